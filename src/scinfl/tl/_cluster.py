"""Leiden clustering (and a UMAP) on the scinfl latent space, via scanpy."""

from __future__ import annotations

import scanpy as sc
from anndata import AnnData

UNS_KEY = "scinfl"


def cluster(
    adata: AnnData,
    use_rep: str = "X_scinfl",
    resolution: float = 1.0,
    n_neighbors: int = 15,
    key_added: str = "scinfl_leiden",
    umap: bool = True,
    random_state: int = 0,
) -> AnnData:
    """Neighbour graph, Leiden clusters and UMAP on ``adata.obsm[use_rep]``.

    Writes ``adata.obs[key_added]``, the graph under ``adata.obsp["scinfl_*"]``, the UMAP in
    ``adata.obsm["X_umap_scinfl"]`` and the parameters in ``adata.uns["scinfl"]``.

    Parameters
    ----------
    adata
        AnnData holding the embedding (see :func:`scinfl.tl.embed`).
    use_rep
        ``.obsm`` key of the embedding.
    resolution
        Leiden resolution.
    n_neighbors
        Neighbours of the kNN graph.
    key_added
        ``.obs`` column for the clusters.
    umap
        Also compute a UMAP.
    random_state
        Seed of Leiden and UMAP.

    Returns
    -------
    ``adata`` (modified in place).

    Examples
    --------
    >>> scinfl.tl.cluster(adata)  # doctest: +SKIP
    >>> adata.obs["scinfl_leiden"].nunique()  # doctest: +SKIP
    9
    """
    if use_rep not in adata.obsm:
        raise ValueError(
            f"adata.obsm[{use_rep!r}] not found; run scinfl.tl.embed(adata, model) first."
        )
    sc.pp.neighbors(
        adata,
        use_rep=use_rep,
        n_neighbors=n_neighbors,
        key_added=UNS_KEY,
        random_state=random_state,
    )
    sc.tl.leiden(
        adata,
        resolution=resolution,
        key_added=key_added,
        neighbors_key=UNS_KEY,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=random_state,
    )
    params = {
        "use_rep": use_rep,
        "n_neighbors": n_neighbors,
        "resolution": resolution,
        "leiden_key": key_added,
        "random_state": random_state,
    }
    if umap:
        umap_key = f"X_umap_{UNS_KEY}"
        # scanpy writes X_umap; keep the user's own UMAP intact by moving ours under its own key
        previous = adata.obsm.get("X_umap")
        sc.tl.umap(adata, neighbors_key=UNS_KEY, random_state=random_state)
        adata.obsm[umap_key] = adata.obsm.pop("X_umap")
        if previous is not None:
            adata.obsm["X_umap"] = previous
        params["umap_key"] = umap_key
    adata.uns.setdefault(UNS_KEY, {})
    adata.uns[UNS_KEY]["cluster"] = params
    return adata
