"""The Flower ``ServerApp``: the one round loop (:func:`~scinfl.federated.run_rounds`) over a Grid.

Sampling, FedAvg, the key-identity check and model selection are those of
:class:`~scinfl.federated.FederatedServer`; this module only moves messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from scinfl.federated._aggregate import fedavg
from scinfl.federated._client import ClientConfig, ClientUpdate
from scinfl.federated._parameters import Parameters
from scinfl.federated._round_loop import run_rounds
from scinfl.federated._secure_aggregation import unmask_sum
from scinfl.federated._server import FederatedServer
from scinfl.module import scale_from_moments

from ._cancellable_grid import CancellableGrid
from ._client_app import (
    FEATURE_SCALE,
    IN_SECRET_FRAME,
    PARTICIPANTS,
    PUBLIC_KEYS,
    REVEAL,
    SELF_MASK,
    WANT_MOMENTS,
    WANT_PARAMETERS,
    WANT_PUBLIC_KEY,
)
from ._records import (
    CONFIG,
    PARAMETERS,
    advertisements_to_record,
    config_to_record,
    content_to_update,
    parameters_to_record,
    record_to_advertisements,
    record_to_parameters,
    reply_error,
)

logger = logging.getLogger(__name__)

ServerFactory = Callable[[Context], FederatedServer]
FinishCallback = Callable[[FederatedServer, Context], None]


@dataclass
class SiteDirectory:
    """Which Flower node holds which site, as the sites reported it.

    Parameters
    ----------
    nodes
        Flower node id of each site, by site name.
    n_train, n_val
        Training and validation rows of each site, by name.
    keys
        Key identity ``(fingerprint, version)`` each site reported, by name (``None`` entries
        for a keyless site).

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

    def site_of(self, node_id: int) -> str | None:
        """The site the node ``node_id`` holds (``None``: no site of the directory).

        Parameters
        ----------
        node_id
            A Flower node id.

        Returns
        -------
        The site's name, or ``None``.

        Examples
        --------
        >>> SiteDirectory({"a": 11}, {"a": 9}, {"a": 1}).site_of(11)
        'a'
        """
        return next((site for site, node in self.nodes.items() if node == node_id), None)


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

    Parameters
    ----------
    grid
        The ServerApp's grid.
    directory
        Site-to-node map from :func:`discover_sites`.
    timeout
        Seconds to wait for the reply (``None``: forever).
    in_secret_frame
        Ask for them in the initial secret frame (the sites' frames must be on).

    Returns
    -------
    The initial global parameters, name to numpy array.

    Raises
    ------
    RuntimeError
        When the site does not answer, or answers with an error.

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


def _query_all(grid, directory, sites, content, group_id, what, timeout):
    """One ``query`` to each of ``sites``; their replies, refusing errors and impostors."""
    messages = [
        Message(RecordDict(dict(content)), directory.nodes[s], MessageType.QUERY, group_id=group_id)
        for s in sites
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        error = reply_error(reply)
        if error is not None:
            raise RuntimeError(f"A site did not {what}: {error}")
    if len(replies) != len(sites):
        raise RuntimeError(f"{len(sites) - len(replies)} site(s) did not {what} in time.")
    return replies


def agree_public_keys(
    grid: Grid, directory: SiteDirectory, sites: Sequence[str], timeout: float | None = None
) -> None:
    """Secure aggregation's key agreement: each site's public key, relayed to every site.

    Each site sends its public key for the run with a tag under the federation's key (which
    the server cannot forge: it cannot substitute keys); the server sends the list to every
    site, which checks the tags and derives a secret with each peer
    (:meth:`~scinfl.federated.SiteProtocol.install_peer_keys`).

    Parameters
    ----------
    grid
        The ServerApp's grid.
    directory
        Site-to-node map from :func:`discover_sites`.
    sites
        The sites that take part (every site that may be asked to train).
    timeout
        Seconds to wait for each step's replies (``None``: forever).

    Raises
    ------
    RuntimeError
        When a site fails, does not answer in time, or a node claims another's site.

    Examples
    --------
    >>> agree_public_keys(grid, directory, directory.sites)  # doctest: +SKIP
    """
    sites = sorted(sites)
    asked = {CONFIG: ConfigRecord({WANT_PUBLIC_KEY: True})}
    advertisements = []
    for reply in _query_all(grid, directory, sites, asked, "keys", "send its public key", timeout):
        (ad,) = record_to_advertisements(reply.content[PUBLIC_KEYS])
        if directory.nodes.get(ad.site) != reply.metadata.src_node_id:
            raise RuntimeError(f"Node {reply.metadata.src_node_id} claimed site {ad.site!r}.")
        advertisements.append(ad)
    relayed = {PUBLIC_KEYS: advertisements_to_record(sorted(advertisements, key=lambda a: a.site))}
    _query_all(grid, directory, sites, relayed, "peer-keys", "install the public keys", timeout)
    logger.info("Public keys of %d sites relayed for secure aggregation.", len(sites))


def share_feature_scale(
    grid: Grid,
    directory: SiteDirectory,
    secure: bool = False,
    timeout: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Agree on the feature scale of continuous data: moments from every site, scale to every site.

    Each site sends its per-feature count, sum and sum of squares per row (masked under
    secure aggregation, so that the server learns only their sum); their FedAvg is the pooled
    rows' moments per row, from which the location and scale follow
    (:func:`~scinfl.module.scale_from_moments`); every site then installs them. Before any
    model: a site answers neither once it has received one.

    Parameters
    ----------
    grid
        The ServerApp's grid.
    directory
        Site-to-node map from :func:`discover_sites`.
    secure
        The sites mask their moments (secure aggregation, with the keys agreed first).
    timeout
        Seconds to wait for each step's replies (``None``: forever).

    Returns
    -------
    ``(loc, scale)``, as every site installed them.

    Examples
    --------
    >>> loc, scale = share_feature_scale(grid, discover_sites(grid, 3))  # doctest: +SKIP
    """
    sites = directory.sites
    asked = ConfigRecord({WANT_MOMENTS: True, PARTICIPANTS: sites})
    messages = [
        Message(
            RecordDict({CONFIG: asked}), directory.nodes[s], MessageType.QUERY, group_id="moments"
        )
        for s in sites
    ]
    updates = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        error = reply_error(reply)
        if error is not None:
            raise RuntimeError(f"A site did not send its feature moments: {error}")
        update = content_to_update(reply.content)
        if directory.nodes.get(update.site) != reply.metadata.src_node_id:
            raise RuntimeError(f"Node {reply.metadata.src_node_id} claimed site {update.site!r}.")
        updates.append(update)
    updates.sort(key=lambda u: u.site)
    if secure:
        template = {name: np.zeros(0) for name in ("count", "sum", "sumsq")}
        moments = unmask_sum(updates, template, sites)
    else:
        moments = fedavg(updates)
    # the aggregate is the pooled per-row mean of each moment: back to sums over all rows
    # (the ratios give the same location and scale; the count tells too rare a feature)
    rows = sum(update.n for update in updates)
    loc, scale = scale_from_moments(*(rows * moments[m] for m in ("count", "sum", "sumsq")))
    record = parameters_to_record({"loc": loc, "scale": scale})
    messages = [
        Message(
            RecordDict({FEATURE_SCALE: record}),
            directory.nodes[s],
            MessageType.QUERY,
            group_id="scale",
        )
        for s in sites
    ]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        error = reply_error(reply)
        if error is not None:
            raise RuntimeError(f"A site did not install the feature scale: {error}")
    logger.info("Feature scale of %d features agreed by %d sites.", len(loc), len(sites))
    return loc, scale


#: how a site's FloatingPointError of a diverged training begins (``_client``)
_DIVERGED = "Training diverged"


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
            site = directory.site_of(node_id) or f"node {node_id}"
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
        diverged = [e[e.index(_DIVERGED) :].split("\n")[0] for e in errors if _DIVERGED in e]
        if diverged and len(diverged) == len(errors):
            # the sites' own FloatingPointError, whatever Flower and Ray wrapped it in
            raise FloatingPointError(f"Round {round_}: {diverged[0]}")
        raise RuntimeError(
            f"Round {round_}: no site completed its {what} step: {'; '.join(errors) or 'timeout'}"
        )
    return sorted(updates, key=lambda u: u.site)


class GridTransport:
    """The sites behind a Flower Grid as a :class:`~scinfl.federated.Transport`.

    Each step is one message per site (``train`` or ``evaluate``) with the global parameters
    and the round's instructions; the replies are decoded, those of another node than the
    addressed one dropped, and a site that fails or does not answer within ``round_timeout``
    is left out of the step (logged).

    Parameters
    ----------
    grid
        The ServerApp's grid.
    directory
        Site-to-node map from :func:`discover_sites`.
    server
        The federation's server (its parameters order the decoded replies).
    round_timeout
        Seconds to wait for the replies of one step (``None``: wait for all).

    Examples
    --------
    >>> transport = GridTransport(grid, discover_sites(grid, 3), server)  # doctest: +SKIP
    """

    def __init__(
        self,
        grid: Grid,
        directory: SiteDirectory,
        server: FederatedServer,
        round_timeout: float | None = None,
    ) -> None:
        self.grid, self.directory, self.server = grid, directory, server
        self.round_timeout = round_timeout

    def available(self, round_: int) -> list[str]:
        """The sites whose node is still connected.

        Parameters
        ----------
        round_
            Global round (0-based; named in the warning about disconnected sites).

        Returns
        -------
        The connected sites, sorted.

        Examples
        --------
        >>> transport.available(0)  # doctest: +SKIP
        ['a', 'b', 'c']
        """
        connected = set(self.grid.get_node_ids())
        gone = [s for s in self.directory.sites if self.directory.nodes[s] not in connected]
        if gone:
            logger.warning("Round %d: sites %s are disconnected and not asked.", round_, gone)
        return [site for site in self.directory.sites if site not in gone]

    def train(
        self,
        round_: int,
        sites: list[str],
        parameters: Parameters,
        config: ClientConfig,
        attempt: int = 0,
    ) -> list[ClientUpdate]:
        """A ``train`` message to each site; their updates.

        Parameters
        ----------
        round_
            Global round (0-based).
        sites
            The sites asked to train.
        parameters
            The global parameters, as the server holds them.
        config
            The round's instructions.
        attempt
            Attempt of the round (under secure aggregation; names the message group).

        Returns
        -------
        The answering sites' updates, sorted by site.

        Raises
        ------
        RuntimeError
            When no site completed the step.
        FloatingPointError
            When training diverged at every site that answered.

        Examples
        --------
        >>> updates = transport.train(0, ["a", "b"], server.parameters, server.client_config(0))  # doctest: +SKIP
        """
        group = f"{round_}" if attempt == 0 else f"{round_}.{attempt}"
        return self._ask(sites, parameters, config, MessageType.TRAIN, round_, group)

    def evaluate(
        self, round_: int, sites: list[str], parameters: Parameters, config: ClientConfig
    ) -> list[ClientUpdate]:
        """An ``evaluate`` message to each site; their metrics.

        Parameters
        ----------
        round_
            The round the parameters come from (0-based).
        sites
            The sites asked to validate.
        parameters
            The global parameters, as the server holds them.
        config
            The instructions that go with them.

        Returns
        -------
        The answering sites' updates (validation metrics, no parameters), sorted by site.

        Examples
        --------
        >>> updates = transport.evaluate(0, ["a", "b"], server.parameters, server.client_config(1))  # doctest: +SKIP
        """
        return self._ask(sites, parameters, config, MessageType.EVALUATE, round_, str(round_))

    def agree_keys(self, sites: list[str]) -> None:
        """:func:`agree_public_keys` among ``sites``.

        Parameters
        ----------
        sites
            Every site that may be asked to train in the run.

        Examples
        --------
        >>> transport.agree_keys(transport.available(0))  # doctest: +SKIP
        """
        agree_public_keys(self.grid, self.directory, sites, self.round_timeout)

    def reveal(self, round_: int, sites: list[str], config: ClientConfig) -> dict[str, bytes]:
        """A ``query`` to each site for its self-mask seed of the attempt ``config`` names.

        Parameters
        ----------
        round_
            Global round (0-based).
        sites
            The participants of the attempt.
        config
            The instructions they trained under.

        Returns
        -------
        Each answering site's 32-byte seed, by site (a site that fails is left out, logged).

        Examples
        --------
        >>> seeds = transport.reveal(0, ["a", "b"], sent)  # doctest: +SKIP
        """
        content = RecordDict({REVEAL: config_to_record(config)})
        messages = [
            Message(
                RecordDict(dict(content)),
                self.directory.nodes[site],
                MessageType.QUERY,
                group_id=f"{round_}.{config.attempt}.reveal",
            )
            for site in sites
        ]
        seeds = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout):
            node_id, error = reply.metadata.src_node_id, reply_error(reply)
            site = self.directory.site_of(node_id)
            if error is not None or site is None or SELF_MASK not in reply.content:
                logger.warning(
                    "Round %d: site %s did not reveal its self mask: %s", round_, site, error
                )
                continue
            seeds[site] = bytes.fromhex(str(reply.content[SELF_MASK]["seed"]))
        return seeds

    def _ask(self, sites, parameters, config, message_type, round_, group_id):
        records = {PARAMETERS: parameters_to_record(parameters), CONFIG: config_to_record(config)}
        messages = [
            Message(
                RecordDict(dict(records)),
                self.directory.nodes[site],
                message_type,
                group_id=group_id,
            )
            for site in sites
        ]
        kind = "train" if message_type == MessageType.TRAIN else "evaluate"
        replies = self.grid.send_and_receive(messages, timeout=self.round_timeout)
        return _collect(replies, self.directory, self.server, kind, round_, asked=sites)


def run_flower_rounds(
    grid: Grid,
    server: FederatedServer,
    directory: SiteDirectory,
    round_timeout: float | None = None,
    progress_bar: bool = True,
) -> FederatedServer:
    """Run the rounds of :func:`~scinfl.federated.run_rounds` with the sites behind a Grid.

    The same loop as :func:`~scinfl.federated.run_local`, over a :class:`GridTransport`; a
    site whose key identity differs from the federation's is warned about first (its updates
    will be rejected).

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
    >>> server = run_flower_rounds(grid, server, discover_sites(grid, 3))  # doctest: +SKIP
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
    if server.site_rows is None:  # the counts the sites declared weigh them from now on
        server.site_rows = {s: (directory.n_train[s], directory.n_val[s]) for s in directory.sites}
    transport = GridTransport(grid, directory, server, round_timeout)
    return run_rounds(transport, server, progress_bar, desc="federated rounds (flower)")


def make_server_app(
    server_factory: ServerFactory,
    expected_sites: int | Sequence[str] | Callable[[Context], int | Sequence[str]],
    on_finish: FinishCallback | None = None,
    round_timeout: float | None = None,
    discovery_timeout: float | None = 300.0,
    progress_bar: bool = True,
    on_error: Callable[[BaseException], None] | None = None,
    cancelled: threading.Event | None = None,
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
    cancelled
        Set by the caller to end the run's waits (:class:`CancellableGrid`): a simulation
        interrupted in its caller's thread.

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
        if cancelled is not None:
            grid = CancellableGrid(grid, cancelled)
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
                    in_secret_frame=bool(server.config.privacy.secret_frames),
                )
            run_flower_rounds(
                grid, server, directory, round_timeout=round_timeout, progress_bar=progress_bar
            )
        except BaseException as error:
            if on_error is not None:
                on_error(error)
            raise
        if on_finish is not None:
            on_finish(server, context)

    return app
