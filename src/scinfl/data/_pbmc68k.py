"""10x PBMC (scanpy's ``pbmc68k_reduced``) with raw counts recovered and simulated sites."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scipy import sparse

from scinfl.federated import partition


def _counts_from_lognorm(lognorm: sparse.csr_matrix) -> sparse.csr_matrix:
    """Invert ``log1p(normalize_total(counts))`` per cell.

    After ``expm1`` each cell's values are its counts times one size factor; the smallest
    non-zero value of a cell is one count, so dividing by it and rounding recovers integers.
    """
    norm = sparse.csr_matrix(lognorm, dtype=np.float64, copy=True)
    norm.data = np.expm1(norm.data)
    smallest = (
        np.minimum.reduceat(norm.data, norm.indptr[:-1]) if norm.nnz else np.ones(norm.shape[0])
    )
    norm = sparse.diags(1.0 / smallest) @ norm
    norm.data = np.round(norm.data)
    return sparse.csr_matrix(norm, dtype=np.float32)


def pbmc68k(n_sites: int = 3, site_method: str = "iid", seed: int = 0) -> AnnData:
    """700 PBMCs x 765 genes with 10 ``bulk_labels``, counts in ``.layers["counts"]``.

    Ships with scanpy (``scanpy.datasets.pbmc68k_reduced``), so nothing is downloaded. Its
    ``.raw`` holds log-normalised values for the 765 genes; raw counts are recovered from them
    per cell (see ``_counts_from_lognorm``) into ``.layers["counts"]`` and ``.X``. Sites are
    simulated in ``.obs["site"]`` with :func:`scinfl.federated.partition`.

    Parameters
    ----------
    n_sites
        Number of simulated sites.
    site_method
        ``"iid"`` or ``"dirichlet"`` (label-skewed over ``bulk_labels``).
    seed
        Seed of the site assignment.

    Returns
    -------
    AnnData with ``.obs["bulk_labels"]`` and ``.obs["site"]``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.pbmc68k()
    >>> adata.layers["counts"].shape
    (700, 765)
    """
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    counts = _counts_from_lognorm(sparse.csr_matrix(reduced.raw.X))
    adata = AnnData(
        X=counts.copy(),
        obs=reduced.obs[["bulk_labels", "n_genes", "percent_mito", "phase"]].copy(),
        var=reduced.raw.var[[]].copy(),
    )
    adata.layers["counts"] = counts
    adata.uns["scinfl_source"] = {
        "dataset": "scanpy.datasets.pbmc68k_reduced",
        "counts": "recovered",
    }
    partition(
        adata,
        n_sites=n_sites,
        method=site_method,
        label_key="bulk_labels" if site_method == "dirichlet" else None,
        seed=seed,
    )
    return adata
