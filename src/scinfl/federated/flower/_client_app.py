"""The Flower ``ClientApp``: one site's side, built on :func:`~scinfl.federated.client_update`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from scinfl.federated._site_runtime import SiteProtocol, SiteRuntime, SiteState

from ._records import (
    CONFIG,
    IDENTITY,
    METRICS,
    PARAMETERS,
    advertisements_to_record,
    identity_record,
    metrics_record,
    parameters_to_record,
    record_to_advertisements,
    record_to_config,
    record_to_parameters,
    update_to_content,
)

logger = logging.getLogger(__name__)

#: ``query`` instruction entry asking a site for its (initial) shared parameters
WANT_PARAMETERS = "want-parameters"
#: ``query`` instruction entry: send the initial parameters in the initial secret frame
IN_SECRET_FRAME = "in-secret-frame"
#: ``query`` instruction entry asking a site for its feature moments (with ``participants``)
WANT_MOMENTS = "want-moments"
#: ``query`` instruction entry: the sites whose secure-aggregation masks cancel
PARTICIPANTS = "participants"
#: ``query`` record carrying the federation's feature scale (arrays ``loc``, ``scale``), and the
#: name under which a site keeps it in ``context.state``
FEATURE_SCALE = "feature-scale"
#: ``query`` instruction entry asking a site for its public key (secure aggregation)
WANT_PUBLIC_KEY = "want-public-key"
#: ``query`` reply record with a site's public key; ``query`` record relaying every site's
PUBLIC_KEYS = "public-keys"
#: ``query`` record with the instructions of the attempt whose self-mask seed is asked for
REVEAL = "reveal"
#: ``query`` reply record with the seed of a site's self mask (secure aggregation)
SELF_MASK = "self-mask"
#: name of the ``ConfigRecord`` in ``context.state`` that holds the site's protocol state
PROTOCOL_STATE = "scinfl-site-protocol"


SiteResolver = Callable[[Context], SiteRuntime]


def make_client_app(resolve: SiteResolver) -> ClientApp:
    """Build the Flower ``ClientApp`` of scinfl around a function that finds the node's site.

    The app answers three message types, each with the node's public identity (site name,
    ``n_k``, key fingerprint and version) in a ``ConfigRecord`` named ``"identity"``:

    - ``query``: identity only (plus the initial shared parameters when asked for
      ``want-parameters``, before the site has received any model; in the initial secret
      frame, when the site's own settings have frames on and the ``in-secret-frame`` flag
      agrees); under secure aggregation, its public key (``want-public-key``, reply record
      ``"public-keys"``), the installation of every site's (a ``"public-keys"`` record), or
      the seed of its self mask in an attempt (a ``"reveal"`` record with the attempt's
      instructions; reply record ``"self-mask"``);
    - ``train``: :func:`~scinfl.federated.client_update` from the received parameters under
      the received :class:`~scinfl.federated.ClientConfig`; replies parameters (masked under
      secure aggregation, :func:`~scinfl.federated.protect_update`) and metrics;
    - ``evaluate``: :func:`~scinfl.federated.client_evaluate` of the received parameters
      (decoded from their secret frame); replies metrics only.

    Every message goes through the site's :class:`~scinfl.federated.SiteProtocol`, whose
    state is kept in ``context.state`` (a ``ConfigRecord`` named ``"scinfl-site-protocol"``),
    which Flower keeps per node and run across messages. A message the protocol refuses
    raises :class:`~scinfl.federated.RefusedMessageError`, which Flower sends back as an error
    reply; the state changes only when a message is answered.

    Parameters
    ----------
    resolve
        ``resolve(context) -> SiteRuntime``: the node's module (key set), data and key
        identity, e.g. from ``context.node_config`` (``partition-id`` in simulation;
        ``data-path`` and ``key-path`` in deployment).

    Returns
    -------
    The ``ClientApp``.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.federated import SiteData
    >>> from scinfl.module import KeyedVAE
    >>> site = SiteData.from_arrays("a", np.ones((10, 4)))
    >>> app = make_client_app(lambda context: SiteRuntime(KeyedVAE(n_input=4, key_mode=None), site))
    >>> type(app).__name__
    'ClientApp'
    """
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _answer_query(_load_protocol(context, resolve), msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _answer_train(_load_protocol(context, resolve), msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _answer_evaluate(_load_protocol(context, resolve), msg, context)

    return app


def _site_identity(runtime: SiteRuntime, n: int) -> ConfigRecord:
    """The site's public identity, with ``n`` the sample count of what it answers about."""
    return identity_record(
        runtime.site.name,
        n,
        runtime.key_fingerprint,
        runtime.key_version,
        **{"n-train": runtime.site.n_train, "n-val": runtime.site.n_val},
    )


def _load_protocol(context: Context, resolve: SiteResolver) -> SiteProtocol:
    """The node's protocol, its state as ``context`` kept it."""
    stored = context.state[PROTOCOL_STATE] if PROTOCOL_STATE in context.state else None
    state = SiteState() if stored is None else SiteState.from_mapping(stored)
    runtime = resolve(context)
    if FEATURE_SCALE in context.state:  # each message may run in a fresh process
        scale = record_to_parameters(context.state[FEATURE_SCALE])
        runtime.module.set_feature_scale(scale["loc"], scale["scale"])
    return SiteProtocol(runtime, state)


def _keep(protocol: SiteProtocol, context: Context) -> None:
    """Store the protocol's state in ``context`` (once a message is answered)."""
    context.state[PROTOCOL_STATE] = ConfigRecord(protocol.state.to_dict())


def _answer_query(protocol: SiteProtocol, msg: Message, context: Context) -> Message:
    """Identity, and whatever else the query asks for (see :func:`make_client_app`)."""
    runtime = protocol.runtime
    content = RecordDict({IDENTITY: _site_identity(runtime, runtime.site.n_train)})
    asked = msg.content[CONFIG] if CONFIG in msg.content else {}
    if _flag(asked, WANT_PARAMETERS):
        parameters = protocol.parameters(_flag(asked, IN_SECRET_FRAME))
        content[PARAMETERS] = parameters_to_record(parameters)
    if _flag(asked, WANT_PUBLIC_KEY):
        content[PUBLIC_KEYS] = advertisements_to_record([protocol.advertise_key()])
        _keep(protocol, context)
    if PUBLIC_KEYS in msg.content:
        protocol.install_peer_keys(record_to_advertisements(msg.content[PUBLIC_KEYS]))
        _keep(protocol, context)
    if REVEAL in msg.content:
        seed = protocol.reveal_self_mask(record_to_config(msg.content[REVEAL]))
        content[SELF_MASK] = ConfigRecord({"seed": seed.hex()})
        _keep(protocol, context)
    if _flag(asked, WANT_MOMENTS):
        update = protocol.moments(list(asked.get(PARTICIPANTS, [])))
        content[PARAMETERS] = parameters_to_record(update.parameters)
        _keep(protocol, context)
    if FEATURE_SCALE in msg.content:
        scale = record_to_parameters(msg.content[FEATURE_SCALE])
        if set(scale) != {"loc", "scale"}:
            raise ValueError(
                f"A feature scale record holds {sorted(scale)}, not 'loc' and 'scale': refused."
            )
        protocol.set_feature_scale(scale["loc"], scale["scale"])
        context.state[FEATURE_SCALE] = parameters_to_record(scale)
        _keep(protocol, context)
    return Message(content, reply_to=msg)


def _answer_train(protocol: SiteProtocol, msg: Message, context: Context) -> Message:
    """Train from the received parameters under the received instructions; reply the update."""
    config = record_to_config(_record(msg, CONFIG, "a train message"))
    received = record_to_parameters(_record(msg, PARAMETERS, "a train message"))
    update = protocol.train(received, config)
    _keep(protocol, context)
    content = update_to_content(update)
    content[IDENTITY] = _site_identity(protocol.runtime, update.n)
    return Message(content, reply_to=msg)


def _answer_evaluate(protocol: SiteProtocol, msg: Message, context: Context) -> Message:
    """Evaluate the received parameters; reply metrics only."""
    runtime = protocol.runtime
    config = record_to_config(msg.content[CONFIG]) if CONFIG in msg.content else None
    received = record_to_parameters(_record(msg, PARAMETERS, "an evaluate message"))
    metrics = protocol.evaluate(received, config).metrics
    _keep(protocol, context)
    content = RecordDict(
        {METRICS: metrics_record(metrics), IDENTITY: _site_identity(runtime, runtime.site.n_val)}
    )
    return Message(content, reply_to=msg)


def _record(msg: Message, name: str, what: str):
    """The record ``name`` of a message, or a refusal naming it."""
    if name not in msg.content:
        raise ValueError(f"{what[0].upper()}{what[1:]} without its {name!r} record: refused.")
    return msg.content[name]


def _flag(asked, name: str) -> bool:
    """A yes/no entry of a query (absent: no); anything but a bool is refused."""
    value = asked.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"The query's {name!r} must be True or False, got {value!r}: refused.")
    return value
