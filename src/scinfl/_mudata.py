"""MuData built from modalities whose sample columns the caller sets itself."""

from __future__ import annotations

from collections.abc import Mapping

import mudata as md
from anndata import AnnData


def mudata_of(modalities: Mapping[str, AnnData]) -> md.MuData:
    """``MuData(modalities)`` without pulling the modalities' ``.obs`` columns into ``.obs``.

    Every caller sets ``.obs`` itself right after; mudata 0.3 warns (a FutureWarning, once per
    object built) that pulling on construction stops in 0.4, and its new behaviour is what
    these callers need.

    Examples
    --------
    >>> import numpy as np
    >>> from anndata import AnnData
    >>> mdata = mudata_of({"rna": AnnData(np.ones((2, 3)))})
    >>> mdata.n_obs, list(mdata.mod)
    (2, ['rna'])
    """
    with md.set_options(pull_on_update=False):
        return md.MuData(dict(modalities))
