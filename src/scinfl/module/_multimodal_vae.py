"""The keyed multi-modal VAE behind :class:`scinfl.model.MultiOmicsINFL`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import Encoder, FCLayers
from torch import nn
from torch.distributions import Distribution, Normal, kl_divergence

from scinfl.key import Key

from ._key_modes import get_key_mode
from ._likelihood import standardised_normal_log_prob
from ._vae import MIN_FEATURE_SCALE

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from scinfl.federated import SiteData

ModalityLikelihood = Literal["nb", "normal"]
Joint = Literal["poe", "mean"]

#: Variance floor of each modality's posterior (as scvi-tools' ``Encoder``'s ``var_eps``).
VAR_EPS = 1e-4


def observed_rows(X: np.ndarray | sparse.spmatrix) -> np.ndarray:
    """Rows that hold a modality: any entry not ``NaN`` (a missing modality is a row of ``NaN``).

    Parameters
    ----------
    X
        Observations x features, dense or sparse (whose implicit zeros are observed).

    Returns
    -------
    Boolean array of shape ``(n_obs,)``.

    Examples
    --------
    >>> observed_rows(np.array([[1.0, np.nan], [np.nan, np.nan]])).tolist()
    [True, False]
    """
    if sparse.issparse(X):
        X = sparse.csr_matrix(X)
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        n_nan = np.bincount(rows[np.isnan(X.data)], minlength=X.shape[0])
        return n_nan < X.shape[1]
    return ~np.isnan(np.asarray(X, dtype=np.float64)).all(axis=1)


class MultiModalKeyedVAE(BaseModuleClass):
    """A VAE over several modalities: one keyed encoder each, one joint latent, one decoder each.

    Each modality has its own encoder (its linear layers keyed, as in
    :class:`~scinfl.module.KeyedVAE`), its own likelihood and its own decoder from the shared
    latent ``z``. The modalities' Gaussian posteriors combine into one (``joint``) over the
    modalities a sample holds, so that a sample with any subset of modalities has a latent;
    an alignment term (the symmetric KL divergence between the posteriors of a sample's
    modalities, as MultiVI's ``"Jeffreys"`` penalty) keeps the latent of one modality close to
    that of all. A missing modality is a row of ``NaN`` in its field; a site without the
    modality never runs its encoder or decoder, so their parameters get no update there
    (:meth:`parameter_counts` says so to the aggregation).

    Parameters
    ----------
    modalities
        Number of features of each modality, by modality name (in order).
    registry_keys
        Registry key of each modality's data (e.g. ``{"rna": "X", "prot": "X_prot"}``).
    likelihoods
        ``"nb"`` (counts) or ``"normal"`` (log intensities, ratios: ``NaN`` entries are masked
        out of the loss; the features are standardised with a location and scale every site
        sets alike, see :meth:`set_feature_scale`) by modality.
    n_batch
        Number of batch categories (0 or 1 for none), given to the decoders.
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes, as in scvi-tools.
    joint
        ``"poe"``: product of the modalities' Gaussian experts and the prior (precision
        weighted); ``"mean"``: the average of their means and variances (mixture-like, as
        MultiVI's equal weighting).
    alignment_weight
        Weight of the symmetric KL divergence between the posteriors of a sample's
        modalities (0 to turn it off).
    subset_elbo
        Also train each modality's own posterior (with the prior: the latent of a sample that
        has only this modality) to reconstruct every modality of the samples that hold
        several, as MoPoE-VAE trains its subsets; the loss adds the mean of these ELBOs.
        The latent from one modality then lands near the latent from all, where that modality
        cannot tell what the others can (synthetic RNA + protein: median distance 0.62 of
        the median distance between cells, against 0.94 without, 3 seeds,
        ``docs/multiomics.md``). Costs one more pass of every decoder per modality on those
        samples.
    key_mode, key_strength
        Key mode of the encoders' linear layers (``"pooled"``, the default; ``None``: no key)
        and its ``lambda``. The per-feature modes of :mod:`scinfl.module.experimental`
        (``"feature"``, ``"feature-inr"``) key the layers that read every feature, and each
        encoder here reads one modality's: they key no layer (with a warning);
        :class:`~scinfl.model.MultiOmicsINFL` refuses them.

    Examples
    --------
    >>> vae = MultiModalKeyedVAE({"rna": 20, "prot": 5}, {"rna": "X", "prot": "X_prot"},
    ...                          {"rna": "nb", "prot": "normal"}, key_mode=None, n_hidden=8)
    >>> x = {"X": torch.poisson(torch.ones(4, 20)), "X_prot": torch.randn(4, 5)}
    >>> x["X_prot"][0] = float("nan")  # the first sample has no protein data
    >>> vae.inference(x, torch.zeros(4, 1))["qz"].loc.shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        modalities: Mapping[str, int],
        registry_keys: Mapping[str, str],
        likelihoods: Mapping[str, ModalityLikelihood],
        n_batch: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        joint: Joint = "poe",
        alignment_weight: float = 1.0,
        subset_elbo: bool = True,
        key_mode: str | None = "pooled",
        key_strength: float = 1.0,
    ) -> None:
        super().__init__()
        if joint not in ("poe", "mean"):
            raise ValueError(f"joint must be 'poe' or 'mean', got {joint!r}.")
        for name in modalities:
            if likelihoods[name] not in ("nb", "normal"):
                raise ValueError(
                    f"The likelihood of modality {name!r} must be 'nb' or 'normal', got "
                    f"{likelihoods[name]!r}."
                )
        self.modalities = dict(modalities)
        self.registry_keys = dict(registry_keys)
        self.likelihoods = dict(likelihoods)
        self.n_batch = n_batch
        self.n_latent = n_latent
        self.joint = joint
        self.alignment_weight = alignment_weight
        self.subset_elbo = subset_elbo
        # a modality no row of a minibatch holds runs no encoder or decoder (faster); per-row
        # gradients (sample-level DP, under torch.func.vmap) cannot branch on the data and
        # switch this off: the absent modality's terms are then weighted by 0
        self.skip_absent_modalities = True
        cat_list = [n_batch] if n_batch > 1 else None
        self.encoders = nn.ModuleDict(
            {
                name: Encoder(
                    n_input,
                    n_latent,
                    n_layers=n_layers,
                    n_hidden=n_hidden,
                    dropout_rate=dropout_rate,
                    var_eps=VAR_EPS,
                    use_batch_norm=False,
                    use_layer_norm=True,
                )
                for name, n_input in self.modalities.items()
            }
        )
        self.decoders = nn.ModuleDict(
            {
                name: FCLayers(
                    n_latent,
                    n_hidden,
                    n_cat_list=cat_list,
                    n_layers=n_layers,
                    n_hidden=n_hidden,
                    dropout_rate=0.0,
                    use_batch_norm=False,
                    use_layer_norm=True,
                )
                for name in self.modalities
            }
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(n_hidden, n_input) for name, n_input in self.modalities.items()}
        )
        self.px_r = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(n_input))
                for name, n_input in self.modalities.items()
                if self.likelihoods[name] == "nb"
            }
        )
        for name in self.normal_modalities:
            # per-feature standardisation (identity until set): saved with the model, set by
            # every site alike, never uploaded (site_state_names)
            self.register_buffer(f"feature_loc_{name}", torch.zeros(self.modalities[name]))
            self.register_buffer(f"feature_scale_{name}", torch.ones(self.modalities[name]))
            self.register_buffer(
                f"feature_observed_{name}", torch.ones(self.modalities[name], dtype=torch.bool)
            )
        if key_mode not in ("pooled", None):
            # the per-feature modes install themselves on a layer reading all the key
            # encoder's features; no encoder here does, so they key nothing (MultiOmicsINFL
            # refuses them; a model saved with one before still loads)
            logger.warning(
                "key_mode=%r keys the layers that read every feature; the encoders here read "
                "one modality each, so no layer is keyed: the model computes without its key.",
                key_mode,
            )
        self.key_mode_name = key_mode
        self.key_encoder = None
        if key_mode is not None:
            self._key_mode = get_key_mode(key_mode, key_strength=key_strength)
            self.key_encoder = self._key_mode.build_key_encoder(sum(self.modalities.values()))
            for encoder in self.encoders.values():
                self._key_mode.install(encoder, self.key_encoder)

    # -- key ---------------------------------------------------------------------------------
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

        No effect on an unkeyed module. The material is a non-persistent buffer: it enters no
        ``state_dict``.

        Parameters
        ----------
        key
            The federation's :class:`~scinfl.Key`; ``None`` removes the material (the keyed
            encoders then refuse to run, :class:`~scinfl.key.MissingKeyError`).

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"rna": 4}, {"rna": "X"}, {"rna": "nb"}, n_hidden=8)
        >>> vae.set_key(Key.generate())
        >>> vae.has_key
        True
        >>> vae.set_key(None)
        >>> vae.has_key
        False
        """
        if self.key_encoder is None:
            return
        n_input = sum(self.modalities.values())
        material = None if key is None else self._key_mode.key_material(key, n_input)
        self.key_encoder.set_coordinates(material)

    def forward(
        self, *args: Any, **kwargs: Any
    ) -> tuple[dict, dict] | tuple[dict, dict, LossOutput]:
        """scvi-tools' forward pass, with the key vector computed once for all keyed layers.

        Parameters
        ----------
        *args, **kwargs
            As for :meth:`scvi.module.base.BaseModuleClass.forward`: a minibatch ``tensors``
            (every modality's registry key, and ``"batch"``), and ``compute_loss`` (default
            ``True``) and per-step keyword dictionaries.

        Returns
        -------
        ``(inference_outputs, generative_outputs)``, and the :meth:`loss` when
        ``compute_loss``.

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"rna": 4, "prot": 2}, {"rna": "X", "prot": "X_prot"},
        ...                          {"rna": "nb", "prot": "normal"}, key_mode=None, n_hidden=8)
        >>> tensors = {"X": torch.ones(3, 4), "X_prot": torch.zeros(3, 2), "batch": torch.zeros(3, 1)}
        >>> _, _, losses = vae(tensors)
        >>> sorted(losses.reconstruction_loss)
        ['reconstruction_prot', 'reconstruction_rna']
        """
        if self.key_encoder is None or not hasattr(self.key_encoder, "reuse"):
            return super().forward(*args, **kwargs)
        with self.key_encoder.reuse():
            return super().forward(*args, **kwargs)

    # -- feature scale -----------------------------------------------------------------------
    @property
    def normal_modalities(self) -> list[str]:
        """Modalities with the normal likelihood, in order."""
        return [name for name in self.modalities if self.likelihoods[name] == "normal"]

    @property
    def feature_scale_keys(self) -> tuple[str, ...]:
        """Registry keys of the fields the feature scale covers, side by side, in order."""
        return tuple(self.registry_keys[name] for name in self.normal_modalities)

    @property
    def site_state_names(self) -> tuple[str, ...]:
        """State every site sets itself and never uploads: the feature scale."""
        return tuple(
            f"feature_{what}_{name}"
            for name in self.normal_modalities
            for what in ("loc", "scale", "observed")
        )

    def set_feature_scale(self, loc: ArrayLike, scale: ArrayLike) -> None:
        """Set the location and scale of the normal modalities' features, side by side.

        Parameters
        ----------
        loc, scale
            Arrays of the features of every normal modality, in order (the columns of
            :attr:`feature_scale_keys`' fields side by side); ``scale`` non-negative, 0 for a
            feature observed too rarely to scale, which is then treated as missing
            (:meth:`~scinfl.module.KeyedVAE.set_feature_scale`).

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"a": 2, "b": 1}, {"a": "X", "b": "X_b"},
        ...                          {"a": "normal", "b": "normal"}, key_mode=None)
        >>> vae.set_feature_scale(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0]))
        >>> vae.feature_loc_b.tolist(), vae.feature_scale_b.tolist()
        ([3.0], [2.0])
        >>> vae.set_feature_scale(np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0]))
        >>> vae.feature_observed_a.tolist()  # scale 0: too rarely observed, read as missing
        [False, True]
        """
        n = sum(self.modalities[name] for name in self.normal_modalities)
        loc, scale = (np.asarray(v, dtype=np.float32).ravel() for v in (loc, scale))
        if loc.shape != (n,) or scale.shape != (n,):
            raise ValueError(
                f"loc and scale must have shape ({n},) (the normal modalities' features side "
                f"by side), got {loc.shape} and {scale.shape}."
            )
        if not (np.isfinite(loc).all() and np.isfinite(scale).all()) or (scale < 0).any():
            raise ValueError("loc and scale must be finite, and scale non-negative.")
        start = 0
        for name in self.normal_modalities:
            stop = start + self.modalities[name]
            part = torch.from_numpy(scale[start:stop])
            getattr(self, f"feature_loc_{name}").copy_(torch.from_numpy(loc[start:stop]))
            getattr(self, f"feature_scale_{name}").copy_(
                torch.where(part > 0, part.clamp_min(MIN_FEATURE_SCALE), 1.0)
            )
            getattr(self, f"feature_observed_{name}").copy_(part > 0)
            start = stop

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the shared parameters hold no feature scale: keep this module's
        for name in self.site_state_names:
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- mosaic ------------------------------------------------------------------------------
    def parameter_counts(self, site: SiteData) -> dict[str, float]:
        """Training rows of ``site`` that inform each modality's parameters, where not all do.

        The parameters of a modality's encoder, decoder and dispersion learn only from the
        rows that hold the modality; FedAvg weights them by this count instead of the site's
        number of training rows (a site without the modality leaves them as they were and
        counts 0, so it does not pull them back).

        Parameters
        ----------
        site
            A :class:`~scinfl.federated.SiteData`.

        Returns
        -------
        Count by parameter name, for the parameters whose count is not ``site.n_train``.

        Examples
        --------
        >>> from scinfl.federated import SiteData
        >>> vae = MultiModalKeyedVAE({"a": 2, "b": 1}, {"a": "X", "b": "X_b"},
        ...                          {"a": "normal", "b": "normal"}, key_mode=None, n_hidden=4)
        >>> site = SiteData.from_arrays("s", np.ones((5, 2)), validation_size=0, X_b=np.full((5, 1), np.nan))
        >>> counts = vae.parameter_counts(site)
        >>> counts["heads.b.weight"], "heads.a.weight" in counts
        (0.0, False)
        """
        counts = {}
        for name, key in self.registry_keys.items():
            n = float(observed_rows(site.fields[key][site.train_idx]).sum())
            if n == site.n_train:
                continue
            prefixes = (f"encoders.{name}.", f"decoders.{name}.", f"heads.{name}.")
            for parameter in self.state_dict():
                if parameter.startswith(prefixes) or parameter == f"px_r.{name}":
                    counts[parameter] = n
        return counts

    # -- inference / generative / loss -------------------------------------------------------
    def _get_inference_input(self, tensors) -> dict:
        return {
            "x": {key: tensors[key] for key in self.registry_keys.values()},
            "batch_index": tensors.get(REGISTRY_KEYS.BATCH_KEY),
        }

    def _encoder_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.likelihoods[name] == "nb":
            return torch.log1p(torch.nan_to_num(x, nan=0.0))
        loc = getattr(self, f"feature_loc_{name}")
        scale = getattr(self, f"feature_scale_{name}")
        # missing values are shown as 0 (the feature's location); they never enter the loss
        x = torch.where(getattr(self, f"feature_observed_{name}"), (x - loc) / scale, 0.0)
        return torch.nan_to_num(x, nan=0.0)

    def experts(self, x: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
        """Each modality's posterior (mean, variance) and its observed rows (boolean mask).

        A modality no row of ``x`` holds is left out (its encoder does not run).

        Parameters
        ----------
        x
            Each modality's data by registry key, shape ``(n, n_features)``; a row of ``NaN``
            is a missing modality.

        Returns
        -------
        ``{modality: (mean, variance, observed)}``: the posterior's mean and variance, shape
        ``(n, n_latent)``, and which rows hold the modality, shape ``(n,)``.

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"rna": 4, "prot": 2}, {"rna": "X", "prot": "X_prot"},
        ...                          {"rna": "nb", "prot": "normal"}, key_mode=None, n_hidden=8)
        >>> x = {"X": torch.ones(3, 4), "X_prot": torch.zeros(3, 2)}
        >>> x["X_prot"][0] = float("nan")
        >>> vae.experts(x)["prot"][2].tolist()
        [False, True, True]
        """
        out = {}
        for name, key in self.registry_keys.items():
            observed = ~torch.isnan(x[key]).all(dim=-1)
            if self.skip_absent_modalities and not bool(observed.any()):
                continue
            mean, var, _ = self.encoders[name](self._encoder_input(name, x[key]))
            out[name] = (mean, var, observed)
        return out

    def combine(self, experts: Mapping[str, tuple], n: int, like: torch.Tensor) -> Normal:
        """The joint posterior of the modalities each row holds (:attr:`joint`).

        A row without any modality gets the prior ``N(0, 1)``.

        Parameters
        ----------
        experts
            ``{modality: (mean, variance, observed)}``, as :meth:`experts` returns.
        n
            Number of rows.
        like
            A tensor whose dtype and device the result takes.

        Returns
        -------
        The joint Gaussian posterior, batch shape ``(n, n_latent)``.

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"a": 2}, {"a": "X"}, {"a": "normal"}, key_mode=None, n_latent=2)
        >>> expert = (torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([True, False]))
        >>> vae.combine({"a": expert}, 2, expert[0]).scale[:, 0]  # N(0, 1) times the prior; prior
        tensor([0.7071, 1.0000])
        """
        zeros = torch.zeros(n, self.n_latent, dtype=like.dtype, device=like.device)
        if self.joint == "poe":
            precision, weighted = zeros + 1.0, zeros.clone()
            for mean, var, observed in experts.values():
                w = observed.unsqueeze(-1).to(mean.dtype)
                precision = precision + w / var
                weighted = weighted + w * mean / var
            return Normal(weighted / precision, precision.rsqrt())
        count, means, variances = zeros.clone(), zeros.clone(), zeros.clone()
        for mean, var, observed in experts.values():
            w = observed.unsqueeze(-1).to(mean.dtype)
            count, means, variances = count + w, means + w * mean, variances + w * var
        none = count == 0
        count = count.clamp_min(1.0)
        return Normal(means / count, torch.where(none, 1.0, variances / count).sqrt())

    @auto_move_data
    def inference(
        self,
        x: Mapping[str, torch.Tensor],
        batch_index: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, Any]:
        """Joint posterior ``qz`` and a sample ``z``; the modalities' posteriors as ``experts``.

        Parameters
        ----------
        x
            Each modality's data by registry key, shape ``(n, n_features)``; a row of ``NaN``
            is a missing modality.
        batch_index
            Batch code of each row (unused by the encoders; accepted for scvi-tools).
        n_samples
            Number of latent samples ``z``.

        Returns
        -------
        ``{"qz": ..., "z": ..., "experts": ...}``: the joint posterior (:meth:`combine`), a
        sample of shape ``(n, n_latent)`` (``(n_samples, n, n_latent)`` for several), and
        :meth:`experts`.
        """
        like = next(iter(x.values()))
        experts = self.experts(x)
        qz = self.combine(experts, like.shape[0], like)
        z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))
        return {"qz": qz, "z": z, "experts": experts}

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {
            "z": inference_outputs["z"],
            "x": {key: tensors[key] for key in self.registry_keys.values()},
            "batch_index": tensors.get(REGISTRY_KEYS.BATCH_KEY),
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        x: Mapping[str, torch.Tensor],
        batch_index: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Each modality's distribution ``px`` (on the data's own scale), by modality name.

        Counts: a negative binomial whose mean is the observed library size times a
        proportion; continuous: a normal whose location and scale map back through the
        feature scale.

        Parameters
        ----------
        z
            Latent samples, shape ``(n, n_latent)``.
        x
            Each modality's data by registry key: the observed library sizes of the count
            modalities, and which modalities any row holds (the others are not decoded).
        batch_index
            Batch code of each row, shape ``(n, 1)`` (read with ``n_batch > 1``).

        Returns
        -------
        ``{"px": {modality: distribution}, "pz": N(0, 1)}``, each ``px`` of shape ``(n,
        n_features)``.

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"rna": 4, "prot": 2}, {"rna": "X", "prot": "X_prot"},
        ...                          {"rna": "nb", "prot": "normal"}, key_mode=None, n_latent=2)
        >>> x = {"X": torch.ones(3, 4), "X_prot": torch.zeros(3, 2)}
        >>> px = vae.generative(torch.zeros(3, 2), x)["px"]
        >>> type(px["rna"]).__name__, px["prot"].mean.shape
        ('NegativeBinomial', torch.Size([3, 2]))
        """
        cats = (batch_index,) if self.n_batch > 1 and batch_index is not None else ()
        px = {}
        for name, key in self.registry_keys.items():
            if self.skip_absent_modalities and not bool((~torch.isnan(x[key]).all(-1)).any()):
                continue
            out = self.heads[name](self.decoders[name](z, *cats))
            if self.likelihoods[name] == "nb":
                library = torch.nan_to_num(x[key], nan=0.0).sum(-1, keepdim=True).clamp_min(1.0)
                mu = library * torch.softmax(out, dim=-1)
                px[name] = NegativeBinomial(mu=mu, theta=torch.exp(self.px_r[name]))
            else:
                loc = getattr(self, f"feature_loc_{name}")
                scale = getattr(self, f"feature_scale_{name}")
                px[name] = Normal(loc + scale * out, scale.expand_as(out))
        return {"px": px, "pz": Normal(torch.zeros_like(z), torch.ones_like(z))}

    def reconstruction_loss(
        self, x: Mapping[str, torch.Tensor], px: Mapping[str, Distribution]
    ) -> dict[str, torch.Tensor]:
        """Negative log-likelihood of each modality per row; ``NaN`` entries masked out.

        For normal modalities, the likelihood of the standardised values (plus the log feature
        scale, its Jacobian), the same whatever scale the data come in.

        Parameters
        ----------
        x
            Each modality's data by registry key.
        px
            Each decoded modality's distribution by modality name (:meth:`generative`).

        Returns
        -------
        Negative log-likelihood by modality name, each of shape ``(n,)`` (0 for a row
        without the modality).

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"a": 2}, {"a": "X"}, {"a": "normal"}, key_mode=None)
        >>> px = {"a": Normal(torch.zeros(2, 2), torch.ones(2, 2))}
        >>> x = {"X": torch.tensor([[0.0, 0.0], [float("nan")] * 2])}  # the second row: missing
        >>> loss = vae.reconstruction_loss(x, px)["a"]
        >>> round(float(loss[0]), 4), bool(loss[1] == 0)
        (1.8379, True)
        """
        losses = {}
        for name, dist in px.items():
            value = x[self.registry_keys[name]]
            observed = ~torch.isnan(value)
            if self.likelihoods[name] == "normal":
                observed = observed & getattr(self, f"feature_observed_{name}")
            value = torch.where(observed, value, dist.mean.detach())
            if self.likelihoods[name] == "normal":
                scale = getattr(self, f"feature_scale_{name}")
                log_prob = standardised_normal_log_prob(value, dist, scale)
            else:
                log_prob = dist.log_prob(value)
            losses[name] = -(log_prob * observed).sum(-1)
        return losses

    def alignment(self, experts: Mapping[str, tuple]) -> torch.Tensor | float:
        """Symmetric KL divergence between the posteriors of each pair of a row's modalities.

        Parameters
        ----------
        experts
            ``{modality: (mean, variance, observed)}``, as :meth:`experts` returns.

        Returns
        -------
        The sum over pairs of modalities, per row, shape ``(n,)`` (0 for a row with fewer than
        two); ``0.0`` when fewer than two modalities are present.

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"a": 2, "b": 2}, {"a": "X", "b": "X_b"},
        ...                          {"a": "normal", "b": "normal"}, key_mode=None, n_latent=2)
        >>> seen = torch.tensor([True])
        >>> vae.alignment({"a": (torch.ones(1, 2), torch.ones(1, 2), seen),
        ...                "b": (-torch.ones(1, 2), torch.ones(1, 2), seen)})
        tensor([8.])
        """
        names = list(experts)
        total = 0.0
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                (ma, va, oa), (mb, vb, ob) = experts[a], experts[b]
                qa, qb = Normal(ma, va.sqrt()), Normal(mb, vb.sqrt())
                sym = (kl_divergence(qa, qb) + kl_divergence(qb, qa)).sum(-1)
                total = total + sym * (oa & ob)
        return total

    def subset_loss(
        self,
        x: Mapping[str, torch.Tensor],
        experts: Mapping[str, tuple],
        batch_index: torch.Tensor | None,
        kl_weight: float,
    ) -> torch.Tensor | float:
        """Mean over modalities of the negative ELBO of each one-modality posterior, per row.

        Only rows holding at least two modalities count (for a row with one, that posterior
        is the joint one, already in the loss).

        Parameters
        ----------
        x
            Each modality's data by registry key.
        experts
            ``{modality: (mean, variance, observed)}``, as :meth:`experts` returns.
        batch_index
            Batch code of each row, for the decoders.
        kl_weight
            Weight of the KL divergence.

        Returns
        -------
        The mean negative ELBO per row, shape ``(n,)``; ``0.0`` with fewer than two
        modalities present.
        """
        if len(experts) < 2:
            return 0.0
        several = sum(observed.to(torch.int64) for _, _, observed in experts.values()) >= 2
        total = 0.0
        for name, (mean, var, observed) in experts.items():
            q = self.combine({name: (mean, var, observed)}, mean.shape[0], mean)
            generated = self.generative(q.rsample(), x, batch_index)
            reconst = sum(self.reconstruction_loss(x, generated["px"]).values())
            kl = kl_divergence(q, generated["pz"]).sum(dim=-1)
            total = total + (reconst + kl_weight * kl) * (observed & several)
        return total / len(experts)

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Any],
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """ELBO over the modalities each row holds, plus the alignment and subset terms.

        The alignment term is weighted by ``alignment_weight``; with ``subset_elbo``, the
        one-modality ELBOs of the rows that hold several are added (:meth:`subset_loss`).

        Parameters
        ----------
        tensors
            The minibatch, by registry key (every modality's, and ``"batch"``).
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.
        kl_weight
            Weight of the KL divergence (scvi-tools' warm-up sets it below 1 early on).

        Returns
        -------
        scvi-tools' :class:`~scvi.module.base.LossOutput`: the mean loss,
        ``reconstruction_<modality>`` per row, the KL divergence per row, and the mean
        ``alignment`` and ``subset_elbo`` terms as extra metrics.

        Examples
        --------
        >>> vae = MultiModalKeyedVAE({"rna": 4, "prot": 2}, {"rna": "X", "prot": "X_prot"},
        ...                          {"rna": "nb", "prot": "normal"}, key_mode=None, n_hidden=8)
        >>> tensors = {"X": torch.ones(3, 4), "X_prot": torch.zeros(3, 2), "batch": torch.zeros(3, 1)}
        >>> inference_outputs, generative_outputs = vae(tensors, compute_loss=False)
        >>> losses = vae.loss(tensors, inference_outputs, generative_outputs)
        >>> losses.loss.ndim, sorted(losses.extra_metrics)
        (0, ['alignment', 'subset_elbo'])
        """
        x = {key: tensors[key] for key in self.registry_keys.values()}
        qz = inference_outputs["qz"]
        kl_z = kl_divergence(qz, generative_outputs["pz"]).sum(dim=-1)
        reconst = self.reconstruction_loss(x, generative_outputs["px"])
        total = sum(reconst.values()) if reconst else torch.zeros_like(kl_z)
        experts = inference_outputs["experts"]
        align = self.alignment(experts)
        subsets = 0.0
        if self.subset_elbo:
            batch_index = tensors.get(REGISTRY_KEYS.BATCH_KEY)
            subsets = self.subset_loss(x, experts, batch_index, kl_weight)
        loss = torch.mean(total + kl_weight * kl_z + self.alignment_weight * align + subsets)
        return LossOutput(
            loss=loss,
            reconstruction_loss={f"reconstruction_{k}": v for k, v in reconst.items()},
            kl_local={"kl_divergence_z": kl_z},
            extra_metrics={
                "alignment": torch.as_tensor(align).mean().detach(),
                "subset_elbo": torch.as_tensor(subsets).mean().detach(),
            },
        )
