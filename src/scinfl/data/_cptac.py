"""Loader for the CPTAC uterine corpus endometrial carcinoma (UCEC) cohort.

The data are read from the files shipped inside the ``cptac`` 0.4.x wheel
(folder ``cptac/data_endometrial``). The ``cptac`` package itself is never
imported (its dependencies are broken on current Python stacks); its files are
located through :mod:`importlib.metadata` / :mod:`importlib.util` only, so
nothing is downloaded at run time.
"""

from __future__ import annotations

import io
import logging
import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd

from scinfl._mudata import mudata_options

from ._package_data import installed_data_dir, installed_version

logger = logging.getLogger(__name__)

_PACKAGE = "cptac"
_PACKAGE_VERSION = "0.4.3"
_DATA_DIR = "data_endometrial"
_CLINICAL_FILE = "clinical.txt"

#: omics name -> file inside ``data_endometrial``.
_OMICS_FILES: dict[str, str] = {
    "proteomics": "proteomics.cct.gz",
    "transcriptomics": "transcriptomics_linear.cct.gz",
    "phosphoproteomics": "phosphoproteomics_site.cct.gz",
}

#: Integer-coded clinical columns that are labels (TMT batch / plex), not quantities.
_INTEGER_LABEL_COLUMNS = ("Proteomics_TMT_batch", "Proteomics_TMT_plex")

_INSTALL_HINT = (
    f"Install the data package without its (unneeded) dependencies with "
    f"`uv pip install --no-deps {_PACKAGE}=={_PACKAGE_VERSION}` (only cptac 0.4.1-0.4.3 ship "
    f"the endometrial data; pip >= 24.1 rejects the wheel's metadata, so use uv or an older "
    f"pip), or pass `path=` pointing to a folder that contains {_CLINICAL_FILE!r} and the "
    f"omics files ({', '.join(repr(f) for f in _OMICS_FILES.values())})."
)


def _validate_omics(omics: str | Sequence[str]) -> list[str]:
    """Return ``omics`` as a list of validated, unique names."""
    allowed = tuple(_OMICS_FILES)
    names = [omics] if isinstance(omics, str) else list(omics)
    if not names:
        raise ValueError(f"`omics` must name at least one of {allowed}; got an empty sequence.")
    bad = [name for name in names if not isinstance(name, str) or name not in _OMICS_FILES]
    if bad:
        raise ValueError(f"Unknown omics {bad!r}; allowed values are {allowed}.")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"`omics` lists {duplicated!r} more than once.")
    return names


def _validate_min_present(min_present: float | None) -> float | None:
    """Check that ``min_present`` is ``None`` or a real number in (0, 1]."""
    if min_present is None:
        return None
    if isinstance(min_present, bool) or not isinstance(min_present, numbers.Real):
        raise ValueError(
            f"`min_present` must be None or a float in (0, 1]; got {min_present!r} "
            f"of type {type(min_present).__name__}."
        )
    value = float(min_present)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"`min_present` must be in (0, 1]; got {min_present!r}.")
    return value


def _installed_data_dir() -> Path | None:
    """Locate ``cptac/data_endometrial`` in the environment without importing ``cptac``."""
    return installed_data_dir(_PACKAGE, _DATA_DIR, [_CLINICAL_FILE])


def _resolve_data_dir(path: str | Path | None, omics: Sequence[str]) -> Path:
    """Find the folder holding the clinical and requested omics files."""
    if path is None:
        data_dir = _installed_data_dir()
        if data_dir is None:
            version = installed_version(_PACKAGE)
            found = (
                f"cptac {version} is installed but has no {_DATA_DIR!r} folder"
                if version is not None
                else "the `cptac` package is not installed"
            )
            raise FileNotFoundError(f"CPTAC UCEC data not found: {found}. {_INSTALL_HINT}")
    else:
        data_dir = Path(path).expanduser()
        if (data_dir / _DATA_DIR / _CLINICAL_FILE).is_file():
            # Also accept the cptac package folder itself.
            data_dir = data_dir / _DATA_DIR
    needed = [_CLINICAL_FILE, *(_OMICS_FILES[name] for name in omics)]
    missing = [name for name in needed if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CPTAC UCEC data files {missing} not found in {str(data_dir)!r}. {_INSTALL_HINT}"
        )
    return data_dir


def _read_clinical(file: Path) -> pd.DataFrame:
    """Read the clinical table (samples x annotations) with categorical label columns."""
    raw = file.read_bytes()
    try:
        # The file is Windows-1252 (e.g. byte 0x96 is an en dash); latin-1 never fails.
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    clinical = pd.read_csv(io.StringIO(text), sep="\t", index_col=0)
    clinical.index = clinical.index.astype(str)
    clinical.index.name = None
    for column in clinical.columns:
        if clinical[column].dtype == object or column in _INTEGER_LABEL_COLUMNS:
            clinical[column] = clinical[column].astype("category")
    return clinical


def _read_omics(
    data_dir: Path,
    name: str,
    clinical: pd.DataFrame,
    min_present: float | None,
    source: dict[str, str],
) -> ad.AnnData:
    """Read one ``features x samples`` table into a ``samples x features`` AnnData."""
    file = data_dir / _OMICS_FILES[name]
    logger.info("Reading CPTAC UCEC %s from %s", name, file)
    table = pd.read_csv(file, sep="\t", index_col=0)
    features = table.index.astype(str)
    samples = table.columns.astype(str)
    x = np.ascontiguousarray(table.to_numpy(dtype=np.float32).T)

    unknown = samples.difference(clinical.index)
    if len(unknown):
        logger.warning("%d %s samples have no clinical annotation.", len(unknown), name)
    obs = clinical.reindex(samples)

    var = pd.DataFrame({"gene": features}, index=features)
    if name == "phosphoproteomics":
        parts = features.str.rsplit("-", n=1, expand=True)
        var["gene"] = parts.get_level_values(0)
        var["site"] = parts.get_level_values(1) if parts.nlevels > 1 else ""
    var.index.name = None

    adata = ad.AnnData(X=x, obs=obs, var=var)
    if not adata.var_names.is_unique:
        n_dup = int(adata.var_names.duplicated().sum())
        logger.info("Making %d duplicated %s feature names unique.", n_dup, name)
        adata.var_names_make_unique()

    if min_present is not None:
        present = np.mean(~np.isnan(adata.X), axis=0)
        keep = present >= min_present
        logger.info(
            "min_present=%s keeps %d of %d %s features.",
            min_present,
            int(keep.sum()),
            adata.n_vars,
            name,
        )
        adata = adata[:, keep].copy()

    adata.uns["scinfl_source"] = {**source, "omics": name, "file": _OMICS_FILES[name]}
    return adata


def cptac_ucec(
    omics: str | Sequence[str] = ("proteomics",),
    path: str | Path | None = None,
    min_present: float | None = None,
) -> ad.AnnData | md.MuData:
    """Load the CPTAC endometrial carcinoma (UCEC) discovery cohort.

    Reads the tables shipped in the ``cptac`` 0.4.x wheel (folder
    ``cptac/data_endometrial``; cptac data version 2.1 of the cohort published
    by Dou et al., *Cell* 2020).
    The ``cptac`` package is located on disk but never imported, and nothing
    is downloaded.

    Each omics table becomes a ``samples x features`` :class:`~anndata.AnnData`
    with ``float32`` values; missing values stay ``NaN`` (never imputed):

    - ``"proteomics"`` (``proteomics.cct.gz``): log2 TMT ratios, 153 samples x
      10,999 proteins (gene symbols), about 11% missing.
    - ``"transcriptomics"`` (``transcriptomics_linear.cct.gz``): log2-scale RNA
      abundance, 115 samples x 28,057 genes, no missing values.
    - ``"phosphoproteomics"`` (``phosphoproteomics_site.cct.gz``): log2 TMT
      ratios per phosphosite (``"GENE-S123"``), 153 samples x 73,212 sites,
      about 59% missing.

    ``.obs`` holds all 178 clinical/derived columns of ``clinical.txt`` under
    their original names (e.g. ``Proteomics_Tumor_Normal``, ``Genomics_subtype``,
    ``Histologic_type``, ``Proteomics_TMT_plex``, ``Country``). Text columns and
    the integer TMT batch/plex labels are pandas categoricals. All samples are
    kept, including the 9 tumours flagged ``Case_excluded == "Yes"`` that the
    ``cptac`` package API drops; filter on that column if needed.

    ``.var`` has a ``gene`` column (and ``site`` for phosphosites). Feature
    names are made unique with :meth:`anndata.AnnData.var_names_make_unique`:
    the first occurrence keeps its name and later duplicates get ``-1``,
    ``-2``, ... suffixes (the shipped 0.4.3 tables contain no duplicates).
    Names are unique within a modality; the same gene symbol may appear in
    several modalities of a :class:`~mudata.MuData`.

    Parameters
    ----------
    omics
        One name or a sequence of names among ``"proteomics"``,
        ``"transcriptomics"`` and ``"phosphoproteomics"``.
    path
        Folder containing ``clinical.txt`` and the omics files (or the
        ``cptac`` package folder containing ``data_endometrial``). By default
        the installed ``cptac`` distribution is used.
    min_present
        Optional fraction in ``(0, 1]``. If given, keep only features observed
        (non-``NaN``) in at least this fraction of the samples of their own
        modality. Values are never filled in.

    Returns
    -------
    AnnData or MuData
        An :class:`~anndata.AnnData` for a single omics; for several, a
        :class:`~mudata.MuData` with one modality per omics (named as in
        ``omics``). Samples are matched by CPTAC sample id (``"S001"`` ...);
        a sample without data for a modality is absent from that modality.
        The global ``.obs`` holds the clinical table for all samples.
        ``.uns["scinfl_source"]`` names the source package, version and files.

    Raises
    ------
    ValueError
        If ``omics`` or ``min_present`` is invalid.
    FileNotFoundError
        If the data files cannot be found; the message says what to install.

    Examples
    --------
    >>> from scinfl.data import cptac_ucec
    >>> adata = cptac_ucec()  # doctest: +SKIP
    >>> adata.obs["Proteomics_Tumor_Normal"].value_counts()  # doctest: +SKIP
    >>> mdata = cptac_ucec(["proteomics", "transcriptomics"], min_present=0.5)  # doctest: +SKIP
    >>> mdata.mod["transcriptomics"].n_obs  # doctest: +SKIP
    115
    """
    names = _validate_omics(omics)
    min_present = _validate_min_present(min_present)
    data_dir = _resolve_data_dir(path, names)

    source = {
        "package": _PACKAGE,
        "version": installed_version(_PACKAGE) or "unknown",
        "dataset": "CPTAC UCEC (endometrial) discovery cohort, cptac data version 2.1",
        "path": str(data_dir),
        "clinical_file": _CLINICAL_FILE,
    }
    clinical = _read_clinical(data_dir / _CLINICAL_FILE)
    modalities = {
        name: _read_omics(data_dir, name, clinical, min_present, source) for name in names
    }
    if len(modalities) == 1:
        return modalities[names[0]]

    with mudata_options(pull_on_update=False), warnings.catch_warnings():
        # The same gene symbol can be a feature of several modalities; names are
        # unique within each modality, which is what MuData needs.
        warnings.filterwarnings("ignore", message="var_names are not unique")
        mdata = md.MuData(modalities)
    mdata.obs = clinical.reindex(mdata.obs_names)
    mdata.uns["scinfl_source"] = {
        **source,
        "omics": names,
        "files": [_OMICS_FILES[name] for name in names],
    }
    return mdata
