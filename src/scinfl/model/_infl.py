"""INFL: a keyed VAE trained across sites that never share data or key."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField
from scvi.model.base import BaseModelClass, RNASeqMixin, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from scinfl._checks import check_value
from scinfl._random import forked_rng
from scinfl.key import Key
from scinfl.module import KeyedVAE

from ._validation import (
    apply_agreed_categories,
    drop_unused_categories,
    validate_anndata_object,
    validate_layer,
    validate_matrix,
    validate_obs_column,
)
from .base import FederatedTrainingMixin, KeyedModelMixin, NewSamplesMixin

logger = logging.getLogger(__name__)

#: scANVI's classification weight: the floor of :meth:`INFL.default_classification_ratio`
SCANVI_CLASSIFICATION_RATIO = 50.0
#: latent sizes of :meth:`INFL.default_n_latent`: scvi-tools' for counts, and for continuous data
COUNTS_N_LATENT = 10
CONTINUOUS_N_LATENT = 30


class INFL(
    KeyedModelMixin,
    NewSamplesMixin,
    FederatedTrainingMixin,
    RNASeqMixin,
    VAEMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """Federated VAE with a secret key embedded in its architecture (INFL).

    Each site trains on its own rows; only parameters travel, and the key (secret coordinates
    that condition the encoder's keyed layers) never does: it is in no ``state_dict``, saved
    model or upload. A latent space for clustering, and labels when ``labels_key`` is set.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    key
        The federation's :class:`~scinfl.Key`. Required before training or inference when
        ``key_mode`` is not ``None``.
    key_mode
        ``"pooled"`` (the paper's design) or ``None`` (plain federated model, no key).
    key_strength
        Strength ``lambda`` of the keyed modulation.
    gene_likelihood
        ``"nb"`` / ``"zinb"`` for counts; ``"normal"`` for continuous data (NaN = missing,
        masked out of the loss).
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes, as in scvi-tools. ``n_latent=None`` (the default): 10 for counts, 30
        for continuous data, see :meth:`default_n_latent`.
    classification_ratio
        Weight of the classifier loss when ``labels_key`` was registered. ``None`` (the
        default): the number of features, at least 50, see :meth:`default_classification_ratio`.
    **module_kwargs
        Passed to :class:`~scinfl.module.KeyedVAE`: its own ``normal_variance``, and through
        it :class:`scvi.module.VAE`'s (``dispersion``, ...). The
        arguments INFL derives from the setup (``n_input``, ``n_batch``, ``n_labels``, ...) are
        not for passing.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=300, n_vars=40, n_sites=3)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> history = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
    >>> model.get_latent().shape
    (300, 10)
    """

    _module_cls = KeyedVAE
    #: how to fix data a count likelihood refuses (the end of the message)
    _count_advice = "Point `layer=` at the raw counts, or use gene_likelihood='normal'."
    #: setup arguments whose categories the sites of a deployment must agree on (run config)
    agreed_category_arguments = ("labels_key", "batch_key")

    def __init__(
        self,
        adata: AnnData,
        key: Key | None = None,
        key_mode: str | None = "pooled",
        key_strength: float = 1.0,
        gene_likelihood: Literal["nb", "zinb", "normal"] = "nb",
        n_hidden: int = 128,
        n_latent: int | None = None,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        classification_ratio: float | None = None,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(adata)
        if n_latent is None:
            n_latent = self.default_n_latent(gene_likelihood)
        layer = self.adata_manager.registry["setup_args"].get("layer")
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        validate_matrix(
            self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY),
            gene_likelihood,
            where,
            self._count_advice,
        )
        labels_key = self.adata_manager.registry["setup_args"].get("labels_key")
        if classification_ratio is not None:
            # a negative weight maximises the cross-entropy: a classifier trained to be wrong
            check_value(
                "classification_ratio", classification_ratio, float, "a number > 0", lambda v: v > 0
            )
            if labels_key is None:
                logger.warning(
                    "classification_ratio is the weight of the classifier, which a model set up "
                    "without labels_key does not have: it has no effect."
                )
        # covariates a model class registers (scvi-tools' CONT_COVS / CAT_COVS fields) reach
        # the decoder, as in scvi-tools' SCVI
        covariates = {"n_continuous_cov": self.summary_stats.get("n_extra_continuous_covs", 0)}
        if REGISTRY_KEYS.CAT_COVS_KEY in self.adata_manager.data_registry:
            state = self.adata_manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY)
            covariates["n_cats_per_cov"] = state.n_cats_per_key
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_batch=self.summary_stats.n_batch,
            n_labels=len(self.classes),
            has_unlabeled=self._unlabeled is not None,
            gene_likelihood=gene_likelihood,
            key_mode=key_mode,
            key_strength=key_strength,
            classify=labels_key is not None,
            classification_ratio=(
                self.default_classification_ratio(self.summary_stats.n_vars)
                if classification_ratio is None
                else classification_ratio
            ),
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            **{**covariates, **module_kwargs},
        )
        self.federated_history_: pd.DataFrame | None = None
        self.dp_epsilon_: float | None = None
        self._model_summary_string = (
            f"INFL: key_mode={key_mode}, gene_likelihood={gene_likelihood}, n_latent={n_latent}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}"
        )
        self.init_params_ = self._get_init_params(locals())
        self._init_key(key)

    def _get_init_params(self, locals: dict) -> dict:
        """The arguments of this ``__init__`` as scvi-tools records them for ``load``.

        scvi-tools reads the signature of ``self.__init__``: for a subclass that forwards
        ``**kwargs`` here (:class:`~scinfl.model.PerturbationINFL`) that records nothing, and
        ``load`` would rebuild the default architecture. This reads INFL's own signature.
        """
        parameters = inspect.signature(INFL.__init__).parameters.values()
        given = {p.name: locals[p.name] for p in parameters if p.name not in ("self", "adata")}
        variable = {p.name for p in parameters if p.kind == p.VAR_KEYWORD}
        return {
            "kwargs": {k: v for k, v in given.items() if k in variable},
            "non_kwargs": {k: v for k, v in given.items() if k not in variable},
        }

    # -- defaults ----------------------------------------------------------------------------
    @staticmethod
    def default_n_latent(gene_likelihood: str) -> int:
        """INFL's default latent size: scvi-tools' 10 for counts, 30 for continuous data.

        Counts of single cells are mostly sampling noise around a few programmes, which ten
        dimensions hold; standardised continuous values (log intensities, log-normalised
        expression) keep more of their variance in more directions, and a ten-dimensional
        latent leaves part of it to the reconstruction error. Measured at the library's
        defaults otherwise, federated, Leiden at resolution 1 against the cell types
        (``benchmarks/results/continuous_latent.md``): on Kang 2018 log-normalised, ARI
        0.45 with 10 dimensions, 0.48 with 20, 0.50 with 30 (PCA + Leiden 0.46, on z-scores
        0.50); on CPTAC proteomics no worse.

        Parameters
        ----------
        gene_likelihood
            ``"nb"``, ``"zinb"`` or ``"normal"``.

        Returns
        -------
        The number of latent dimensions.

        Examples
        --------
        >>> from scinfl.model import INFL
        >>> INFL.default_n_latent("nb"), INFL.default_n_latent("normal")
        (10, 30)
        """
        return CONTINUOUS_N_LATENT if gene_likelihood == "normal" else COUNTS_N_LATENT

    @staticmethod
    def default_classification_ratio(n_features: int) -> float:
        """INFL's default classification weight: the number of features, at least 50.

        The reconstruction term of the loss is a sum over features, the classifier's
        cross-entropy one term per observation: with a fixed weight, the more features, the
        more the reconstruction drowns the labels. A weight proportional to the number of
        features keeps their balance: one unit of weight per reconstructed feature, and
        scANVI's 50 for panels of fewer than 50 features. Measured at the library's defaults
        (docs/proteomics.md, "Defaults for bulk data"): on CPTAC proteomics (9,000 and 1,700
        proteins) a weight of 50 is 3-13 points below one near the number of features on
        held-out samples, and on pbmc68k counts (765 genes) 765 does as well as 50.

        Parameters
        ----------
        n_features
            Number of features the model reconstructs.

        Returns
        -------
        The weight of the classification loss.

        Examples
        --------
        >>> from scinfl.model import INFL
        >>> INFL.default_classification_ratio(765), INFL.default_classification_ratio(9000)
        (765.0, 9000.0)
        >>> INFL.default_classification_ratio(20)
        50.0
        """
        return float(max(SCANVI_CLASSIFICATION_RATIO, n_features))

    # -- setup -------------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        site_key: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categories: Mapping[str, Sequence[str]] | None = None,
        unlabeled_category: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for INFL.

        Parameters
        ----------
        adata
            Observations x features; counts or continuous values.
        layer
            Layer with the data (``None``: ``adata.X``). Counts for ``nb``/``zinb``.
        site_key
            ``.obs`` column naming the site of each observation (required to federate; see
            :func:`scinfl.federated.partition` to simulate sites).
        batch_key
            ``.obs`` column of batches to correct for in the decoder.
        labels_key
            ``.obs`` column of labels; trains a classifier head and enables :meth:`predict`.
        categories
            Agreed categories by argument name, e.g. ``{"labels_key": [...]}``: fixes the
            category codes across sites that set up their data separately. Values outside the
            list are refused; the agreed labels need not list ``unlabeled_category``.
        unlabeled_category
            The label of rows without one (as scvi-tools' SCANVI): the classifier trains on
            the labelled rows only, never predicts this label, and missing labels (``NaN``)
            become it. ``None``: every row must be labelled.
        **kwargs
            Passed to scvi-tools' :meth:`scvi.data.AnnDataManager.register_fields`:
            ``source_registry`` and its transfer arguments (``extend_categories``), with which
            scvi-tools (``load``, new samples) sets up data like a trained model's.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
        >>> INFL.setup_anndata(adata, layer="counts", site_key="site", labels_key="label")
        >>> adata.obs["label"] = adata.obs["label"].cat.add_categories("Unknown")
        >>> adata.obs.loc[adata.obs_names[:10], "label"] = "Unknown"  # rows without a label
        >>> INFL.setup_anndata(adata, site_key="site", labels_key="label", unlabeled_category="Unknown")
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        validate_anndata_object(adata)
        validate_layer(adata, layer)
        _unlabeled_rows(adata, labels_key, unlabeled_category)
        for argument, key in (
            ("site_key", site_key),
            ("batch_key", batch_key),
            ("labels_key", labels_key),
        ):
            validate_obs_column(adata, key, argument)
        if "labels_key" not in (categories or {}) and "source_registry" not in kwargs:
            drop_unused_categories(adata, labels_key, "labels_key")
        for argument, cats in (categories or {}).items():
            if argument not in ("site_key", "batch_key", "labels_key"):
                raise ValueError(
                    f"categories= takes 'site_key', 'batch_key' or 'labels_key', got {argument!r}."
                )
            column = {"site_key": site_key, "batch_key": batch_key, "labels_key": labels_key}[
                argument
            ]
            if argument == "labels_key" and unlabeled_category is not None:
                # the placeholder of unlabelled rows is no class for the sites to agree on: it
                # goes last (the classes keep their order), named as text as the agreed are
                unlabeled_category = str(unlabeled_category)
                cats = [*(c for c in cats if str(c) != unlabeled_category), unlabeled_category]
            apply_agreed_categories(adata, column, cats)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key)
            if unlabeled_category is None or labels_key is None
            else LabelsWithUnlabeledObsField(
                REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category
            ),
        ]
        if "source_registry" not in kwargs and "labels_key" not in (categories or {}):
            # a trained model's setup (load, new samples) may meet data without labels, and so
            # may one site of a federation that agreed its classes
            _check_labelled_rows(adata, labels_key, unlabeled_category)
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _revalidate_setup(self) -> None:
        """The training mixin's check of the setup, then: some row must be labelled.

        A site may hold unlabelled rows only (agreed classes), the whole data may not; a model
        loaded onto new data (a saved registry's setup) may fine-tune without labels, as
        scANVI's query step does.
        """
        super()._revalidate_setup()
        loaded = getattr(self.adata_manager, "_source_registry", None) is not None
        if self.module.classifier is None or not self.module.has_unlabeled or loaded:
            return
        labels = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY))
        if not (labels < self.module.n_labels).any():
            raise ValueError(
                "No row of the training data is labelled (all are the unlabeled_category): "
                "the classifier would train on nothing. Label some rows, or set up without "
                "labels_key."
            )

    def _check_what_training_gave(self, sites, config, unit: str) -> None:
        """Warn when the classifier says one class for rows of several: it is undertrained.

        A small cohort trains few optimiser steps at the defaults (a site smaller than a
        minibatch trains one step a round); the classifier then says the majority class (or
        any one) for nearly every row, with nothing else to flag it.
        """
        if self.module.classifier is None:
            return
        # the labels the run trained on, by their registered codes (the .obs column may have
        # been renamed, recoded or dropped since setup); code n_classes marks unlabelled rows
        codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY))
        codes = codes.ravel()[self.train_indices_]
        classes = np.asarray(self.classes, dtype=object)
        labelled = codes < len(classes)
        rows, truth = self.train_indices_[labelled], classes[codes[labelled]]
        shares = pd.Series(truth).astype(str).value_counts(normalize=True)
        if len(rows) < 20 or len(shares) < 2:
            return
        with forked_rng(self.module):  # the prediction draws nothing the user should see
            said = pd.Series(self.predict(indices=rows)).astype(str)
        said = said.value_counts(normalize=True)
        top, share = said.index[0], said.iloc[0]
        if share < 0.9 or shares.get(top, 0.0) > 0.6:
            return
        runs = self.federated_history_["round"].nunique()
        steps = max(-(-site.n_train // config.batch_size) for site in sites) * config.local_epochs
        logger.warning(
            "The classifier says %r for %.0f%% of the labelled training rows, where %.0f%% are "
            "%r: it has not learned to tell the classes apart. This run made %d optimiser steps "
            "at its largest site (%d %s x %d steps each); %s",
            top,
            100 * share,
            100 * shares.get(top, 0.0),
            top,
            runs * steps,
            runs,
            unit if runs != 1 else unit.removesuffix("s"),
            steps,
            _undertrained_advice(config, unit),
        )

    @property
    def _unlabeled(self) -> str | None:
        """The registered label of unlabelled rows, if any."""
        if self.adata_manager.registry["setup_args"].get("labels_key") is None:
            return None
        state = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        return state.get(LabelsWithUnlabeledObsField.UNLABELED_CATEGORY)

    @property
    def classes(self) -> list:
        """The classes of the classifier, in code order (the unlabelled category excluded).

        Examples
        --------
        >>> model.classes
        ['type0', 'type1', 'type2']
        """
        mapping = list(
            self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        )
        return mapping[:-1] if self._unlabeled is not None else mapping

    # -- outputs -------------------------------------------------------------------------------
    def get_latent_representation(
        self, *args: Any, **kwargs: Any
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation of each observation (mean of q(z|x) by default).

        Parameters
        ----------
        *args, **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.VAEMixin.get_latent_representation`:
            ``adata`` (default: the registered AnnData; new samples are matched to the model's
            features by name), ``indices``, ``give_mean`` (``False``: a draw of q(z|x)),
            ``batch_size``, ``return_dist``.

        Returns
        -------
        The latent, shape ``(n_obs, n_latent)``; with ``return_dist=True`` the means and the
        variances of q(z|x), each of that shape.

        Examples
        --------
        >>> adata.obsm["X_scinfl"] = model.get_latent_representation()
        >>> adata.obsm["X_scinfl"].shape
        (300, 10)
        """
        self._require_key()
        return super().get_latent_representation(*args, **kwargs)

    def get_normalized_expression(self, *args: Any, **kwargs: Any) -> np.ndarray | pd.DataFrame:
        """Expected expression per cell (scvi-tools' method), for count likelihoods.

        :meth:`differential_expression` builds on it, as in scvi-tools' SCVI. Continuous data
        (``gene_likelihood="normal"``) have no count proportions to normalise: refused
        (``NotImplementedError``).

        Parameters
        ----------
        *args, **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.RNASeqMixin.get_normalized_expression`:
            ``adata``, ``indices``, ``gene_list``, ``library_size`` (default 1: proportions),
            ``n_samples``, ``return_mean``, ``return_numpy``, ``batch_size``,
            ``transform_batch``.

        Returns
        -------
        Cells x genes, a DataFrame named by cells and genes (an array with
        ``return_numpy=True``); with ``n_samples > 1`` and ``return_mean=False`` an array of
        shape ``(n_samples, n_cells, n_genes)``.

        Examples
        --------
        >>> expression = model.get_normalized_expression(library_size=1e4)
        >>> expression.shape, bool(np.allclose(expression.sum(axis=1), 1e4, rtol=1e-4))
        ((300, 40), True)
        """
        self._refuse_for_continuous_data("get_normalized_expression")
        return super().get_normalized_expression(*args, **kwargs)

    def differential_expression(self, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """scvi-tools' differential expression, from :meth:`get_normalized_expression` (counts).

        Parameters
        ----------
        *args, **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.RNASeqMixin.differential_expression`:
            ``adata``, ``groupby``, ``group1``, ``group2`` (default: the rest), or ``idx1`` /
            ``idx2``; ``mode`` (``"vanilla"`` or ``"change"``), ``delta``, ``fdr_target``,
            ``batch_size``, ``silent``.

        Returns
        -------
        One row per gene (per gene and group when ``group1`` is ``None``), scvi-tools'
        columns: ``bayes_factor``, ``scale1``/``scale2``, ``raw_mean1``/``raw_mean2``,
        ``comparison``, ...; ``mode="change"`` adds ``proba_de``, ``lfc_mean`` and
        ``is_de_fdr_<fdr_target>``.

        Examples
        --------
        >>> de = model.differential_expression(groupby="label", group1="type0", silent=True)
        >>> de.shape[0], "bayes_factor" in de
        (40, True)
        """
        self._refuse_for_continuous_data("differential_expression")
        return super().differential_expression(*args, **kwargs)

    def get_feature_correlation_matrix(self, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """scvi-tools' feature correlations of denoised counts, for count likelihoods.

        Parameters
        ----------
        *args, **kwargs
            Passed to scvi-tools'
            :meth:`scvi.model.base.RNASeqMixin.get_feature_correlation_matrix`: ``adata``,
            ``indices``, ``n_samples``, ``batch_size``, ``rna_size_factor``,
            ``transform_batch``, ``correlation_type`` (``"spearman"`` or ``"pearson"``).

        Returns
        -------
        Genes x genes correlations, named by the genes.

        Examples
        --------
        >>> model.get_feature_correlation_matrix(n_samples=2).shape
        (40, 40)
        """
        self._refuse_for_continuous_data("get_feature_correlation_matrix")
        return super().get_feature_correlation_matrix(*args, **kwargs)

    def get_latent_library_size(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """scvi-tools' library size per cell, for count likelihoods.

        Parameters
        ----------
        *args, **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.RNASeqMixin.get_latent_library_size`:
            ``adata``, ``indices``, ``give_mean``, ``batch_size``. INFL uses the observed library
            size (no library posterior): pass ``give_mean=False``.

        Returns
        -------
        Library size per cell, shape ``(n_obs, 1)``.

        Examples
        --------
        >>> model.get_latent_library_size(give_mean=False).shape  # the observed library sizes
        (300, 1)
        """
        self._refuse_for_continuous_data("get_latent_library_size")
        return super().get_latent_library_size(*args, **kwargs)

    def _refuse_for_continuous_data(self, method: str) -> None:
        """The key first; then refuse a count-proportion method under the normal likelihood."""
        self._require_key()
        if getattr(self.module, "gene_likelihood", None) == "normal":
            raise NotImplementedError(
                f"{method} works on expected count proportions, which "
                "gene_likelihood='normal' does not model: continuous data are on their own "
                "scale already (the latent, get_latent_representation, is what to compare; "
                "for differences between groups, test the data themselves)."
            )

    def get_likelihood_parameters(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """The count likelihood's parameters per cell (scvi-tools' method), for count models.

        Parameters
        ----------
        *args, **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.RNASeqMixin.get_likelihood_parameters`:
            ``adata``, ``indices``, ``n_samples``, ``give_mean``, ``batch_size``.

        Returns
        -------
        ``"mean"`` and ``"dispersions"`` (and ``"dropout"`` under ``"zinb"``), each cells x
        genes (with ``n_samples > 1`` and ``give_mean=False``, samples x cells x genes).

        Examples
        --------
        >>> sorted(model.get_likelihood_parameters())
        ['dispersions', 'mean']
        """
        self._require_key()
        if getattr(self.module, "gene_likelihood", None) == "normal":
            raise NotImplementedError(
                "get_likelihood_parameters returns a count likelihood's mean, dispersion and "
                "dropout; gene_likelihood='normal' has none of these."
            )
        return super().get_likelihood_parameters(*args, **kwargs)

    def get_latent(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent means, shape ``(n_obs, n_latent)``: what to store in ``.obsm["X_scinfl"]``.

        Parameters
        ----------
        adata
            Data to embed (default: the registered AnnData); new samples need no site or label
            column, and their features are matched to the model's by name.
        indices
            Rows of ``adata`` to embed (default: all).
        batch_size
            Minibatch size (default: scvi-tools' setting).

        Returns
        -------
        The latent means, shape ``(n_obs, n_latent)`` (``len(indices)`` rows with
        ``indices``).

        Examples
        --------
        >>> adata.obsm["X_scinfl"] = model.get_latent()
        >>> model.get_latent(indices=[0, 1]).shape
        (2, 10)
        """
        return self.get_latent_representation(adata=adata, indices=indices, batch_size=batch_size)

    @torch.inference_mode()
    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predict labels with the classifier head (needs ``labels_key`` at setup).

        Parameters
        ----------
        adata, indices, batch_size
            Data to predict on (default: the registered AnnData).
        soft
            Return class probabilities as a DataFrame instead of label names.

        Returns
        -------
        The predicted label of each row, an array of names from :attr:`classes`; with
        ``soft=True`` a DataFrame of class probabilities, rows named by the observations, one
        column per class.

        Examples
        --------
        >>> adata.obs["scinfl_prediction"] = model.predict()
        >>> set(adata.obs["scinfl_prediction"]) <= set(model.classes)
        True
        >>> model.predict(soft=True).columns.tolist()
        ['type0', 'type1', 'type2']
        """
        if self.module.classifier is None:
            if "labels_key" not in inspect.signature(self.setup_anndata).parameters:
                raise ValueError(
                    f"{type(self).__name__} trains no classifier (its setup takes no labels): "
                    "use scinfl.model.INFL set up with labels_key= for predictions."
                )
            raise ValueError(
                f"This model has no classifier: pass labels_key= to "
                f"{type(self).__name__}.setup_anndata."
            )
        self._require_key()
        # as scvi-tools' inference methods do: an untrained (or key-rotated) model has no answer
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        self.module.eval()
        probs = []
        for tensors in loader:
            inference_inputs = self.module._get_inference_input(tensors)
            qz = self.module.inference(**inference_inputs)["qz"]
            probs.append(torch.softmax(self.module.classification_logits(qz.loc), dim=-1).cpu())
        probs = torch.cat(probs).numpy()
        categories = self.classes
        obs_names = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        if soft:
            return pd.DataFrame(probs, index=obs_names, columns=list(categories))
        return np.asarray(categories)[probs.argmax(1)]


def _unlabeled_rows(adata: AnnData, labels_key: str | None, unlabeled: str | None) -> None:
    """Missing labels: refused without ``unlabeled_category``, made it (info line) with it."""
    if labels_key is None or labels_key not in adata.obs:
        return
    _check_unlabeled_kind(adata.obs[labels_key], labels_key, unlabeled)
    missing = adata.obs[labels_key].isna()
    if not missing.any():
        _unlabeled_last(adata, labels_key, unlabeled)
        return
    if unlabeled is None:
        raise ValueError(
            f"adata.obs[{labels_key!r}] has {int(missing.sum())} missing labels: pass "
            "unlabeled_category='Unknown' (any name) so that the classifier trains on the "
            "labelled rows only, or subset the AnnData to the labelled rows."
        )
    column = adata.obs[labels_key]
    if isinstance(column.dtype, pd.CategoricalDtype) and unlabeled not in column.cat.categories:
        column = column.cat.add_categories([unlabeled])
    adata.obs[labels_key] = column.fillna(unlabeled)
    logger.info(
        "adata.obs[%r]: %d missing labels set to the unlabelled category %r.",
        labels_key,
        int(missing.sum()),
        unlabeled,
    )
    _unlabeled_last(adata, labels_key, unlabeled)


def _unlabeled_last(adata: AnnData, labels_key: str, unlabeled) -> None:
    """Put the unlabelled category last among the labels' categories, the classes in order.

    scvi-tools' labels field *swaps* the unlabelled category with the last one, so classes
    ``[c0, c1, c2]`` with ``"Unknown"`` first came out ``[c2, c0, c1]`` (in predictions and
    plot legends); with the placeholder already last nothing is swapped.
    """
    column = adata.obs[labels_key]
    if unlabeled is None or not column.eq(unlabeled).any():
        return
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype("category")
    classes = [c for c in column.cat.categories if c != unlabeled]
    adata.obs[labels_key] = column.cat.reorder_categories([*classes, unlabeled])


def _check_unlabeled_kind(column: pd.Series, labels_key: str, unlabeled) -> None:
    """Refuse a text ``unlabeled_category`` for labels that are numbers (or the reverse)."""
    if unlabeled is None:
        return
    values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    values = pd.Series(values).dropna()
    if values.empty or isinstance(unlabeled, str) == values.map(type).eq(str).all():
        return
    kind = "text" if isinstance(unlabeled, str) else "a number"
    raise ValueError(
        f"unlabeled_category={unlabeled!r} is {kind}, but adata.obs[{labels_key!r}] holds "
        f"{'numbers' if isinstance(unlabeled, str) else 'text'} (e.g. {values.iloc[0]}): pass "
        f"one of its own kind, or make the labels text first: adata.obs[{labels_key!r}] = "
        f"adata.obs[{labels_key!r}].astype(str) (missing labels become 'nan' then: replace "
        "them)."
    )


def _check_labelled_rows(adata: AnnData, labels_key: str | None, unlabeled) -> None:
    """Refuse labels of which no row is labelled; warn of one class or an unused placeholder."""
    if labels_key is None:
        return
    labels = adata.obs[labels_key]
    labelled = labels[labels != unlabeled] if unlabeled is not None else labels
    if labelled.empty:
        raise ValueError(
            f"Every row of adata.obs[{labels_key!r}] is the unlabelled category {unlabeled!r}: "
            "there is nothing to train a classifier on. Set up without labels_key (no "
            "classifier), or label some rows."
        )
    if unlabeled is not None and len(labelled) == len(labels):
        logger.warning(
            "unlabeled_category=%r matches no row of adata.obs[%r] (categories: %s): every "
            "row is labelled. A misspelt placeholder would be trained on as a class.",
            unlabeled,
            labels_key,
            sorted(map(str, pd.unique(labels)))[:10],
        )
    if labelled.nunique() < 2:
        logger.warning(
            "adata.obs[%r] holds one class (%r): the classifier has nothing to tell apart.",
            labels_key,
            labelled.iloc[0],
        )


def _undertrained_advice(config, unit: str) -> str:
    """What would train an undertrained classifier more, from the settings a run had."""
    more = [f"max_{unit}={2 * config.max_rounds}"]
    if unit == "rounds" and config.local_epochs < 5:
        more.append(f"local_epochs={max(5, 2 * config.local_epochs)}")
    if config.batch_size > 32:
        more.append("batch_size=32")
    advice = f"small cohorts need more steps: e.g. {' or '.join(more)}"
    sample_dp = config.privacy.sample_dp_epsilon is not None
    if not config.balance_classes and not sample_dp:
        # sample-level DP refuses it: the label counts it reads are not covered by the noise
        advice += " (and balance_classes=True for unequal classes)"
    if sample_dp or config.privacy.mode == "dp":
        advice += "; differential privacy's noise also drowns what few steps learn"
    return advice + "."
