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
        ``.obsm`` key of the 2-D coordinates (``f"X_umap_{neighbors_key}"`` of
        :func:`scinfl.tl.cluster`).
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
    >>> import matplotlib.pyplot as plt
    >>> import numpy as np
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20)
    >>> adata.obsm["X_scinfl"] = np.log1p(adata.X.toarray())  # or scinfl.tl.embed(adata, model)
    >>> scinfl.tl.cluster(adata, n_neighbors=5)
    >>> fig = scinfl.pl.umap(adata, color=["scinfl_leiden", "label"])  # save="umap.png" writes it
    >>> len(fig.axes)
    2
    >>> plt.close(fig)
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
