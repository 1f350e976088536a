"""Sample-level differential privacy at each site: DP-SGD on the site's own rows.

Each site clips every row's gradient to L2 norm ``C``, adds Gaussian noise of standard
deviation ``z C`` to their sum and divides by the expected minibatch size, with minibatches
drawn by Poisson sampling (Abadi et al. 2016, "Deep Learning with Differential Privacy"). The
noise is added before anything leaves the site, so the guarantee holds against the server, the
other sites and anyone holding the key: every upload is post-processing of a DP-SGD
trajectory. The accountant is Flower's Rényi-DP accountant (``flwr.supercore.privacy_accounting``,
Poisson-sampled Gaussian); ``z`` is the smallest noise multiplier whose epsilon over the whole
run (every round, every local epoch) is at most the target.

Why not Opacus: its ``GradSampleModule`` hooks know torch's own layers, not the keyed layers;
``torch.func`` differentiates the module's own loss per row whatever its layers are.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from torch import nn
from torch.func import functional_call, grad, vmap

from scinfl.module import NONZERO_KEY

from ._flower_dp import flower_dp, warn_of_a_large_delta
from ._site_data import SiteData

#: Rows whose gradients are held at once: about this many floats of per-row gradients.
_PER_ROW_FLOATS = 2**25

#: Rényi orders of the accountant: fractional orders below 2 do not converge numerically at
#: the large sampling rates of small sites (and never give the smallest epsilon there).
_ORDERS = tuple(float(a) for a in np.arange(2.0, 12.0, 0.25)) + tuple(
    float(a) for a in (*range(12, 65), 80, 96, 128, 256)
)


def dp_sgd_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, n_rows: int, delta: float
) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps on ``n_rows`` rows, at ``delta``.

    Parameters
    ----------
    noise_multiplier
        Noise standard deviation in units of the clipping norm.
    sample_rate
        Probability that a row is in a minibatch.
    steps
        Optimiser steps.
    n_rows
        Rows the minibatches are drawn from.
    delta
        The ``delta`` of the guarantee.

    Returns
    -------
    Epsilon (Rényi-DP accounting, add-or-remove-one neighbouring).

    Examples
    --------
    >>> round(dp_sgd_epsilon(2.0, 0.1, 100, 1000, 1e-5), 2)
    2.58
    """
    if steps == 0:
        return 0.0
    _, accounting, RdpAccountant = flower_dp("sample_dp_epsilon")
    sample_size = max(1, min(n_rows, round(sample_rate * n_rows)))
    accountant = RdpAccountant(
        accounting.PrivacyConfig(
            target_delta=delta,
            population_size=n_rows,
            neighboring_relation=accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=accounting.SamplingMethod.POISSON,
        ),
        orders=_ORDERS,
    )
    event = accounting.GaussianPrivacyEvent(
        noise_multiplier=noise_multiplier, sample_size=sample_size, population_size=n_rows
    )
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class DPSGDPlan:
    """How one site runs DP-SGD for a whole federated run, and what it spends.

    Built by :meth:`for_site` from the federation's target epsilon and the site's size: a site
    with fewer rows samples a larger share of them per step and needs more noise for the same
    epsilon.

    Parameters
    ----------
    n_rows
        The site's training rows.
    sample_rate
        Poisson sampling probability of a row (``batch_size / n_rows``, at most 1).
    steps_per_epoch
        Steps of one local epoch (``1 / sample_rate``, rounded up).
    noise_multiplier
        ``z``: noise standard deviation in units of the clipping norm.
    clipping_norm
        ``C``: bound on the L2 norm of one row's gradient.
    delta
        The ``delta`` of the guarantee.

    Examples
    --------
    >>> plan = DPSGDPlan.for_site(3.0, 1.0, 1e-5, n_rows=500, batch_size=50, max_rounds=5, local_epochs=1)
    >>> plan.steps_per_epoch, plan.epsilon(5 * plan.steps_per_epoch) <= 3.0
    (10, True)
    """

    n_rows: int
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    clipping_norm: float
    delta: float

    @classmethod
    @functools.cache  # every round asks again: the bisection runs once per site and run
    def for_site(
        cls,
        epsilon: float,
        clipping_norm: float,
        delta: float,
        n_rows: int,
        batch_size: int,
        max_rounds: int,
        local_epochs: int,
    ) -> DPSGDPlan:
        """The smallest noise that keeps the whole run within ``epsilon`` (bisection, 1%).

        Cached: the same arguments give the same plan without a second search.

        Parameters
        ----------
        epsilon
            The site's budget for the whole run (``sample_dp_epsilon``).
        clipping_norm
            ``C``: bound on the L2 norm of one row's gradient.
        delta
            The ``delta`` of the guarantee.
        n_rows
            The site's training rows.
        batch_size
            Expected minibatch size (the sampling rate is ``batch_size / n_rows``).
        max_rounds, local_epochs
            Rounds of the run and local epochs per round: the steps the budget is spread over.

        Returns
        -------
        The plan, with the noise multiplier found.

        Raises
        ------
        ValueError
            When no noise multiplier up to 10^4 reaches ``epsilon``.

        Examples
        --------
        >>> plan = DPSGDPlan.for_site(3.0, 1.0, 1e-5, n_rows=500, batch_size=50, max_rounds=5, local_epochs=1)
        >>> plan.sample_rate, round(plan.noise_multiplier, 1)
        (0.1, 1.5)
        """
        warn_of_a_large_delta(delta, n_rows, "rows at this site")
        rate = min(1.0, batch_size / n_rows)
        steps_per_epoch = math.ceil(1 / rate)
        steps = max_rounds * local_epochs * steps_per_epoch
        low, high = 0.1, 1.0
        while dp_sgd_epsilon(high, rate, steps, n_rows, delta) > epsilon:
            low, high = high, 2 * high
            if high > 1e4:
                raise ValueError(
                    f"sample_dp_epsilon={epsilon} cannot be reached in {steps} steps on "
                    f"{n_rows} rows; raise the epsilon or train fewer rounds."
                )
        while high / low > 1.01:
            middle = math.sqrt(low * high)
            if dp_sgd_epsilon(middle, rate, steps, n_rows, delta) > epsilon:
                low = middle
            else:
                high = middle
        return cls(n_rows, rate, steps_per_epoch, high, clipping_norm, delta)

    def epsilon(self, steps: int) -> float:
        """Epsilon spent after ``steps`` steps.

        Parameters
        ----------
        steps
            Noisy minibatch steps taken so far at the site (over all rounds).

        Returns
        -------
        The sample-level epsilon at :attr:`delta` (:func:`dp_sgd_epsilon`).

        Examples
        --------
        >>> plan = DPSGDPlan(n_rows=500, sample_rate=0.1, steps_per_epoch=10, noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)
        >>> round(plan.epsilon(10), 2), round(plan.epsilon(50), 2)
        (3.45, 5.89)
        """
        return dp_sgd_epsilon(
            self.noise_multiplier, self.sample_rate, steps, self.n_rows, self.delta
        )


def noise_seed(secret: bytes, round_: int) -> int:
    """Seed of a site's DP sampling and noise in one round, from a secret only the site holds.

    The server knows the federation seed, so noise drawn from it could be subtracted, and the
    rows sampled into a minibatch (which the accountant's amplification assumes hidden) would be
    known. The same round gives the same seed, so a round asked again (secure aggregation after
    a dropout) sends the same noisy update: no second release.

    Parameters
    ----------
    secret
        The site's secret (drawn once per run, kept in its state).
    round_
        Global round (0-based).

    Returns
    -------
    A 63-bit seed (HMAC-SHA256 of the round under ``secret``).

    Examples
    --------
    >>> noise_seed(b"s" * 32, 3) == noise_seed(b"s" * 32, 3) != noise_seed(b"s" * 32, 4)
    True
    """
    digest = hmac.new(secret, f"scinfl/dp-sgd/{round_}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def poisson_minibatches(
    site: SiteData, plan: DPSGDPlan, generator: torch.Generator
) -> Iterator[np.ndarray]:
    """One local epoch of Poisson-sampled minibatches (positions of training rows; may be empty)."""
    rows = site.train_idx
    for _ in range(plan.steps_per_epoch):
        chosen = torch.rand(len(rows), generator=generator) < plan.sample_rate
        yield rows[chosen.numpy()]


def _row_gradients(module: nn.Module, batch: dict[str, torch.Tensor], kl_weight: float):
    """The gradient of the loss of each row of ``batch``, stacked (``torch.func``)."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    buffers = dict(module.named_buffers())
    # a row's non-zero counts differ in number from row to row, which vmap cannot batch: every
    # position is listed instead (the likelihood's sparse terms are 0 where a count is 0)
    rows = {k: v for k, v in batch.items() if k != NONZERO_KEY}
    every_position = torch.arange(
        batch[REGISTRY_KEYS.X_KEY].shape[-1], device=batch[REGISTRY_KEYS.X_KEY].device
    )

    def row_loss(p, b, row):
        one = {k: v.unsqueeze(0) for k, v in row.items()}
        one[NONZERO_KEY] = every_position
        _, _, out = functional_call(
            module, (p, b), (one,), {"loss_kwargs": {"kl_weight": kl_weight}}
        )
        return out.loss

    # the module's random draws (dropout, the latent sample) are shared by the rows of a call
    # ("same"): they do not depend on the data, so the guarantee is unchanged
    per_row = vmap(grad(row_loss), in_dims=(None, None, 0), randomness="same")
    skips = getattr(module, "skip_absent_modalities", None)
    if skips is None:
        return per_row(params, buffers, rows)
    module.skip_absent_modalities = False  # vmap cannot branch on the data
    try:
        return per_row(params, buffers, rows)
    finally:
        module.skip_absent_modalities = skips


def private_gradients(
    module: nn.Module,
    site: SiteData,
    rows: np.ndarray,
    plan: DPSGDPlan,
    kl_weight: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """The noisy mean of the clipped row gradients, one tensor per trainable parameter.

    ``sum_i clip(g_i, C) + N(0, (z C)^2)``, divided by the expected minibatch size
    ``sample_rate * n_rows``, in the order of ``module.parameters()`` (trainable ones).

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=6, key_mode=None)
    >>> site = SiteData.from_arrays("a", np.random.poisson(2, (20, 6)), validation_size=0)
    >>> plan = DPSGDPlan(20, 0.5, 2, noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)
    >>> grads = private_gradients(vae, site, np.arange(8), plan, 1.0, torch.Generator().manual_seed(0))
    >>> len(grads) == len([p for p in vae.parameters() if p.requires_grad])
    True
    """
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    size = sum(p.numel() for p in params)
    chunk = max(1, _PER_ROW_FLOATS // size)
    for start in range(0, len(rows), chunk):
        batch = site.tensors(rows[start : start + chunk])
        batch = {k: v.to(params[0].device) for k, v in batch.items()}
        per_row = list(_row_gradients(module, batch, kl_weight).values())
        norms = torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in per_row))
        factor = (plan.clipping_norm / (norms + 1e-6)).clamp(max=1.0)
        for acc, g in zip(total, per_row, strict=True):
            acc.add_(torch.tensordot(factor, g, dims=1))
    std = plan.noise_multiplier * plan.clipping_norm
    expected = plan.sample_rate * plan.n_rows
    for acc in total:
        noise = torch.normal(0.0, std, size=acc.shape, generator=generator)
        acc.add_(noise.to(acc.device)).div_(expected)
    return total
