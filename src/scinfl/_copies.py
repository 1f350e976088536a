"""Copies of AnnData objects as users hold them, backed on disk included."""

from __future__ import annotations

import logging

from anndata import AnnData

logger = logging.getLogger(__name__)


def in_memory_copy(adata: AnnData) -> AnnData:
    """A copy of ``adata`` in memory, also when it is backed on disk (or a view of such).

    ``AnnData.copy`` of a backed object needs a file to copy to; the copies scinfl makes
    (aligned new samples, ``copy=True`` results) are meant to live in memory.

    Examples
    --------
    >>> import numpy as np
    >>> adata = AnnData(np.ones((2, 3)))
    >>> copied = in_memory_copy(adata)
    >>> copied is adata, copied.shape
    (False, (2, 3))
    """
    if adata.isbacked:
        logger.info("The AnnData is backed on disk: its copy is read into memory.")
        return adata.to_memory()
    return adata.copy()
