"""Secure aggregation: pairwise masks from pairwise key agreement, cancelling in the sum.

The sites hide their individual updates from the server the way SecAgg does (Bonawitz et al.
2017): every pair of participants ``(a, b)`` holds a secret only the two of them know
(X25519 key agreement, :mod:`~scinfl.federated._key_agreement`), from which both derive the
same pseudo-random mask for the round, the attempt and the participant list; ``a`` adds it,
``b`` subtracts it. Updates are encoded in fixed point (``n_k w_k 2^FIXED_POINT_BITS`` as
64-bit integers) and masked modulo ``2^64``, so that each masked update is uniformly
distributed on its own, and the masks cancel exactly in the sum of all participants' updates.
The server, even with ``t`` colluding sites, learns the sum of the other participants' updates
and nothing else about their parameters (it still sees each site's ``n_k`` and metrics). The
masks are ChaCha20 key streams (``cryptography``), keyed by an HMAC of the pair's secret.

A site that drops out leaves its partners' masks uncancelled: the round is then run again with
the sites that answered, under fresh masks (``attempt``). Revealing a dropped site's masks
instead, as SecAgg's unmasking step does, would expose that site's update if it arrived late.

Reruns alone would let a server that claims a dropout it did not see difference two sums of
one round (every upload of attempt 0, then the same minus one site in attempt 1: that site's
update). So each upload also carries a *self mask*, a key stream under a seed only its site
knows, fresh for every round and attempt (SecAgg's double masking): the sum of an attempt is
readable only once every participant has revealed its seed (:func:`unmask_sum` with
``self_seeds``), and a site reveals the seed of one attempt per round, after which it takes
part in no other attempt of that round. A server thus reads at most one sum per round.

Flower 1.41's SecAgg+ (``SecAggPlusWorkflow`` and ``secaggplus_mod``) is not used: the
workflow drives Flower's legacy strategy loop (``LegacyContext``, ``FitIns``), not scinfl's
round loop with its key identity, secret frames, per-site protocol state and feature-moments
step; it adds four message stages to every round (its Shamir shares of each site's secrets
let the server recover dropped sites' masks, where scinfl reruns the round and adds one stage,
the reveal of the self masks); it quantizes with
stochastic rounding into a clipping range; and its masks come from ``pseudo_rand_gen``, which
folds the pair's key into a 32-bit ``RandomState`` seed. scinfl agrees on one key pair per
site and run instead (:mod:`~scinfl.federated._key_agreement`), with the primitives SecAgg+
uses (the ``cryptography`` package's Diffie-Hellman and HKDF).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

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


def _pair_masks(
    secret: bytes,
    round_: int,
    attempt: int,
    participants: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """Every parameter's mask for one pair: one ChaCha20 key stream under the pair's secret.

    The stream is cut into the parameters in the order of their names: one cipher a pair and
    round, not one a parameter (a site of a 100-site federation masks 99 pairs; a cipher per
    parameter cost 20x the stream itself).
    """
    label = "\x1f".join(["scinfl/secagg", str(round_), str(attempt), *participants])
    stream_key = hmac.new(secret, label.encode(), hashlib.sha256).digest()
    names = sorted(shapes)
    sizes = [int(np.prod(shapes[name], dtype=np.int64)) for name in names]
    stream = Cipher(algorithms.ChaCha20(stream_key, bytes(16)), mode=None).encryptor()
    flat = np.frombuffer(stream.update(bytes(8 * sum(sizes))), dtype="<u8")
    masks, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        masks[name] = flat[start : start + size].reshape(shapes[name])
        start += size
    return masks


def _self_masks(seed: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Every parameter's self mask: a ChaCha20 key stream under the site's attempt seed."""
    return _pair_masks(seed, -1, -1, ["self"], shapes)


def self_mask_seed(secret: bytes, round_: int, attempt: int) -> bytes:
    """The seed of a site's self mask in one attempt of a round, from the site's own secret.

    Parameters
    ----------
    secret
        The site's own secret (drawn once per run, never shared).
    round_, attempt
        Global round and its attempt.

    Returns
    -------
    The 32-byte seed (HMAC-SHA256 of round and attempt under ``secret``); the site reveals it
    only once every participant's upload is in.

    Examples
    --------
    >>> self_mask_seed(bytes(32), 0, 0) == self_mask_seed(bytes(32), 0, 1)
    False
    """
    label = "\x1f".join(["scinfl/secagg-self-mask", str(round_), str(attempt)]).encode()
    return hmac.new(secret, label, hashlib.sha256).digest()


def _is_masked(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def mask_update(
    update: ClientUpdate,
    secrets: Mapping[str, bytes],
    round_: int,
    participants: Sequence[str],
    attempt: int = 0,
    self_seed: bytes | None = None,
) -> ClientUpdate:
    """The update a site sends under secure aggregation: ``n_k w_k`` in fixed point, masked.

    Floating-point parameters become ``uint64`` arrays; integer ones (counters) are sent as
    they are. Every participant must mask with the same round, attempt and participant list,
    which the server announces (:class:`~scinfl.federated.ClientConfig`).

    Parameters
    ----------
    update
        The site's plain update (:func:`~scinfl.federated.client_update`).
    secrets
        The secret the site shares with each other participant, by name
        (:func:`~scinfl.federated.pair_secrets`).
    round_, attempt
        Global round, and how many times it was restarted without a dropped site.
    participants
        Names of the sites asked to train in this attempt (the update's site among them).
    self_seed
        The seed of the site's own mask in this attempt (:func:`self_mask_seed`), revealed
        only when the attempt is aggregated; ``None``: pairwise masks only.

    Returns
    -------
    A new :class:`~scinfl.federated.ClientUpdate` (same site, ``n`` and metrics).

    Examples
    --------
    >>> import numpy as np
    >>> update = ClientUpdate("a", 10, {"w": np.array([0.5], np.float32)})
    >>> mask_update(update, {"b": bytes(32)}, round_=0, participants=["a", "b"]).parameters["w"].dtype
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
    unknown = [other for other in participants if other != update.site and other not in secrets]
    if unknown:
        raise ValueError(
            f"Site {update.site!r} shares no secret with {unknown}: run the key agreement "
            "(advertise and install every participant's public key) before masking."
        )
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
    shapes = {name: encoded[name].shape for name in masked}
    for other in participants:
        if other == update.site:
            continue
        adds = update.site < other  # the pair's first site adds the mask, the second subtracts
        masks = _pair_masks(secrets[other], round_, attempt, participants, shapes)
        for name in masked:
            # uint64 arithmetic wraps: the masks cancel modulo 2^64 in the sum
            value = encoded[name]
            encoded[name] = value + masks[name] if adds else value - masks[name]
    if self_seed is not None:
        own = _self_masks(self_seed, shapes)
        for name in masked:
            encoded[name] = encoded[name] + own[name]
    return ClientUpdate(
        site=update.site,
        n=update.n,
        parameters=encoded,
        metrics=dict(update.metrics),
        key_fingerprint=update.key_fingerprint,
        key_version=update.key_version,
    )


def unmask_sum(
    updates: Sequence[ClientUpdate],
    template: Parameters,
    participants: Sequence[str],
    self_seeds: Mapping[str, bytes] | None = None,
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
    self_seeds
        Every participant's revealed self-mask seed, when the updates carry self masks.

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
    >>> ups = [ClientUpdate(s, n, {"w": np.array([v], np.float32)}) for s, n, v in (("a", 1, 1.0), ("b", 3, 3.0))]
    >>> secrets = {"a": {"b": bytes(32)}, "b": {"a": bytes(32)}}
    >>> masked = [mask_update(u, secrets[u.site], 0, ["a", "b"]) for u in ups]
    >>> unmask_sum(masked, {"w": np.zeros(1, np.float32)}, ["a", "b"])["w"]
    array([2.5], dtype=float32)
    """
    received = {u.site for u in updates}
    missing = sorted(set(participants) - received)
    if self_seeds is not None and not missing and not received <= set(self_seeds):
        raise ValueError(
            f"The self masks of {sorted(received - set(self_seeds))} were not revealed: their "
            "updates cannot be unmasked."
        )
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
    first = updates[0].parameters
    shapes = {name: first[name].shape for name in names if first[name].dtype == np.uint64}
    sums = {name: np.zeros(shape, dtype=np.uint64) for name, shape in shapes.items()}
    for update in updates:
        own = _self_masks(self_seeds[update.site], shapes) if self_seeds is not None else {}
        for name in shapes:
            sums[name] += update.parameters[name]
            if own:
                sums[name] -= own[name]
    result: Parameters = {}
    for name in names:
        if name not in shapes:
            result[name] = first[name].copy()
            continue
        dtype = template[name].dtype if name in template else np.float32
        fixed = sums[name].view(np.int64).astype(np.float64)
        result[name] = (fixed / (_SCALE * total_n)).astype(dtype)
    return result


def protect_update(
    update: ClientUpdate,
    key: Key | None,
    config: ClientConfig,
    received: Parameters | None = None,
    secrets: Mapping[str, bytes] | None = None,
    self_seed: bytes | None = None,
    received_digest: str | None = None,
) -> ClientUpdate:
    """What a site sends for ``update``: in its secret frame and/or masked, as the round asks.

    Under ``config.secret_frames`` the parameters are mapped to the frame named by the
    parameters ``received`` (as sent; ``received_digest`` is their
    :func:`~scinfl.federated.parameters_digest` when the caller has it) and ``config``
    (:func:`~scinfl.federated.frame_id`, :func:`~scinfl.federated.hide_update`), then masked
    under ``config.secure_aggregation`` with the ``secrets`` the site shares with the other
    participants.

    Parameters
    ----------
    update
        The site's plain update.
    key
        The federation's key (draws the secret frames; unused without them).
    config
        The round's instructions: which protections are on, the round, attempt and
        participants.
    received
        The global parameters as sent (needed under secret frames: they name the frame).
    secrets
        The secrets shared with each other participant (needed under secure aggregation).
    self_seed
        The seed of the site's self mask (:func:`self_mask_seed`; ``None``: no self mask).
    received_digest
        :func:`~scinfl.federated.parameters_digest` of ``received``, if known (saves hashing).

    Returns
    -------
    The update to send: ``update`` itself when no protection is on.

    Raises
    ------
    ValueError
        When a protection is asked for without what it needs (``received``, ``secrets``).

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
        update = hide_update(update, key, frame_id(received, config, received_digest))
    if not config.secure_aggregation:
        return update
    if secrets is None:
        raise ValueError(
            f"Site {update.site!r} was asked to mask its update (privacy='secagg') but holds no "
            "pairwise secrets: secure aggregation masks with the secrets of the key agreement "
            "(SiteProtocol.advertise_key, then install_peer_keys). Pass secrets=."
        )
    return mask_update(
        update, secrets, config.round, config.participants, config.attempt, self_seed
    )
