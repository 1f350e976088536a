"""Secure aggregation with the federation's key: pairwise masks that cancel in the sum.

The sites of a federation already share a secret (the :class:`~scinfl.Key`), so they can hide
their individual updates from the server the way SecAgg does (Bonawitz et al. 2017) without
its key agreement: every pair of participants ``(a, b)`` derives the same pseudo-random mask
from the key, the round and the participant list; ``a`` adds it, ``b`` subtracts it. Updates
are encoded in fixed point (``n_k w_k 2^FIXED_POINT_BITS`` as 64-bit integers) and masked
modulo ``2^64``, so that each masked update is uniformly distributed on its own, and the masks
cancel exactly in the sum of all participants' updates. The server learns the FedAvg aggregate
and nothing else about the parameters (it still sees each site's ``n_k`` and metrics).

A site that drops out leaves its partners' masks uncancelled: the round is then run again with
the sites that answered, under fresh masks (``attempt``). Revealing a dropped site's masks
instead, as SecAgg's unmasking step does, would expose that site's update if it arrived late.

Flower 1.41 offers SecAgg+ only in its legacy API, which does not compose with Message-API
apps; this is scinfl's own, and it trusts what the threat model trusts (docs/targets.md):
sites of one federation trust each other, a colluding site is a leaked key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np

from scinfl.key import Key

from ._client import ClientConfig, ClientUpdate
from ._parameters import Parameters
from ._secret_frames import frame_id, hide_update

#: fractional bits of the fixed-point encoding (resolution 6e-8 of ``n_k w``)
FIXED_POINT_BITS = 24
_SCALE = float(2**FIXED_POINT_BITS)


class IncompleteRoundError(RuntimeError):
    """A masked round lacks updates of some participants: the masks do not cancel.

    ``missing`` names them; the round must be run again without them.
    """

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


def _pair_generator(
    key: Key, round_: int, attempt: int, participants: Sequence[str], a: str, b: str
) -> np.random.Generator:
    label = "\x1f".join(["scinfl/secagg", str(round_), str(attempt), *participants, "|", a, b])
    digest = hmac.new(key.secret_for("secure-aggregation"), label.encode(), hashlib.sha256)
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest.digest(), "big")))


def _is_masked(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def mask_update(
    update: ClientUpdate,
    key: Key,
    round_: int,
    participants: Sequence[str],
    attempt: int = 0,
) -> ClientUpdate:
    """The update a site sends under secure aggregation: ``n_k w_k`` in fixed point, masked.

    Floating-point parameters become ``uint64`` arrays; integer ones (counters) are sent as
    they are. Every participant must mask with the same key, round, attempt and participant
    list, which the server announces (:class:`~scinfl.federated.ClientConfig`).

    Parameters
    ----------
    update
        The site's plain update (:func:`~scinfl.federated.client_update`).
    key
        The federation's key.
    round_, attempt
        Global round, and how many times it was restarted without a dropped site.
    participants
        Names of the sites asked to train in this attempt (the update's site among them).

    Returns
    -------
    A new :class:`~scinfl.federated.ClientUpdate` (same site, ``n`` and metrics).

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl import Key
    >>> update = ClientUpdate("a", 10, {"w": np.array([0.5], np.float32)})
    >>> mask_update(update, Key.generate(), round_=0, participants=["a", "b"]).parameters["w"].dtype
    dtype('uint64')
    """
    participants = sorted(participants)
    if update.counts:
        raise ValueError(
            f"Site {update.site!r}: secure aggregation of a mosaic is not supported (some "
            "parameters learned from fewer rows than the site's n_k, e.g. a modality it lacks, "
            "and their weights would have to travel in clear). Train without privacy='secagg', "
            "or give every site every modality."
        )
    if update.site not in participants:
        raise ValueError(f"Site {update.site!r} is not among the participants {participants}.")
    limit = 2.0**62 / len(participants)
    encoded = dict(update.parameters)
    masked = [name for name, value in update.parameters.items() if _is_masked(value)]
    for name in masked:
        value = update.parameters[name]
        fixed = np.rint(np.asarray(value, dtype=np.float64) * (update.n * _SCALE))
        if not np.isfinite(fixed).all() or np.abs(fixed).max(initial=0) >= limit:
            raise ValueError(
                f"Parameter {name!r} of site {update.site!r} is not finite or too large for "
                f"secure aggregation (|n_k w| must stay below {limit / _SCALE:.3g}). The model "
                "diverged: lower the learning rate."
            )
        encoded[name] = fixed.astype(np.int64).view(np.uint64)
    for other in participants:
        if other == update.site:
            continue
        a, b = sorted((update.site, other))
        generator = _pair_generator(key, round_, attempt, participants, a, b)
        for name in masked:
            value = encoded[name]
            mask = generator.integers(0, 2**64, size=value.shape, dtype=np.uint64, endpoint=False)
            # uint64 arithmetic wraps: the masks cancel modulo 2^64 in the sum
            encoded[name] = value + mask if update.site == a else value - mask
    return ClientUpdate(
        site=update.site,
        n=update.n,
        parameters=encoded,
        metrics=dict(update.metrics),
        key_fingerprint=update.key_fingerprint,
        key_version=update.key_version,
    )


def unmask_sum(
    updates: Sequence[ClientUpdate], template: Parameters, participants: Sequence[str]
) -> Parameters:
    """FedAvg of masked updates: their sum modulo ``2^64``, decoded, divided by ``sum n_k``.

    Parameters
    ----------
    updates
        Masked updates (:func:`mask_update`) of exactly the ``participants``.
    template
        Parameters giving each output's dtype (the current global ones).
    participants
        The sites whose masks must cancel.

    Returns
    -------
    The aggregate, as :func:`~scinfl.federated.fedavg` would give it from the plain updates
    (up to the fixed-point resolution).

    Raises
    ------
    IncompleteRoundError
        When a participant's update is missing.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl import Key
    >>> key = Key.generate()
    >>> ups = [ClientUpdate(s, n, {"w": np.array([v], np.float32)}) for s, n, v in (("a", 1, 1.0), ("b", 3, 3.0))]
    >>> masked = [mask_update(u, key, 0, ["a", "b"]) for u in ups]
    >>> unmask_sum(masked, {"w": np.zeros(1, np.float32)}, ["a", "b"])["w"]
    array([2.5], dtype=float32)
    """
    received = {u.site for u in updates}
    missing = sorted(set(participants) - received)
    if missing or len(updates) != len(set(participants)):
        raise IncompleteRoundError(
            f"Secure aggregation needs the update of every participant; missing: {missing}. "
            "The round is run again without them.",
            missing,
        )
    names = list(updates[0].parameters)
    for update in updates[1:]:
        if list(update.parameters) != names:
            raise ValueError(f"Site {update.site!r} sent parameters of another architecture.")
    total_n = float(sum(u.n for u in updates))
    result: Parameters = {}
    for name in names:
        first = updates[0].parameters[name]
        if first.dtype != np.uint64:
            result[name] = first.copy()
            continue
        acc = np.zeros(first.shape, dtype=np.uint64)
        for update in updates:
            acc += update.parameters[name]
        dtype = template[name].dtype if name in template else np.float32
        result[name] = (acc.view(np.int64).astype(np.float64) / (_SCALE * total_n)).astype(dtype)
    return result


def protect_update(
    update: ClientUpdate,
    key: Key | None,
    config: ClientConfig,
    received: Parameters | None = None,
) -> ClientUpdate:
    """What a site sends for ``update``: in its secret frame and/or masked, as the round asks.

    Under ``config.secret_frames`` the parameters are mapped to the frame named by the
    parameters ``received`` (as sent) and ``config`` (:func:`~scinfl.federated.frame_id`,
    :func:`~scinfl.federated.hide_update`), then masked under ``config.secure_aggregation``.

    Examples
    --------
    >>> import numpy as np
    >>> update = ClientUpdate("a", 1, {"w": np.zeros(1)})
    >>> protect_update(update, None, ClientConfig(round=0)) is update
    True
    """
    if config.secret_frames:
        if received is None:
            raise ValueError("Under secret_frames, protect_update needs the parameters received.")
        update = hide_update(update, key, frame_id(received, config))
    if not config.secure_aggregation:
        return update
    if key is None:
        raise ValueError(
            f"Site {update.site!r} was asked to mask its update (privacy='secagg') but holds no "
            "key object: secure aggregation derives its masks from the federation's Key. Pass "
            "key= (the same at every site)."
        )
    return mask_update(update, key, config.round, config.participants, config.attempt)
