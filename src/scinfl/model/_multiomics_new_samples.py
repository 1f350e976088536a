"""New samples for a multi-omics model: modalities matched by name, features and samples too."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pandas as pd
from anndata import AnnData
from mudata import MuData

from scinfl._mudata import mudata_of
from scinfl.model.base._new_samples import features_by_name
from scinfl.pp._modalities import _absent, _pad, check_in_memory

logger = logging.getLogger(__name__)


def aligned_new_mudata(
    mdata: MuData,
    features: Mapping[str, Sequence[str]],
    layers: Mapping[str, str | None],
    likelihoods: Mapping[str, str],
) -> MuData:
    """A MuData the model reads like its own: its modalities, features and samples, by name.

    - Samples are paired across modalities by ``obs_names`` (never by position); a sample a
      modality lacks gets a row of ``NaN`` there (the modality counts as absent for it).
    - Each modality's features are put in the model's order; extra ones are dropped; missing
      ones are ``NaN`` for continuous modalities and an error for counts.
    - A modality the model has and ``mdata`` lacks is added with every sample absent.

    Parameters
    ----------
    mdata
        The new samples.
    features
        The model's features of each modality, in its order.
    layers
        The layer each modality's values are read from (``None``: ``.X``).
    likelihoods
        The likelihood of each modality.

    Returns
    -------
    A new MuData (``mdata`` is not modified).

    Examples
    --------
    >>> import numpy as np, anndata, mudata
    >>> rna = anndata.AnnData(np.ones((2, 2)), obs=dict(obs_names=["a", "b"]))
    >>> rna.var_names = ["g1", "g0"]
    >>> new = aligned_new_mudata(
    ...     mudata.MuData({"rna": rna}),
    ...     {"rna": ["g0", "g1"], "prot": ["p0"]},
    ...     {},
    ...     {"rna": "nb", "prot": "nb"},
    ... )
    >>> list(new.mod["rna"].var_names), bool(np.isnan(new.mod["prot"].X).all())
    (['g0', 'g1'], True)
    """
    check_in_memory(mdata)
    samples = _samples(mdata, features)
    modalities = {}
    for name, names in features.items():
        names = pd.Index(names)
        layer = layers.get(name)
        if name in mdata.mod:
            mod = _with_features(mdata.mod[name], names, layer, likelihoods[name], name)
            modalities[name] = _pad(mod, samples)
        else:
            logger.info("The new data lack modality %r: every sample counts as without it.", name)
            modalities[name] = _absent(samples, names, layer)
    out = mudata_of(modalities)
    out.obs = mdata.obs.reindex(out.obs_names)
    return out


def _samples(mdata: MuData, features: Mapping) -> pd.Index:
    """Every sample of the modalities the model reads, in ``mdata``'s order where it has them."""
    names = [mdata.mod[name].obs_names for name in features if name in mdata.mod]
    if not names:
        raise ValueError(
            f"The new MuData holds none of the model's modalities {list(features)} (it has "
            f"{list(mdata.mod)})."
        )
    for name in features:
        if name in mdata.mod and not mdata.mod[name].obs_names.is_unique:
            raise ValueError(
                f"mdata.mod[{name!r}].obs_names are not unique: samples are paired across "
                "modalities by name, so make them unique first."
            )
    union = names[0].append(names[1:]).unique() if len(names) > 1 else names[0]
    unread = mdata.obs_names[~mdata.obs_names.isin(union)]
    if len(unread):
        # results are written into mdata by sample: these would have no row to take
        others = [name for name in mdata.mod if name not in features]
        raise ValueError(
            f"{len(unread)} samples of the new MuData (e.g. {list(unread[:5])}) are in none of "
            f"the model's modalities {list(features)} (only in {others}): the model has nothing "
            "to read for them. Subset the MuData to the samples it can read, e.g. "
            f"mdata[mdata.obs_names.isin(mdata.mod[{list(features)[0]!r}].obs_names)]."
        )
    ordered = mdata.obs_names[mdata.obs_names.isin(union)].unique()
    return ordered.append(union[~union.isin(ordered)])


def _with_features(
    mod: AnnData, names: pd.Index, layer: str | None, likelihood: str, modality: str
) -> AnnData:
    """``mod`` with exactly the features ``names`` in that order (values in ``layer``)."""
    if layer is not None and layer not in mod.layers:
        raise ValueError(
            f"The model reads mdata.mod[{modality!r}].layers[{layer!r}], which the new data lack "
            f"(layers: {list(mod.layers)})."
        )
    if mod.var_names.equals(names):
        return mod
    if not mod.var_names.is_unique:
        raise ValueError(
            f"mdata.mod[{modality!r}].var_names are not unique: features are matched by name, "
            "so call var_names_make_unique() on it first."
        )
    return features_by_name(mod, names, likelihood, f"Modality {modality!r} of the new data")
