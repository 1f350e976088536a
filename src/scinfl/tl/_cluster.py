"""Leiden clustering (and a UMAP) on the scinfl latent space, via scanpy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from mudata import MuData

from scinfl._checks import check_not_empty, check_obs_column_free, check_value
from scinfl._copies import in_memory_copy
from scinfl._threads import keeps_torch_threads

from ._results import check_entries_free, result_tool


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
    _check_cluster_arguments(adata, use_rep, key_added, neighbors_key, resolution)
    check_value("n_neighbors", n_neighbors, int, "an integer >= 2", lambda v: v >= 2)
    if random_state is not None:
        check_value("random_state", random_state, int, "an integer (or None)")
    tool = "scinfl.tl.cluster"
    check_obs_column_free(adata, key_added, lambda entry: result_tool(entry) == tool, tool)
    entries = [("obs", key_added), ("uns", key_added), ("uns", neighbors_key)]
    if umap:
        entries.append(("obsm", f"X_umap_{neighbors_key}"))
    check_entries_free(adata, entries, tool)
    check_not_empty(adata.n_obs)
    carrier = leiden_carrier(
        adata.obs_names,
        adata.obsm[use_rep],
        use_rep,
        neighbors_key,
        key_added,
        resolution,
        random_state,
        n_neighbors,
    )
    params = {
        "use_rep": use_rep,
        "n_neighbors": n_neighbors,
        "resolution": resolution,
        "random_state": random_state,
        "n_iterations": LEIDEN_ITERATIONS,
        "neighbors_key": neighbors_key,
    }
    obsm = {}
    if umap:
        params["umap_key"] = f"X_umap_{neighbors_key}"
        sc.tl.umap(carrier, neighbors_key=neighbors_key, random_state=random_state)
        obsm[params["umap_key"]] = carrier.obsm["X_umap"]
    if copy:
        adata = in_memory_copy(adata)
    adata.obs[key_added] = carrier.obs[key_added].array
    for name in (f"{neighbors_key}_distances", f"{neighbors_key}_connectivities"):
        adata.obsp[name] = carrier.obsp[name]
    adata.obsm.update(obsm)
    adata.uns[neighbors_key] = carrier.uns[neighbors_key]
    adata.uns[key_added] = {"params": params}
    return adata if copy else None


#: iterations of scinfl's Leiden clusterings (scanpy's igraph flavour)
LEIDEN_ITERATIONS = 2


def leiden_carrier(
    obs_names: pd.Index,
    representation,
    use_rep: str,
    neighbors_key: str,
    key_added: str,
    resolution: float,
    random_state: int | None,
    n_neighbors: int = 15,
) -> ad.AnnData:
    """Neighbour graph and Leiden clusters of ``representation``, on an AnnData of it alone.

    The callers copy the results into the user's AnnData once everything has worked: an error
    or an interrupt part-way leaves it as it was (scanpy writes as it goes).

    Returns
    -------
    The carrier: ``.obs[key_added]``, the graph under ``neighbors_key`` (``.uns``, ``.obsp``).

    Examples
    --------
    >>> import numpy as np
    >>> rep = np.repeat(np.eye(2), 20, axis=0) + np.random.default_rng(0).normal(0, 0.01, (40, 2))
    >>> carrier = leiden_carrier(pd.Index([f"c{i}" for i in range(40)]), rep, "X", "g", "c", 0.5, 0)
    >>> carrier.obs["c"].nunique(), "g_connectivities" in carrier.obsp
    (2, True)
    """
    carrier = ad.AnnData(obs=pd.DataFrame(index=obs_names.copy()), obsm={use_rep: representation})
    sc.pp.neighbors(
        carrier,
        use_rep=use_rep,
        n_neighbors=n_neighbors,
        key_added=neighbors_key,
        random_state=random_state,
    )
    sc.tl.leiden(
        carrier,
        resolution=resolution,
        key_added=key_added,
        neighbors_key=neighbors_key,
        flavor="igraph",
        n_iterations=LEIDEN_ITERATIONS,
        directed=False,
        random_state=random_state,
    )
    return carrier


def _check_cluster_arguments(
    adata: AnnData, use_rep: str, key_added: str, neighbors_key: str, resolution: float
) -> None:
    """Refuse an embedding :func:`cluster` cannot use and names that would collide."""
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
