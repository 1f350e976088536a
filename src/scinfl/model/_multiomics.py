"""MultiOmicsINFL: a keyed multi-modal VAE trained across sites that may lack modalities."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import MuDataCategoricalObsField, MuDataLayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scinfl._checks import check_not_empty
from scinfl.key import Key
from scinfl.module import MultiModalKeyedVAE, observed_rows
from scinfl.pp._modalities import check_shared_samples

from ._infl import INFL
from ._multiomics_new_samples import aligned_new_mudata
from ._validation import (
    apply_agreed_categories,
    check_not_a_view,
    validate_matrix,
    validate_obs_column,
)
from .base import FederatedTrainingMixin, KeyedModelMixin
from .base._federated import features_changed
from .base._keyed import LOADING_SAVED_MODEL
from .base._new_samples import check_input_columns, warn_of_unlike_samples

logger = logging.getLogger(__name__)

#: a modality's feature standardisation, as the module names its buffers (``<part>_<name>``)
_FEATURE_SCALE = ("feature_loc", "feature_scale", "feature_observed")


def modality_key(index: int, name: str) -> str:
    """Registry key of a modality: ``"X"`` for the first (as scvi-tools' TOTALVI), ``"X_<name>"``.

    Examples
    --------
    >>> modality_key(0, "rna"), modality_key(1, "prot")
    ('X', 'X_prot')
    """
    return REGISTRY_KEYS.X_KEY if index == 0 else f"X_{name}"


class MultiOmicsINFL(
    KeyedModelMixin,
    FederatedTrainingMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """Federated multi-omics VAE with a secret key: one keyed encoder per modality, one latent.

    Built on :class:`~scinfl.module.MultiModalKeyedVAE`: each modality has its likelihood
    (counts: negative binomial; log intensities and ratios: normal with missing values masked
    out) and its keyed encoder; the modalities a sample holds combine into one latent (a
    product of experts by default). Sites may lack modalities (a mosaic): a site trains the
    shared parts and the modalities it holds, and the server weights each modality's
    parameters by the rows that trained them. Trains with
    :meth:`~scinfl.model.base.FederatedTrainingMixin.train_federated` like
    :class:`~scinfl.model.INFL`.

    Parameters
    ----------
    mdata
        MuData registered with :meth:`setup_mudata`.
    key
        The federation's :class:`~scinfl.Key` (required before training when ``key_mode`` is
        not ``None``).
    key_mode
        ``"pooled"`` (the paper's design) or ``None`` (no key).
    key_strength
        ``lambda`` of the keyed layers.
    likelihoods
        ``"nb"`` or ``"normal"`` by modality. Default: ``"nb"`` for a modality whose observed
        values are all non-negative integers, ``"normal"`` otherwise.
    n_hidden, n_layers, dropout_rate
        Network sizes, as in scvi-tools.
    n_latent
        Latent dimensions. Default: as :meth:`INFL.default_n_latent
        <scinfl.model.INFL.default_n_latent>` gives for the modalities' likelihoods, 30 when
        any modality is continuous, 10 for counts only. On CPTAC proteomics + transcriptomics
        (federated, 10 paired seeds, ``benchmarks/multiomics.py``) 30 dimensions give k-means
        ARI 0.210 against 0.160 with 10 (5-NN 0.652 against 0.648).
    joint
        How the modalities' posteriors combine: ``"poe"`` (product of experts, default) or
        ``"mean"`` (see :class:`~scinfl.module.MultiModalKeyedVAE`).
    alignment_weight
        Weight of the term that keeps each modality's posterior near the others'.
    subset_elbo
        Also train each modality's own posterior to reconstruct every modality of the samples
        that hold several (see :class:`~scinfl.module.MultiModalKeyedVAE`): a sample's latent
        moves less when a modality is missing.

    Examples
    --------
    >>> import scinfl
    >>> mdata = scinfl.data.synthetic_multiome(n_obs=120, n_sites=3, seed=0)
    >>> scinfl.model.MultiOmicsINFL.setup_mudata(mdata, modalities=["rna", "prot"], site_key="site")
    >>> model = scinfl.model.MultiOmicsINFL(mdata, key=scinfl.Key.generate(), n_hidden=16)
    >>> history = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
    >>> model.get_latent().shape
    (120, 10)
    """

    _module_cls = MultiModalKeyedVAE

    def __init__(
        self,
        mdata: MuData,
        key: Key | None = None,
        key_mode: str | None = "pooled",
        key_strength: float = 1.0,
        likelihoods: Mapping[str, str] | None = None,
        n_hidden: int = 128,
        n_latent: int | None = None,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        joint: str = "poe",
        alignment_weight: float = 1.0,
        subset_elbo: bool = True,
    ) -> None:
        super().__init__(mdata)
        names = list(self.adata_manager.registry["setup_args"]["modalities"])
        keys = {name: modality_key(i, name) for i, name in enumerate(names)}
        data = {name: self.adata_manager.get_from_registry(keys[name]) for name in names}
        unknown = sorted(set(likelihoods or {}) - set(names))
        if unknown:
            raise ValueError(
                f"likelihoods= names modalities {unknown} that the model does not have; its "
                f"modalities: {names}."
            )
        chosen = {name: _default_likelihood(data[name]) for name in names}
        chosen.update(likelihoods or {})
        for name in names:
            rows = observed_rows(data[name])
            validate_matrix(
                data[name][rows],
                chosen[name],
                f"modality {name!r}",
                f"Point layers={{{name!r}: ...}} at its raw counts, or pass "
                f"likelihoods={{{name!r}: 'normal'}} for continuous values.",
            )
        if n_latent is None:
            n_latent = max(INFL.default_n_latent(chosen[name]) for name in names)
        if key_mode not in ("pooled", None) and not LOADING_SAVED_MODEL.get():
            # the per-feature modes key a layer reading every feature; each encoder here
            # reads one modality (a model saved with one keyed nothing, and still loads)
            raise ValueError(
                f"key_mode={key_mode!r} keys the layers that read every feature; a multi-omics "
                "model's encoders read one modality each. Use key_mode='pooled' (the default)."
            )
        self.module = self._module_cls(
            modalities={name: data[name].shape[1] for name in names},
            registry_keys=keys,
            likelihoods=chosen,
            n_batch=self.summary_stats.n_batch,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            joint=joint,
            alignment_weight=alignment_weight,
            subset_elbo=subset_elbo,
            key_mode=key_mode,
            key_strength=key_strength,
        )
        self.federated_history_: pd.DataFrame | None = None
        self.dp_epsilon_: float | None = None
        #: each modality's features, in the model's order (saved with the model): new samples
        #: are matched to them by name
        self.modality_features_ = {name: list(mdata.mod[name].var_names) for name in names}
        self._model_summary_string = (
            f"MultiOmicsINFL: modalities={chosen}, joint={joint}, key_mode={key_mode}, "
            f"n_latent={n_latent}, n_hidden={n_hidden}, n_layers={n_layers}"
        )
        # the likelihoods chosen from the values are recorded as if given: a saved model, and
        # a deployed site that lacks a modality's values, build the same architecture
        likelihoods = chosen
        self.init_params_ = self._get_init_params(locals())
        self._init_key(key)

    def _features_changed_since_setup(self) -> str | None:
        """How a modality of the registered MuData changed in place since setup, or ``None``."""
        for name, registered in self._modality_features().items():
            if name not in self.adata.mod:
                return f"modality {name!r} removed"
            changed = features_changed(registered, self.adata.mod[name].var_names)
            if changed:
                return f"modality {name!r}: {changed}"
        return None

    def _modality_features(self) -> dict[str, list]:
        """Each modality's features, in the model's order."""
        return getattr(self, "modality_features_", None) or {
            name: list(self.adata.mod[name].var_names)
            for name in self.adata_manager.registry["setup_args"]["modalities"]
        }

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        if adata is not None:
            check_not_empty(adata.n_obs, "samples", "mdata")
        changed = self._features_changed_since_setup()
        if adata is None and changed:
            # the registered MuData whose modalities changed in place: read as new samples
            adata = self.adata
        if isinstance(adata, MuData) and (adata is not self.adata or changed):
            setup = self.adata_manager.registry["setup_args"]
            new = adata
            adata = aligned_new_mudata(
                adata, self._modality_features(), setup.get("layers") or {}, self.module.likelihoods
            )
            check_input_columns(adata.obs, self.adata_manager)
            self._warn_of_unlike_modalities(new, adata, setup.get("layers") or {})
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _warn_of_unlike_modalities(self, given: MuData, aligned: MuData, layers) -> None:
        """:func:`warn_of_unlike_samples` for each continuous modality's samples that hold it."""
        for name, likelihood in self.module.likelihoods.items():
            if likelihood != "normal":
                continue
            mod = aligned.mod[name]
            matrix = mod.X if layers.get(name) is None else mod.layers[layers[name]]
            holding = observed_rows(matrix)
            if not holding.any():
                continue
            names = mod.var_names.astype(str)
            given_names = given.mod[name].var_names.astype(str) if name in given.mod else []
            shared = int(names.isin(given_names).sum())
            warn_of_unlike_samples(
                matrix[holding],
                *(getattr(self.module, f"{part}_{name}") for part in _FEATURE_SCALE),
                shared,
                f"The new samples' {name!r} values",
            )

    @classmethod
    def setup_anndata(cls, adata: Any, *args: Any, **kwargs: Any) -> None:
        """Refused: this model reads a MuData (:meth:`setup_mudata`).

        Parameters
        ----------
        adata, *args, **kwargs
            Not read: any call is refused.

        Raises
        ------
        TypeError
            Always: register a MuData with :meth:`setup_mudata`, or one modality in an
            AnnData with :meth:`scinfl.model.INFL.setup_anndata`.

        Examples
        --------
        >>> MultiOmicsINFL.setup_anndata(None)
        Traceback (most recent call last):
        ...
        TypeError: MultiOmicsINFL reads a MuData: register it with MultiOmicsINFL.setup_mudata ...
        """
        raise TypeError(
            "MultiOmicsINFL reads a MuData: register it with MultiOmicsINFL.setup_mudata (for "
            "one modality in an AnnData use scinfl.model.INFL.setup_anndata)."
        )

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        modalities: Sequence[str],
        layers: Mapping[str, str | None] | None = None,
        site_key: str | None = None,
        batch_key: str | None = None,
        categories: Mapping[str, Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        """Register a MuData: one ``MuDataLayerField`` per modality, sites and batches in ``.obs``.

        As scvi-tools' ``TOTALVI.setup_mudata`` and ``MULTIVI.setup_mudata``, but for any
        number of modalities of any names (CPTAC's ``"proteomics"``, ``"transcriptomics"``,
        ...). Every modality must hold every sample of the MuData, absent ones as rows of
        ``NaN``: :func:`scinfl.pp.pad_modalities` makes such a MuData from a mosaic.

        Parameters
        ----------
        mdata
            MuData with samples named alike in every modality.
        modalities
            Names of the modalities to model (keys of ``mdata.mod``), in order.
        layers
            Layer of each modality holding its data (default: its ``.X``).
        site_key
            ``mdata.obs`` column naming each sample's site (required to federate). A column
            kept in the modalities' ``.obs`` instead (each naming the site of the samples it
            holds, as in a mosaic) is combined into ``mdata.obs`` (an info line says so).
        batch_key
            ``mdata.obs`` column of batches the decoders correct for (combined from the
            modalities likewise).
        categories
            Agreed categories by argument name (``"site_key"``, ``"batch_key"``), as in
            :meth:`scinfl.model.INFL.setup_anndata`.
        **kwargs
            Passed to scvi-tools' :meth:`scvi.data.AnnDataManager.register_fields`:
            ``source_registry`` and its transfer arguments, with which scvi-tools (``load``)
            sets up data like a trained model's.

        Examples
        --------
        >>> import scinfl
        >>> mdata = scinfl.data.synthetic_multiome(n_obs=60, n_sites=2)
        >>> scinfl.model.MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"], site_key="site")
        """
        # one name may come as a string; recorded as the list the model reads
        modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(mdata, MuData):
            raise TypeError(
                f"setup_mudata takes a MuData, got {type(mdata).__name__}; for one modality use "
                "scinfl.model.INFL.setup_anndata."
            )
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must name distinct modalities, got {modalities}.")
        check_not_a_view(mdata)
        dotted = [name for name in modalities if "." in str(name)]
        if dotted:
            # the model's per-modality layers and the registry are named after the modality,
            # and neither torch nor scvi-tools takes a dot in a name
            raise ValueError(
                f"Modality names cannot hold a dot ({dotted}): rename it, e.g. "
                f"mdata.mod[{dotted[0].replace('.', '_')!r}] = mdata.mod.pop({dotted[0]!r}); "
                "mdata.update()."
            )
        layers = dict(layers or {})
        check_shared_samples(mdata, modalities)
        for name, layer in layers.items():
            if name in mdata.mod and layer is not None and layer not in mdata.mod[name].layers:
                raise ValueError(
                    f"layers={{{name!r}: {layer!r}}}: mdata.mod[{name!r}] has no such layer "
                    f"(layers: {list(mdata.mod[name].layers)})."
                )
        _check_aligned(mdata, modalities)
        for argument, column in (("site_key", site_key), ("batch_key", batch_key)):
            _check_obs_column(mdata, column, argument)
        for argument, cats in (categories or {}).items():
            if argument not in ("site_key", "batch_key"):
                raise ValueError(f"categories= takes 'site_key' or 'batch_key', got {argument!r}.")
            apply_agreed_categories(
                mdata, {"site_key": site_key, "batch_key": batch_key}[argument], cats
            )
        _check_coverage(mdata, modalities, layers, site_key)
        fields = [
            MuDataLayerField(
                modality_key(i, name),
                layers.get(name),
                mod_key=name,
                is_count_data=False,
                mod_required=True,
            )
            for i, name in enumerate(modalities)
        ]
        fields += [
            MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            MuDataCategoricalObsField(REGISTRY_KEYS.LABELS_KEY, None),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(mdata, **kwargs)
        cls.register_manager(manager)

    @torch.inference_mode()
    def get_latent(
        self,
        mdata: MuData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        modalities: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Latent means, ``(n_obs, n_latent)``, from the modalities each sample holds.

        Parameters
        ----------
        mdata, indices, batch_size
            Data (default: the registered MuData).
        modalities
            Use only these modalities (default: all): e.g. the latent a sample would get from
            its proteomics alone. One name may be a string.

        Returns
        -------
        The latent means, shape ``(n_obs, n_latent)``; ``NaN`` rows for samples that hold
        none of the modalities read (with a warning).

        Examples
        --------
        >>> mdata.obsm["X_scinfl"] = model.get_latent()
        >>> mdata.obsm["X_scinfl"].shape
        (120, 10)
        """
        self._require_key()
        if mdata is not None and not isinstance(mdata, MuData):
            raise TypeError(
                f"{type(self).__name__} reads a MuData, got {type(mdata).__name__}: wrap one "
                'modality as mudata.MuData({"rna": adata}) (its other modalities absent).'
            )
        names = list(self.module.registry_keys)
        if isinstance(modalities, str):
            modalities = [modalities]
        if modalities is not None and len(modalities) == 0:
            raise ValueError(f"modalities=[] names no modality; the model has {names}.")
        unknown = sorted(set(modalities or ()) - set(names))
        if unknown:
            raise ValueError(f"Unknown modalities {unknown}; the model has {names}.")
        hidden = [self.module.registry_keys[n] for n in names if modalities and n not in modalities]
        mdata = self._validate_anndata(mdata)
        loader = self._make_data_loader(adata=mdata, indices=indices, batch_size=batch_size)
        self.module.eval()
        used = [key for key in self.module.registry_keys.values() if key not in hidden]
        latent = []
        for tensors in loader:
            for key in hidden:
                tensors[key] = torch.full_like(tensors[key], float("nan"))
            inputs = self.module._get_inference_input(tensors)
            z = self.module.inference(**inputs)["qz"].loc.cpu()
            # a sample without any of the modalities read has the prior's mean (0), no latent
            held = _holding_any(tensors, used).cpu()
            latent.append(torch.where(held[:, None], z, float("nan")))
        latent = torch.cat(latent).numpy()
        empty = int(np.isnan(latent[:, 0]).sum())
        if empty:
            logger.warning(
                "%d samples hold none of the modalities %s: their latent is NaN (subset to the "
                "others before clustering).",
                empty,
                modalities or names,
            )
        return latent

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: MuData | None = None,
        modality: str | None = None,
        indices: Sequence[int] | None = None,
        library_size: float = 1.0,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """One modality's expected values, decoded from each sample's joint latent mean.

        A sample that lacks the modality gets it predicted from the modalities it holds (a
        protein profile for a sample with RNA only): what the joint latent carries of it.

        Parameters
        ----------
        adata
            The MuData (default: the registered one).
        modality
            The modality to decode (default: the first the model has).
        indices
            Samples to decode (default: all).
        library_size
            For a count modality, the total the expected counts of a sample sum to
            (scvi-tools' ``library_size``: 1 gives proportions); a continuous modality is
            given on the data's own scale, and takes the default only.
        batch_size
            Samples per forward pass.

        Returns
        -------
        Samples x the modality's features, named as the model's; ``NaN`` rows for samples
        that hold none of the modalities.

        Examples
        --------
        >>> protein = model.get_normalized_expression(modality="prot")
        >>> protein.shape == (mdata.n_obs, mdata.mod["prot"].n_vars)
        True
        """
        self._require_key()
        names = list(self.module.registry_keys)
        modality = names[0] if modality is None else modality
        if modality not in names:
            raise ValueError(f"Unknown modality {modality!r}; the model has {names}.")
        counts = self.module.likelihoods[modality] == "nb"
        if not counts and library_size != 1.0:
            raise ValueError(
                f"Modality {modality!r} is continuous: its values are given on the data's own "
                "scale, with no library size to scale them to."
            )
        mdata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=mdata, indices=indices, batch_size=batch_size)
        self.module.eval()
        skips, self.module.skip_absent_modalities = self.module.skip_absent_modalities, False
        try:
            parts = [self._decoded(tensors, modality, counts) for tensors in loader]
        finally:
            self.module.skip_absent_modalities = skips
        values = torch.cat(parts).numpy() * (library_size if counts else 1.0)
        rows = np.arange(mdata.n_obs) if indices is None else np.asarray(indices)
        return pd.DataFrame(
            values,
            index=mdata.obs_names[rows],
            columns=pd.Index(self._modality_features()[modality]),
        )

    def _decoded(self, tensors: dict, modality: str, counts: bool) -> torch.Tensor:
        """A minibatch's expected values of ``modality`` from its joint latent means."""
        inference = self.module.inference(**self.module._get_inference_input(tensors))
        generative_input = self.module._get_generative_input(tensors, inference)
        generative_input["z"] = inference["qz"].loc
        px = self.module.generative(**generative_input)["px"][modality]
        values = px.mu / px.mu.sum(-1, keepdim=True) if counts else px.mean
        held = _holding_any(tensors, self.module.registry_keys.values())
        return torch.where(held[:, None].to(values.device), values, float("nan")).cpu()

    def get_latent_representation(
        self,
        adata: MuData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        *,
        modalities: Sequence[str] | None = None,
        mdata: MuData | None = None,
    ) -> np.ndarray:
        """The same as :meth:`get_latent`, under scvi-tools' name and arguments.

        Parameters
        ----------
        adata
            The MuData (scvi-tools' name; ``mdata=`` as :meth:`get_latent` names it works too).
        indices, batch_size, modalities
            As in :meth:`get_latent`.
        give_mean, mc_samples, return_dist
            Only the latent means are given (``give_mean=True``, ``return_dist=False``;
            ``mc_samples`` is then unused, as in scvi-tools): the joint posterior of a
            sample's modalities is not one scvi-tools distribution.
        mdata
            The MuData, by :meth:`get_latent`'s name (give it or ``adata``).

        Returns
        -------
        The latent means, shape ``(n_obs, n_latent)``, as :meth:`get_latent` returns them.

        Examples
        --------
        >>> mdata.obsm["X_scinfl"] = model.get_latent_representation()
        >>> mdata.obsm["X_scinfl"].shape
        (120, 10)
        """
        if not give_mean or return_dist:
            raise ValueError(
                f"{type(self).__name__} gives the latent means only (give_mean=True, "
                "return_dist=False): the joint posterior of a sample's modalities is a product "
                "of experts, not one of scvi-tools' distributions."
            )
        if adata is not None and mdata is not None:
            raise TypeError("Give the MuData once: adata= or mdata=.")
        return self.get_latent(adata if mdata is None else mdata, indices, batch_size, modalities)


def _holding_any(tensors: Mapping[str, torch.Tensor], keys) -> torch.Tensor:
    """Which rows of a minibatch hold any of the modalities ``keys`` (a row of NaN: absent)."""
    return torch.stack([~torch.isnan(tensors[key]).all(-1) for key in keys]).any(0)


def _default_likelihood(matrix) -> str:
    values = (
        matrix.data if hasattr(matrix, "data") and not isinstance(matrix, np.ndarray) else matrix
    )
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    counts = values.size > 0 and (values >= 0).all() and np.allclose(values, np.round(values))
    return "nb" if counts else "normal"


def _check_obs_column(mdata: MuData, column: str | None, argument: str) -> None:
    """:func:`validate_obs_column` on ``mdata.obs``, taking the column from the modalities.

    Users often keep a sample's site (or batch) in each modality's ``.obs``; in a mosaic no
    single modality holds every sample (muon's ``"rna:site"`` is missing for protein-only
    samples). The modalities' columns are combined into ``mdata.obs[column]`` (with an info
    line), a sample named differently by two modalities refused.
    """
    if column is not None and column not in mdata.obs:
        holders = [name for name, mod in mdata.mod.items() if column in mod.obs]
        if holders:
            mdata.obs[column] = _combined_column(mdata, column, holders, argument)
            logger.info(
                "%s=%r: combined the column of mdata.mod[...].obs of %s into mdata.obs[%r].",
                argument,
                column,
                holders,
                column,
            )
    modality, _, base = (column or "").partition(":")
    if base and modality in mdata.mod and base in mdata.mod[modality].obs:
        pulled = mdata.obs.get(column)
        if pulled is None or pulled.isna().any():
            raise ValueError(
                f"{argument}={column!r} (muon's copy of mdata.mod[{modality!r}].obs[{base!r}]) "
                "is missing for the samples without that modality (or was not pulled into "
                f"mdata.obs); pass {argument}={base!r}: scinfl combines the column of every "
                "modality that holds it."
            )
    validate_obs_column(mdata, column, argument)


def _combined_column(mdata: MuData, column: str, holders: list[str], argument: str) -> pd.Series:
    """``column`` of the modalities ``holders``, one value per sample of ``mdata``."""
    combined = pd.Series(pd.NA, index=mdata.obs_names, dtype=object)
    for name in holders:
        obs = mdata.mod[name].obs
        values = obs[column][~obs.index.duplicated()].reindex(mdata.obs_names).astype(object)
        clash = combined.notna() & values.notna() & (combined.astype(str) != values.astype(str))
        if clash.any():
            sample = clash.index[clash][0]
            raise ValueError(
                f"{argument}={column!r}: sample {sample!r} has {column}={combined[sample]!r} in "
                f"one modality and {values[sample]!r} in mdata.mod[{name!r}]; make them agree."
            )
        combined = combined.where(combined.notna(), values)
    return pd.Series(pd.Categorical(combined.where(combined.notna(), None)), index=mdata.obs_names)


def _check_aligned(mdata: MuData, modalities: Sequence[str]) -> None:
    """Refuse modalities that do not hold every sample of the MuData in its order."""
    for name in modalities:
        mod = mdata.mod[name]
        if mod.n_obs != mdata.n_obs or not (mod.obs_names == mdata.obs_names).all():
            n_absent = int((~mdata.obs_names.isin(mod.obs_names)).sum())
            raise ValueError(
                f"Modality {name!r} holds {mod.n_obs} of the MuData's {mdata.n_obs} samples "
                f"({n_absent} absent, a mosaic) or another order: pad it first with "
                "`mdata = scinfl.pp.pad_modalities(mdata)` (absent modalities become rows of NaN). "
                "If a modality was filtered since the MuData was built, call mdata.update() first."
            )


def _check_coverage(
    mdata: MuData, modalities: Sequence[str], layers: Mapping, site_key: str | None
) -> None:
    """Refuse a modality that no sample holds, and samples that hold no modality.

    Without ``site_key`` the MuData may be one site of a federation (a deployed site), which
    may lack a modality that other sites hold: a warning then, not an error.
    """
    held = {}
    for name in modalities:
        mod = mdata.mod[name]
        matrix = mod.X if layers.get(name) is None else mod.layers[layers[name]]
        held[name] = observed_rows(matrix)
        if not held[name].any() and site_key is None:
            logger.warning(
                "Modality %r holds no sample here (all its rows are NaN): right for one site of "
                "a federation whose other sites hold it; otherwise drop it from modalities=.",
                name,
            )
        elif not held[name].any():
            raise ValueError(
                f"Modality {name!r} holds no sample at any site (all its rows are NaN): drop it "
                f"from modalities= (e.g. modalities={[m for m in modalities if m != name]})."
            )
    none = ~np.any(np.stack(list(held.values())), axis=0)
    if none.any():
        where = ""
        if site_key is not None:
            sites = pd.Series(mdata.obs[site_key].to_numpy()[none]).value_counts()
            where = f" (by site: {sites.to_dict()})"
        raise ValueError(
            f"{int(none.sum())} samples hold none of the modalities {list(modalities)}{where}: "
            "a sample needs at least one. Drop them, e.g. `mdata = mdata[keep].copy()` with "
            "`keep` the samples that hold a modality, then pad again."
        )
