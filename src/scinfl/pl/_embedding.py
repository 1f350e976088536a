"""Plots of the scinfl latent space."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import scanpy as sc
from anndata import AnnData


def umap(
    adata: AnnData,
    color: str | Sequence[str] = "scinfl_leiden",
    basis: str = "X_umap_scinfl",
    show: bool = False,
    save: str | None = None,
    **kwargs,
):
    """UMAP of the scinfl latent space coloured by ``.obs`` columns (after :func:`scinfl.tl.cluster`).

    Parameters
    ----------
    adata
        AnnData with ``.obsm[basis]``.
    color
        Column(s) to colour by.
    basis
        ``.obsm`` key of the 2-D coordinates.
    show
        Show the figure.
    save
        Write the figure to this path (png, pdf, ...).
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> scinfl.pl.umap(adata, color=["scinfl_leiden", "bulk_labels"], save="umap.png")  # doctest: +SKIP
    """
    if basis not in adata.obsm:
        raise ValueError(f"adata.obsm[{basis!r}] not found; run scinfl.tl.cluster(adata) first.")
    colors = [color] if isinstance(color, str) else list(color)
    sc.pl.embedding(adata, basis=basis, color=colors, show=False, **kwargs)
    fig = plt.gcf()
    if save is not None:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show:
        plt.show()
    return fig
