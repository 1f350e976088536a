"""New samples as users bring them: no site column, features in another order or more of them."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from scinfl._checks import check_not_empty
from scinfl._copies import in_memory_copy
from scinfl._logging import quiet
from scinfl.model._validation import rows_without_values, validate_matrix
from scinfl.module import feature_moments
from scinfl.pp._features import align_features

from ._federated import registered_features_changed

logger = logging.getLogger(__name__)

#: Setup arguments of ``.obs`` columns that only training needs (new samples may lack them),
#: with their registry keys.
_TRAINING_ONLY = {"labels_key": REGISTRY_KEYS.LABELS_KEY}


def check_input_columns(obs: pd.DataFrame, manager, what: str = "The new data") -> None:
    """Refuse new samples lacking an ``.obs`` column the model reads, or holding new categories.

    A batch (``batch_key``) or a categorical covariate (e.g. a perturbation model's condition)
    is an input of the encoder or decoder: each category has its own trained parameters, so a
    category the model never saw has none to use.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=5, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", batch_key="site")
    >>> model = scinfl.model.INFL(adata, key_mode=None)
    >>> check_input_columns(adata.obs.drop(columns="site"), model.adata_manager)
    Traceback (most recent call last):
    ...
    ValueError: The new data lack adata.obs['site'], which the model reads as an input ...
    """
    for column, known in _input_columns(manager).items():
        if column not in obs:
            raise ValueError(
                f"{what} lack adata.obs[{column!r}], which the model reads as an input (a batch "
                f"or covariate it was set up with); add it, with one of the categories it "
                f"knows: {list(known)[:10]}."
            )
        values = obs[column]
        if values.isna().any():
            raise ValueError(
                f"adata.obs[{column!r}] of {what.lower()} has {int(values.isna().sum())} "
                f"missing values; the model reads it as an input: fill them with one of "
                f"{list(known)[:10]}, or leave those cells out."
            )
        new = values[~values.isin(known)]
        if len(new):
            raise ValueError(
                f"adata.obs[{column!r}] of {what.lower()} holds categories the model was not "
                f"trained on ({sorted(map(str, pd.unique(new)))[:10]}); it reads this column as "
                f"an input and has parameters only for {list(known)[:10]}. Map them to one of "
                "these, or leave those cells out."
            )


def _input_columns(manager) -> dict[str, np.ndarray]:
    """The ``.obs`` columns a model reads as inputs, with the categories it was trained on."""
    setup = manager.registry["setup_args"]
    registries = manager.registry["field_registries"]
    columns = {}
    if setup.get("batch_key") is not None and REGISTRY_KEYS.BATCH_KEY in registries:
        state = manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY)
        columns[setup["batch_key"]] = np.asarray(state.categorical_mapping)
    if REGISTRY_KEYS.CAT_COVS_KEY in registries:
        state = manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY)
        for column, mapping in state.get("mappings", {}).items():
            columns[column] = np.asarray(mapping)
    return columns


def check_feature_names(adata: AnnData, names: pd.Index, what: str) -> None:
    """Refuse duplicate feature names and data that share no feature with the model."""
    if not adata.var_names.is_unique:
        duplicated = adata.var_names[adata.var_names.duplicated()].unique()
        raise ValueError(
            f"{what} name several features alike (e.g. {list(duplicated[:5])}); features are "
            "matched to the model's by name: make them unique (adata.var_names_make_unique()) "
            "or aggregate them."
        )
    shared = int(names.isin(adata.var_names.astype(str)).sum())
    if shared == 0:
        raise ValueError(
            f"{what} share none of the model's {len(names)} features (model: "
            f"{list(names[:3])}, data: {list(adata.var_names[:3])}). Are the features named "
            "the same way (e.g. gene symbols, not accessions), and is the matrix samples x "
            "features (not transposed)?"
        )
    if shared < len(names) / 2:
        logger.warning(
            "%s hold only %d of the model's %d features (matched by name); the others are "
            "treated as missing, which leaves the model little to go on.",
            what,
            shared,
            len(names),
        )


class NewSamplesMixin:
    """Accept new samples (inference on an AnnData the model was not set up with).

    - The site column is never needed: it partitions training and is no input.
    - Labels are not needed for inference: a missing labels column is filled with the first
      category on the model's own copy (predictions do not depend on it).
    - Features are matched by name: a superset or a reordering of the model's features is
      aligned (with an info line). Features the data lack are an error for count likelihoods;
      for ``gene_likelihood="normal"`` they become missing values (NaN), which the model masks.

    The user's AnnData is never modified: an aligned copy is made when one is needed.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=10, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> _ = model.train_federated(max_rounds=1, progress_bar=False)
    >>> new = adata[:5, ::-1].copy()
    >>> del new.obs["site"], new.obs["label"]
    >>> model.get_latent(new).shape
    (5, 10)
    """

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        if adata is None and self.adata_manager is not None:
            # the registered data whose features changed in place are read as new samples
            if registered_features_changed(self.adata_manager, self.adata):
                adata = self.adata
        if adata is not None:
            check_not_empty(adata.n_obs)
        if isinstance(adata, AnnData) and self.adata_manager is not None:
            # scvi-tools' own lookup (get_anndata_manager) already transfers the setup, which
            # fails on other features: look up this model's managers by the AnnData's id here
            uuid = adata.uns.get("_scvi_uuid")
            managers = self._per_instance_manager_store.get(self.id, {})
            manager = managers.get(uuid) if uuid else None
            # a copy or view of the training data carries its scvi-tools id, but not its rows:
            # treat anything that is not the registered object itself as new samples, and so
            # the registered object whose features changed in place since setup (by name)
            changed = manager is not None and registered_features_changed(manager, adata)
            if manager is None or manager.adata is not adata or changed:
                adata = self._aligned_new_samples(adata)
                # scvi-tools announces the transfer of the setup, expected here, and warns of
                # categories with few rows, a concern for training, not for inference
                with warnings.catch_warnings(), quiet("scvi.model.base._base_model"):
                    warnings.filterwarnings("ignore", message=".*has fewer than 3 cells")
                    return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _aligned_new_samples(self, adata: AnnData) -> AnnData:
        """A copy of ``adata`` with the model's features and the columns inference reads."""
        state = self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY)
        names = pd.Index(np.asarray(state.get("column_names", [])).astype(str))
        setup = self.adata_manager.registry["setup_args"]
        layer = setup.get("layer")
        if layer is not None and layer not in adata.layers:
            raise ValueError(
                f"The model reads adata.layers[{layer!r}], which the new data lack (layers: "
                f"{list(adata.layers)}); add it, e.g. adata.layers[{layer!r}] = adata.X if .X "
                "holds the same kind of values."
            )
        likelihood = getattr(self.module, "gene_likelihood", None)
        shared_by_name = int(names.isin(adata.var_names.astype(str)).sum())
        if len(names) == 0 or adata.var_names.astype(str).equals(names):
            adata = in_memory_copy(adata)
        else:
            check_feature_names(adata, names, "The new data")
            adata = features_by_name(adata, names, likelihood)
        check_input_columns(adata.obs, self.adata_manager)
        if likelihood is not None:
            where = "the new data's " + ("X" if layer is None else f"layers[{layer!r}]")
            matrix = adata.X if layer is None else adata.layers[layer]
            validate_matrix(
                matrix,
                likelihood,
                where,
                "Give the new samples the kind of values the model was trained on (raw counts).",
            )
            empty = rows_without_values(matrix) if likelihood == "normal" else 0
            if empty:
                logger.warning(
                    "%d new samples have no value for any of the model's features (all NaN once "
                    "matched by name): their latent and predictions are the model's guess "
                    "without data. Check that they quantify the model's features.",
                    empty,
                )
            elif likelihood == "normal" and hasattr(self.module, "feature_loc"):
                module = self.module
                warn_of_unlike_samples(
                    matrix,
                    module.feature_loc,
                    module.feature_scale,
                    module.feature_observed,
                    shared_by_name,
                )
        for key in ("_scvi_uuid", "_scvi_manager_uuid"):
            adata.uns.pop(key, None)
        for arg, registry_key in _TRAINING_ONLY.items():
            column = setup.get(arg)
            if column is None:
                continue
            mapping = self.adata_manager.get_state_registry(registry_key).categorical_mapping
            if column in adata.obs and adata.obs[column].isin(mapping).all():
                continue
            if column in adata.obs:
                # inference does not read labels: the model's own copy gets placeholders
                logger.info(
                    "adata.obs[%r] holds labels the model was not trained on; inference does "
                    "not read them (the copy the model reads gets placeholders).",
                    column,
                )
            adata.obs[column] = pd.Categorical([mapping[0]] * adata.n_obs, categories=mapping)
        return adata


#: new samples whose median feature lies this many training standard deviations from its
#: training location (plus the noise of a mean over few samples) are far from the training
#: data; a batch of one class moves few features
SHIFT_WARNING = 1.0
#: ... or whose median feature spreads this many times wider than in training (narrower is
#: what a batch of one class does, the training spread holding the gaps between classes)
SPREAD_WARNING = 2.0
#: features absent from every new sample, or a spread, are told apart from chance from this
#: many samples on (one sample of data with half its values missing lacks half the features)
FEW_SAMPLES = 10


def warn_of_unlike_samples(
    matrix,
    loc: torch.Tensor,
    scale: torch.Tensor,
    observed: torch.Tensor,
    shared_by_name: int,
    what: str = "The new samples",
) -> None:
    """Warn of new continuous samples unlike the training data: few values, shifted, rescaled.

    ``loc``, ``scale`` and ``observed`` are the model's feature standardisation (its
    ``feature_loc``, ``feature_scale`` and ``feature_observed``); ``shared_by_name`` the number
    of the model's features the data named.

    - Half or more of the model's features hold no value in any of the new samples (absent by
      name is warned of before; all-NaN columns, as :func:`scinfl.pp.align_features` writes
      them, are the same thing), from :data:`FEW_SAMPLES` samples on.
    - The median feature's mean lies :data:`SHIFT_WARNING` or more training standard
      deviations (more for fewer samples) from its training location, or it spreads
      :data:`SPREAD_WARNING` times as wide as the training scale or more (from
      :data:`FEW_SAMPLES` samples on): another instrument, normalisation or logarithm. The
      model standardises with the training sites' location and scale and reads such samples as
      extreme ones: predictions may all fall into one class.
    """
    count, total, squares = feature_moments(matrix)
    n_samples, n_features = matrix.shape[0], len(count)
    held = count > 0
    enough = n_samples >= FEW_SAMPLES
    if enough and shared_by_name >= n_features / 2 and held.sum() <= n_features / 2:
        logger.warning(
            "%s (%d) hold values for %d of the model's %d features (the others are missing in "
            "every one), which leaves the model little to go on.",
            what,
            n_samples,
            int(held.sum()),
            n_features,
        )
    scale = scale.detach().cpu().numpy().astype(np.float64)
    loc = loc.detach().cpu().numpy().astype(np.float64)
    usable = held & observed.detach().cpu().numpy()
    if not usable.any():
        return
    mean = total[usable] / count[usable]
    shift = np.median(np.abs(mean - loc[usable]) / scale[usable])
    spread = None
    several = usable & (count > 2)
    if enough and several.any():
        variance = squares[several] / count[several] - (total[several] / count[several]) ** 2
        variance *= count[several] / (count[several] - 1)  # unbiased
        spread = np.median(np.sqrt(np.maximum(variance, 0.0)) / scale[several])
    rescaled = spread is not None and spread >= SPREAD_WARNING
    if shift >= SHIFT_WARNING * (1 + 1 / np.sqrt(n_samples)) or rescaled:
        logger.warning(
            "%s lie far from the training data: the median feature is %.1f "
            "training standard deviations from its training location%s (another instrument, "
            "normalisation or logarithm?). The model standardises with the training sites' "
            "location and scale, so it reads them as extreme samples: its latent and "
            "predictions may mean little (e.g. all one class). Normalise them as the training "
            "sites did.",
            what,
            shift,
            "" if spread is None else f" and spreads {spread:.1f} times as wide",
        )


def features_by_name(
    adata: AnnData,
    names: pd.Index,
    likelihood: str | None,
    what: str = "The new data",
) -> AnnData:
    """A copy of ``adata`` with exactly the features ``names``, in that order, matched by name.

    Extra features are dropped. Missing ones are an error for a count likelihood (it cannot
    treat them as missing) and become ``NaN`` (missing values) for ``"normal"``, in ``.X``
    and every layer (:func:`scinfl.pp.align_features`).

    Examples
    --------
    >>> import numpy as np, anndata, pandas as pd
    >>> adata = anndata.AnnData(np.ones((2, 2)), var=pd.DataFrame(index=["b", "a"]))
    >>> new = features_by_name(adata, pd.Index(["a", "c"]), "normal")
    >>> list(new.var_names), bool(np.isnan(new.X[:, 1]).all())
    (['a', 'c'], True)
    """
    # by name as strings (the model keeps them so; var_names may be numbers)
    missing = names[~names.isin(adata.var_names.astype(str))]
    if len(missing) and likelihood != "normal":
        raise ValueError(
            f"{what} lack {len(missing)} of the model's {len(names)} features "
            f"(e.g. {list(missing[:5])}); a count likelihood cannot treat them as missing. "
            "Give the data every feature the model was trained on (matched by var_names)."
        )
    logger.info(
        "Aligned the %d features of %s to the model's %d by name.",
        adata.n_vars,
        what.lower(),
        len(names),
    )
    return align_features(adata, names)
