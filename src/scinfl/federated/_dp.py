"""Client-level differential privacy for the aggregation: DP-FedAvg with fixed clipping.

The mechanism and the accountant are Flower's (``flwr.supercore.differential_privacy`` and
``flwr.supercore.privacy_accounting``): each site's update ``w_k - w`` is clipped to L2 norm
``C``, the clipped updates are averaged uniformly over the ``m`` sampled sites and Gaussian
noise of standard deviation ``z C / m`` is added (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"). We do not wrap a Flower ``Strategy`` with
``DifferentialPrivacyServerSideFixedClipping`` because scinfl's server is shared by the
in-process engine and the Flower engine and is not a Flower ``Strategy``; calling the wrapper's
own building blocks keeps the arithmetic identical while both engines give the same weights.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ._client import ClientUpdate
from ._flower_dp import flower_dp, warn_of_a_large_delta
from ._parameters import Parameters

logger = logging.getLogger(__name__)


@dataclass
class DPFedAvg:
    """Server-side fixed-clipping DP-FedAvg with a Rényi-DP accountant (client-level DP).

    Parameters
    ----------
    noise_multiplier
        ``z``: noise standard deviation in units of the clipping norm (>= 1 for strong privacy).
    clipping_norm
        ``C``: bound on the L2 norm of one site's update (all float parameters together).
    n_sites
        Number of sites in the federation (the population sampled from).
    delta
        Target ``delta`` at which epsilon is reported.
    seed
        Seed of the noise; ``None`` (the default) draws a secret one from the operating system.
        The noise must be unknown to anyone but the server: from a known seed (the
        federation's, which every site receives) it could be drawn again and subtracted.
    releases
        Number of updates averaged in each noisy release so far, one entry per aggregated
        round (the accountant's history; :meth:`aggregate` appends to it). Leave it empty for
        a new run; a run resumed from a checkpoint passes the checkpoint's, so that
        :meth:`epsilon` counts the rounds already released.

    Examples
    --------
    >>> from scinfl.federated import ClientUpdate
    >>> dp = DPFedAvg(noise_multiplier=1.0, clipping_norm=0.5, n_sites=2)
    >>> updates = [ClientUpdate(s, 10, {"w": np.full(4, 3.0)}) for s in "ab"]
    >>> new = dp.aggregate({"w": np.zeros(4)}, updates, round_=0)
    >>> new["w"].shape
    (4,)
    >>> dp.epsilon() > 0
    True
    """

    noise_multiplier: float
    clipping_norm: float
    n_sites: int
    delta: float = 1e-5
    seed: int | None = field(default=None, repr=False)
    releases: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError("dp_noise_multiplier must be > 0.")
        if not self.clipping_norm > 0:
            raise ValueError("dp_clipping_norm must be > 0.")
        if self.n_sites < 1:
            raise ValueError("DP needs at least one site.")
        if self.seed is None:
            self.seed = secrets.randbits(63)
        flower_dp()  # fail early, with the install hint
        warn_of_a_large_delta(self.delta, self.n_sites, "sites")

    def aggregate(
        self, current: Parameters, updates: Sequence[ClientUpdate], round_: int
    ) -> Parameters:
        """Clip every update around ``current``, average uniformly, add the Gaussian noise.

        Records the release in :attr:`releases` (for :meth:`epsilon`).

        Parameters
        ----------
        current
            The global parameters the round started from (the clipping's centre).
        updates
            The accepted updates of the round's sites (plain parameters, not masked).
        round_
            Global round (0-based); with the secret :attr:`seed` it fixes the noise.

        Returns
        -------
        The new global parameters: ``current`` plus the noisy mean of the clipped updates
        (float tensors; integer tensors are those of ``current``).

        Examples
        --------
        >>> dp = DPFedAvg(noise_multiplier=1.0, clipping_norm=0.5, n_sites=2, seed=0)
        >>> updates = [ClientUpdate(s, 10, {"w": np.full(4, 3.0)}) for s in "ab"]
        >>> new = dp.aggregate({"w": np.zeros(4)}, updates, round_=0)
        >>> new["w"].dtype, dp.releases
        (dtype('float64'), [2])
        """
        dp, _, _ = flower_dp()
        names = [n for n, a in current.items() if np.issubdtype(a.dtype, np.floating)]
        base = [current[n].astype(np.float64) for n in names]
        clipped = []
        for update in updates:
            params = [update.parameters[n].astype(np.float64) for n in names]
            if any(np.any(p != b) for p, b in zip(params, base, strict=True)):
                # Flower's clipping divides by the update's norm: an unchanged model is skipped
                dp.compute_clip_model_update(params, base, self.clipping_norm)
            clipped.append(params)
        mean = [np.mean([c[i] for c in clipped], axis=0) for i in range(len(names))]
        std = dp.compute_stdv(self.noise_multiplier, self.clipping_norm, len(updates))
        # a generator of the server's secret seed and the round, not numpy's global one (which
        # Flower's add_gaussian_noise_inplace draws from)
        rng = np.random.default_rng([self.seed, round_, 0xD9])
        result = dict(current)
        for name, value in zip(names, mean, strict=True):
            noisy = value + rng.normal(0.0, std, size=value.shape)
            result[name] = noisy.astype(current[name].dtype)
        self.releases.append(len(updates))
        # a line every round would drown the progress bar: at the debug level
        logger.debug(
            "Round %d: %d updates clipped to %.3g, noise std %.3g.",
            round_,
            len(updates),
            self.clipping_norm,
            std,
        )
        return result

    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (RDP accounting, no sampling amplification).

        Sites are few and sampled by a seeded schedule the server knows, so no amplification by
        sampling is claimed: every release is charged in full (:func:`dp_fedavg_epsilon`).

        Returns
        -------
        The client-level epsilon of the releases in :attr:`releases` (0 before any).

        Examples
        --------
        >>> dp = DPFedAvg(noise_multiplier=1.0, clipping_norm=0.5, n_sites=3)
        >>> dp.epsilon()
        0.0
        >>> dp.releases = [3, 3]  # two rounds of three updates each
        >>> dp.epsilon() == dp_fedavg_epsilon([(1.0, 3)] * 2, n_sites=3)
        True
        """
        return dp_fedavg_epsilon(self.release_events, self.n_sites, self.delta)

    @property
    def release_events(self) -> list[tuple[float, int]]:
        """The releases of this run, as ``(noise_multiplier, n_updates)`` pairs."""
        return [(self.noise_multiplier, m) for m in self.releases]


def dp_fedavg_epsilon(
    releases: Sequence[tuple[float, int]], n_sites: int, delta: float = 1e-5
) -> float:
    """Epsilon of a sequence of DP-FedAvg releases, each ``(noise_multiplier, n_updates)``.

    Flower's RDP accountant, add-or-remove-one-site neighbouring, no sampling amplification:
    the Gaussian releases of every round (of every run a model continued from) compose.

    Parameters
    ----------
    releases
        One ``(noise_multiplier, n_updates)`` pair per noisy release (round).
    n_sites
        Sites in the federation (the population).
    delta
        Target ``delta``.

    Returns
    -------
    Epsilon at ``delta`` (0 for no release).

    Examples
    --------
    >>> one = dp_fedavg_epsilon([(1.0, 3)] * 3, n_sites=3)
    >>> two = dp_fedavg_epsilon([(1.0, 3)] * 6, n_sites=3)
    >>> 0 < one < two
    True
    """
    if not releases:
        return 0.0
    _, accounting, RdpAccountant = flower_dp()
    # no amplification: the population only bounds the sample sizes
    population = max(n_sites, *(m for _, m in releases))
    accountant = RdpAccountant(
        accounting.PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=accounting.SamplingMethod.NO_AMPLIFICATION,
        )
    )
    # equal releases composed at once (a run's rounds mostly are): the server asks after
    # every round, and composing each one alone cost time in the rounds run so far
    for (noise_multiplier, sample_size), count in Counter(releases).items():
        accountant.compose(
            accounting.GaussianPrivacyEvent(
                noise_multiplier=noise_multiplier,
                sample_size=sample_size,
                population_size=population,
            ),
            count=count,
        )
    return float(accountant.get_epsilon(delta))
