"""Spatial neighbour graphs built per site and per section (squidpy), never across sites."""

from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import QhullError

from scinfl._checks import check_not_empty, check_value

logger = logging.getLogger(__name__)

#: the coordinate types squidpy builds graphs of
_COORD_TYPES = ("generic", "grid")
_INSTALL_HINT = (
    "squidpy is needed for spatial graphs: install it with `pip install scinfl[spatial]`."
)


def _squidpy():
    """Import squidpy, or say what to install."""
    try:
        return importlib.import_module("squidpy")
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error


@contextmanager
def _quiet(logger: logging.Logger):
    """Hide a logger's info lines (squidpy logs one per graph it builds, here one per section)."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _groups(adata: AnnData, site_key: str | None, library_key: str | None) -> pd.Series:
    """The block of each spot (its site, or its (site, section) pair) as a readable label.

    Blocks are told apart by the pair, never by joined names: site ``"H"`` with section
    ``"X/1"`` and site ``"H/X"`` with section ``"1"`` are two blocks. Also checks that each
    section lies in one site.
    """
    check_not_empty(adata.n_obs, "spots")
    for key, what in ((site_key, "site"), (library_key, "section")):
        if key is not None and key not in adata.obs:
            raise KeyError(f"adata.obs[{key!r}] (the {what} of each spot) not found.")
        n_missing = 0 if key is None else int(adata.obs[key].isna().sum())
        if n_missing:
            # as strings they would all be "nan": one group joining spots of different blocks
            raise ValueError(
                f"adata.obs[{key!r}] has {n_missing} missing values (no {what}); fill them or "
                "drop those spots before building the graph."
            )
    if site_key is None:
        sites = pd.Series("all", index=adata.obs_names)
    else:
        sites = adata.obs[site_key].astype(str)
    if library_key is None:
        return sites
    libraries = adata.obs[library_key].astype(str)
    n_sites = (
        pd.DataFrame({"site": sites, "library": libraries}).groupby("library")["site"].nunique()
    )
    split = sorted(n_sites.index[n_sites > 1])
    if split:
        raise ValueError(
            f"Sections {split} of adata.obs[{library_key!r}] lie in more than one site of "
            f"adata.obs[{site_key!r}]; a section belongs to one site (name sections per site)."
        )
    pairs = pd.MultiIndex.from_arrays([sites, libraries])
    codes, uniques = pd.factorize(pairs)
    labels = np.array([f"{site} | {library}" for site, library in uniques], dtype=object)
    if len(set(labels)) < len(labels):  # names that only a pair tells apart: number them
        labels = np.array([f"{label} (block {i})" for i, label in enumerate(labels)], dtype=object)
    return pd.Series(labels[codes], index=adata.obs_names)


def _warn_stacked_sections(coords: np.ndarray, groups: pd.Series) -> None:
    """Warn when spots of one block share coordinates: sections stacked without ``library_key``."""
    frame = pd.DataFrame(coords).assign(block=groups.to_numpy())
    stacked = frame.duplicated()
    if stacked.any():
        blocks = sorted(set(frame.loc[stacked, "block"]))
        logger.warning(
            "%d spots share their coordinates with another spot of the same block %s: several "
            "sections over one coordinate system? Pass library_key= (the .obs column naming "
            "each spot's section), or the graph joins spots of different sections.",
            int(stacked.sum()),
            blocks,
        )


def _coord_type(adata: AnnData, coord_type: str | None) -> str:
    """``coord_type``, or squidpy's choice for ``None``: a grid where ``.uns["spatial"]`` is."""
    if coord_type is None:
        return "grid" if "spatial" in adata.uns else "generic"
    if coord_type not in _COORD_TYPES:
        raise ValueError(
            f"`coord_type` must be one of {list(_COORD_TYPES)} or None; got {coord_type!r}."
        )
    return coord_type


def _builder(coord_type: str, n_neighs: int, radius, delaunay: bool) -> tuple[str, dict]:
    """Squidpy's builder and its arguments for one (site, section), as squidpy chooses them."""
    if coord_type == "grid":
        if delaunay or radius is not None:
            raise ValueError(
                "radius= and delaunay= build graphs of generic coordinates; a grid (Visium, ST) "
                "takes n_neighs= only. Pass coord_type='generic' for them."
            )
        return "spatial_neighbors_grid", {"n_neighs": n_neighs}
    if radius is not None:
        try:
            bounds = np.atleast_1d(np.asarray(radius, dtype=float))
        except (TypeError, ValueError):
            bounds = np.array([np.nan])
        if bounds.size not in (1, 2) or not np.isfinite(bounds).all() or (bounds < 0).any():
            raise ValueError(
                f"radius must be a non-negative distance or a (min, max) pair; got {radius!r}."
            )
        if bounds.size == 2 and bounds[0] > bounds[1]:
            raise ValueError(f"radius=(min, max) needs min <= max; got {radius!r}.")
        if not delaunay and bounds.max() <= 0:
            raise ValueError("radius must be positive: a radius of 0 joins no spots.")
        # plain floats: squidpy reads a tuple as (min, max) and numpy scalars as neither
        radius = float(bounds[0]) if bounds.size == 1 else (float(bounds[0]), float(bounds[1]))
    if delaunay:
        # squidpy prunes the triangulation to a (min, max) radius; a single radius would be
        # ignored there, so it is read as the pair (0, radius)
        if radius is not None and np.ndim(radius) == 0:
            radius = (0.0, float(radius))
        return "spatial_neighbors_delaunay", {"radius": radius}
    if radius is not None:
        return "spatial_neighbors_radius", {"radius": radius}
    return "spatial_neighbors_knn", {"n_neighs": n_neighs}


def _check_block_sizes(sizes: pd.Series, builder: str, n_neighs: int, n_dims: int) -> None:
    """Refuse sections too small for the graph asked (a radius graph takes any size)."""
    if builder in ("spatial_neighbors_knn", "spatial_neighbors_grid"):
        small = sorted(sizes.index[sizes <= n_neighs])
        if small:
            raise ValueError(
                f"Sections {small} have no more spots ({sizes[small].min()} or fewer) than the "
                f"n_neighs={n_neighs} neighbours asked; ask fewer neighbours or drop them."
            )
    if builder == "spatial_neighbors_delaunay":
        small = sorted(sizes.index[sizes <= n_dims])
        if small:
            raise ValueError(
                f"Sections {small} have {n_dims} spots or fewer: too few for a Delaunay "
                "triangulation. Use radius= or n_neighs= without delaunay, or drop them."
            )


def spatial_neighbors(
    adata: AnnData,
    site_key: str | None = "site",
    library_key: str | None = None,
    spatial_key: str = "spatial",
    coord_type: str | None = None,
    n_neighs: int = 6,
    radius: float | tuple[float, float] | None = None,
    delaunay: bool = False,
    key_added: str = "spatial",
    copy: bool = False,
) -> AnnData | None:
    """Spatial neighbour graph of each site and section (squidpy's ``gr.spatial_neighbors_*``).

    The graph of each (site, section) is computed on its own spots and the blocks are put
    together, so no edge joins two sites or two sections: what is aggregated over the graph
    (:func:`scinfl.tl.domains`) stays within a site, as federated data do.

    Parameters
    ----------
    adata
        AnnData with spot coordinates in ``.obsm[spatial_key]`` (spots x 2, or spots x 3 for
        ``coord_type="generic"``).
    site_key
        ``.obs`` column naming the site of each spot; ``None`` for data of one site (e.g. new
        sections to give domains to).
    library_key
        ``.obs`` column naming the section (library) of each spot, or ``None`` when each site
        holds one section. A section must lie in one site. Spots of one site at identical
        coordinates without it get a warning (stacked sections would be joined).
    spatial_key
        ``.obsm`` key of the coordinates.
    coord_type
        ``"generic"`` (the ``n_neighs`` nearest spots, :func:`squidpy.gr.spatial_neighbors_knn`)
        or ``"grid"`` (a regular array such as ST or Visium: neighbours at the grid spacing
        only, :func:`squidpy.gr.spatial_neighbors_grid`), as squidpy's ``coord_type``; ``None``
        chooses as squidpy does: ``"grid"`` when ``adata.uns["spatial"]`` exists (Visium data
        read by scanpy or squidpy), ``"generic"`` otherwise.
    n_neighs
        Neighbours per spot (``coord_type="grid"``, and ``"generic"`` without ``radius`` or
        ``delaunay``).
    radius
        ``coord_type="generic"`` only, as squidpy's ``radius``: a distance joins every pair of
        spots at most that far apart (:func:`squidpy.gr.spatial_neighbors_radius`, in the units of the
        coordinates; ``n_neighs`` is then not read); a ``(min, max)`` pair keeps the edges
        whose length lies in it. With ``delaunay=True`` it prunes the triangulation's edges
        (a single distance is read as ``(0, radius)``).
    delaunay
        ``coord_type="generic"`` only: join the spots of each section by their Delaunay
        triangulation (:func:`squidpy.gr.spatial_neighbors_delaunay`), which suits
        irregularly placed cells (imaging-based data such as MERFISH or Xenium).
    key_added
        Name of the graph: ``.obsp[f"{key_added}_connectivities"]``,
        ``.obsp[f"{key_added}_distances"]`` and ``.uns[f"{key_added}_neighbors"]``, where
        squidpy writes them.
    copy
        Return a copy of ``adata`` holding the graph instead of writing into ``adata``.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData. Sets

    ``.obsp[f"{key_added}_connectivities"]``, ``.obsp[f"{key_added}_distances"]``
        Spots x spots CSR matrices, block-diagonal over (site, section).
    ``.uns[f"{key_added}_neighbors"]``
        The keys of both matrices and ``params`` (squidpy's, with ``site_key`` and
        ``library_key``).

    Raises
    ------
    KeyError
        If the coordinates, the site column or the section column are missing.
    ValueError
        If the coordinates are not spots x 2 (x 3) finite numbers, a section has no more spots than
        ``n_neighs`` (too few, or on one line, for a triangulation with ``delaunay``), a
        section lies in more than one site, ``coord_type`` is unknown, or ``radius`` or
        ``delaunay`` are asked of a grid.
    ImportError
        If squidpy is not installed (the message says what to install).

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_spatial(n_sections=2, n_side=8, n_vars=20)
    >>> scinfl.pp.spatial_neighbors(adata, site_key="site", coord_type="grid", n_neighs=4)
    >>> graph = adata.obsp["spatial_connectivities"]
    >>> graph.shape, int(graph.sum(axis=1).max())
    ((128, 128), 4)
    >>> sites = adata.obs["site"].cat.codes.to_numpy()
    >>> rows, cols = graph.nonzero()
    >>> bool((sites[rows] == sites[cols]).all())
    True

    Irregularly placed cells (imaging-based data), joined by triangulation:

    >>> scinfl.pp.spatial_neighbors(adata, coord_type="generic", delaunay=True)
    >>> adata.uns["spatial_neighbors"]["params"]["delaunay"]
    True
    """
    if spatial_key not in adata.obsm:
        raise KeyError(f"adata.obsm[{spatial_key!r}] (spot coordinates) not found.")
    asked, coord_type = coord_type, _coord_type(adata, coord_type)
    coords = np.asarray(adata.obsm[spatial_key])
    dims = (2, 3) if coord_type == "generic" else (2,)
    if coords.ndim != 2 or coords.shape[1] not in dims:
        chosen = " (chosen because adata.uns['spatial'] exists)" if asked is None else ""
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must be spots x {' or '.join(map(str, dims))} "
            f"coordinates for coord_type={coord_type!r}{chosen}; got shape {coords.shape}."
        )
    if not np.issubdtype(coords.dtype, np.number) or not np.isfinite(coords).all():
        raise ValueError(f"adata.obsm[{spatial_key!r}] must hold finite numbers.")
    check_value("delaunay", delaunay, bool, "True or False")
    builder, settings = _builder(coord_type, n_neighs, radius, delaunay)
    groups = _groups(adata, site_key, library_key)
    _warn_stacked_sections(coords, groups)
    sizes = groups.value_counts()
    _check_block_sizes(sizes, builder, n_neighs, coords.shape[1])
    build = getattr(_squidpy().gr, builder)
    if copy:
        adata = adata.copy()

    n_obs = adata.n_obs
    blocks = {"connectivities": [], "distances": []}
    order = []
    params = None
    for name in sizes.index.sort_values():
        rows = np.flatnonzero((groups == name).to_numpy())
        part = AnnData(obs=pd.DataFrame(index=adata.obs_names[rows]))
        part.obsm["spatial"] = coords[rows].astype(np.float64)
        with _quiet(logging.getLogger("spatialdata._logging")):
            _build_block(build, part, settings, name)
        params = part.uns["spatial_neighbors"]["params"]
        for kind in blocks:
            blocks[kind].append(sp.csr_matrix(part.obsp[f"spatial_{kind}"]))
        order.append(rows)

    # the blocks in block order, then moved back to the spots' own order
    order = np.concatenate(order)
    back = np.empty(n_obs, dtype=np.int64)
    back[order] = np.arange(n_obs)
    for kind, parts in blocks.items():
        graph = sp.block_diag(parts, format="csr")[back][:, back]
        graph.sort_indices()
        adata.obsp[f"{key_added}_{kind}"] = graph.tocsr()
    alone = int((np.diff(adata.obsp[f"{key_added}_connectivities"].indptr) == 0).sum())
    if alone:
        logger.warning(
            "%d of %d spots have no neighbour in the graph (a radius below the spacing of "
            "the spots, or spots off the grid?); domains aggregate nothing for them.",
            alone,
            n_obs,
        )
    adata.uns[f"{key_added}_neighbors"] = {
        "connectivities_key": f"{key_added}_connectivities",
        "distances_key": f"{key_added}_distances",
        # a tuple (squidpy's radius interval) cannot be written to h5ad or zarr: a list can
        "params": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dict(params).items()},
            "delaunay": builder == "spatial_neighbors_delaunay",
            "site_key": site_key,
            "library_key": library_key,
            "spatial_key": spatial_key,
        },
    }
    return adata if copy else None


def _build_block(build, part: AnnData, settings: dict, name: str) -> None:
    """Build one section's graph; a triangulation of spots on one line names the section."""
    try:
        build(part, spatial_key="spatial", **settings)
    except QhullError as error:
        raise ValueError(
            f"Section {name!r}: its spots lie on one line (or plane), so they have no Delaunay "
            "triangulation. Use radius= or n_neighs= without delaunay for it."
        ) from error
