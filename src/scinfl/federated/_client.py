"""Client side: one site's local update and its validation, shared by every engine."""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._parameters import Parameters, get_shared_parameters, set_shared_parameters
from ._sample_dp import DPSGDPlan, poisson_minibatches, private_gradients
from ._site_data import SiteData

#: Version of what the messages of a round mean (their instructions, the parameters' layout, the
#: names of secret frames). Every round's instructions carry it and a site refuses another, so a
#: server and sites on scinfl versions that would misread each other stop at the first message
#: with an error that says so. Raise it with any change that makes an older site or server
#: misread a message (the frame names changed in protocol 2; the secure-aggregation masks in
#: protocol 3: one key stream a pair, cut into the parameters; the frames' maps in protocol 4:
#: smaller dense maps and blocks).
PROTOCOL_VERSION = 4


@dataclass
class ClientConfig:
    """What the server tells a site to do in one round.

    Parameters
    ----------
    round
        Global round (0-based).
    local_epochs
        Passes over the site's training rows.
    batch_size
        Minibatch size.
    lr, weight_decay, eps
        Adam settings (a fresh optimizer each round: clients are stateless, as in Flower).
    kl_weight
        KL weight for this round, set by the server from the global round.
    mu
        FedProx proximal weight (0 = FedAvg).
    balance_classes
        Weight the classification loss by the inverse frequency of each label among the site's
        own training rows (class imbalance, decided locally).
    seed
        Federation seed; with the round and the site name it fixes all randomness.
    secure_aggregation, participants, attempt
        Mask the update for secure aggregation
        (:func:`~scinfl.federated.mask_update`): the sites asked to train in this attempt of
        the round, and the attempt (a round restarts without sites that dropped out).
    secret_frames, frame
        The parameters travel in secret frames drawn from the key
        (:class:`~scinfl.federated.SecretFrames`): the global model sent with these
        instructions is in ``frame``, the update goes back in the frame
        :func:`~scinfl.federated.frame_id` names.
    max_rounds
        Rounds of the run, under sample-level DP (which spreads its budget over them; 0
        otherwise).
    sample_dp_epsilon, sample_dp_clipping_norm, dp_delta
        Sample-level DP (DP-SGD) at the site for the whole run (0: off); see
        :class:`~scinfl.federated.FederationConfig`.
    protocol
        The message protocol the instructions are written in
        (:data:`~scinfl.federated.PROTOCOL_VERSION`); a site refuses another.

    Examples
    --------
    >>> ClientConfig(round=0, local_epochs=1).batch_size
    128
    """

    round: int
    local_epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    kl_weight: float = 1.0
    mu: float = 0.0
    balance_classes: bool = False
    seed: int = 0
    secure_aggregation: bool = False
    participants: list[str] = field(default_factory=list)
    attempt: int = 0
    secret_frames: bool = False
    frame: str = ""
    max_rounds: int = 0
    sample_dp_epsilon: float = 0.0
    sample_dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        # a number of another type (kl_weight=1, lr=np.float32(1e-3), round=np.int64(0))
        # compares equal but hashes otherwise (the upload's frame is named from the
        # instructions' text): every number is held as Python's, on the server and the sites
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool | np.bool_):
                continue
            if f.type == "float" and isinstance(value, numbers.Real):
                setattr(self, f.name, float(value))
            elif f.type == "int" and isinstance(value, numbers.Integral):
                setattr(self, f.name, int(value))


@dataclass
class ClientUpdate:
    """What a site sends to the server: shared parameters, ``n_k``, metrics, key fingerprint.

    ``counts`` gives, for the parameters that learned from fewer than ``n`` training rows, how
    many did (a modality some of the site's rows lack: its parameters learned from the rows
    that hold it, or, with none, not at all); FedAvg weights those parameters by it.

    Parameters
    ----------
    site
        Name of the sending site.
    n
        Its number of training rows ``n_k`` (the update's FedAvg weight).
    parameters
        The shared parameters after local training (name to array), or, under secure
        aggregation, their masked form.
    metrics
        Training or validation metrics (``loss``, ``val_loss``, ``n_val``, ...).
    key_fingerprint, key_version
        Identity of the key the site trained under (``None``: keyless); the server drops an
        update made under another.
    counts
        Per-parameter number of rows that trained it, where fewer than ``n`` (see above).

    Examples
    --------
    >>> import numpy as np
    >>> ClientUpdate("a", 10, {"w": np.zeros(2)}).n
    10
    """

    site: str
    n: int
    parameters: Parameters
    metrics: dict[str, float] = field(default_factory=dict)
    key_fingerprint: str | None = None
    key_version: int | None = None
    counts: dict[str, float] = field(default_factory=dict)


def site_seed(seed: int, round_: int, site: str) -> int:
    """Seed for one site in one round, independent of the order sites are visited in.

    Parameters
    ----------
    seed
        Federation seed.
    round_
        Global round (0-based).
    site
        Site name.

    Returns
    -------
    A 32-bit seed (SHA-256 of the three).

    Examples
    --------
    >>> site_seed(0, 1, "a") == site_seed(0, 1, "a")
    True
    """
    digest = hashlib.sha256(f"{seed}/{round_}/{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _accumulate(totals: dict[str, float], loss_output, n: int) -> None:
    totals["loss"] += float(loss_output.loss.detach()) * n
    totals["reconstruction"] += float(loss_output.reconstruction_loss_sum.detach())
    totals["kl"] += float(loss_output.kl_local_sum.detach())
    if loss_output.logits is not None:
        logits = loss_output.logits.detach()
        y = loss_output.true_labels.view(-1)
        labelled = y < logits.shape[-1]  # unlabelled rows (if any) have the next code
        n_labelled = float(labelled.sum())
        totals["correct"] += float(((logits.argmax(-1) == y) & labelled).sum())
        totals["classification"] += float(loss_output.classification_loss.detach()) * n_labelled
        totals["labelled"] += n_labelled
    totals["n"] += n


def _summarise(totals: dict[str, float], prefix: str, classify: bool) -> dict[str, float]:
    n = max(totals["n"], 1.0)
    out = {
        f"{prefix}_loss": totals["loss"] / n,
        f"{prefix}_reconstruction": totals["reconstruction"] / n,
        f"{prefix}_kl": totals["kl"] / n,
    }
    if classify:
        labelled = totals["labelled"]
        out[f"{prefix}_labelled"] = labelled  # the weight of the two means below
        out[f"{prefix}_accuracy"] = totals["correct"] / labelled if labelled else float("nan")
        out[f"{prefix}_classification"] = (
            totals["classification"] / labelled if labelled else float("nan")
        )
    return out


def _new_totals() -> dict[str, float]:
    return dict.fromkeys(
        ("loss", "reconstruction", "kl", "correct", "classification", "labelled", "n"), 0.0
    )


def client_update(
    module: nn.Module,
    site: SiteData,
    global_parameters: Parameters,
    config: ClientConfig,
    key_fingerprint: str | None = None,
    key_version: int | None = None,
    dp_seed: int | None = None,
) -> ClientUpdate:
    """Train ``module`` from the global parameters on one site's training rows.

    Used unchanged by the local engine and by the Flower ``ClientApp``. Deterministic given
    the global parameters, the site, the round and the seed (and, under sample-level DP, the
    site's ``dp_seed``).

    Parameters
    ----------
    module
        The site's keyed module (its key already set).
    site
        The site's data.
    global_parameters
        Parameters received from the server.
    config
        Round instructions.
    key_fingerprint, key_version
        The site's key identity, sent along so the server can reject mismatches.
    dp_seed
        Under sample-level DP (``config.sample_dp_epsilon``), the seed of the minibatch
        sampling and the noise, which only the site may know
        (:func:`~scinfl.federated.noise_seed`); drawn from the operating system when not given.

    Returns
    -------
    The :class:`ClientUpdate` to send: under sample-level DP its metrics are the epsilon
    spent by the end of this round (``dp_epsilon``, assuming the site trained in every round
    so far) and the noise multiplier, not losses.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.federated import SiteData, get_shared_parameters
    >>> vae = KeyedVAE(n_input=8, key_mode=None)
    >>> site = SiteData.from_arrays("a", np.random.poisson(2, (40, 8)))
    >>> update = client_update(vae, site, get_shared_parameters(vae), ClientConfig(round=0, batch_size=16))
    >>> update.n
    36
    """
    start = time.perf_counter()
    set_shared_parameters(module, global_parameters)
    module.train()
    seed = site_seed(config.seed, config.round, site.name)
    torch.manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    # the fused kernel updates every tensor in one pass: the keyed layers add many small
    # tensors, and torch's default CPU Adam loops over tensors one by one (slower per step
    # than the forward pass on small models)
    optimizer = torch.optim.Adam(
        params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, fused=True
    )
    anchors = [p.detach().clone() for p in params] if config.mu > 0 else None
    classify = getattr(module, "classifier", None) is not None
    if classify:
        module.class_weights = (
            site.class_weights(module.n_labels).to(params[0].device)
            if config.balance_classes
            else None
        )
    with _diverged_training_named(f"at site {site.name!r} in round {config.round}"):
        if config.sample_dp_epsilon > 0:
            metrics = _private_epochs(module, site, config, optimizer, anchors, dp_seed)
        else:
            metrics = _local_epochs(module, site, config, optimizer, anchors, seed)
    if config.sample_dp_epsilon <= 0:
        # under sample-level DP only what the noise covers leaves the site: the time of the
        # round depends on its rows and on its secret sampling
        metrics["time_s"] = time.perf_counter() - start
    return ClientUpdate(
        site=site.name,
        n=site.n_train,
        parameters=get_shared_parameters(module),
        metrics=metrics,
        key_fingerprint=key_fingerprint,
        key_version=key_version,
        counts=module.parameter_counts(site) if hasattr(module, "parameter_counts") else {},
    )


def _local_epochs(module, site, config, optimizer, anchors, seed: int) -> dict[str, float]:
    """The local epochs (minibatch SGD with Adam); returns the training metrics."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    classify = getattr(module, "classifier", None) is not None
    totals = _new_totals()
    for _ in range(config.local_epochs):
        for batch in site.minibatches("train", config.batch_size, generator):
            _, _, loss_output = module(batch, loss_kwargs={"kl_weight": config.kl_weight})
            loss = loss_output.loss
            if anchors is not None:
                loss = loss + _proximal_term(params, anchors, config.mu)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _accumulate(totals, loss_output, batch["X"].shape[0])
    return _summarise(totals, "train", classify)


@contextmanager
def _diverged_training_named(where: str) -> Iterator[None]:
    """Name a diverged training (torch's distributions refuse NaN parameters) and its fix."""
    try:
        yield
    except ValueError as error:
        # torch.distributions' argument validation: "... to satisfy the constraint Real(),
        # but found invalid values" once the weights have become NaN or infinite
        if "found invalid values" not in str(error):
            raise
        raise FloatingPointError(
            f"Training diverged ({where}): the model's outputs became "
            "NaN or infinite. Lower the learning rate (lr=), and check the data (values far "
            "from 1 in magnitude: log-transform intensities; counts need a count likelihood)."
        ) from error


def _proximal_term(params, anchors, mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 ||w - w_global||^2``."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))


def _private_epochs(module, site, config, optimizer, anchors, dp_seed) -> dict[str, float]:
    """The local epochs as DP-SGD (:mod:`~scinfl.federated._sample_dp`); returns its metrics."""
    if config.balance_classes:
        raise ValueError(
            "balance_classes weights the loss by the site's label counts, which sample-level DP "
            "does not cover: train with balance_classes=False."
        )
    plan = DPSGDPlan.for_site(
        config.sample_dp_epsilon,
        config.sample_dp_clipping_norm,
        config.dp_delta,
        n_rows=site.n_train,
        batch_size=config.batch_size,
        max_rounds=config.max_rounds,
        local_epochs=config.local_epochs,
    )
    seed = secrets.randbits(63) if dp_seed is None else dp_seed
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    for _ in range(config.local_epochs):
        for rows in poisson_minibatches(site, plan, generator):
            gradients = private_gradients(module, site, rows, plan, config.kl_weight, generator)
            optimizer.zero_grad(set_to_none=True)
            if anchors is not None:
                # the proximal term does not read the data: added after the noise
                _proximal_term(params, anchors, config.mu).backward()
            for p, g in zip(params, gradients, strict=True):
                p.grad = g if p.grad is None else p.grad + g
            optimizer.step()
    steps = (config.round + 1) * config.local_epochs * plan.steps_per_epoch
    return {"dp_epsilon": plan.epsilon(steps), "dp_noise_multiplier": plan.noise_multiplier}


@torch.inference_mode()
def client_evaluate(
    module: nn.Module,
    site: SiteData,
    global_parameters: Parameters | None = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Validation metrics of the (global) model on a site's validation rows.

    The loss is the full ELBO (KL weight 1, plus the classification term), so it is comparable
    across rounds whatever the KL warm-up.

    Parameters
    ----------
    module
        The site's (keyed) module; evaluated in place.
    site
        The site's data; its validation rows are scored.
    global_parameters
        Load these shared parameters into ``module`` first (``None``: score it as it is).
    batch_size
        Rows per forward pass (memory only; the metrics do not depend on it).

    Returns
    -------
    Metrics averaged over the validation rows (``val_loss``, ``val_reconstruction``,
    ``val_kl``, classification metrics if the module classifies) and ``n_val``; all NaN but
    ``n_val = 0`` for a site without validation rows.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=8, key_mode=None)
    >>> site = SiteData.from_arrays("a", np.random.poisson(2, (40, 8)))
    >>> sorted(client_evaluate(vae, site))[:2]
    ['n_val', 'val_kl']
    """
    if global_parameters is not None:
        set_shared_parameters(module, global_parameters)
    module.eval()
    totals = _new_totals()
    # the reconstruction term samples z ~ q(z|x): draw it from a fixed seed, so that every
    # round is scored with the same noise (selection compares models, not draws) and a site
    # scores the same in any process, whatever its random state (local engine == Flower)
    device = next(module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with _diverged_training_named(f"scored at site {site.name!r}"):
            for batch in site.minibatches("val", batch_size):
                _, _, loss_output = module(batch, loss_kwargs={"kl_weight": 1.0})
                _accumulate(totals, loss_output, batch["X"].shape[0])
    metrics = _summarise(totals, "val", getattr(module, "classifier", None) is not None)
    metrics["n_val"] = float(site.n_val)
    if site.n_val == 0:
        metrics = {k: (np.nan if k != "n_val" else 0.0) for k in metrics}
    return metrics
