"""The Flower ``ServerApp``: the round loop of :func:`~scinfl.federated.run_local` over a Grid.

Sampling, FedAvg, the key-identity check and model selection are those of
:class:`~scinfl.federated.FederatedServer`; this module only moves messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from scinfl.federated._aggregate import accept_updates
from scinfl.federated._client import ClientUpdate
from scinfl.federated._secure_aggregation import IncompleteRoundError
from scinfl.federated._server import FederatedServer

from ._client_app import IN_SECRET_FRAME, WANT_PARAMETERS
from ._records import (
    CONFIG,
    PARAMETERS,
    config_to_record,
    content_to_update,
    parameters_to_record,
    record_to_parameters,
    reply_error,
)

logger = logging.getLogger(__name__)

ServerFactory = Callable[[Context], FederatedServer]
FinishCallback = Callable[[FederatedServer, Context], None]


@dataclass
class SiteDirectory:
    """Which Flower node holds which site, as the sites reported it.

    Examples
    --------
    >>> SiteDirectory({"a": 11}, {"a": 9}, {"a": 1}).sites
    ['a']
    """

    nodes: dict[str, int]
    n_train: dict[str, int]
    n_val: dict[str, int]
    keys: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        """Site names, sorted."""
        return sorted(self.nodes)


def discover_sites(
    grid: Grid,
    expected: int | Sequence[str],
    timeout: float | None = 300.0,
    poll: float = 0.2,
) -> SiteDirectory:
    """Wait for the nodes to connect, then ask each for its site name and sizes (``query``).

    Parameters
    ----------
    grid
        The ServerApp's grid.
    expected
        Number of sites to wait for, or their names (then exactly these must answer).
    timeout
        Seconds to wait for the nodes and their answers (``None``: forever).
    poll
        Seconds between checks for connected nodes.

    Returns
    -------
    The :class:`SiteDirectory`.

    Examples
    --------
    >>> directory = discover_sites(grid, expected=3)  # doctest: +SKIP
    """
    names = None if isinstance(expected, int) else sorted(expected)
    n_expected = expected if names is None else len(names)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= n_expected:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"Only {len(node_ids)} of {n_expected} Flower nodes connected within {timeout} s. "
                "Start one `flower-supernode` per site (each with its own --node-config)."
            )
        time.sleep(poll)
    messages = [
        Message(RecordDict(), node_id, MessageType.QUERY, group_id="discovery")
        for node_id in node_ids
    ]
    remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
    directory = SiteDirectory({}, {}, {})
    errors = []
    for reply in grid.send_and_receive(messages, timeout=remaining):
        error = reply_error(reply)
        if error is not None:
            logger.warning(
                "Node %d did not answer the site query: %s", reply.metadata.src_node_id, error
            )
            errors.append(f"node {reply.metadata.src_node_id}: {error}")
            continue
        identity = reply.content["identity"]
        site = str(identity["site"])
        if site in directory.nodes:
            raise RuntimeError(
                f"Two Flower nodes claim site {site!r}: give every supernode its own `site` in --node-config."
            )
        directory.nodes[site] = reply.metadata.src_node_id
        directory.n_train[site] = int(identity["n-train"])
        directory.n_val[site] = int(identity["n-val"])
        directory.keys[site] = (identity.get("key-fingerprint"), identity.get("key-version"))
    if names is not None and directory.sites != names:
        raise RuntimeError(f"Expected sites {names}, but the nodes reported {directory.sites}.")
    if len(directory.nodes) < n_expected:
        raise RuntimeError(
            f"Only {len(directory.nodes)} of {n_expected} sites answered: {directory.sites}. "
            + "; ".join(errors)
        )
    return directory


def request_parameters(
    grid: Grid,
    directory: SiteDirectory,
    timeout: float | None = None,
    in_secret_frame: bool = False,
) -> dict:
    """Ask the first site (by name) for its shared parameters, to start the federation from.

    The parameters of a freshly built module: random initial weights, no data, no key; in
    the initial secret frame with ``in_secret_frame`` (:class:`~scinfl.federated.SecretFrames`).

    Examples
    --------
    >>> parameters = request_parameters(grid, discover_sites(grid, 3))  # doctest: +SKIP
    """
    site = directory.sites[0]
    message = Message(
        RecordDict(
            {CONFIG: ConfigRecord({WANT_PARAMETERS: True, IN_SECRET_FRAME: in_secret_frame})}
        ),
        directory.nodes[site],
        MessageType.QUERY,
        group_id="initial-parameters",
    )
    replies = list(grid.send_and_receive([message], timeout=timeout))
    if not replies or reply_error(replies[0]) is not None:
        reason = reply_error(replies[0]) if replies else "no reply"
        raise RuntimeError(f"Site {site!r} did not send initial parameters: {reason}.")
    logger.info("Initial global parameters taken from site %r.", site)
    return record_to_parameters(replies[0].content[PARAMETERS])


def _collect(
    replies,
    directory: SiteDirectory,
    server: FederatedServer,
    what: str,
    round_: int,
    asked: Sequence[str] = (),
) -> list[ClientUpdate]:
    """Decode replies; drop errors and replies whose claimed site is not the addressed node's.

    A site that died (its SuperNode killed or disconnected) answers with Flower's "node
    unavailable" error once the SuperLink misses its heartbeats, or not at all within the
    round timeout: both are logged and the round goes on without it.
    """
    replies = list(replies)
    answered = {reply.metadata.src_node_id for reply in replies}
    for site in asked:
        if directory.nodes[site] not in answered:
            logger.warning(
                "Round %d: site %r did not answer its %s step in time; going on without it.",
                round_,
                site,
                what,
            )
    updates, errors = [], []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        error = reply_error(reply)
        if error is not None:
            site = next((s for s, n in directory.nodes.items() if n == node_id), f"node {node_id}")
            logger.warning("Round %d: site %r failed its %s step: %s", round_, site, what, error)
            errors.append(f"{site}: {error}")
            continue
        update = content_to_update(reply.content, order=server.parameters)
        if directory.nodes.get(update.site) != node_id:
            logger.warning(
                "Dropped a %s reply of node %d claiming site %r.", what, node_id, update.site
            )
            continue
        updates.append(update)
    if (errors or asked) and not updates:
        raise RuntimeError(
            f"Round {round_}: no site completed its {what} step: {'; '.join(errors) or 'timeout'}"
        )
    return sorted(updates, key=lambda u: u.site)


def run_rounds(
    grid: Grid,
    server: FederatedServer,
    directory: SiteDirectory,
    round_timeout: float | None = None,
    progress_bar: bool = True,
) -> FederatedServer:
    """Run the rounds of :func:`~scinfl.federated.run_local` with the sites behind a Grid.

    Each round: :meth:`~scinfl.federated.FederatedServer.sample_sites`, a ``train`` message to
    each sampled site, :meth:`~scinfl.federated.FederatedServer.aggregate` of the replies
    (sorted by site, which drops updates under another key), an ``evaluate`` message with the
    new global parameters to every site, and
    :meth:`~scinfl.federated.FederatedServer.record_evaluation`. Evaluations under another
    key are dropped too.

    Parameters
    ----------
    grid
        The ServerApp's grid.
    server
        The federation's server state (parameters, settings, key identity).
    directory
        Site-to-node map from :func:`discover_sites`.
    round_timeout
        Seconds to wait for the replies of one step (``None``: wait for all).
    progress_bar
        Show a progress bar over rounds.

    Returns
    -------
    ``server``, after the last round; its ``best_parameters`` are the selected model.

    Examples
    --------
    >>> server = run_rounds(grid, server, discover_sites(grid, 3))  # doctest: +SKIP
    """
    for site, (fingerprint, version) in sorted(directory.keys.items()):
        if (server.key_fingerprint is not None and fingerprint != server.key_fingerprint) or (
            server.key_version is not None and version != server.key_version
        ):
            logger.warning(
                "Site %r holds key %s (version %s), not the federation's key %s (version %s): "
                "its updates will be rejected.",
                site,
                fingerprint,
                version,
                server.key_fingerprint,
                server.key_version,
            )
    rounds = tqdm(server.rounds(), desc="federated rounds (flower)", disable=not progress_bar)
    for round_ in rounds:
        connected = set(grid.get_node_ids())
        gone = [site for site in directory.sites if directory.nodes[site] not in connected]
        if gone:
            logger.warning("Round %d: sites %s are disconnected and not asked.", round_, gone)
        available = [site for site in directory.sites if site not in gone]
        selected = server.sample_sites(available, round_)
        _train_round(grid, server, directory, round_, selected, round_timeout)
        # the instructions name the secret frame of the parameters (when frames are on)
        evaluate_config = config_to_record(server.client_config(round_ + 1))
        evaluations = _ask(
            grid,
            server,
            directory,
            available,
            {PARAMETERS: parameters_to_record(server.parameters), CONFIG: evaluate_config},
            MessageType.EVALUATE,
            round_,
            str(round_),
            round_timeout,
        )
        accepted = accept_updates(evaluations, server.key_fingerprint, server.key_version)
        stop = server.record_evaluation(round_, {u.site: u.metrics for u in accepted})
        val = [u.metrics["val_loss"] for u in accepted if u.metrics.get("n_val", 0) > 0]
        if val:
            rounds.set_postfix(val_loss=f"{np.mean(val):.4g}", best_round=server.best_round)
        if stop:
            break
    return server


def _ask(
    grid: Grid,
    server: FederatedServer,
    directory: SiteDirectory,
    sites: list[str],
    records: dict,
    message_type: str,
    round_: int,
    group_id: str,
    round_timeout: float | None,
) -> list[ClientUpdate]:
    """One message with ``records`` to each of ``sites``; their replies as updates."""
    messages = [
        Message(RecordDict(dict(records)), directory.nodes[site], message_type, group_id=group_id)
        for site in sites
    ]
    kind = "train" if message_type == MessageType.TRAIN else "evaluate"
    return _collect(
        grid.send_and_receive(messages, timeout=round_timeout),
        directory,
        server,
        kind,
        round_,
        asked=sites,
    )


def _train_round(
    grid: Grid,
    server: FederatedServer,
    directory: SiteDirectory,
    round_: int,
    selected: list[str],
    round_timeout: float | None,
) -> None:
    """Train messages to the selected sites, then aggregation of their replies.

    Under secure aggregation a site that does not answer (or is rejected) leaves the others'
    masks uncancelled: the round is asked again of the sites that answered, under fresh masks
    (their training is seeded, so they send the same update), until every participant's
    update is in or fewer than ``min_available`` remain.
    """
    participants, attempt = list(selected), 0
    while True:
        config = server.client_config(round_, participants, attempt)
        updates = _ask(
            grid,
            server,
            directory,
            participants,
            {PARAMETERS: parameters_to_record(server.parameters), CONFIG: config_to_record(config)},
            MessageType.TRAIN,
            round_,
            f"{round_}" if attempt == 0 else f"{round_}.{attempt}",
            round_timeout,
        )
        try:
            server.aggregate(round_, updates, participants, sent=config)
            return
        except IncompleteRoundError as err:
            participants = [site for site in participants if site not in err.missing]
            if len(participants) < server.config.min_available:
                raise RuntimeError(
                    f"Round {round_}: secure aggregation needs every participant's update; "
                    f"{err.missing} did not answer (or were rejected) and {len(participants)} "
                    f"site(s) remain, fewer than min_available={server.config.min_available}."
                ) from err
            attempt += 1
            logger.warning(
                "Round %d: no update from %s; asking the %d others again under fresh masks "
                "(attempt %d).",
                round_,
                err.missing,
                len(participants),
                attempt,
            )


def make_server_app(
    server_factory: ServerFactory,
    expected_sites: int | Sequence[str] | Callable[[Context], int | Sequence[str]],
    on_finish: FinishCallback | None = None,
    round_timeout: float | None = None,
    discovery_timeout: float | None = 300.0,
    progress_bar: bool = True,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """Build the Flower ``ServerApp`` of scinfl.

    Parameters
    ----------
    server_factory
        ``server_factory(context) -> FederatedServer``: the server state to drive (settings,
        key identity, initial parameters; empty parameters = take them from the first site).
    expected_sites
        Number or names of the sites to wait for (or a function of the context giving them).
    on_finish
        Called with the server and the context after the last round (e.g. to save results).
    round_timeout
        Seconds to wait for the replies of one step (``None``: all of them).
    discovery_timeout
        Seconds to wait for the nodes to connect and introduce themselves.
    progress_bar
        Show a progress bar over rounds.
    on_error
        Called with an exception that ends the run, before it propagates (Flower's simulation
        only logs it).

    Returns
    -------
    The ``ServerApp``.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.federated import FederationConfig
    >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=2))
    >>> app = make_server_app(lambda context: server, expected_sites=["a", "b"])
    >>> type(app).__name__
    'ServerApp'
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server = server_factory(context)
            expected = expected_sites(context) if callable(expected_sites) else expected_sites
            directory = discover_sites(grid, expected, timeout=discovery_timeout)
            logger.info(
                "Sites: %s",
                ", ".join(f"{s} (node {directory.nodes[s]})" for s in directory.sites),
            )
            if not server.parameters:
                server.parameters = request_parameters(
                    grid,
                    directory,
                    round_timeout,
                    in_secret_frame=bool(server.config.secret_frames),
                )
            run_rounds(
                grid, server, directory, round_timeout=round_timeout, progress_bar=progress_bar
            )
        except BaseException as error:
            if on_error is not None:
                on_error(error)
            raise
        if on_finish is not None:
            on_finish(server, context)

    return app
