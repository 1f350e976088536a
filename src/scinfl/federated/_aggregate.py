"""Server-side aggregation: FedAvg weighted by the number of training samples."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from ._client import ClientUpdate
from ._parameters import Parameters, dtype_fits

logger = logging.getLogger(__name__)


def accept_updates(
    updates: Sequence[ClientUpdate],
    key_fingerprint: str | None,
    key_version: int | None,
    reference: Parameters | None = None,
    expected_rows: Mapping[str, int] | None = None,
    masked: bool = False,
) -> list[ClientUpdate]:
    """Drop (and log, naming the site) the updates that cannot go into the average.

    Always: an update made under another key fingerprint or key version. With ``reference``
    (the global parameters the round started from, as sent: training uploads), also one

    - whose tensors are not those of the global model, by name, shape or kind (numpy would
      broadcast a tensor of another shape into the average without a word, and an integer or
      complex copy of a float tensor would be cast or break the sum);
    - whose number of training samples ``n`` is not a positive integer, or differs from
      ``expected_rows[site]`` (the rows the site declared when the run began): ``n`` weighs
      the site in the average, so a wrong one silently outweighs or cancels the others;
    - that is not finite;
    - unless ``masked`` (secure aggregation: only the sum is readable), one that returns the
      model it was sent unchanged (it did not train; under secret frames it is in the frame it
      came in, and averaging it would mix frames), or whose size is far outside the model's
      (its parameters' norm over 1,000 times the global model's: a finite but corrupted
      upload would wreck every site's next round).

    Parameters
    ----------
    updates
        The round's updates from the sites.
    key_fingerprint, key_version
        Identity of the federation's key; an update made under another is dropped (``None``:
        not checked).
    reference
        The global parameters the round started from; ``None``: only the key is checked (e.g.
        evaluation replies, which carry metrics only).
    expected_rows
        Training rows of each site, as declared at the start of the run (``None``, or a site
        missing from it: any positive integer is taken).
    masked
        The uploads are masked (secure aggregation): float tensors arrive as ``uint64``, and
        their values cannot be inspected.

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
    >>> lying = ClientUpdate("b", 10**9, {"w": np.ones(3)})
    >>> accept_updates([lying], None, None, reference={"w": np.zeros(3)}, expected_rows={"b": 40})
    []
    """
    accepted = []
    screened = reference is not None and not masked
    floats = [n for n, value in reference.items() if _is_float(value)] if screened else []
    global_size = _norm(reference, floats) if screened else 0.0
    for update in updates:
        reason = _key_mismatch(update, key_fingerprint, key_version)
        if reason is None and reference is not None:
            reason = _upload_misfit(update, reference, expected_rows, masked)
        if reason is None and not is_finite_update(update):
            # NaN escapes clipping (min(1, C / NaN) is 1) and poisons any average
            reason = (
                "it holds NaN or infinite values (its training diverged: a learning rate too "
                "high, or data of an extreme scale)."
            )
        if reason is None and screened:
            reason = _upload_outlier(update, reference, floats, global_size)
        if reason is None:
            accepted.append(update)
        else:
            logger.warning("Rejected the update of site %r: %s", update.site, reason)
    return accepted


#: an upload whose parameters' norm exceeds this many times the global model's is refused
OUTSIZED = 1_000.0


def _key_mismatch(update: ClientUpdate, fingerprint: str | None, version: int | None) -> str | None:
    """Why ``update`` was made under another key; ``None`` if it was not."""
    if fingerprint is not None and update.key_fingerprint != fingerprint:
        return f"key fingerprint {update.key_fingerprint}, expected {fingerprint}."
    if version is not None and update.key_version != version:
        return f"key version {update.key_version}, expected {version}."
    return None


def _upload_misfit(
    update: ClientUpdate,
    reference: Parameters,
    expected_rows: Mapping[str, int] | None,
    masked: bool,
) -> str | None:
    """Why a training upload cannot go into the average (see :func:`accept_updates`)."""
    misfit = _misfit(update.parameters, reference, masked)
    if misfit is not None:
        return f"{misfit} (a site on another scinfl version, or corrupted)."
    n = update.n
    if not is_count(n) or n <= 0:
        return (
            f"it reports {n!r} training samples, not a positive integer (the count weighs it in "
            "the average)."
        )
    declared = None if expected_rows is None else expected_rows.get(update.site)
    if declared is not None and int(n) != int(declared):
        return (
            f"it reports {n} training samples, but declared {declared} when the run began (the "
            "count weighs it in the average)."
        )
    return None


def _upload_outlier(
    update: ClientUpdate, reference: Parameters, floats: list[str], global_size: float
) -> str | None:
    """Why a plain upload is no local training of the global model: unchanged, or far too large.

    ``floats``: the float tensors' names; ``global_size``: their norm in ``reference``.
    """
    if floats and all(np.array_equal(update.parameters[name], reference[name]) for name in floats):
        return (
            "it returned the model it was sent, unchanged: it did not train (under secret frames "
            "averaging it would also mix two frames)."
        )
    size = _norm(update.parameters, floats)
    if size > OUTSIZED * max(global_size, 1.0):
        return (
            f"its parameters' norm is {size:.3g}, {size / max(global_size, 1.0):.3g} times the "
            "global model's: no local training moves a model that far (corrupted, or a site "
            "whose training blew up)."
        )
    return None


def is_count(value) -> bool:
    """Whether ``value`` is a whole number (an integer, or a float without a fraction; no bool).

    Examples
    --------
    >>> is_count(40), is_count(40.0), is_count(2.5), is_count(True), is_count(float("nan"))
    (True, True, False, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return bool(np.isfinite(value)) and float(value).is_integer()


def _is_float(value) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _norm(parameters: Parameters, names: Sequence[str]) -> float:
    """Euclidean norm of the tensors ``names`` of ``parameters`` together (float64)."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(parameters[n], dtype=np.float64))) for n in names))
    )


def _misfit(parameters: Parameters, reference: Parameters, masked: bool = False) -> str | None:
    """How ``parameters`` differ from ``reference`` in names, shapes or kinds; ``None`` if they fit.

    A float tensor must arrive as float32 or float64 (``uint64`` when ``masked``), an integer
    one as integers.
    """
    if set(parameters) != set(reference):
        return "its tensors are not those of the global model"
    for name, value in parameters.items():
        if np.shape(value) != np.shape(reference[name]):
            return (
                f"its {name!r} has shape {np.shape(value)}, the global model's "
                f"{np.shape(reference[name])}"
            )
        dtype, wanted = np.asarray(value).dtype, np.asarray(reference[name]).dtype
        if not dtype_fits(dtype, wanted, _is_float(reference[name]), masked):
            return f"its {name!r} arrived as {dtype}, where the global model's is {wanted}"
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
