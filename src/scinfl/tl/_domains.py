"""Spatial domains: the latent averaged over 1..L hop rings of the per-site graph, clustered."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.mixture import GaussianMixture

from scinfl._checks import check_value
from scinfl._copies import in_memory_copy
from scinfl._threads import keeps_torch_threads

from ._cluster import leiden_carrier
from ._results import check_entries_free, result_tool

if TYPE_CHECKING:
    from scinfl.model import INFL

#: ``.uns`` keys scanpy and squidpy read (``"spatial"``: Visium images and scale factors)
_RESERVED = ("spatial", "neighbors", "umap", "pca", "leiden", "louvain")


def _check_key_added(adata: AnnData, key_added: str, use_rep: str) -> None:
    """Refuse a ``key_added`` whose ``.obsm`` / ``.uns`` entries hold another tool's results."""
    if use_rep == f"X_{key_added}":
        raise ValueError(
            f"key_added={key_added!r} writes the domain features to adata.obsm[{use_rep!r}], "
            "where the latent is (scinfl.tl.embed's); pick another key_added."
        )
    if key_added in _RESERVED:
        raise ValueError(
            f"key_added={key_added!r} is where scanpy / squidpy keep their own results "
            f"(.uns[{key_added!r}]); pick another key_added."
        )
    held = adata.uns.get(key_added)
    ours = result_tool(held) == "scinfl.tl.domains"
    if held is not None and not ours:
        raise ValueError(
            f"adata.uns[{key_added!r}] holds results that are not spatial domains (e.g. a "
            f"neighbour graph of scinfl.tl.cluster); pick another key_added."
        )
    if f"X_{key_added}" in adata.obsm and not ours:
        raise ValueError(
            f"adata.obsm['X_{key_added}'] holds another tool's result (e.g. a UMAP); pick "
            "another key_added."
        )


def _ring_means(graph: sp.spmatrix, latent: np.ndarray, n_layers: int) -> list[np.ndarray]:
    """Mean latent over the spots exactly ``l`` hops away, for ``l = 1..n_layers``.

    A spot with no spot at some distance (an isolated spot, a small section) takes its own
    latent for that ring.
    """
    adjacency = sp.csr_matrix(graph, dtype=bool)
    step = (adjacency + adjacency.T + sp.identity(graph.shape[0], dtype=bool, format="csr")).astype(
        np.float32
    )
    reached = sp.identity(graph.shape[0], dtype=np.float32, format="csr")
    means = []
    for _ in range(n_layers):
        wider = sp.csr_matrix((reached @ step) > 0, dtype=np.float32)
        ring = wider - reached
        ring.eliminate_zeros()
        size = np.asarray(ring.sum(axis=1)).ravel()
        mean = sp.diags(1.0 / np.maximum(size, 1.0)) @ (ring @ latent)
        mean[size == 0] = latent[size == 0]
        means.append(np.asarray(mean))
        reached = wider
    return means


def _check_domain_settings(
    adata: AnnData, n_layers: int, method: str, n_domains: int, resolution: float
) -> None:
    """Refuse settings :func:`domains` cannot work with, naming the fitting values."""
    check_value("n_layers", n_layers, int, "an integer >= 0", lambda v: v >= 0)
    if method not in ("gmm", "leiden"):
        raise ValueError(f"`method` must be 'gmm' or 'leiden'; got {method!r}.")
    if method == "leiden":
        check_value("resolution", resolution, float, "a number > 0", lambda v: v > 0)
        return
    check_value("n_domains", n_domains, int, "an integer >= 1", lambda v: v >= 1)
    if not 1 <= n_domains <= adata.n_obs:
        raise ValueError(
            f"n_domains={n_domains} with {adata.n_obs} spots: a mixture needs between 1 domain "
            "and as many domains as spots."
        )


def _leiden_domains(
    adata: AnnData, features: np.ndarray, key_added: str, resolution: float, random_state: int
) -> tuple[pd.Categorical, tuple]:
    """Leiden domains of ``features`` (named D0, D1, ..., largest first) and their graph.

    Computed on an AnnData of the features alone, so that ``adata`` is written only once
    everything has worked (scanpy writes as it goes).
    """
    graph = f"{key_added}_features"
    carrier = leiden_carrier(
        adata.obs_names, features, f"X_{key_added}", graph, key_added, resolution, random_state
    )
    # igraph's Leiden numbers communities in no particular order: named here by size, ties
    # in the order found
    found = carrier.obs[key_added]
    sizes = found.value_counts(sort=False)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes.iloc[i], i))
    names = {sizes.index[i]: f"D{rank}" for rank, i in enumerate(order)}
    labels = pd.Categorical(found.map(names), categories=[f"D{rank}" for rank in range(len(order))])
    params = carrier.uns[graph]
    connectivities = carrier.obsp[f"{graph}_connectivities"]
    return labels, (connectivities, carrier.obsp[f"{graph}_distances"], params)


def _write_feature_graph(adata: AnnData, graph: str, found: tuple | None) -> None:
    """Write the features' neighbour graph, or remove an earlier one that no longer matches."""
    if found is None:
        adata.uns.pop(graph, None)
        for kind in ("connectivities", "distances"):
            adata.obsp.pop(f"{graph}_{kind}", None)
        return
    connectivities, distances, params = found
    adata.obsp[f"{graph}_connectivities"] = connectivities
    adata.obsp[f"{graph}_distances"] = distances
    adata.uns[graph] = params


@keeps_torch_threads
def domains(
    adata: AnnData,
    model: INFL | None = None,
    n_layers: int = 3,
    n_domains: int = 5,
    method: Literal["gmm", "leiden"] = "gmm",
    use_rep: str = "X_scinfl",
    neighbors_key: str = "spatial",
    resolution: float = 1.0,
    random_state: int = 0,
    key_added: str = "scinfl_domain",
    copy: bool = False,
) -> AnnData | None:
    """Spatial domains from the latent space and the per-site spatial graph (CellCharter-style).

    Each spot's latent is put next to the mean latent of the spots 1, 2, ... ``n_layers`` hops
    away on the spatial graph (each ring exactly ``l`` hops away, as CellCharter does), and the
    concatenated features are clustered. The graph of :func:`scinfl.pp.spatial_neighbors`
    joins no two sites, so no aggregate mixes sites: each site could compute its own features.

    Parameters
    ----------
    adata
        AnnData with the spatial graph (:func:`scinfl.pp.spatial_neighbors`).
    model
        A trained :class:`~scinfl.model.INFL` with its key set, whose latent is used; ``None``
        to use ``adata.obsm[use_rep]`` instead (e.g. :func:`scinfl.tl.embed`'s, or a PCA).
    n_layers
        Hops aggregated; ``0`` clusters the latent alone (no spatial context).
    n_domains
        Number of domains (components of the Gaussian mixture; unused by ``"leiden"``, whose
        ``resolution`` sets how many it finds).
    method
        ``"gmm"`` (:class:`sklearn.mixture.GaussianMixture`, full covariances) or ``"leiden"``
        (:func:`scanpy.tl.leiden` at ``resolution`` on a 15-neighbour graph of the features,
        written as ``.uns[f"{key_added}_features"]`` and its ``.obsp`` matrices).
    use_rep
        ``.obsm`` key of the latent when ``model`` is ``None``.
    neighbors_key
        Name of the spatial graph: ``.obsp[f"{neighbors_key}_connectivities"]``.
    resolution
        Leiden resolution (``method="leiden"``).
    random_state
        Seed of the clustering.
    key_added
        ``.obs`` column of the domains; also the ``.uns`` key of the parameters.
    copy
        Return a copy of ``adata`` holding the results instead of writing into ``adata``.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData. Sets

    ``.obs[key_added]``
        Domain of each spot (categorical: ``D0``, ``D1``, ... for either method).
    ``.obsm[f"X_{key_added}"]``
        The clustered features (spots x latent dimensions * (n_layers + 1)).
    ``.uns[key_added]["params"]``
        The parameters of the call.

    Raises
    ------
    ValueError
        If the spatial graph (with ``n_layers > 0``) or the latent is missing, ``n_layers`` or
        ``n_domains`` is not a fitting integer, ``method`` is unknown, or ``key_added`` would
        overwrite the latent (``use_rep`` is ``f"X_{key_added}"``) or another tool's
        ``.uns[key_added]``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_spatial(n_sections=2, n_side=8, n_vars=20)
    >>> scinfl.pp.spatial_neighbors(adata, coord_type="grid", n_neighs=4)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_latent=4)
    >>> _ = model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    >>> scinfl.tl.domains(adata, model, n_layers=2, n_domains=4)
    >>> adata.obs["scinfl_domain"].nunique(), adata.obsm["X_scinfl_domain"].shape
    (4, (128, 12))
    """
    _check_domain_settings(adata, n_layers, method, n_domains, resolution)
    graph_key = f"{neighbors_key}_connectivities"
    if n_layers > 0 and graph_key not in adata.obsp:
        raise ValueError(
            f"adata.obsp[{graph_key!r}] not found; run scinfl.pp.spatial_neighbors(adata) first."
        )
    _check_key_added(adata, key_added, use_rep)
    entries = [("obs", key_added), ("uns", key_added), ("obsm", f"X_{key_added}")]
    check_entries_free(adata, entries, "scinfl.tl.domains")
    if model is not None:
        latent = np.asarray(model.get_latent(adata), dtype=np.float64)
    elif use_rep in adata.obsm:
        latent = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    else:
        raise ValueError(
            f"adata.obsm[{use_rep!r}] not found; pass the model or run scinfl.tl.embed first."
        )
    parts = [latent]
    if n_layers > 0:
        parts += _ring_means(adata.obsp[graph_key], latent, n_layers)
    features = np.concatenate(parts, axis=1)
    # computed before anything is written: a failing fit leaves the AnnData as it was
    if method == "gmm":
        mixture = GaussianMixture(n_components=n_domains, random_state=random_state)
        labels = pd.Categorical.from_codes(
            mixture.fit_predict(features), categories=[f"D{k}" for k in range(n_domains)]
        )
        graph = None
    else:
        labels, graph = _leiden_domains(adata, features, key_added, resolution, random_state)
    if copy:
        adata = in_memory_copy(adata)
    adata.obsm[f"X_{key_added}"] = features
    adata.obs[key_added] = labels
    _write_feature_graph(adata, f"{key_added}_features", graph)
    adata.uns[key_added] = {
        "params": {
            "n_layers": n_layers,
            "n_domains": n_domains if method == "gmm" else None,
            "method": method,
            "use_rep": None if model is not None else use_rep,
            "neighbors_key": neighbors_key,
            "resolution": resolution,
            "random_state": random_state,
        }
    }
    return adata if copy else None
