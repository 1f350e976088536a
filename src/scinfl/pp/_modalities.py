"""A mosaic MuData as a multi-modal model reads it: every modality holds every sample."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scipy import sparse

from scinfl._mudata import mudata_of

logger = logging.getLogger(__name__)


def check_in_memory(mdata: MuData) -> None:
    """Refuse a MuData backed on disk, which scvi-tools' MuData fields cannot read.

    Parameters
    ----------
    mdata
        The MuData.

    Raises
    ------
    ValueError
        When ``mdata`` is backed, naming the fix.

    Examples
    --------
    >>> import numpy as np, anndata, mudata
    >>> check_in_memory(mudata.MuData({"rna": anndata.AnnData(np.ones((2, 1)))}))
    """
    if getattr(mdata, "isbacked", False):
        raise ValueError(
            "The MuData is backed (read with backed=True): load it into memory first, "
            "mudata.read_h5mu(path)."
        )


def check_shared_samples(mdata: MuData, modalities: Sequence[str], features: bool = True) -> None:
    """Refuse modalities that share no sample name (the same samples named differently).

    Parameters
    ----------
    mdata
        The MuData.
    modalities
        Names of the modalities to check.
    features
        Also refuse a modality without features, or whose features repeat a name (a model
        matches them by name; padding does not read them).

    Examples
    --------
    >>> import numpy as np, anndata, mudata
    >>> a = anndata.AnnData(np.ones((2, 1)), obs={"i": [0, 1]}); a.obs_names = ["s1", "s2"]
    >>> b = a.copy(); b.obs_names = ["p1", "p2"]
    >>> check_shared_samples(mudata.MuData({"rna": a, "prot": b}), ["rna", "prot"])
    Traceback (most recent call last):
    ...
    ValueError: The modalities ['rna', 'prot'] share no sample name ...
    """
    missing = [name for name in modalities if name not in mdata.mod]
    if missing:
        raise ValueError(f"MuData has no modality {missing}; its modalities are {list(mdata.mod)}.")
    check_in_memory(mdata)
    for name in modalities:
        _check_modality_names(mdata.mod[name], name, features)
    if len(modalities) < 2:
        return
    names = [set(mdata.mod[name].obs_names) for name in modalities]
    if not any(a & b for i, a in enumerate(names) for b in names[i + 1 :]):
        examples = {name: list(mdata.mod[name].obs_names[:2]) for name in modalities}
        raise ValueError(
            f"The modalities {list(modalities)} share no sample name (e.g. {examples}): a "
            "sample must carry the same name in every modality. Rename them (e.g. "
            "mdata.mod['prot'].obs_names = ...) and build the MuData again."
        )


def _check_modality_names(mod, name: str, features: bool) -> None:
    """Refuse a modality whose samples repeat a name; or without features, or repeating one."""
    if features and mod.n_vars == 0:
        raise ValueError(f"mdata.mod[{name!r}] has no features: drop the modality or fill it.")
    checks = [("obs", "samples are paired across modalities", "obs_names_make_unique")]
    if features:
        checks.append(("var", "features are matched to the model's", "var_names_make_unique"))
    for axis, what, fix in checks:
        names = getattr(mod, f"{axis}_names")
        if not names.is_unique:
            repeated = list(names[names.duplicated()].unique()[:5])
            raise ValueError(
                f"mdata.mod[{name!r}].{axis}_names repeat names (e.g. {repeated}): {what} by "
                f"name, so make them unique (mdata.mod[{name!r}].{fix}()) and build the MuData "
                "again."
            )


def pad_modalities(
    mdata: MuData,
    modalities: Sequence[str] | None = None,
    features: Mapping[str, Sequence[str]] | None = None,
) -> MuData:
    """A MuData whose modalities all hold every sample; absent ones as rows of ``NaN``.

    In a mosaic (a site with proteomics only, another with RNA only) a modality lacks some of
    the MuData's samples. :meth:`scinfl.model.MultiOmicsINFL.setup_mudata`, like scvi-tools'
    MuData fields, reads every modality row by row with the MuData's samples: this gives
    each modality all the samples, in ``mdata.obs_names`` order, the missing ones as rows of
    ``NaN`` (layers too), which the model reads as "modality absent". ``.obs``, ``.obsm`` and
    ``.uns`` of the MuData are kept; so results written into the padded object (e.g.
    ``.obsm["X_scinfl"]``) line up with ``mdata``'s samples.

    Parameters
    ----------
    mdata
        The MuData (samples named alike in every modality).
    modalities
        Modalities to keep (default: all).
    features
        Features of modalities that ``mdata`` lacks altogether, by name (e.g. the federation's
        proteins at a site without proteomics): each is added with every sample absent (rows
        of ``NaN``), so the site sets up the same modalities as the others.

    Returns
    -------
    A new MuData.

    Examples
    --------
    >>> import numpy as np, anndata, mudata
    >>> rna = anndata.AnnData(np.ones((3, 2))); rna.obs_names = ["a", "b", "c"]
    >>> prot = anndata.AnnData(np.ones((2, 1))); prot.obs_names = ["a", "b"]
    >>> padded = pad_modalities(mudata.MuData({"rna": rna, "prot": prot}))
    >>> padded.mod["prot"].n_obs, bool(np.isnan(padded.mod["prot"].X[2]).all())
    (3, True)
    >>> rna_only = pad_modalities(mudata.MuData({"rna": rna}), features={"prot": ["CD3", "CD4"]})
    >>> rna_only.mod["prot"].shape
    (3, 2)
    """
    features = dict(features or {})
    modalities = list(mdata.mod) if modalities is None else list(modalities)
    modalities += [name for name in features if name not in modalities]
    absent = [name for name in modalities if name not in mdata.mod and name in features]
    held = [name for name in modalities if name not in absent]
    check_shared_samples(mdata, held, features=False)
    padded = {
        name: _pad(mdata.mod[name], mdata.obs_names)
        if name in held
        else _absent(mdata.obs_names, features[name])
        for name in modalities
    }
    out = mudata_of(padded)
    out.obs = mdata.obs.loc[out.obs_names].copy()
    for key, value in mdata.obsm.items():
        # the modalities' own entries (which samples each holds) are mudata's to set
        if key not in mdata.mod and not isinstance(value, MuData | AnnData):
            out.obsm[key] = value
    out.uns.update(mdata.uns)
    logger.info(
        "Padded %s to %d samples each (%s rows added).",
        modalities,
        out.n_obs,
        {name: out.n_obs - (mdata.mod[name].n_obs if name in held else 0) for name in modalities},
    )
    return out


def _absent(obs_names, features: Sequence[str], layer: str | None = None) -> AnnData:
    """A modality that no sample of ``obs_names`` holds: rows of ``NaN`` (in ``layer`` too)."""
    obs_names = obs_names[~obs_names.duplicated()]
    values = np.full((len(obs_names), len(features)), np.nan, dtype=np.float32)
    layers = {} if layer is None else {layer: values}
    return AnnData(
        values, obs=pd.DataFrame(index=obs_names), var=pd.DataFrame(index=features), layers=layers
    )


def _pad(adata: AnnData, obs_names) -> AnnData:
    """``adata`` with the rows of ``obs_names`` (in that order), absent ones ``NaN``."""
    obs_names = obs_names[~obs_names.duplicated()]
    position = adata.obs_names.get_indexer(obs_names)
    present = position >= 0
    matrices = {"X": adata.X, **{name: adata.layers[name] for name in adata.layers}}
    padded = {name: _pad_matrix(m, position, present) for name, m in matrices.items()}
    # nullable dtypes keep numbered columns numbered (a plain reindex makes them float)
    nullable = {
        column: "Int64" if pd.api.types.is_integer_dtype(dtype) else "boolean"
        for column, dtype in adata.obs.dtypes.items()
        if pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
    }
    obs = adata.obs.astype(nullable).reindex(obs_names)
    # per-sample arrays follow their samples (absent ones NaN); per-feature ones and .uns stay
    obsm = {
        name: _pad_matrix(np.asarray(value, dtype=np.float32), position, present)
        for name, value in adata.obsm.items()
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind in "fiub"
    }
    dropped = sorted(set(adata.obsm) - set(obsm))
    dropped += [slot for slot in ("obsp", "raw") if getattr(adata, slot) not in (None, {})]
    dropped = [slot for slot in dropped if slot != "obsp" or len(adata.obsp)]
    if dropped:
        logger.info("pad_modalities: %s of a modality not carried over (no NaN padding).", dropped)
    padded_mod = AnnData(
        X=padded.pop("X"), obs=obs, var=adata.var.copy(), layers=padded, varm=dict(adata.varm)
    )
    padded_mod.obsm.update(obsm)
    padded_mod.uns.update(adata.uns)
    return padded_mod


def _pad_matrix(matrix, position: np.ndarray, present: np.ndarray):
    n, p = len(position), matrix.shape[1]
    if sparse.issparse(matrix):
        rows = sparse.csr_matrix(matrix, dtype=np.float32)[position[present]]
        fill = sparse.csr_matrix(np.full(((~present).sum(), p), np.nan, dtype=np.float32))
        stacked = sparse.vstack([rows, fill], format="csr")
        order = np.argsort(np.concatenate([np.flatnonzero(present), np.flatnonzero(~present)]))
        return stacked[order]
    out = np.full((n, p), np.nan, dtype=np.float32)
    out[present] = np.asarray(matrix, dtype=np.float32)[position[present]]
    return out
