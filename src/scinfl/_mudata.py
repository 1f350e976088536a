"""MuData built from modalities whose sample columns the caller sets itself."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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
    with mudata_options(pull_on_update=False):
        return md.MuData(dict(modalities))


@contextmanager
def mudata_options(**options) -> Iterator[None]:
    """``mudata.set_options(**options)`` as a context, leaving the root logger unconfigured.

    mudata's option context logs through the module-level ``logging.info``, which configures
    the root logger (``logging.basicConfig``) when it has no handler, so that a notebook's own
    ``basicConfig`` afterwards does nothing: a handler that prints nothing stands there
    meanwhile.

    Examples
    --------
    >>> before = list(logging.getLogger().handlers)
    >>> with mudata_options(pull_on_update=False):
    ...     pass
    >>> logging.getLogger().handlers == before
    True
    """
    root = logging.getLogger()
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        with md.set_options(**options):
            yield
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)
