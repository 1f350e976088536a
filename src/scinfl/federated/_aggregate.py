"""Server-side aggregation: FedAvg weighted by the number of training samples."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ._client import ClientUpdate
from ._parameters import Parameters

logger = logging.getLogger(__name__)


def accept_updates(
    updates: Sequence[ClientUpdate],
    key_fingerprint: str | None,
    key_version: int | None,
    reference: Parameters | None = None,
) -> list[ClientUpdate]:
    """Drop (and log) updates made under another key fingerprint or key version, or not finite.

    With ``reference`` (the global parameters the round started from), also an update whose
    tensors are not those of the global model, by name and shape: numpy would broadcast a
    tensor of another shape into the average without a word.

    Parameters
    ----------
    updates
        The round's updates from the sites.
    key_fingerprint, key_version
        Identity of the federation's key; an update made under another is dropped (``None``:
        not checked).
    reference
        The global parameters the round started from; ``None``: names and shapes not checked.

    Returns
    -------
    The accepted updates, in their order.

    Examples
    --------
    >>> accept_updates([], key_fingerprint=None, key_version=None)
    []
    >>> import numpy as np
    >>> odd = ClientUpdate("a", 1, {"w": np.zeros(1)})
    >>> accept_updates([odd], None, None, reference={"w": np.zeros(3)})
    []
    """
    accepted = []
    for update in updates:
        misfit = None if reference is None else _misfit(update.parameters, reference)
        if misfit is not None:
            logger.warning(
                "Rejected the update of site %r: %s (a site on another scinfl version, or "
                "corrupted).",
                update.site,
                misfit,
            )
        elif key_fingerprint is not None and update.key_fingerprint != key_fingerprint:
            logger.warning(
                "Rejected the update of site %r: key fingerprint %s, expected %s.",
                update.site,
                update.key_fingerprint,
                key_fingerprint,
            )
        elif key_version is not None and update.key_version != key_version:
            logger.warning(
                "Rejected the update of site %r: key version %s, expected %s.",
                update.site,
                update.key_version,
                key_version,
            )
        elif not is_finite_update(update):
            # NaN escapes clipping (min(1, C / NaN) is 1) and poisons any average
            logger.warning(
                "Rejected the update of site %r: it holds NaN or infinite values (its training "
                "diverged: a learning rate too high, or data of an extreme scale).",
                update.site,
            )
        else:
            accepted.append(update)
    return accepted


def _misfit(parameters: Parameters, reference: Parameters) -> str | None:
    """How ``parameters`` differ from ``reference`` in names or shapes; ``None`` if they fit."""
    if set(parameters) != set(reference):
        return "its tensors are not those of the global model"
    for name, value in parameters.items():
        if np.shape(value) != np.shape(reference[name]):
            return (
                f"its {name!r} has shape {np.shape(value)}, the global model's "
                f"{np.shape(reference[name])}"
            )
    return None


def is_finite_update(update: ClientUpdate) -> bool:
    """Whether every float parameter of ``update`` is finite (no NaN, no infinity).

    Parameters
    ----------
    update
        A site's update; its integer tensors (counters) are not checked.

    Returns
    -------
    ``True`` if no float tensor holds NaN or an infinity.

    Examples
    --------
    >>> is_finite_update(ClientUpdate("a", 1, {"w": np.array([np.nan])}))
    False
    """
    return all(
        np.isfinite(value).all()
        for value in update.parameters.values()
        if np.issubdtype(np.asarray(value).dtype, np.floating)
    )


def fedavg(updates: Sequence[ClientUpdate]) -> Parameters:
    """Average the sites' parameters weighted by their number of training samples ``n_k``.

    ``w = sum_k n_k w_k / sum_k n_k``. Integer tensors (counters) are taken from the first
    update. FedProx changes the client objective only, so it aggregates the same way. A
    parameter for which an update gives its own count (:attr:`ClientUpdate.counts`: a
    modality the site's rows lack, in a mosaic) is weighted by that count instead, so that
    sites that did not train it do not pull it back; if no update trained it, it is the plain
    mean (all updates then hold the global value).

    Parameters
    ----------
    updates
        The accepted updates of one round (at least one, each with ``n > 0`` and the same
        tensor names).

    Returns
    -------
    The averaged parameters: name to array, of the first update's shapes and dtypes.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.federated import ClientUpdate
    >>> a = ClientUpdate("a", 1, {"w": np.array([0.0])})
    >>> b = ClientUpdate("b", 3, {"w": np.array([4.0])})
    >>> fedavg([a, b])["w"]
    array([3.])
    >>> b.counts = {"w": 0.0}  # site b holds no rows of the modality w belongs to
    >>> fedavg([a, b])["w"]
    array([0.])
    """
    if not updates:
        raise ValueError("No updates to aggregate: every site failed or was rejected this round.")
    names = list(updates[0].parameters)
    for update in updates[1:]:
        if list(update.parameters) != names:
            raise ValueError(f"Site {update.site!r} sent parameters of another architecture.")
    if any(u.n <= 0 for u in updates):
        raise ValueError("Every update must report a positive number of training samples.")
    result: Parameters = {}
    for name in names:
        first = updates[0].parameters[name]
        if not np.issubdtype(first.dtype, np.floating):
            result[name] = first.copy()
            continue
        weights = np.array([u.counts.get(name, u.n) for u in updates], dtype=np.float64)
        if weights.sum() <= 0:
            weights = np.ones(len(updates))
        weights /= weights.sum()
        acc = np.zeros(first.shape, dtype=np.float64)
        for w, update in zip(weights, updates, strict=True):
            acc += w * update.parameters[name]
        result[name] = acc.astype(first.dtype)
    return result
