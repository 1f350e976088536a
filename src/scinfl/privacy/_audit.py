"""The privacy audit of a trained model: every attack, every key guess, one tidy table.

:func:`audit` is a loop over attack objects (:class:`Attack`: ``name`` and ``run``), which share
one :class:`AuditConfig` and what :class:`AuditData` prepares once (split, public reference,
attackers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scvi
from scipy.optimize import linear_sum_assignment
from torch import nn

from scinfl.module import ModelKeyMode

from ._adaptive import class_order_from_prevalence
from ._attacks import (
    analytic_attack,
    attacker_module,
    decoder_inversion,
    dlg,
    infer_label,
    output_layer,
)
from ._framed import framed_attackers
from ._membership import loss_attack, rmia_attack, train_reference_models
from ._metrics import candidate_scores, partial_correlation, reidentification_rate, top_k_overlap
from ._upload import upload_gradient
from ._utility import NO_MODEL, ModelData, model_data, wrong_key_utility

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData
    from scvi.model.base import BaseModelClass

logger = logging.getLogger(__name__)

RECONSTRUCTION_ATTACKS = (
    "analytic",
    "decoder-inversion",
    "inverting-gradients",
    "dlg",
    "adaptive-key",
)
MEMBERSHIP_ATTACKS = ("loss", "rmia")
ATTACKS = (*RECONSTRUCTION_ATTACKS, "label-prevalence", *MEMBERSHIP_ATTACKS, "inference")
#: what :func:`audit` runs by default: every attack but the L2 ``"dlg"`` (inverting gradients is
#: the stronger gradient-matching attack) and ``"adaptive-key"`` (each costs minutes on CPU)
DEFAULT_ATTACKS = tuple(a for a in ATTACKS if a not in ("dlg", "adaptive-key"))
KEY_GUESSES = ("none", "wrong", "correct")
COLUMNS = ["defence", "attack", "key_guess", "upload", "metric", "value", "sd", "chance", "n"]
GLOBAL_MODEL = "global-model"
#: weight of the public-profile prior of the ``"adaptive-key"`` attacker (the gradient distance
#: is at most 2; the prior is a mean squared z-score over features)
ADAPTIVE_PRIOR_WEIGHT = 0.01


def training_rows(
    model: BaseModelClass, validation_size: float | None = None, seed: int | None = None
) -> np.ndarray:
    """Rows of the model's AnnData that :meth:`~scinfl.model.INFL.train_federated` trained on.

    These are the members of a membership inference attack. The validation rows were never
    trained on, but did select the best round. By default the split the model recorded when it
    was trained (``model.train_indices``); with ``validation_size`` (and ``seed``), the split
    ``train_federated`` draws for those values is reproduced instead.

    Parameters
    ----------
    model
        A model trained with :meth:`~scinfl.model.INFL.train_federated`.
    validation_size, seed
        Reproduce the split of ``train_federated(validation_size=..., seed=...)`` (default seed:
        ``scvi.settings.seed``).

    Returns
    -------
    Boolean mask over the rows of ``model.adata``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> _ = model.train_federated(max_rounds=1, batch_size=16, progress_bar=False, seed=0)
    >>> members = training_rows(model)
    >>> int(members.sum()) == len(model.train_indices_)
    True
    >>> bool((training_rows(model, validation_size=0.1, seed=0) == members).all())
    True
    """
    n = model.adata.n_obs
    if validation_size is None and seed is None:
        if getattr(model, "train_indices_", None) is None:
            raise ValueError(
                "The model records no training split (not trained in this session): pass the "
                "validation_size and seed given to train_federated, or members= to audit()."
            )
        mask = np.zeros(n, dtype=bool)
        mask[np.asarray(model.train_indices_)] = True
        return mask
    if model.adata_manager.registry["setup_args"].get("site_key") is None:
        raise ValueError("The model has no site_key: pass members= explicitly.")
    validation_size = 0.1 if validation_size is None else validation_size
    seed = scvi.settings.seed if seed is None else seed
    seed = 0 if seed is None else int(seed)
    rows = model._site_rows()
    mask = np.zeros(n, dtype=bool)
    for site in model._site_data(validation_size, seed):
        mask[rows[site.name][site.train_idx]] = True
    return mask


def _as_mask(rows, n: int, name: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise ValueError(f"{name}= as a boolean mask needs {n} entries, got {rows.shape}.")
        return rows
    mask = np.zeros(n, dtype=bool)
    mask[rows.astype(np.int64)] = True
    return mask


def _fresh_module(model) -> nn.Module:
    """An untrained module of the model's architecture (no key set)."""
    init = model.init_params_
    kwargs = dict(init.get("non_kwargs", {}))
    for group in init.get("kwargs", {}).values():
        kwargs.update(group)
    fresh = type(model)(model.adata, **kwargs).module
    target = set(model.module.state_dict())
    mode = getattr(fresh, "_key_mode", None)
    if set(fresh.state_dict()) != target and isinstance(mode, ModelKeyMode):
        mode.install_model(fresh)
    if set(fresh.state_dict()) != target:
        raise ValueError("Cannot rebuild the model's architecture for the reference models.")
    return fresh


def _defence_name(model, framed: bool = False) -> str:
    name = getattr(model.module, "key_mode_name", None) or "plain"
    if getattr(model, "dp_epsilon_", None) is not None:
        name = f"{name}+dp"
    elif _trained_with_sample_dp(model):
        name = f"{name}+sample-dp"
    if framed:
        name = f"{name}+frames"
    return name


def _trained_with_sample_dp(model) -> bool:
    """Whether the model's last federated run was DP-SGD at the sites (epsilon per site)."""
    history = getattr(model, "federated_history_", None)
    return history is not None and "dp_epsilon" in history and history["dp_epsilon"].notna().any()


def _upload_name(size: int) -> str:
    return "one-sample" if size == 1 else f"batch-{size}"


def _draw_uploads(
    data: ModelData,
    members: np.ndarray,
    size: int,
    n_uploads: int,
    rng,
    aggregated_sites: int = 1,
) -> list[np.ndarray]:
    """Rows of each upload: distinct victims for one-sample uploads, one site's rows otherwise.

    With ``aggregated_sites > 1`` (secure aggregation) what the server sees is the sum of that
    many sites' uploads: ``size`` rows from each of as many distinct sites (all its rows from a
    site that has fewer).
    """
    member_rows = np.flatnonzero(members)
    if aggregated_sites > 1:
        by_site = {s: member_rows[data.sites[member_rows] == s] for s in np.unique(data.sites)}
        eligible = [rows for rows in by_site.values() if len(rows)]
        if len(eligible) < aggregated_sites:
            raise ValueError(
                f"aggregated_sites={aggregated_sites} needs as many sites with training rows; "
                f"{len(eligible)} have them."
            )
        uploads = []
        for _ in range(n_uploads):
            chosen = rng.choice(len(eligible), aggregated_sites, replace=False)
            rows = [
                rng.choice(eligible[i], min(size, len(eligible[i])), replace=False) for i in chosen
            ]
            uploads.append(np.sort(np.concatenate(rows)))
        return uploads
    if size == 1:
        count = min(n_uploads, len(member_rows))
        return [np.array([r]) for r in rng.choice(member_rows, count, replace=False)]
    by_site = {s: member_rows[data.sites[member_rows] == s] for s in np.unique(data.sites)}
    eligible = [rows for rows in by_site.values() if len(rows) >= size]
    if not eligible:
        raise ValueError(f"No site has {size} training rows for a batch upload.")
    return [
        np.sort(rng.choice(eligible[rng.integers(len(eligible))], size, replace=False))
        for _ in range(n_uploads)
    ]


def _match(recs: np.ndarray, truths: np.ndarray, reference: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (reconstruction, upload row) the attacker is scored on: best matches.

    One reconstruction of a batch upload is scored against the row it resembles most; one
    reconstruction per row is matched to the rows by the assignment of highest total
    partial correlation.
    """
    scores = np.atleast_2d(candidate_scores(recs, truths, reference))
    if len(recs) == 1:
        return [(0, int(scores[0].argmax()))]
    rec_idx, row_idx = linear_sum_assignment(-scores)
    return list(zip(rec_idx.tolist(), row_idx.tolist(), strict=True))


@dataclass
class AuditConfig:
    """Settings of :func:`audit`: one object shared by every attack.

    Parameters
    ----------
    key_guesses
        Subset of ``("none", "wrong", "correct")``.
    upload_sizes
        Rows per audited upload (``1`` = the one-sample worst case; a batch upload takes its
        rows from one site).
    aggregated_sites
        Under secure aggregation (``train_federated(privacy="secagg")``) the server sees only
        the sum of a round's uploads: with ``aggregated_sites=k`` each audited upload is that
        of ``k`` sites together, ``upload_sizes`` rows from each (or all of a smaller site's
        rows; equal weights per row; the reconstruction is scored against the participant it
        matches best). The ``"label-prevalence"`` attack is skipped (it reads single uploads).
    n_victims
        Uploads attacked per upload size.
    n_candidates, top_k
        Re-identification candidates and the ``k`` of the top-``k`` overlap (at most half the
        features).
    public
        Rows (indices or mask) of the attacker's public data: the reference profile, the
        reference models' training data and RMIA's population. Default: a random half of the
        rows the model did not train on (the other half are the non-members).
    members
        Rows (indices or mask) the model was trained on. Default: :func:`training_rows` (the
        split the model recorded, or the one ``validation_size`` and ``training_seed``
        reproduce; only with the model's own AnnData).
    labels_key
        ``.obs`` column of labels for the ``"inference"`` utility when the model has no
        classifier.
    validation_size, training_seed
        Reproduce the split of ``train_federated`` (see :func:`training_rows`); default: the
        split the model recorded.
    dlg_iters, dlg_lr
        Iterations and learning rate of the gradient-matching attacks.
    n_label_uploads
        One-sample uploads the ``"label-prevalence"`` attacker observes (one gradient each,
        cheap): the more it sees, the better its class-frequency estimate.
    n_membership
        Members and non-members (each) scored by membership inference, at most.
    n_references, reference_epochs, reference_lr, reference_batch_size
        RMIA's reference models (default epochs: the number of rounds in the model's
        federated history, else 50).
    fpr
        False-positive rate of the membership TPR.
    kl_weight
        KL weight of the audited round and of the membership losses.
    defence
        Name of the defence in the table (default: the key mode, ``"plain"`` without a key,
        with ``"+dp"`` for a model trained with DP-FedAvg (``privacy="dp"``), ``"+sample-dp"``
        for one trained with DP-SGD at the sites (``sample_dp_epsilon``: its upload attacks
        see the uploads without that noise, an upper bound; a warning says so) and
        ``"+frames"`` for one trained under secret frames).
    secret_frame
        Audit the model as trained under ``secret_frames``: the server holds the global
        parameters in this secret frame and each upload in the same one (the attacker's best
        case), and every key guess decodes both with its own frames
        (:func:`~scinfl.privacy.framed_attackers`). Default: the frame of the model's selected
        round when it was trained with ``secret_frames=True`` (``model.secret_frame_``), else
        none.
    seed
        Seed of the audit (victims, wrong key, splits, attacks). Each part draws from its own
        stream, so its draws do not depend on the attacks chosen.

    Examples
    --------
    >>> config = AuditConfig(n_victims=2, key_guesses=("none", "correct"))
    >>> config.n_victims, config.dlg_iters
    (2, 200)
    """

    key_guesses: Sequence[str] = KEY_GUESSES
    upload_sizes: Sequence[int] = (1,)
    aggregated_sites: int = 1
    n_victims: int = 5
    n_candidates: int = 100
    top_k: int = 50
    public: Any = None
    members: Any = None
    labels_key: str | None = None
    validation_size: float | None = None
    training_seed: int | None = None
    dlg_iters: int = 200
    dlg_lr: float = 0.1
    n_label_uploads: int = 100
    n_membership: int = 500
    n_references: int = 4
    reference_epochs: int | None = None
    reference_lr: float = 1e-3
    reference_batch_size: int = 128
    fpr: float = 0.01
    kl_weight: float = 1.0
    defence: str | None = None
    secret_frame: str | int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        bad = set(self.key_guesses) - set(KEY_GUESSES)
        if bad:
            raise ValueError(f"Unknown key guesses {sorted(bad)}; choose from {KEY_GUESSES}.")
        if self.n_victims < 1:
            raise ValueError(
                f"n_victims must be >= 1 (uploads attacked per size), got {self.n_victims}."
            )

    def rng(self, part: int) -> np.random.Generator:
        """The random stream of one part: 0 public split, 1 uploads, 2 membership, 3 labels.

        Parameters
        ----------
        part
            Which part of the audit draws from it.

        Returns
        -------
        A new generator seeded with ``(seed, part)``: the same draws on every call.

        Examples
        --------
        >>> config = AuditConfig(seed=1)
        >>> int(config.rng(2).integers(100)) == int(config.rng(2).integers(100))
        True
        """
        return np.random.default_rng([self.seed, part])


@dataclass
class AuditData:
    """What every attack of one audit shares: data, split, public reference and attackers.

    Built by :meth:`prepare` from a model and an :class:`AuditConfig`.

    Attributes
    ----------
    data
        The registered data the attacks draw rows from.
    adata
        The AnnData audited (``None``: the model's own).
    members, public_rows, held_out
        Training rows (mask), the attacker's public rows and the held-out non-members.
    reference, reference_sd
        Mean and standard deviation of the public rows' encoder input.
    attackers
        The attacker's module for each key guess run (one, ``"none"``, for an unkeyed model
        outside secret frames).
    views
        Under secret frames, each key guess's decoding of an upload; else empty.
    keyed, framed
        Whether the model has a key mode, and whether it is audited under secret frames.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> config = AuditConfig(validation_size=0.2, training_seed=0)
    >>> shared = AuditData.prepare(model, None, config)
    >>> sorted(shared.attackers), int(shared.members.sum())
    (['correct', 'none', 'wrong'], 48)
    """

    data: ModelData
    adata: Any
    members: np.ndarray
    public_rows: np.ndarray
    held_out: np.ndarray
    reference: np.ndarray
    reference_sd: np.ndarray
    attackers: dict[str, nn.Module]
    views: dict = field(default_factory=dict)
    keyed: bool = False
    framed: bool = False

    @classmethod
    def prepare(
        cls, model: BaseModelClass, adata: AnnData | MuData | None, config: AuditConfig
    ) -> AuditData:
        """Split the rows, compute the public reference and build the attackers.

        Parameters
        ----------
        model
            The trained model audited (its key set).
        adata
            Data set up like the training data (``None``: the model's own; then the members
            default to :func:`training_rows`).
        config
            The audit's settings (members, public rows, key guesses, seed, secret frame).

        Returns
        -------
        The shared data of the audit.

        Raises
        ------
        ValueError
            When the model has no key, no member split can be found, or no public row is left.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
        >>> shared = AuditData.prepare(model, None, AuditConfig(key_guesses=["none"], validation_size=0.2, training_seed=0))
        >>> len(shared.public_rows) + len(shared.held_out) + int(shared.members.sum())
        60
        """
        module = model.module
        if not module.has_key:
            raise ValueError("The model has no key set: the audit needs it to make the uploads.")
        own_data = adata is None or adata is model.adata
        data = model_data(model, adata)
        n = data.n_obs
        if config.members is None:
            if not own_data:
                raise ValueError("With another AnnData than the model's, pass members=.")
            members = training_rows(model, config.validation_size, config.training_seed)
        else:
            members = _as_mask(config.members, n, "members")
        non_members = np.flatnonzero(~members)
        if config.public is None:
            shuffled = config.rng(0).permutation(non_members)
            public_rows = np.sort(shuffled[: len(shuffled) // 2])
            held_out = np.sort(shuffled[len(shuffled) // 2 :])
        else:
            public_rows = np.flatnonzero(_as_mask(config.public, n, "public"))
            held_out = np.setdiff1d(non_members, public_rows)
            if members[public_rows].any():
                logger.warning("Some public rows are training rows of the model.")
        if len(public_rows) == 0:
            raise ValueError(
                "No public rows: the model trained on every row (as under sample_dp_epsilon or "
                "validation_size=0). Pass public= (rows of the same kind it did not train on) "
                "and members= (those it did), e.g. from a split made before training."
            )
        public_x = data.encoder_input(public_rows, bool(getattr(module, "log_variational", True)))

        keyed = getattr(module, "key_encoder", None) is not None
        secret_frame = config.secret_frame
        if secret_frame is None:
            secret_frame = getattr(model, "secret_frame_", None)
        framed = secret_frame is not None
        guesses = list(config.key_guesses) if keyed or framed else ["none"]
        views = {}
        if framed:
            key = getattr(model, "_key", None)
            if key is None:
                raise ValueError(
                    "Auditing secret frames needs the model's scinfl.Key: create or load the "
                    "model with key=."
                )
            attackers, views = framed_attackers(module, key, secret_frame, guesses, config.seed)
        else:
            attackers = {g: attacker_module(module, g, seed=config.seed) for g in guesses}
        return cls(
            data=data,
            adata=adata,
            members=members,
            public_rows=public_rows,
            held_out=held_out,
            reference=public_x.mean(0),
            reference_sd=public_x.std(0),
            attackers=attackers,
            views=views,
            keyed=keyed,
            framed=framed,
        )


@runtime_checkable
class Attack(Protocol):
    """An attack of :func:`audit`: a family of attacks run on what :class:`AuditData` holds.

    ``run`` returns the rows of the audit table it scores (every column but ``defence``).

    Examples
    --------
    >>> isinstance(MembershipAttack(), Attack)
    True
    """

    #: name of the attack family
    name: str

    def run(self, model: BaseModelClass, data: AuditData, config: AuditConfig) -> list[dict]:
        """Attack with every key guess of ``data``; the rows of the table.

        Parameters
        ----------
        model
            The trained model audited (its key set).
        data
            What the attacks share (:meth:`AuditData.prepare`).
        config
            The audit's settings.

        Returns
        -------
        The rows of the audit table this attack scores, one dict per (key guess, upload,
        metric) with the columns of :data:`COLUMNS` but ``defence``; empty when skipped.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
        >>> config = AuditConfig(key_guesses=["none"], validation_size=0.2, training_seed=0)
        >>> attack: Attack = InferenceAttack()
        >>> rows = attack.run(model, AuditData.prepare(model, None, config), config)
        >>> sorted({row["metric"] for row in rows})
        ['accuracy', 'agreement', 'ari', 'knn_accuracy']
        """
        ...


def _methods(methods: Sequence[str], known: Sequence[str], family: str) -> tuple[str, ...]:
    unknown = set(methods) - set(known)
    if unknown:
        raise ValueError(f"Unknown {family} attacks {sorted(unknown)}; choose from {known}.")
    return tuple(m for m in known if m in methods)


def _reconstruct(method, attacker, grads, size, config: AuditConfig, seed, prior):
    """Reconstructions ``(k, p)`` and recovered labels (or ``None``)."""
    if method == "analytic":
        return analytic_attack(attacker, grads)[None], None
    if method == "decoder-inversion":
        return decoder_inversion(attacker, grads)[None], None
    if method == "adaptive-key":
        # inverting gradients that also optimises the key material from the attacker's key
        # guess, starting at the public mean with the public profile as a prior; labels are
        # optimised too (without the key, the class order is unknown)
        rec = dlg(
            attacker,
            grads,
            n_samples=size,
            labels="optimize",
            distance="cosine",
            n_iter=config.dlg_iters,
            lr=config.dlg_lr,
            init="mean",
            reference=prior[0],
            optimize_key=True,
            prior_weight=ADAPTIVE_PRIOR_WEIGHT,
            prior_scale=prior[1],
            seed=seed,
        )
        return rec.x, rec.labels
    cosine = method == "inverting-gradients"
    rec = dlg(
        attacker,
        grads,
        n_samples=size,
        labels="infer" if cosine else "optimize",
        distance="cosine" if cosine else "l2",
        n_iter=config.dlg_iters,
        lr=config.dlg_lr,
        seed=seed,
    )
    return rec.x, rec.labels


class ReconstructionAttack:
    """Reconstruction of training rows from uploads: analytic, decoder and gradient inversion.

    The uploads are the gradient of a site's loss on ``config.upload_sizes`` training rows at
    the global parameters (deterministic forward: the worst case for the defender). Methods:
    ``"analytic"`` (:func:`~scinfl.privacy.analytic_attack`), ``"decoder-inversion"``
    (:func:`~scinfl.privacy.decoder_inversion`; NB likelihood with per-gene dispersion only,
    skipped otherwise), ``"inverting-gradients"`` (cosine gradient matching, iDLG labels),
    ``"dlg"`` (L2 gradient matching, labels optimised), see :func:`~scinfl.privacy.dlg`, and
    ``"adaptive-key"``: inverting gradients that also optimises the key material from the key
    guess, labels optimised, from the public mean with the public profile as a prior (key
    modes with continuous key material only, skipped otherwise). Scores:
    ``reidentification`` among ``config.n_candidates`` rows (chance ``1 / n_candidates``),
    ``partial_corr`` given the public mean profile, ``top{k}_overlap``, and
    ``label_recovery`` (gradient matching, models with a classifier), in the encoder's input
    space (``log1p`` counts for count models); a batch upload's reconstructions are matched to
    its rows first (best match).

    Parameters
    ----------
    methods
        Subset of ``("analytic", "decoder-inversion", "inverting-gradients", "dlg",
        "adaptive-key")``, run in that order.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> config = AuditConfig(
    ...     n_victims=2, key_guesses=["none"], validation_size=0.2, training_seed=0
    ... )
    >>> rows = ReconstructionAttack(["analytic"]).run(
    ...     model, AuditData.prepare(model, None, config), config
    ... )
    >>> sorted({row["metric"] for row in rows})
    ['partial_corr', 'reidentification', 'top10_overlap']
    """

    name = "reconstruction"

    def __init__(
        self, methods: Sequence[str] = ("analytic", "decoder-inversion", "inverting-gradients")
    ) -> None:
        self.methods = _methods(methods, RECONSTRUCTION_ATTACKS, self.name)

    def _applicable(self, module) -> list[str]:
        methods = list(self.methods)
        if "decoder-inversion" in methods and (
            getattr(module, "gene_likelihood", None) != "nb"
            or getattr(module, "dispersion", None) != "gene"
        ):
            logger.info(
                "decoder-inversion skipped: it needs gene_likelihood='nb', dispersion='gene'."
            )
            methods.remove("decoder-inversion")
        if "adaptive-key" in methods and not getattr(
            getattr(module, "key_encoder", None), "differentiable", False
        ):
            logger.info(
                "adaptive-key skipped: it needs a key mode with continuous key material "
                "('pooled' or 'feature-inr')."
            )
            methods.remove("adaptive-key")
        return methods

    def run(self, model: BaseModelClass, data: AuditData, config: AuditConfig) -> list[dict]:
        """Attack ``config.n_victims`` uploads of each size with every method and key guess.

        Parameters
        ----------
        model
            The trained model audited (its key set).
        data
            What the attacks share (:meth:`AuditData.prepare`).
        config
            The audit's settings.

        Returns
        -------
        The rows of the audit table this attack scores, one dict per (key guess, upload,
        metric) with the columns of :data:`COLUMNS` but ``defence``; empty when skipped.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
        >>> config = AuditConfig(n_victims=1, key_guesses=["none"], validation_size=0.2, training_seed=0)
        >>> rows = ReconstructionAttack(["analytic"]).run(model, AuditData.prepare(model, None, config), config)
        >>> [(row["attack"], row["upload"], row["n"]) for row in rows][:1]
        [('analytic', 'one-sample', 1)]
        """
        module = model.module
        methods = self._applicable(module)
        if not methods:
            return []
        rng = config.rng(1)
        rows_data = data.data
        log_var = bool(getattr(module, "log_variational", True))
        n_cands = min(config.n_candidates, rows_data.n_obs)
        rows = []
        for size in config.upload_sizes:
            uploads = _draw_uploads(
                rows_data, data.members, size, config.n_victims, rng, config.aggregated_sites
            )
            victims = np.unique(np.concatenate(uploads))
            others = np.setdiff1d(np.arange(rows_data.n_obs), victims)
            extra = rng.choice(others, min(len(others), 20 * n_cands), replace=False)
            pool = np.concatenate([victims, extra])  # candidates of re-identification
            pool_x = rows_data.encoder_input(pool, log_var)
            position = {int(r): i for i, r in enumerate(pool)}
            scored = {(m, g): [] for m in methods for g in data.attackers}
            for i, upload in enumerate(uploads):
                truths = pool_x[[position[int(r)] for r in upload]]
                for key, found in _attack_upload(module, methods, data, config, upload, truths, i):
                    scored[key].extend(found)
                logger.info("Upload %d/%d (%s) attacked.", i + 1, len(uploads), _upload_name(size))
            for (method, guess), found in scored.items():
                metrics = _reconstruction_metrics(module, data, config, found, pool_x, position)
                for metric, (values, chance) in metrics.items():
                    rows.append(
                        {
                            "attack": method,
                            "key_guess": guess,
                            "upload": _upload_name(size),
                            "metric": metric,
                            "value": float(np.mean(values)),
                            "sd": float(np.std(values)),
                            "chance": chance,
                            "n": len(values),
                        }
                    )
        return rows


def _attack_upload(module, methods, data: AuditData, config: AuditConfig, upload, truths, i):
    """``((method, guess), [(reconstruction, victim row, label hit), ...])`` of one upload."""
    rows_data = data.data
    classify = getattr(module, "classifier", None) is not None
    grads = upload_gradient(module, rows_data.tensors(upload), kl_weight=config.kl_weight)
    for guess, attacker in data.attackers.items():
        seen = data.views[guess](grads) if guess in data.views else grads
        for method in methods:
            recs, labels = _reconstruct(
                method,
                attacker,
                seen,
                len(upload),
                config,
                seed=i,
                prior=(data.reference, data.reference_sd),
            )
            found = []
            for k, j in _match(recs, truths, data.reference):
                label_hit = (
                    float(labels[k] == rows_data.labels[upload[j]])
                    if labels is not None and classify
                    else np.nan
                )
                found.append((recs[k], int(upload[j]), label_hit))
            yield (method, guess), found


def _reconstruction_metrics(module, data: AuditData, config: AuditConfig, found, pool_x, position):
    """``{metric: (values, chance)}`` of the matched reconstructions of one method and guess."""
    reference = data.reference
    p = module.n_input
    k_top = max(1, min(config.top_k, p // 2))
    n_cands = min(config.n_candidates, data.data.n_obs)
    recs = np.stack([f[0] for f in found])
    victims_pos = [position[f[1]] for f in found]
    truths = pool_x[victims_pos]
    hits = [
        reidentification_rate(r[None], [v], pool_x, reference, n_cands, seed=config.seed)
        for r, v in zip(recs, victims_pos, strict=True)
    ]
    metrics = {
        "reidentification": (hits, 1.0 / n_cands),
        "partial_corr": (partial_correlation(recs, truths, reference), 0.0),
        f"top{k_top}_overlap": (
            [top_k_overlap(r, t, k_top, reference) for r, t in zip(recs, truths, strict=True)],
            k_top / p,
        ),
    }
    labels_found = [f[2] for f in found]
    if not np.isnan(labels_found).all():
        n_labels = int(getattr(module, "n_labels", 0) or 0)
        metrics["label_recovery"] = (labels_found, 1.0 / max(n_labels, 1))
    return metrics


class LabelPrevalenceAttack:
    """Label recovery of iDLG on one-sample uploads, the class order guessed by prevalence.

    iDLG's output unit of each of ``config.n_label_uploads`` one-sample uploads, mapped to a
    class. Without the key (guesses ``"none"`` and ``"wrong"``) the attacker ignores its key
    guess's class order and matches the units of all uploads to the public label counts
    (:func:`~scinfl.privacy.class_order_from_prevalence`); with ``"correct"`` it reads them
    through the key. An unkeyed model needs no guess: its units are the classes. Under secret
    frames each guess reads the units from its own view of the uploads. Score:
    ``label_recovery``, its ``chance`` the most prevalent public class. Skipped without a
    classifier and under secure aggregation (it reads single uploads).

    Examples
    --------
    >>> LabelPrevalenceAttack().name
    'label-prevalence'
    """

    name = "label-prevalence"

    def run(self, model: BaseModelClass, data: AuditData, config: AuditConfig) -> list[dict]:
        """Read the label of every upload with every key guess.

        Parameters
        ----------
        model
            The trained model audited (its key set).
        data
            What the attacks share (:meth:`AuditData.prepare`).
        config
            The audit's settings.

        Returns
        -------
        The rows of the audit table this attack scores, one dict per (key guess, upload,
        metric) with the columns of :data:`COLUMNS` but ``defence``; empty when skipped.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
        >>> config = AuditConfig(key_guesses=["none"], n_label_uploads=5, validation_size=0.2, training_seed=0)
        >>> [row] = LabelPrevalenceAttack().run(model, AuditData.prepare(model, None, config), config)
        >>> row["metric"], row["n"]
        ('label_recovery', 5)
        """
        module = model.module
        if config.aggregated_sites > 1:
            logger.info("label-prevalence skipped: it reads single uploads, not aggregates.")
            return []
        if getattr(module, "classifier", None) is None:
            logger.info("label-prevalence skipped: the model has no classifier.")
            return []
        views, rows_data = data.views, data.data
        n_labels = int(module.n_labels)
        uploads = _draw_uploads(rows_data, data.members, 1, config.n_label_uploads, config.rng(3))
        layer = output_layer(module, "classifier")[0]
        gradients = [
            upload_gradient(module, rows_data.tensors(rows), kl_weight=config.kl_weight)
            for rows in uploads
        ]
        truth = np.array([rows_data.labels[rows[0]] for rows in uploads])
        prevalence = np.bincount(rows_data.labels[data.public_rows], minlength=n_labels)
        rows = []
        for guess, attacker in data.attackers.items():
            view = views.get(guess)
            units = [infer_label(view(g) if view else g, layer) for g in gradients]
            if guess == "correct":
                order = (
                    np.arange(n_labels)
                    if getattr(module, "class_order", None) is None
                    else attacker.class_order.numpy()
                )
            elif getattr(module, "class_order", None) is None and view is None:
                order = np.arange(n_labels)
            else:
                order = class_order_from_prevalence(units, prevalence)
            found = np.argsort(order)[units]  # the class each unit carries under ``order``
            hits = (found == truth).astype(float)
            rows.append(
                {
                    "attack": self.name,
                    "key_guess": guess,
                    "upload": _upload_name(1),
                    "metric": "label_recovery",
                    "value": float(hits.mean()),
                    "sd": float(hits.std()),
                    # an attacker without gradients guesses the most prevalent public class
                    "chance": float(prevalence.max() / max(prevalence.sum(), 1)),
                    "n": len(hits),
                }
            )
        return rows


class MembershipAttack:
    """Membership inference on the global model: ``"loss"`` and ``"rmia"``.

    ``"loss"`` is :func:`~scinfl.privacy.loss_attack`; ``"rmia"`` is
    :func:`~scinfl.privacy.rmia_attack`, with reference models the attacker trains on the
    public rows with its key guess. Up to ``config.n_membership`` members and as many held-out
    rows are scored: ``auc`` and the TPR at ``config.fpr``.

    Parameters
    ----------
    methods
        Subset of ``("loss", "rmia")``.

    Examples
    --------
    >>> MembershipAttack(["rmia"]).methods
    ('rmia',)
    """

    name = "membership"

    def __init__(self, methods: Sequence[str] = MEMBERSHIP_ATTACKS) -> None:
        self.methods = _methods(methods, MEMBERSHIP_ATTACKS, self.name)

    def run(self, model: BaseModelClass, data: AuditData, config: AuditConfig) -> list[dict]:
        """Score members against held-out rows with every key guess.

        Parameters
        ----------
        model
            The trained model audited (its key set).
        data
            What the attacks share (:meth:`AuditData.prepare`).
        config
            The audit's settings.

        Returns
        -------
        The rows of the audit table this attack scores, one dict per (key guess, upload,
        metric) with the columns of :data:`COLUMNS` but ``defence``; empty when skipped.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
        >>> config = AuditConfig(key_guesses=["none"], n_membership=10, validation_size=0.2, training_seed=0)
        >>> rows = MembershipAttack(["loss"]).run(model, AuditData.prepare(model, None, config), config)
        >>> sorted(row["metric"] for row in rows)
        ['auc', 'tpr@1%fpr']
        """
        members, held_out, rows_data = data.members, data.held_out, data.data
        count = min(config.n_membership, len(held_out), int(members.sum()))
        if count < 2:
            logger.warning("Membership inference skipped: fewer than 2 held-out rows.")
            return []
        epochs = config.reference_epochs
        if epochs is None:
            history = getattr(model, "federated_history_", None)
            epochs = (
                int(history["round"].nunique())
                if history is not None and "round" in history
                else 50
            )
        rng = config.rng(2)
        member_t = rows_data.tensors(
            np.sort(rng.choice(np.flatnonzero(members), count, replace=False))
        )
        non_member_t = rows_data.tensors(np.sort(rng.choice(held_out, count, replace=False)))
        population = rows_data.tensors(data.public_rows)
        fpr, kl_weight = config.fpr, config.kl_weight
        rows = []
        for guess, attacker in data.attackers.items():
            results = {}
            if "loss" in self.methods:
                results["loss"] = loss_attack(attacker, member_t, non_member_t, fpr, kl_weight)
            if "rmia" in self.methods:

                def factory(attacker=attacker):
                    fresh = _fresh_module(model)
                    if getattr(fresh, "key_encoder", None) is not None:
                        fresh.key_encoder.set_coordinates(attacker.key_encoder.coordinates.clone())
                        if getattr(fresh, "classifier", None) is not None:
                            fresh.set_class_order(attacker.class_order)
                    return fresh

                references = train_reference_models(
                    factory,
                    population,
                    n_models=config.n_references,
                    epochs=epochs,
                    batch_size=config.reference_batch_size,
                    lr=config.reference_lr,
                    seed=config.seed,
                )
                results["rmia"] = rmia_attack(
                    attacker, references, member_t, non_member_t, population, fpr=fpr
                )
            for method, result in results.items():
                for metric, value, chance in (
                    ("auc", result.auc, 0.5),
                    (f"tpr@{fpr:.0%}fpr", result.tpr, fpr),
                ):
                    rows.append(
                        {
                            "attack": method,
                            "key_guess": guess,
                            "upload": GLOBAL_MODEL,
                            "metric": metric,
                            "value": value,
                            "sd": np.nan,
                            "chance": chance,
                            "n": 2 * count,
                        }
                    )
            logger.info("Membership inference with key guess %r done.", guess)
        return rows


class InferenceAttack:
    """Utility of the global model run with each key guess (``"inference"``).

    :func:`~scinfl.privacy.wrong_key_utility` with the audit's attackers, with its model-free
    reference (key guess ``"no model"``: kNN accuracy and ARI on principal components of the
    input). Needs labels: the model's, or ``config.labels_key``; skipped without.

    Examples
    --------
    >>> InferenceAttack().name
    'inference'
    """

    name = "inference"

    def run(self, model: BaseModelClass, data: AuditData, config: AuditConfig) -> list[dict]:
        """Utility metrics of the model with every key guess.

        Parameters
        ----------
        model
            The trained model audited (its key set).
        data
            What the attacks share (:meth:`AuditData.prepare`).
        config
            The audit's settings.

        Returns
        -------
        The rows of the audit table this attack scores, one dict per (key guess, upload,
        metric) with the columns of :data:`COLUMNS` but ``defence``; empty when skipped.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
        >>> config = AuditConfig(key_guesses=["none"], validation_size=0.2, training_seed=0)
        >>> rows = InferenceAttack().run(model, AuditData.prepare(model, None, config), config)
        >>> sorted({row["key_guess"] for row in rows})
        ['no model', 'none']
        """
        if data.data.label_names is None and config.labels_key is None:
            logger.info("Inference utility skipped: the model has no labels; pass labels_key=.")
            return []
        utility = wrong_key_utility(
            model,
            data.adata,
            labels=config.labels_key,
            guesses=list(data.attackers),
            seed=config.seed,
            attackers=data.attackers,
        )
        return [
            {
                "attack": self.name,
                "upload": GLOBAL_MODEL,
                "sd": np.nan,
                "n": data.data.n_obs,
                **record,
            }
            for record in utility.to_dict("records")
        ]


def _resolve(attacks: Sequence[str | Attack]) -> list[Attack]:
    """Attack objects for names (grouped by family, in the order of :data:`ATTACKS`)."""
    names = [a for a in attacks if isinstance(a, str)]
    unknown = set(names) - set(ATTACKS)
    if unknown:
        raise ValueError(f"Unknown attacks {sorted(unknown)}; choose from {ATTACKS}.")
    resolved: list[Attack] = []
    if reconstruction := [a for a in RECONSTRUCTION_ATTACKS if a in names]:
        resolved.append(ReconstructionAttack(reconstruction))
    if "label-prevalence" in names:
        resolved.append(LabelPrevalenceAttack())
    if membership := [a for a in MEMBERSHIP_ATTACKS if a in names]:
        resolved.append(MembershipAttack(membership))
    if "inference" in names:
        resolved.append(InferenceAttack())
    return resolved + [a for a in attacks if not isinstance(a, str)]


def audit(
    model: BaseModelClass,
    adata: AnnData | MuData | None = None,
    attacks: Sequence[str | Attack] = DEFAULT_ATTACKS,
    config: AuditConfig | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Audit a trained model against the attacks of the threat model, with every key guess.

    The adversary is the server (``docs/privacy.md``): it holds the global model, each site's
    upload and public data, and knows the key generator but not the key. For each key guess
    (``"none"``: secret material at zero, ``"wrong"``: a key from the same generator,
    ``"correct"``: the key, the upper bound; see :func:`~scinfl.privacy.attacker_module`) the
    audit runs each attack in turn, on what they share (:class:`AuditData`) with one
    :class:`AuditConfig`:

    - :class:`ReconstructionAttack`: ``"analytic"``, ``"decoder-inversion"``,
      ``"inverting-gradients"``, ``"dlg"`` and ``"adaptive-key"`` on uploads of training rows;
    - :class:`LabelPrevalenceAttack`: ``"label-prevalence"``, labels of many uploads;
    - :class:`MembershipAttack`: ``"loss"`` and ``"rmia"`` on the global model;
    - :class:`InferenceAttack`: ``"inference"``, the model's utility with the key guess.

    For an unkeyed model every key guess is the same attacker: it is run once and its rows are
    repeated for each guess.

    Parameters
    ----------
    model
        A trained :class:`~scinfl.model.INFL` with its key set.
    adata
        Data set up like the training data (default: the model's own).
    attacks
        Attack names, a subset of ``("analytic", "decoder-inversion", "inverting-gradients",
        "dlg", "adaptive-key", "label-prevalence", "loss", "rmia", "inference")`` (by default
        all but ``"dlg"`` and ``"adaptive-key"``), and/or :class:`Attack` objects (run after
        the named ones). The gradient-matching attacks take most of the time: on pbmc68k (765
        genes) with 2 CPU cores, about 0.1 s per iteration, i.e. ``n_victims x
        len(key_guesses) x dlg_iters x 0.1`` seconds each (4 minutes for a keyed model with
        the defaults, 1.5 for an unkeyed one).
    config
        The settings (default: :class:`AuditConfig`'s).
    **overrides
        Fields of :class:`AuditConfig` that replace those of ``config``, e.g.
        ``n_victims=2``.

    Returns
    -------
    Tidy DataFrame, one row per defence x attack x key guess x upload x metric, with columns
    ``defence``, ``attack``, ``key_guess``, ``upload`` (``"one-sample"``, ``"batch-32"``, or
    ``"global-model"`` for membership and inference), ``metric``, ``value`` (mean over
    victims), ``sd``, ``chance`` (the value of an attacker that guesses) and ``n``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=200, n_vars=100, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    >>> _ = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False, seed=0)
    >>> df = audit(model, attacks=["analytic", "loss"], n_victims=2, training_seed=0)
    >>> sorted(df["metric"].unique())
    ['auc', 'partial_corr', 'reidentification', 'top50_overlap', 'tpr@1%fpr']
    >>> config = AuditConfig(n_victims=2, key_guesses=["none"], training_seed=0)
    >>> same = audit(model, attacks=[ReconstructionAttack(["analytic"])], config=config)
    >>> part = df[(df["attack"] == "analytic") & (df["key_guess"] == "none")]
    >>> same.equals(part.reset_index(drop=True))
    True
    """
    attacks = _resolve(attacks)
    unknown = set(overrides) - {f.name for f in fields(AuditConfig)}
    if unknown:
        raise TypeError(
            f"audit() got unknown settings {sorted(unknown)}; the settings are the fields of "
            "AuditConfig."
        )
    config = replace(config or AuditConfig(), **overrides)
    if _trained_with_sample_dp(model):
        logger.warning(
            "The model trained with sample-level DP (DP-SGD at the sites): the audit attacks "
            "its uploads without the DP-SGD noise, so its upload attacks measure what the "
            "model leaks without that noise (an upper bound), not the guarantee."
        )
    data = AuditData.prepare(model, adata, config)
    rows = [row for attack in attacks for row in attack.run(model, data, config)]
    if not (data.keyed or data.framed):
        # one attacker for every guess; the model-free reference rows stay as they are
        rows = [
            {**row, "key_guess": guess}
            for row in rows
            for guess in (
                [row["key_guess"]] if row["key_guess"] == NO_MODEL else config.key_guesses
            )
        ]
    table = pd.DataFrame(rows, columns=COLUMNS[1:])
    table.insert(0, "defence", config.defence or _defence_name(model, data.framed))
    return table
