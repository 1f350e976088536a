"""What travels in a Flower message: parameters, round instructions, replies, key identity.

Only public things are ever encoded here: shared parameters (the module's ``state_dict``, which
holds no key material), the round's :class:`~scinfl.federated.ClientConfig`, metrics, ``n_k``
and the key's *fingerprint and version*. There is no encoder for a :class:`~scinfl.Key`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from scinfl.federated._client import PROTOCOL_VERSION, ClientConfig, ClientUpdate
from scinfl.federated._key_agreement import KeyAdvertisement
from scinfl.federated._parameters import Parameters

PARAMETERS = "parameters"
CONFIG = "config"
METRICS = "metrics"
IDENTITY = "identity"
#: per-parameter training rows of a mosaic's update (:attr:`ClientUpdate.counts`), when any
COUNTS = "counts"

_FIELDS = {f.name: f.type for f in dataclasses.fields(ClientConfig)}


def parameters_to_record(parameters: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Encode shared parameters as an :class:`~flwr.app.ArrayRecord` (exact, names kept).

    Parameters
    ----------
    parameters
        Name to numpy array.

    Returns
    -------
    The record, one :class:`~flwr.app.Array` per name, in the same order.

    Examples
    --------
    >>> import numpy as np
    >>> record = parameters_to_record({"w": np.arange(3, dtype=np.float32)})
    >>> record_to_parameters(record)["w"]
    array([0., 1., 2.], dtype=float32)
    """
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(value)) for name, value in parameters.items()}
    )


def record_to_parameters(
    record: ArrayRecord, order: Mapping[str, object] | None = None
) -> Parameters:
    """Decode an :class:`~flwr.app.ArrayRecord` into numpy parameters.

    Parameters
    ----------
    record
        The record.
    order
        Names in the wanted order (e.g. the current global parameters); names not in it
        follow in the record's order, so a mismatch still reaches the architecture check.

    Returns
    -------
    Name to numpy array.

    Examples
    --------
    >>> import numpy as np
    >>> record = parameters_to_record({"b": np.zeros(1), "a": np.ones(1)})
    >>> list(record_to_parameters(record, order={"a": None, "b": None}))
    ['a', 'b']
    """
    arrays = {name: array.numpy() for name, array in record.items()}
    if order is None:
        return arrays
    ordered = {name: arrays[name] for name in order if name in arrays}
    ordered.update({name: value for name, value in arrays.items() if name not in ordered})
    return ordered


def config_to_record(config: ClientConfig) -> ConfigRecord:
    """Encode the round's instructions.

    Parameters
    ----------
    config
        The round's instructions.

    Returns
    -------
    A record with one entry per field (an empty ``participants`` list is left out).

    Examples
    --------
    >>> config_to_record(ClientConfig(round=3))["round"]
    3
    """
    values = dataclasses.asdict(config)
    return ConfigRecord(
        {
            k: v.item() if isinstance(v, np.generic) else v
            for k, v in values.items()
            # an empty list has no element type to serialise; its default is empty anyway
            if not (isinstance(v, list) and not v)
        }
    )


def record_to_config(record: ConfigRecord) -> ClientConfig:
    """Decode the round's instructions (unknown entries and another protocol are refused).

    Parameters
    ----------
    record
        The record, as :func:`config_to_record` makes it.

    Returns
    -------
    The instructions.

    Raises
    ------
    ValueError
        On an unknown entry, a value of the wrong type or another protocol version.

    Examples
    --------
    >>> record_to_config(config_to_record(ClientConfig(round=3, lr=0.01))).lr
    0.01
    """
    unknown = sorted(set(record) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown round instructions {unknown}: the server runs another scinfl version. "
            "Give the server and every site the same scinfl version."
        )
    # a missing version is an older server's (the dataclass default would hide it)
    protocol = record.get("protocol")
    if protocol != PROTOCOL_VERSION:
        sent = (
            "no protocol version (an older scinfl)" if protocol is None else f"protocol {protocol}"
        )
        raise ValueError(
            f"The server's round instructions are in {sent}, this site's in protocol "
            f"{PROTOCOL_VERSION}: they would read each other's messages (and secret frames) "
            "differently. Give the server and every site the same scinfl version."
        )
    values = dict(record.items())
    if "round" not in values:
        raise ValueError("The server's round instructions name no round: refused.")
    for name, value in values.items():
        if not _is_of_type(value, _FIELDS[name]):
            raise ValueError(
                f"The server's round instructions give {name}={value!r} "
                f"({type(value).__name__}), where a value of type {_FIELDS[name]} is expected: "
                "refused."
            )
    return ClientConfig(**values)


def _is_of_type(value, annotation: str) -> bool:
    """Whether ``value`` is of the annotated type, strictly (a bool is no number).

    Instructions are compared with the site's own by value, and ``0 == 0.0 == False``: but
    the seed and the frame's name are formed from their text, so each would train otherwise.
    """
    if isinstance(value, bool):
        return annotation == "bool"
    if annotation == "int":
        return isinstance(value, int)
    if annotation == "float":
        return isinstance(value, int | float)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return False


def identity_record(
    site: str,
    n: int,
    key_fingerprint: str | None,
    key_version: int | None,
    **extra: int | float | str | bool,
) -> ConfigRecord:
    """Build the public identity a site attaches to every reply (name, ``n_k``, key identity).

    Examples
    --------
    >>> record = identity_record("a", 10, "00ff", 1)
    >>> record["key-fingerprint"], record["key-version"]
    ('00ff', 1)
    """
    record = ConfigRecord({"site": str(site), "n": int(n), **extra})
    if key_fingerprint is not None:
        record["key-fingerprint"] = str(key_fingerprint)
    if key_version is not None:
        record["key-version"] = int(key_version)
    return record


def advertisements_to_record(advertisements: Sequence[KeyAdvertisement]) -> ConfigRecord:
    """Public keys, their tags and signatures (secure aggregation's key agreement), a record.

    Examples
    --------
    >>> ad = KeyAdvertisement("a", "00" * 32, "11" * 32, "22" * 64)
    >>> record_to_advertisements(advertisements_to_record([ad])) == [ad]
    True
    """
    return ConfigRecord(
        {
            "sites": [ad.site for ad in advertisements],
            "public-keys": [ad.public_key for ad in advertisements],
            "tags": [ad.tag for ad in advertisements],
            "signatures": [ad.signature for ad in advertisements],
        }
    )


def record_to_advertisements(record: ConfigRecord) -> list[KeyAdvertisement]:
    """The advertisements of :func:`advertisements_to_record`."""
    columns = [list(record[name]) for name in ("sites", "public-keys", "tags", "signatures")]
    if len({len(column) for column in columns}) != 1:
        raise ValueError("A public-key record needs as many keys, tags and signatures as sites.")
    return [KeyAdvertisement(*map(str, row)) for row in zip(*columns, strict=True)]


def metrics_record(metrics: Mapping[str, float]) -> MetricRecord:
    """Encode metrics (floats; ``NaN`` allowed).

    Examples
    --------
    >>> metrics_record({"loss": 1})["loss"]
    1.0
    """
    return MetricRecord({name: float(value) for name, value in metrics.items()})


def update_to_content(update: ClientUpdate) -> RecordDict:
    """Encode a :class:`~scinfl.federated.ClientUpdate` as a reply's content.

    Parameters
    ----------
    update
        The site's update.

    Returns
    -------
    The content: ``parameters``, ``metrics``, ``identity`` (site, ``n``, key identity) and,
    if the update has them, ``counts``.

    Examples
    --------
    >>> import numpy as np
    >>> content = update_to_content(ClientUpdate("a", 5, {"w": np.zeros(2)}, {"train_loss": 1.0}))
    >>> sorted(content)
    ['identity', 'metrics', 'parameters']
    """
    content = RecordDict(
        {
            PARAMETERS: parameters_to_record(update.parameters),
            METRICS: metrics_record(update.metrics),
            IDENTITY: identity_record(
                update.site, update.n, update.key_fingerprint, update.key_version
            ),
        }
    )
    if update.counts:
        content[COUNTS] = metrics_record(update.counts)
    return content


def content_to_update(
    content: RecordDict, order: Mapping[str, object] | None = None
) -> ClientUpdate:
    """Decode a reply's content into a :class:`~scinfl.federated.ClientUpdate`.

    A reply without parameters (an evaluation) gives an update with empty parameters.

    Parameters
    ----------
    content
        The reply's content (:func:`update_to_content`).
    order
        Parameter names in the wanted order (see :func:`record_to_parameters`).

    Returns
    -------
    The update.

    Examples
    --------
    >>> import numpy as np
    >>> update = ClientUpdate("a", 5, {"w": np.zeros(2)}, {"train_loss": 1.0}, "00ff", 2)
    >>> content_to_update(update_to_content(update)).key_version
    2
    """
    identity = content[IDENTITY]
    parameters = record_to_parameters(content[PARAMETERS], order) if PARAMETERS in content else {}
    metrics = dict(content[METRICS].items()) if METRICS in content else {}
    return ClientUpdate(
        site=str(identity["site"]),
        n=int(identity["n"]),
        parameters=parameters,
        metrics={name: float(value) for name, value in metrics.items()},
        key_fingerprint=identity.get("key-fingerprint"),
        key_version=identity.get("key-version"),
        counts={name: float(v) for name, v in content[COUNTS].items()} if COUNTS in content else {},
    )


def reply_error(message: Message) -> str | None:
    """Return the error text of a reply, or ``None`` when it carries content.

    Examples
    --------
    >>> reply_error.__name__
    'reply_error'
    """
    if message.has_error():
        return f"{message.error.reason} (code {message.error.code})"
    return None
