"""Leiden clustering (and a UMAP) on the scinfl latent space, via scanpy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
from anndata import AnnData
from mudata import MuData

from scinfl._checks import check_not_empty
from scinfl._copies import in_memory_copy
from scinfl._threads import keeps_torch_threads


@keeps_torch_threads
def cluster(
    adata: AnnData | MuData,
    use_rep: str = "X_scinfl",
    resolution: float = 1.0,
    n_neighbors: int = 15,
    key_added: str = "scinfl_leiden",
    neighbors_key: str = "scinfl",
    umap: bool = True,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Neighbour graph, Leiden clusters and UMAP on ``adata.obsm[use_rep]``.

    Parameters
    ----------
    adata
        AnnData or MuData holding the embedding (see :func:`scinfl.tl.embed`); for a MuData
        the results go to its own ``.obs``, ``.obsp``, ``.obsm`` and ``.uns``, where muon
        users look.
    use_rep
        ``.obsm`` key of the embedding.
    resolution
        Leiden resolution.
    n_neighbors
        Neighbours of the kNN graph.
    key_added
        ``.obs`` column for the clusters, and ``.uns`` key of the parameters.
    neighbors_key
        Name of the kNN graph: :func:`scanpy.pp.neighbors` writes its settings in
        ``.uns[neighbors_key]`` and the graph in ``.obsp[f"{neighbors_key}_distances"]`` and
        ``.obsp[f"{neighbors_key}_connectivities"]``; the UMAP goes to
        ``.obsm[f"X_umap_{neighbors_key}"]``.
    umap
        Also compute a UMAP of the graph (any ``.obsm["X_umap"]`` and ``.uns["umap"]`` of
        your own are left as they were).
    random_state
        Seed of the graph, Leiden and UMAP.
    copy
        Return a copy of ``adata`` holding the results instead of writing into ``adata``.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData (MuData). Sets

    ``.obs[key_added]``
        Cluster of each cell (categorical).
    ``.uns[key_added]["params"]``
        The parameters of the call (with ``umap_key`` when ``umap=True``).
    ``.uns[neighbors_key]``, ``.obsp[f"{neighbors_key}_distances"]``, ``.obsp[f"{neighbors_key}_connectivities"]``
        The kNN graph.
    ``.obsm[f"X_umap_{neighbors_key}"]``
        The UMAP coordinates (with ``umap=True``).

    Examples
    --------
    >>> import numpy as np
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20)
    >>> adata.obsm["X_scinfl"] = np.log1p(adata.X.toarray())  # or scinfl.tl.embed(adata, model)
    >>> scinfl.tl.cluster(adata, n_neighbors=5)
    >>> adata.obs["scinfl_leiden"].dtype.name, adata.obsm["X_umap_scinfl"].shape
    ('category', (60, 2))
    >>> adata.uns["scinfl_leiden"]["params"]["neighbors_key"]
    'scinfl'
    >>> fine = scinfl.tl.cluster(adata, resolution=2.0, key_added="fine", umap=False, copy=True)
    >>> "fine" in fine.obs, "fine" in adata.obs
    (True, False)
    """
    if use_rep not in adata.obsm:
        raise ValueError(
            f"adata.obsm[{use_rep!r}] not found; run scinfl.tl.embed(adata, model) first."
        )
    values = adata.obsm[use_rep]
    values = values.toarray() if hasattr(values, "toarray") else np.asarray(values, dtype=float)
    empty = np.isnan(values).any(axis=1)
    if empty.any():
        raise ValueError(
            f"{int(empty.sum())} rows of adata.obsm[{use_rep!r}] hold NaN (samples without the "
            "modalities their latent was computed from?): cluster the others, e.g. "
            f"scinfl.tl.cluster(adata[~np.isnan(adata.obsm[{use_rep!r}]).any(axis=1)].copy(), "
            f"use_rep={use_rep!r})."
        )
    if key_added == neighbors_key:
        raise ValueError(
            f"key_added and neighbors_key are both {key_added!r}: the clusters' parameters "
            "would replace the graph's entry in .uns; give them different names."
        )
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0, got {resolution!r}.")
    if not n_neighbors >= 2:
        raise ValueError(
            f"n_neighbors must be at least 2 (a cell and a neighbour), got {n_neighbors!r}."
        )
    check_not_empty(adata.n_obs)
    if copy:
        adata = in_memory_copy(adata)
    if isinstance(adata, MuData):
        _cluster_mudata(
            adata, use_rep, resolution, n_neighbors, key_added, neighbors_key, umap, random_state
        )
        return adata if copy else None
    sc.pp.neighbors(
        adata,
        use_rep=use_rep,
        n_neighbors=n_neighbors,
        key_added=neighbors_key,
        random_state=random_state,
    )
    n_iterations = 2
    sc.tl.leiden(
        adata,
        resolution=resolution,
        key_added=key_added,
        neighbors_key=neighbors_key,
        flavor="igraph",
        n_iterations=n_iterations,
        directed=False,
        random_state=random_state,
    )
    params = {
        "use_rep": use_rep,
        "n_neighbors": n_neighbors,
        "resolution": resolution,
        "random_state": random_state,
        "n_iterations": n_iterations,
        "neighbors_key": neighbors_key,
    }
    if umap:
        umap_key = f"X_umap_{neighbors_key}"
        # scanpy writes .obsm["X_umap"] and .uns["umap"]: move ours under its own key and put
        # back the user's own
        previous = {"obsm": adata.obsm.get("X_umap"), "uns": adata.uns.get("umap")}
        sc.tl.umap(adata, neighbors_key=neighbors_key, random_state=random_state)
        adata.obsm[umap_key] = adata.obsm.pop("X_umap")
        del adata.uns["umap"]
        if previous["obsm"] is not None:
            adata.obsm["X_umap"] = previous["obsm"]
        if previous["uns"] is not None:
            adata.uns["umap"] = previous["uns"]
        params["umap_key"] = umap_key
    adata.uns[key_added] = {"params": params}
    return adata if copy else None


def _cluster_mudata(mdata: MuData, use_rep: str, *args) -> None:
    """:func:`cluster` on an AnnData that holds the MuData's embedding; results copied back."""
    carrier = ad.AnnData(obs=mdata.obs[[]].copy(), obsm={use_rep: mdata.obsm[use_rep]})
    cluster(carrier, use_rep, *args)
    for column in carrier.obs:
        mdata.obs[column] = carrier.obs[column].to_numpy()
        mdata.obs[column] = mdata.obs[column].astype(carrier.obs[column].dtype)
    for key, value in carrier.obsp.items():
        mdata.obsp[key] = value
    for key, value in carrier.obsm.items():
        if key != use_rep:
            mdata.obsm[key] = value
    mdata.uns.update(carrier.uns)
