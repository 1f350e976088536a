"""Membership inference on a released model: the LOSS attack and an RMIA-style attack."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import logsumexp
from scvi import REGISTRY_KEYS
from scvi.module._constants import MODULE_KEYS
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


def _n_rows(tensors: Tensors) -> int:
    return int(tensors[REGISTRY_KEYS.X_KEY].shape[0])


def _slice(tensors: Tensors, rows) -> dict[str, torch.Tensor]:
    return {name: value[rows] for name, value in tensors.items()}


def _concat(*parts: Tensors) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


@torch.no_grad()
def sample_losses(
    module: nn.Module, tensors: Tensors, kl_weight: float = 1.0, batch_size: int = 1024
) -> np.ndarray:
    """Per-sample loss of a model: negative ELBO, plus the weighted cross-entropy with a classifier.

    The loss a site minimises (:func:`scinfl.privacy.client_loss`), one value per row, with the
    deterministic forward pass (dropout off, ``z`` = posterior mean): the signal of membership
    inference attacks, since a model fits its training rows better than unseen ones.

    Parameters
    ----------
    module
        A :class:`~scinfl.module.KeyedVAE` (with the key, or an attacker's key guess, set).
    tensors
        Registry tensors (``X``, ``batch``, ``labels``), e.g. from
        :func:`~scinfl.privacy.make_tensors`.
    kl_weight
        Weight of the KL term.
    batch_size
        Rows per forward pass.

    Returns
    -------
    ``(n,)`` losses (lower = better fit).

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors
    >>> vae = KeyedVAE(n_input=10, key_mode=None)
    >>> sample_losses(vae, make_tensors(np.ones((3, 10)))).shape
    (3,)
    """
    was_training = module.training
    module.eval()
    key_encoder = getattr(module, "key_encoder", None)
    reuse = key_encoder.reuse() if hasattr(key_encoder, "reuse") else contextlib.nullcontext()
    out = []
    try:
        with reuse:
            for start in range(0, _n_rows(tensors), batch_size):
                t = _slice(tensors, slice(start, start + batch_size))
                inference_outputs = module.inference(**module._get_inference_input(t))
                inference_outputs[MODULE_KEYS.Z_KEY] = inference_outputs[MODULE_KEYS.QZ_KEY].loc
                generative_outputs = module.generative(
                    **module._get_generative_input(t, inference_outputs)
                )
                loss = module.loss(t, inference_outputs, generative_outputs, kl_weight=kl_weight)
                per_sample = sum(loss.reconstruction_loss.values()) + kl_weight * sum(
                    loss.kl_local.values()
                )
                logits = getattr(loss, "logits", None)
                if logits is not None:
                    ce = F.cross_entropy(logits, loss.true_labels.view(-1), reduction="none")
                    per_sample = per_sample + module.classification_ratio * ce
                out.append(per_sample.double().cpu())
    finally:
        module.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def membership_metrics(
    scores: np.ndarray, is_member: np.ndarray, fpr: float = 0.01
) -> tuple[float, float]:
    """ROC-AUC of membership scores and the true-positive rate at a false-positive rate.

    Parameters
    ----------
    scores
        Higher = more likely a member.
    is_member
        Booleans, the truth.
    fpr
        False-positive rate at which the TPR is read (the largest TPR whose FPR does not
        exceed it; with fewer than ``1 / fpr`` non-members that means no false positive).

    Returns
    -------
    ``(auc, tpr)``. Chance is ``(0.5, fpr)``.

    Examples
    --------
    >>> membership_metrics([0.9, 0.8, 0.3, 0.1], [True, True, False, False])
    (1.0, 1.0)
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(is_member, dtype=bool)
    if truth.all() or not truth.any():
        raise ValueError("Membership metrics need both members and non-members.")
    auc = float(roc_auc_score(truth, scores))
    fprs, tprs, _ = roc_curve(truth, scores)
    return auc, float(tprs[fprs <= fpr + 1e-12].max())


@dataclass
class MembershipResult:
    """Scores of a membership inference attack on members and non-members.

    Attributes
    ----------
    scores
        Membership score of every target row (higher = more likely a member): members first.
    is_member
        The truth.
    auc
        ROC-AUC (chance 0.5).
    tpr
        True-positive rate at false-positive rate ``fpr`` (chance ``fpr``).
    fpr
        The false-positive rate of ``tpr``.

    Examples
    --------
    >>> result = MembershipResult.from_scores(np.array([0.9, 0.4, 0.6, 0.1]), np.array([1, 1, 0, 0]))
    >>> result.auc, result.tpr, result.is_member.tolist()
    (0.75, 0.5, [True, True, False, False])
    """

    scores: np.ndarray = field(repr=False)
    is_member: np.ndarray = field(repr=False)
    auc: float
    tpr: float
    fpr: float

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, is_member: np.ndarray, fpr: float = 0.01
    ) -> MembershipResult:
        """Compute the metrics of ``scores`` (see :func:`membership_metrics`).

        Parameters
        ----------
        scores
            ``(n,)`` membership score of every target row (higher = more likely a member).
        is_member
            ``(n,)`` truth (booleans, or 0/1).
        fpr
            False-positive rate at which the TPR is read.

        Returns
        -------
        The result, with the scores and truth kept as arrays.

        Examples
        --------
        >>> MembershipResult.from_scores([1.0, 0.0], [True, False]).auc
        1.0
        """
        auc, tpr = membership_metrics(scores, is_member, fpr)
        return cls(np.asarray(scores), np.asarray(is_member, dtype=bool), auc, tpr, fpr)


def loss_attack(
    module: nn.Module,
    members: Tensors,
    non_members: Tensors,
    fpr: float = 0.01,
    kl_weight: float = 1.0,
) -> MembershipResult:
    """LOSS attack (Yeom et al. 2018): a row is a member when the model's loss on it is low.

    Parameters
    ----------
    module
        The released model as the attacker runs it (its key guess set, see
        :func:`~scinfl.privacy.attacker_module`).
    members, non_members
        Registry tensors of training rows and of rows the model never saw.
    fpr
        False-positive rate of the reported TPR.
    kl_weight
        Weight of the KL term of the loss.

    Returns
    -------
    :class:`MembershipResult` with score ``-loss``.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors
    >>> vae = KeyedVAE(n_input=10, key_mode=None)
    >>> rng = np.random.default_rng(0)
    >>> res = loss_attack(vae, make_tensors(rng.poisson(2, (5, 10))), make_tensors(rng.poisson(2, (5, 10))))
    >>> 0.0 <= res.auc <= 1.0
    True
    """
    targets = _concat(members, non_members)
    scores = -sample_losses(module, targets, kl_weight=kl_weight)
    is_member = np.r_[np.ones(_n_rows(members), bool), np.zeros(_n_rows(non_members), bool)]
    return MembershipResult.from_scores(scores, is_member, fpr)


@dataclass
class ReferenceModels:
    """Reference models of an RMIA attacker, trained on subsets of population data.

    Attributes
    ----------
    modules
        The trained models.
    trained_on
        ``(n_models, n_population)`` booleans: the population rows each model was trained on.

    Examples
    --------
    >>> references = ReferenceModels([nn.Linear(2, 1)], trained_on=np.array([[True, False, True]]))
    >>> len(references.modules), references.trained_on.sum(1).tolist()
    (1, [2])
    """

    modules: list[nn.Module] = field(repr=False)
    trained_on: np.ndarray = field(repr=False)


def train_reference_models(
    factory: Callable[[], nn.Module],
    population: Tensors,
    n_models: int = 4,
    fraction: float = 0.5,
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 1e-3,
    kl_warmup_epochs: int | None = None,
    seed: int = 0,
) -> ReferenceModels:
    """Train reference models on random subsets of population data, as a site trains.

    Each model is built by ``factory`` (a fresh, untrained model of the target's architecture
    with the attacker's key guess) and trained on a random ``fraction`` of the population rows
    with the client update of the federation (:func:`~scinfl.federated.client_update`: Adam,
    a fresh optimizer per epoch, KL warm-up).

    Parameters
    ----------
    factory
        Returns a new untrained module.
    population
        Registry tensors of the attacker's population data (public data of the same kind).
    n_models
        Number of reference models.
    fraction
        Fraction of the population each model is trained on.
    epochs, batch_size, lr
        Training of each model.
    kl_warmup_epochs
        Epochs of linear KL warm-up (default: half of ``epochs``).
    seed
        Seed of the subsets and of the training.

    Returns
    -------
    :class:`ReferenceModels`.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors
    >>> pop = make_tensors(np.random.default_rng(0).poisson(2, (20, 10)))
    >>> refs = train_reference_models(lambda: KeyedVAE(n_input=10, key_mode=None), pop, n_models=2, epochs=2)
    >>> refs.trained_on.shape
    (2, 20)
    """
    from scinfl.federated import (
        ClientConfig,
        SiteData,
        client_update,
        get_shared_parameters,
        set_shared_parameters,
    )

    n = _n_rows(population)
    size = max(2, int(round(fraction * n)))
    if size > n:
        raise ValueError(f"Cannot train reference models on {size} of {n} population rows.")
    warmup = max(1, epochs // 2) if kl_warmup_epochs is None else max(1, kl_warmup_epochs)
    x = population[REGISTRY_KEYS.X_KEY].cpu().numpy()
    batch = population[REGISTRY_KEYS.BATCH_KEY].view(-1).cpu().numpy()
    labels = population[REGISTRY_KEYS.LABELS_KEY].view(-1).cpu().numpy()
    rng = np.random.default_rng(seed)
    modules, trained_on = [], np.zeros((n_models, n), dtype=bool)
    for m in range(n_models):
        rows = np.sort(rng.choice(n, size=size, replace=False))
        trained_on[m, rows] = True
        torch.manual_seed(int(rng.integers(2**31)))
        module = factory()
        site = SiteData.from_arrays(
            f"reference{m}", x[rows], batch=batch[rows], labels=labels[rows], validation_size=0
        )
        parameters = get_shared_parameters(module)
        for epoch in range(epochs):
            config = ClientConfig(
                round=epoch,
                batch_size=batch_size,
                lr=lr,
                kl_weight=min(1.0, (epoch + 1) / warmup),
                seed=seed + m,
            )
            parameters = client_update(module, site, parameters, config).parameters
        set_shared_parameters(module, parameters)
        module.eval()
        modules.append(module)
        logger.info("Reference model %d/%d trained on %d rows.", m + 1, n_models, size)
    return ReferenceModels(modules, trained_on)


def _log_mean_exp(a: np.ndarray, axis: int = 0, where: np.ndarray | None = None) -> np.ndarray:
    if where is None:
        return logsumexp(a, axis=axis) - np.log(a.shape[axis])
    masked = np.where(where, a, -np.inf)
    return logsumexp(masked, axis=axis) - np.log(where.sum(axis=axis))


def rmia_attack(
    module: nn.Module,
    references: ReferenceModels,
    members: Tensors,
    non_members: Tensors,
    population: Tensors,
    gamma: float = 1.0,
    fpr: float = 0.01,
    kl_weight: float = 1.0,
) -> MembershipResult:
    """RMIA (Zarifzadeh et al. 2024): likelihood ratios against reference models and population samples.

    With ``p(x | theta) = exp(-loss)`` (the per-sample ELBO, plus the classifier's
    probability of the true label, see :func:`sample_losses`), ``p(x)`` the mean of
    ``p(x | theta_ref)`` over the reference models and ``LR(x) = p(x | theta) / p(x)``, the
    score of a target ``x`` is the fraction of population samples ``z`` it dominates:
    ``Pr_z[LR(x) / LR(z) > gamma]``. Reference models are trained on population data only
    (offline RMIA, every target is *out*), so ``p(x)`` is the mean over all of them; for a
    population sample ``z`` it is the mean over the models not trained on ``z``. The paper's
    linear correction of offline ``p(x)`` (its ``a``) is for probabilities bounded by 1 and
    is not applied to these densities. All ratios are computed in log space.

    Parameters
    ----------
    module
        The released model as the attacker runs it (its key guess set).
    references
        Reference models (:func:`train_reference_models`) trained on ``population``.
    members, non_members
        Registry tensors of the target rows.
    population
        Registry tensors of the population samples ``z`` (those the references were trained on).
    gamma
        Threshold of the pairwise likelihood-ratio test.
    fpr
        False-positive rate of the reported TPR.
    kl_weight
        Weight of the KL term of the loss.

    Returns
    -------
    :class:`MembershipResult`.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors
    >>> rng = np.random.default_rng(0)
    >>> data = [make_tensors(rng.poisson(2, (n, 10))) for n in (6, 6, 20)]
    >>> make = lambda: KeyedVAE(n_input=10, key_mode=None)
    >>> refs = train_reference_models(make, data[2], n_models=2, epochs=2)
    >>> res = rmia_attack(make(), refs, *data)
    >>> res.scores.shape
    (12,)
    """
    if not references.modules:
        raise ValueError("RMIA needs at least one reference model.")
    if references.trained_on.shape[1] != _n_rows(population):
        raise ValueError("The reference models were not trained on this population.")
    targets = _concat(members, non_members)

    def log_ratio(tensors, trained_on=None):
        target = -sample_losses(module, tensors, kl_weight=kl_weight)
        refs = np.stack(
            [-sample_losses(r, tensors, kl_weight=kl_weight) for r in references.modules]
        )
        if trained_on is None:
            return target - _log_mean_exp(refs)
        out_models = ~trained_on
        # a sample every reference model was trained on falls back to all of them
        out_models[:, ~out_models.any(0)] = True
        return target - _log_mean_exp(refs, where=out_models)

    x_ratio = log_ratio(targets)
    z_ratio = log_ratio(population, references.trained_on)
    scores = (x_ratio[:, None] - z_ratio[None, :] > np.log(gamma)).mean(1)
    is_member = np.r_[np.ones(_n_rows(members), bool), np.zeros(_n_rows(non_members), bool)]
    return MembershipResult.from_scores(scores, is_member, fpr)
