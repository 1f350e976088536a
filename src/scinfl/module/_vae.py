"""The keyed VAE behind :class:`scinfl.model.INFL`."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from scvi import REGISTRY_KEYS
from scvi.module import VAE
from scvi.module._constants import MODULE_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch import nn
from torch.distributions import Distribution, Normal, kl_divergence
from torch.nn import functional as F

from scinfl.key import MISSING_KEY_MESSAGE, Key, MissingKeyError

from ._key_modes import ModelKeyMode, get_key_mode
from ._likelihood import NONZERO_KEY, nb_log_likelihood, standardised_normal_log_prob

Likelihood = Literal["nb", "zinb", "normal"]
NormalVariance = Literal["unit", "feature"]

#: Smallest feature scale :meth:`KeyedVAE.set_feature_scale` accepts (smaller ones are raised):
#: far below any unit data come in (molar concentrations, 1e-9), far above float32's smallest.
MIN_FEATURE_SCALE = 1e-30


class _Unused(nn.Module):
    """Stands for a head of scvi-tools' decoder that the likelihood never reads."""

    def forward(self, *args) -> None:
        return None


class KeyedVAE(VAE):
    """scvi-tools' VAE with keyed encoder layers, a masked Gaussian likelihood, a classifier.

    Subclasses :class:`~scvi.module.VAE`: the Gaussian likelihood (continuous data) masks
    missing values out of the loss; the classifier head is optional.

    Federated-friendly defaults: LayerNorm instead of BatchNorm (BatchNorm running statistics
    are per-site data summaries and average badly across non-IID sites), observed library size
    (no per-site library prior to agree on).

    Parameters
    ----------
    n_input
        Number of features.
    n_batch
        Number of batch categories (0 for none).
    n_labels
        Number of label categories; a classifier head is built when ``classify`` is set.
    gene_likelihood
        ``"nb"``, ``"zinb"`` (counts) or ``"normal"`` (continuous; NaN entries are masked out of
        the loss and shown to the encoder as 0 after standardisation, i.e. as the feature's
        location). With ``"normal"`` the module holds a per-feature location and scale
        (:meth:`set_feature_scale`; identity until set): the encoder and the likelihood see
        standardised values, reconstructions are on the data's own scale.
    key_mode
        Registered key mode, a name in :data:`~scinfl.module.KEY_MODES`: ``"pooled"`` (the
        paper's design), the superseded per-feature ``"feature"`` or ``"feature-inr"``
        (:mod:`scinfl.module.experimental`, which also key the decoder's per-feature heads and
        dispersions), or ``None`` for no key.
    key_strength
        ``lambda`` of the keyed layers.
    classify
        Build a classifier head on the latent mean and add its cross-entropy to the loss.
    classification_ratio
        Weight of the classification loss.
    normal_variance
        Standard deviation of the ``normal`` likelihood: ``"unit"`` (default) is 1 for every
        standardised feature (the feature's scale on the data's scale), ``"feature"`` is learned
        per feature. A learned variance lets the model give up on features it explains badly
        and its latent space clusters far worse (``benchmarks/results/continuous.md``: ARI
        0.32 against 0.65 on Kang 2018 PBMC, where PCA reaches 0.66).
    has_unlabeled
        Some rows are unlabelled: label code ``n_labels`` (one past the last class) marks them,
        and they add no classification loss (:func:`labelled_cross_entropy`). ``False`` (the
        default): every row carries one of the ``n_labels`` classes.
    **vae_kwargs
        Passed to :class:`scvi.module.VAE` (``n_hidden``, ``n_latent``, ``n_layers``,
        ``dropout_rate``, ``dispersion``, ...).

    Examples
    --------
    >>> import torch
    >>> from scinfl import Key
    >>> vae = KeyedVAE(n_input=20, n_labels=3, classify=True)
    >>> vae.set_key(Key.generate())
    >>> "key_encoder.coordinates" in vae.state_dict()
    False
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        gene_likelihood: Likelihood = "nb",
        key_mode: str | None = "pooled",
        key_strength: float = 1.0,
        classify: bool = False,
        classification_ratio: float = 50.0,
        normal_variance: NormalVariance = "unit",
        has_unlabeled: bool = False,
        **vae_kwargs: Any,
    ) -> None:
        if gene_likelihood not in ("nb", "zinb", "normal"):
            raise ValueError(
                f"gene_likelihood must be 'nb', 'zinb' or 'normal', got {gene_likelihood!r}."
            )
        if normal_variance not in ("unit", "feature"):
            raise ValueError(
                f"normal_variance must be 'unit' or 'feature', got {normal_variance!r}."
            )
        vae_kwargs.setdefault("use_batch_norm", "none")
        vae_kwargs.setdefault("use_layer_norm", "both")
        vae_kwargs.setdefault("log_variational", gene_likelihood != "normal")
        super().__init__(
            n_input,
            n_batch=n_batch,
            n_labels=n_labels,
            gene_likelihood=gene_likelihood,
            use_observed_lib_size=True,
            **vae_kwargs,
        )
        if gene_likelihood == "normal" and self.dispersion != "gene":
            raise ValueError("gene_likelihood='normal' supports dispersion='gene' only.")
        if gene_likelihood == "normal":
            # per-feature standardisation (identity until set): persistent, so it is saved with
            # the model; every site sets the same values itself, and they never travel
            # (site_state_names)
            self.register_buffer("feature_loc", torch.zeros(n_input))
            self.register_buffer("feature_scale", torch.ones(n_input))
            # features seen too rarely to scale (scale 0 from scale_from_moments): missing
            self.register_buffer("feature_observed", torch.ones(n_input, dtype=torch.bool))
        # the library-size encoder is unused with the observed library size, the dropout head
        # with any likelihood but the zero-inflated one, the per-cell dispersion head with any
        # other dispersion: dropping them keeps untrained per-feature weights out of every
        # upload (three of the model's four feature-sized matrices with the NB) and the dropout
        # head's product out of every forward pass
        self.l_encoder = None
        if gene_likelihood != "zinb":
            self.decoder.px_dropout_decoder = _Unused()
        if self.dispersion != "gene-cell":
            self.decoder.px_r_decoder = _Unused()
        self.normal_variance = normal_variance
        self.classify = classify and n_labels > 0
        # rows whose label code is n_labels are unlabelled: no classification loss
        self.has_unlabeled = has_unlabeled
        self.classification_ratio = classification_ratio
        self.classifier = None
        # per-class weights of the classification loss, set by each site from its own label
        # counts (no pooled statistic); never shared
        self.register_buffer("class_weights", None, persistent=False)
        if self.classify:
            self.classifier = nn.Sequential(
                nn.Linear(self.n_latent, 32),
                nn.LayerNorm(32),
                nn.ReLU(),
                nn.Linear(32, n_labels),
            )
        # keyed models read their class logits through a secret permutation of the
        # classifier's output units (set with the key): a non-persistent buffer, never shared
        self.register_buffer("class_order", None, persistent=False)
        self.key_mode_name = key_mode
        self.key_encoder = None
        if key_mode is not None:
            mode = get_key_mode(key_mode, key_strength=key_strength)
            self._key_mode = mode
            self.key_encoder = mode.build_key_encoder(n_input)
            mode.install(self.z_encoder, self.key_encoder)
            if self.classifier is not None:
                mode.install(self.classifier, self.key_encoder)
            if isinstance(mode, ModelKeyMode):
                # per-feature modes also key the decoder's per-feature heads and dispersions
                # (built here, in __init__, so that save / load see the keyed architecture)
                mode.install_model(self, self.key_encoder)

    # -- key -------------------------------------------------------------------------------
    @property
    def is_keyed(self) -> bool:
        """Whether this module has keyed layers."""
        return self.key_encoder is not None

    @property
    def has_key(self) -> bool:
        """Whether a key is set (always ``True`` for an unkeyed module)."""
        return self.key_encoder is None or self.key_encoder.has_key

    def set_key(self, key: Key | None) -> None:
        """Install (or, with ``None``, remove) the secret key material.

        Derives the key mode's material (:meth:`~scinfl.module.KeyMode.key_material`) into the
        key encoder, and the classifier's class order (:meth:`set_class_order`) from ``key``.
        Neither is a parameter: nothing of the key enters a ``state_dict``. No effect on an
        unkeyed module.

        Parameters
        ----------
        key
            The federation's :class:`~scinfl.Key`; ``None`` removes the material (the module
            then refuses to run, :class:`~scinfl.key.MissingKeyError`).

        Examples
        --------
        >>> vae = KeyedVAE(n_input=5, n_hidden=8)
        >>> vae.set_key(Key.generate())
        >>> vae.has_key
        True
        >>> vae.set_key(None)
        >>> vae.has_key
        False
        """
        if self.key_encoder is None:
            return
        material = None if key is None else self._key_mode.key_material(key, self.n_input)
        self.key_encoder.set_coordinates(material)
        order = None
        if key is not None and self.classifier is not None:
            order = torch.from_numpy(key.permutation(self.n_labels, purpose="classes"))
        self.set_class_order(order)

    def set_class_order(self, order: torch.Tensor | None) -> None:
        """Set the output unit of the classifier that carries each class.

        Class ``c``'s logit is output unit ``order[c]``. :meth:`set_key` sets it from the key,
        so that the shared classifier weights do not say which unit means which class: the
        label of a one-sample update can no longer be read off the sign of the output bias
        gradient (iDLG) without the key, and a wrong key predicts permuted labels.

        Parameters
        ----------
        order
            Permutation of ``range(n_labels)`` (a tensor or sequence of ints), or ``None`` for
            the identity order (an unkeyed module's; a keyed one then refuses to classify).

        Examples
        --------
        >>> vae = KeyedVAE(n_input=10, n_labels=3, classify=True, key_mode=None)
        >>> vae.set_class_order(torch.tensor([2, 0, 1]))
        >>> vae.class_order.tolist()
        [2, 0, 1]
        """
        if order is not None:
            order = torch.as_tensor(order, dtype=torch.long)
            if sorted(order.tolist()) != list(range(self.n_labels)):
                raise ValueError(
                    f"class order must be a permutation of range({self.n_labels}), got "
                    f"{order.tolist()}."
                )
        self.class_order = order

    def key_parameter_names(self) -> list[str]:
        """Names of the parameters that exist only because the model is keyed.

        The key encoder's weights and the modulation networks of the keyed layers (not their
        ``weight`` and ``bias``, which an unkeyed layer has too).

        Returns
        -------
        Parameter names as in :meth:`~torch.nn.Module.named_parameters`; empty for an
        unkeyed module.

        Examples
        --------
        >>> KeyedVAE(n_input=5, key_mode=None).key_parameter_names()
        []
        >>> names = KeyedVAE(n_input=5, n_hidden=8).key_parameter_names()
        >>> names[0]
        'z_encoder.encoder.fc_layers.Layer 0.0.scale_in.weight'
        """
        names = []
        for path, sub in self.named_modules():
            if path == "key_encoder":
                names += [f"{path}.{n}" for n, _ in sub.named_parameters()]
            elif getattr(sub, "is_keyed_layer", False):
                names += [
                    f"{path}.{n}" for n, _ in sub.named_parameters() if n not in ("weight", "bias")
                ]
        return names

    # -- feature scale (normal likelihood) ---------------------------------------------------
    def set_feature_scale(self, loc: ArrayLike, scale: ArrayLike) -> None:
        """Set the per-feature location and scale the normal likelihood standardises with.

        The encoder sees ``(x - loc) / scale`` and the likelihood is that of the standardised
        values, so raw log intensities, centred log-ratios or z-scores of the same data give
        the same model; the generative distribution ``px`` is on the data's own scale. Compute
        ``loc`` and ``scale`` from all sites' rows with
        :func:`~scinfl.module.feature_moments` (summed over sites) and
        :func:`~scinfl.module.scale_from_moments`, and set the same values at every site before
        training. The default (0 and 1) is the identity.

        Parameters
        ----------
        loc, scale
            Arrays or tensors of shape ``(n_input,)``, finite; ``scale`` non-negative (positive
            values below ``MIN_FEATURE_SCALE`` are raised to it). A scale of exactly 0 marks a
            feature observed too rarely to scale (fewer than two values over all sites,
            :func:`~scinfl.module.scale_from_moments`): the model treats its values as missing,
            in training and in new samples alike, since it cannot have learnt from them.

        Examples
        --------
        >>> vae = KeyedVAE(n_input=3, gene_likelihood="normal", key_mode=None)
        >>> vae.set_feature_scale(np.array([25.0, 20.0, 30.0]), np.array([2.0, 1.0, 0.5]))
        >>> vae.feature_loc.tolist(), vae.feature_scale.tolist()
        ([25.0, 20.0, 30.0], [2.0, 1.0, 0.5])
        >>> vae.set_feature_scale(np.array([25.0, 0.0, 30.0]), np.array([2.0, 0.0, 0.5]))
        >>> vae.feature_observed.tolist()
        [True, False, True]
        """
        if self.gene_likelihood != "normal":
            raise ValueError(
                "Feature scaling is for gene_likelihood='normal'; count likelihoods "
                f"({self.gene_likelihood!r}) model the counts themselves."
            )
        values = {}
        for name, value in (("loc", loc), ("scale", scale)):
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
            if tuple(tensor.shape) != (self.n_input,):
                raise ValueError(
                    f"{name} must have shape ({self.n_input},) (one value per feature), got "
                    f"{tuple(tensor.shape)}."
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} must be finite (no NaN or inf).")
            values[name] = tensor
        if (values["scale"] < 0).any():
            raise ValueError("scale must be non-negative.")
        observed = values["scale"] > 0
        self.feature_loc.copy_(values["loc"])
        self.feature_scale.copy_(
            torch.where(observed, values["scale"].clamp_min(MIN_FEATURE_SCALE), 1.0)
        )
        self.feature_observed.copy_(observed)

    @property
    def site_state_names(self) -> tuple[str, ...]:
        """State every site sets itself, identically, and never uploads: the feature scale.

        :func:`~scinfl.federated.get_shared_parameters` leaves these entries out, so no
        aggregation (DP noise included) touches them; they are saved with the model.
        """
        if self.gene_likelihood != "normal":
            return ()
        return ("feature_loc", "feature_scale", "feature_observed")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the shared parameters (and models saved before feature scaling existed) hold no
        # feature scale: keep the one this module has (the identity until set)
        for name in self.site_state_names:
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- inference / generative / loss -------------------------------------------------------
    def forward(
        self, *args: Any, **kwargs: Any
    ) -> tuple[dict, dict] | tuple[dict, dict, LossOutput]:
        """scvi-tools' forward pass, with the key vector computed once for all keyed layers.

        Parameters
        ----------
        *args, **kwargs
            As for :meth:`scvi.module.base.BaseModuleClass.forward`: a minibatch ``tensors``
            (registry key to tensor: ``"X"``, ``"batch"``, ``"labels"``, ...), and
            ``compute_loss`` (default ``True``) and per-step keyword dictionaries.

        Returns
        -------
        ``(inference_outputs, generative_outputs)``, and the :meth:`loss` when
        ``compute_loss``.

        Examples
        --------
        >>> vae = KeyedVAE(n_input=5, key_mode=None, n_hidden=8, n_latent=2)
        >>> tensors = {"X": torch.ones(3, 5), "batch": torch.zeros(3, 1), "labels": torch.zeros(3, 1)}
        >>> inference_outputs, generative_outputs, losses = vae(tensors)
        >>> inference_outputs["qz"].loc.shape, losses.loss.ndim
        (torch.Size([3, 2]), 0)
        """
        if self.key_encoder is None or not hasattr(self.key_encoder, "reuse"):
            return super().forward(*args, **kwargs)
        with self.key_encoder.reuse():
            return super().forward(*args, **kwargs)

    def _get_inference_input(self, tensors, full_forward_pass: bool = False):
        inputs = super()._get_inference_input(tensors, full_forward_pass=full_forward_pass)
        if self.gene_likelihood == "normal" and MODULE_KEYS.X_KEY in inputs:
            # the encoder sees standardised values; missing values are shown to it as 0 (the
            # feature's location); they never enter the loss
            x = (inputs[MODULE_KEYS.X_KEY] - self.feature_loc) / self.feature_scale
            x = torch.where(self.feature_observed, x, 0.0)
            inputs[MODULE_KEYS.X_KEY] = torch.nan_to_num(x, nan=0.0)
        return inputs

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        size_factor: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        transform_batch: torch.Tensor | int | None = None,
    ) -> dict[str, Distribution | None]:
        """Generative process; for ``normal`` a linear mean head and per-feature scale.

        The ``normal`` distribution ``px`` is on the data's scale: the network's standardised
        mean and standard deviation mapped back through the feature location and scale.
        Counts (``"nb"``, ``"zinb"``) use scvi-tools' :meth:`scvi.module.VAE.generative`.

        Parameters
        ----------
        z
            Latent samples, shape ``(n, n_latent)`` (or ``(n_samples, n, n_latent)``).
        library
            Log library size of each row, shape ``(n, 1)`` (counts only).
        batch_index
            Batch code of each row, shape ``(n, 1)``.
        cont_covs, cat_covs
            Continuous and categorical covariates, if registered (counts only).
        size_factor
            Library size factors, if registered (counts only).
        y
            Labels, passed to the decoder by scvi-tools (counts only).
        transform_batch
            Decode every row as this batch code instead of its own (``None``: its own).

        Returns
        -------
        ``{"px": ..., "pl": ..., "pz": ...}``: the data distribution (shape ``(n,
        n_input)``), the library prior (``None`` with the observed library size) and the
        latent prior ``N(0, 1)``.

        Examples
        --------
        >>> vae = KeyedVAE(n_input=5, key_mode=None, n_hidden=8, n_latent=2)
        >>> out = vae.generative(torch.zeros(3, 2), torch.full((3, 1), 2.0), torch.zeros(3, 1))
        >>> type(out["px"]).__name__, out["px"].mean.shape
        ('NegativeBinomial', torch.Size([3, 5]))
        """
        if self.gene_likelihood != "normal":
            return super().generative(
                z, library, batch_index, cont_covs, cat_covs, size_factor, y, transform_batch
            )
        if transform_batch is not None:
            batch_index = torch.ones_like(batch_index) * transform_batch
        # scvi's DecoderSCVI ends in a softmax over features (count proportions); for
        # continuous data use its hidden layers and the linear part of its scale head
        hidden = self.decoder.px_decoder(z, batch_index)
        mean = self.decoder.px_scale_decoder[0](hidden)
        mean = self.feature_loc + self.feature_scale * mean
        scale = self.feature_scale
        if self.normal_variance == "feature":
            scale = scale * (F.softplus(self.px_r) + 1e-3)
        return {
            MODULE_KEYS.PX_KEY: Normal(mean, scale.expand_as(mean)),
            MODULE_KEYS.PL_KEY: None,
            MODULE_KEYS.PZ_KEY: Normal(torch.zeros_like(z), torch.ones_like(z)),
        }

    def reconstruction_loss(
        self, x: torch.Tensor, px: Distribution, nonzero: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Negative log-likelihood per observation; NaN entries of ``x`` are masked out.

        For ``normal``, the likelihood of the standardised values (``px``'s log-density plus
        the log feature scale, its Jacobian), the same whatever scale the data come in.

        Parameters
        ----------
        x
            Observed data, shape ``(n, n_input)``; ``NaN`` marks a missing value (``normal``).
        px
            The generative distribution (``generative(...)["px"]``), on the data's scale.
        nonzero
            Flat positions of the non-zero counts, when the minibatch carries them (see
            :func:`~scinfl.module.nb_log_likelihood`); found from ``x`` otherwise.

        Returns
        -------
        Negative log-likelihood of each row, shape ``(n,)``.

        Examples
        --------
        >>> vae = KeyedVAE(n_input=2, gene_likelihood="normal", key_mode=None)
        >>> px = Normal(torch.zeros(1, 2), torch.ones(1, 2))
        >>> vae.reconstruction_loss(torch.tensor([[0.0, float("nan")]]), px)  # one value seen
        tensor([0.9189])
        """
        if self.gene_likelihood == "normal":
            observed = ~torch.isnan(x) & self.feature_observed
            value = torch.where(observed, x, self.feature_loc.expand_as(x))
            log_prob = standardised_normal_log_prob(value, px, self.feature_scale)
            return -(log_prob * observed).sum(-1)
        if self.gene_likelihood == "nb" and px.mu.dim() == x.dim():
            return -nb_log_likelihood(x, px.mu, px.theta, nonzero=nonzero)
        # several posterior draws at once (scvi-tools' marginal likelihood, importance
        # weights: a leading axis of draws), or a zero-inflated likelihood: the distribution's
        # own log-density broadcasts
        return -px.log_prob(x).sum(-1)

    def classification_logits(self, qz_mean: torch.Tensor) -> torch.Tensor:
        """Class logits from the latent mean (through the keyed class order, if any).

        Parameters
        ----------
        qz_mean
            Latent means, shape ``(n, n_latent)``.

        Returns
        -------
        Logits, shape ``(n, n_labels)``, column ``c`` for class ``c``.

        Raises
        ------
        MissingKeyError
            If the module is keyed and no key (class order) is set.

        Examples
        --------
        >>> vae = KeyedVAE(n_input=5, n_labels=3, classify=True, key_mode=None, n_latent=2)
        >>> vae.classification_logits(torch.zeros(4, 2)).shape
        torch.Size([4, 3])
        """
        logits = self.classifier(qz_mean)
        if self.class_order is not None:
            return logits[:, self.class_order]
        if self.is_keyed:
            raise MissingKeyError(MISSING_KEY_MESSAGE)
        return logits

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Distribution | None],
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """ELBO (with KL warm-up weight) plus, with a classifier, weighted cross-entropy.

        Parameters
        ----------
        tensors
            The minibatch, by registry key (``"X"``, and ``"labels"`` with a classifier).
        inference_outputs
            Output of :meth:`inference` (``"qz"`` read here).
        generative_outputs
            Output of :meth:`generative` (``"px"``, ``"pz"``).
        kl_weight
            Weight of the KL divergence (scvi-tools' warm-up sets it below 1 early on).

        Returns
        -------
        scvi-tools' :class:`~scvi.module.base.LossOutput`: the mean loss, the per-row
        reconstruction loss and KL divergence and, with a classifier,
        ``classification_loss``, ``logits`` and ``true_labels``.

        Examples
        --------
        >>> vae = KeyedVAE(n_input=5, key_mode=None, n_hidden=8, n_latent=2)
        >>> tensors = {"X": torch.ones(3, 5), "batch": torch.zeros(3, 1), "labels": torch.zeros(3, 1)}
        >>> inference_outputs, generative_outputs = vae(tensors, compute_loss=False)
        >>> vae.loss(tensors, inference_outputs, generative_outputs).reconstruction_loss[
        ...     "reconstruction_loss"
        ... ].shape
        torch.Size([3])
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        qz = inference_outputs[MODULE_KEYS.QZ_KEY]
        kl_z = kl_divergence(qz, generative_outputs[MODULE_KEYS.PZ_KEY]).sum(dim=-1)
        reconst = self.reconstruction_loss(
            x, generative_outputs[MODULE_KEYS.PX_KEY], tensors.get(NONZERO_KEY)
        )
        loss = torch.mean(reconst + kl_weight * kl_z)
        extra = {}
        if self.classifier is not None:
            y = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
            logits = self.classification_logits(qz.loc)
            weight = self.class_weights if self.training else None
            if self.has_unlabeled:
                ce = labelled_cross_entropy(logits, y, weight)
            else:
                ce = F.cross_entropy(logits, y, weight=weight)
            loss = loss + self.classification_ratio * ce
            extra = {"classification_loss": ce, "logits": logits, "true_labels": y}
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst,
            kl_local={MODULE_KEYS.KL_Z_KEY: kl_z},
            **extra,
        )


def labelled_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over the labelled rows (code below the number of classes); 0 if none.

    The weighted mean of :func:`torch.nn.functional.cross_entropy`, with unlabelled rows
    weighted 0 (no boolean indexing, so per-sample gradients under DP-SGD work alike).

    Examples
    --------
    >>> logits = torch.zeros(3, 2)
    >>> float(labelled_cross_entropy(logits, torch.tensor([0, 1, 2])))  # the third unlabelled
    0.6931471824645996
    """
    n_classes = logits.shape[-1]
    labelled = (y < n_classes).to(logits.dtype)
    safe = y.clamp(max=n_classes - 1)
    per_row = F.cross_entropy(logits, safe, weight=weight, reduction="none")
    rows = (labelled if weight is None else weight[safe] * labelled).sum()
    # no labelled row: 0, with a finite gradient (a clamped tiny denominator squared underflows)
    return (per_row * labelled).sum() / torch.where(rows > 0, rows, torch.ones_like(rows))
