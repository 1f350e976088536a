"""The one round loop of every engine: sample, train, aggregate, evaluate, select.

What carries the messages is a :class:`Transport`: the sites in this process
(:func:`~scinfl.federated.run_local`) or behind a Flower Grid (the ``ServerApp``). The loop,
and so the arithmetic of a federation, is the same for both.
"""

from __future__ import annotations

import logging
from typing import Protocol

from tqdm.auto import tqdm

from ._aggregate import accept_updates
from ._client import ClientConfig, ClientUpdate
from ._parameters import Parameters
from ._secure_aggregation import IncompleteRoundError
from ._server import FederatedServer

logger = logging.getLogger(__name__)


class Transport(Protocol):
    """How the server reaches the sites in one engine.

    ``train`` and ``evaluate`` send the global ``parameters`` (as the server holds them) and the
    round's instructions to each of ``sites`` and return their replies as updates, sorted by
    site; a site that fails or does not answer is left out (and logged) where the transport
    can go on without it.

    Implemented by :class:`~scinfl.federated.InProcessTransport` (the sites of this process)
    and :class:`~scinfl.federated.flower.GridTransport` (the sites behind a Flower Grid).

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.federated import InProcessTransport, SiteData, SiteRuntime
    >>> from scinfl.module import KeyedVAE
    >>> site = SiteData.from_arrays("a", np.ones((10, 4)))
    >>> transport: Transport = InProcessTransport({"a": SiteRuntime(KeyedVAE(n_input=4, key_mode=None), site)})
    >>> transport.available(0)
    ['a']
    """

    def available(self, round_: int) -> list[str]:
        """The sites that can be asked in this round, sorted.

        Parameters
        ----------
        round_
            Global round (0-based).

        Returns
        -------
        The names of the sites that can be asked.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.federated import InProcessTransport, SiteData, SiteRuntime
        >>> from scinfl.module import KeyedVAE
        >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
        >>> InProcessTransport({"a": runtime}).available(0)
        ['a']
        """

    def train(
        self,
        round_: int,
        sites: list[str],
        parameters: Parameters,
        config: ClientConfig,
        attempt: int,
    ) -> list[ClientUpdate]:
        """Each site's update from ``parameters`` under ``config``.

        Parameters
        ----------
        round_
            Global round (0-based).
        sites
            The sites asked to train.
        parameters
            The global parameters, as the server holds them (in their secret frame, if any).
        config
            The round's instructions (:meth:`~scinfl.federated.FederatedServer.client_config`).
        attempt
            Attempt of the round (under secure aggregation; 0 otherwise).

        Returns
        -------
        The sites' updates, sorted by site; a site that failed is missing.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.federated import FederationConfig, InProcessTransport, SiteData, SiteRuntime, get_shared_parameters
        >>> from scinfl.module import KeyedVAE
        >>> config, vae = FederationConfig(max_rounds=1, batch_size=8), KeyedVAE(n_input=4, key_mode=None)
        >>> runtime = SiteRuntime(vae, SiteData.from_arrays("a", np.ones((10, 4))), federation=config)
        >>> transport: Transport = InProcessTransport({"a": runtime})
        >>> [u.n for u in transport.train(0, ["a"], get_shared_parameters(vae), config.client_config(0), 0)]
        [9]
        """

    def evaluate(
        self, round_: int, sites: list[str], parameters: Parameters, config: ClientConfig
    ) -> list[ClientUpdate]:
        """Each site's validation metrics of ``parameters`` (updates without parameters).

        Parameters
        ----------
        round_
            The round the parameters come from (0-based; ``max_rounds`` is allowed: the
            model after the last round).
        sites
            The sites asked to validate.
        parameters
            The global parameters, as the server holds them.
        config
            The instructions that go with them (their round and frame).

        Returns
        -------
        The sites' updates, sorted by site, with empty ``parameters`` and the validation
        metrics (``val_loss``, ``n_val``, ...) in ``metrics``.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.federated import FederationConfig, InProcessTransport, SiteData, SiteRuntime, get_shared_parameters
        >>> from scinfl.module import KeyedVAE
        >>> config, vae = FederationConfig(max_rounds=1), KeyedVAE(n_input=4, key_mode=None)
        >>> runtime = SiteRuntime(vae, SiteData.from_arrays("a", np.ones((10, 4))), federation=config)
        >>> transport: Transport = InProcessTransport({"a": runtime})
        >>> [u.metrics["n_val"] for u in transport.evaluate(0, ["a"], get_shared_parameters(vae), config.client_config(0))]
        [1.0]
        """

    def agree_keys(self, sites: list[str]) -> None:
        """Secure aggregation's key agreement: relay each site's public key to every site.

        Each of ``sites`` advertises its public key (tagged with the federation's key) and
        installs the list of all of them (:meth:`~scinfl.federated.SiteProtocol.advertise_key`,
        :meth:`~scinfl.federated.SiteProtocol.install_peer_keys`).

        Parameters
        ----------
        sites
            Every site that may be asked to train in the run.

        Examples
        --------
        >>> import json
        >>> import numpy as np
        >>> from scinfl import Key
        >>> from scinfl.federated import FederationConfig, InProcessTransport, SiteData, SiteRuntime
        >>> from scinfl.module import KeyedVAE
        >>> config, vae, key = FederationConfig(privacy="secagg"), KeyedVAE(n_input=4, key_mode=None), Key.generate()
        >>> runtimes = {s: SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), key=key, federation=config) for s in "abc"}
        >>> transport: Transport = InProcessTransport(runtimes)
        >>> transport.agree_keys(["a", "b", "c"])
        >>> len(json.loads(transport.protocols["a"].state.peer_keys))  # every site's public key
        3
        """

    def reveal(self, round_: int, sites: list[str], config: ClientConfig) -> dict[str, bytes]:
        """Secure aggregation's unmasking step: each site's self-mask seed of the attempt.

        Asked once every participant's masked upload of the attempt ``config`` names is in
        (:meth:`~scinfl.federated.SiteProtocol.reveal_self_mask`); a site that fails or does
        not answer is left out.

        Parameters
        ----------
        round_
            Global round (0-based).
        sites
            The participants of the attempt.
        config
            The instructions they trained under (round, attempt, participants).

        Returns
        -------
        Each answering site's 32-byte self-mask seed, by site.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl import Key
        >>> from scinfl.federated import FederationConfig, InProcessTransport, SiteData, SiteRuntime, get_shared_parameters
        >>> from scinfl.module import KeyedVAE
        >>> config = FederationConfig.from_settings(max_rounds=1, batch_size=8, privacy="secagg", secagg_min_participants=2)
        >>> vae, key = KeyedVAE(n_input=4, key_mode=None), Key.generate()
        >>> runtimes = {s: SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), key=key, federation=config) for s in "ab"}
        >>> transport: Transport = InProcessTransport(runtimes)
        >>> transport.agree_keys(["a", "b"])
        >>> sent = config.client_config(0, ["a", "b"])
        >>> _ = transport.train(0, ["a", "b"], get_shared_parameters(vae), sent, 0)
        >>> {site: len(seed) for site, seed in transport.reveal(0, ["a", "b"], sent).items()}
        {'a': 32, 'b': 32}
        """


def run_rounds(
    transport: Transport,
    server: FederatedServer,
    progress_bar: bool | str = True,
    desc: str = "federated rounds",
) -> FederatedServer:
    """Run a federation's remaining rounds over ``transport``.

    Under secure aggregation the sites first agree on pairwise keys
    (:meth:`Transport.agree_keys`). Each round:
    :meth:`~scinfl.federated.FederatedServer.sample_sites` among the available
    sites, a train step (:func:`train_round`), an evaluate step of the new global model at
    every available site (updates under another key are dropped), and
    :meth:`~scinfl.federated.FederatedServer.record_evaluation`, which selects the model and
    decides early stopping.

    Parameters
    ----------
    transport
        How the server reaches the sites.
    server
        The server; its rounds still to run (:meth:`~scinfl.federated.FederatedServer.rounds`)
        are run.
    progress_bar
        Show a progress bar over rounds (a string: shown, with that label).
    desc
        The progress bar's label when ``progress_bar`` is ``True``.

    Returns
    -------
    ``server``, with its history and selected model updated.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.federated import FederationConfig, SiteData, run_local
    >>> from scinfl.module import KeyedVAE
    >>> sites = [SiteData.from_arrays(s, np.random.poisson(2, (40, 8))) for s in "ab"]
    >>> server = run_local(KeyedVAE(n_input=8, key_mode=None), sites, FederationConfig(max_rounds=2), progress_bar=False)
    >>> server.next_round  # run_local runs this loop over the sites in this process
    2
    """
    # a label in place of True names what the bar counts (train_centralized: epochs)
    desc = progress_bar if isinstance(progress_bar, str) else desc
    rounds = tqdm(server.rounds(), desc=desc, disable=not progress_bar)
    if server.config.privacy.secure_aggregation:
        # before the first masked upload: every site that may be asked shares masks with all
        transport.agree_keys(transport.available(server.next_round))
    for round_ in rounds:
        available = transport.available(round_)
        selected = server.sample_sites(available, round_)
        train_round(transport, server, round_, selected)
        # the instructions name the secret frame of the parameters (when frames are on)
        evaluations = transport.evaluate(
            round_, available, server.parameters, server.client_config(round_ + 1)
        )
        accepted = accept_updates(evaluations, server.key_fingerprint, server.key_version)
        stop = server.record_evaluation(round_, {u.site: u.metrics for u in accepted})
        if server.last_val_loss is not None:
            # the selection's loss (weighted by validation rows), as the history has it
            best = {"best_epoch" if desc == "epochs" else "best_round": server.best_round}
            rounds.set_postfix(val_loss=f"{server.last_val_loss:.4g}", **best)
        if stop:
            break
    return server


def train_round(
    transport: Transport, server: FederatedServer, round_: int, selected: list[str]
) -> None:
    """The train step of a round, then the aggregation of its updates.

    Under secure aggregation a site that does not answer (or is rejected) leaves the others'
    masks uncancelled: the round is asked again of the sites that answered, under fresh masks
    (their training is seeded, so they send the same update), until every participant's
    update is in or fewer than ``min_available`` remain.

    Parameters
    ----------
    transport
        How the server reaches the sites.
    server
        The server; its global parameters and history are updated
        (:meth:`~scinfl.federated.FederatedServer.aggregate`).
    round_
        Global round (0-based).
    selected
        The sites asked to train (:meth:`~scinfl.federated.FederatedServer.sample_sites`).

    Raises
    ------
    RuntimeError
        Under secure aggregation, when fewer than ``secagg_min_participants`` or
        ``min_available`` sites remain.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.federated import FederatedServer, FederationConfig, InProcessTransport, SiteData, SiteRuntime, get_shared_parameters
    >>> from scinfl.module import KeyedVAE
    >>> config, vae = FederationConfig(max_rounds=1, batch_size=8), KeyedVAE(n_input=4, key_mode=None)
    >>> runtimes = {s: SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), federation=config) for s in "ab"}
    >>> server = FederatedServer(get_shared_parameters(vae), config)
    >>> train_round(InProcessTransport(runtimes), server, 0, ["a", "b"])
    >>> server.history()[["round", "site", "n_train", "accepted"]]
       round site  n_train  accepted
    0      0    a        9      True
    1      0    b        9      True
    """
    participants, attempt = list(selected), 0
    privacy = server.config.privacy
    while True:
        if privacy.secure_aggregation and len(participants) < privacy.secagg_min_participants:
            raise RuntimeError(
                f"Round {round_}: secure aggregation over {participants} would sum fewer than "
                f"secagg_min_participants={privacy.secagg_min_participants} sites, which they "
                "refuse. Bring sites back (resume=True from the last checkpoint), sample more "
                "sites per round, or lower secagg_min_participants."
            )
        config = server.client_config(round_, participants, attempt)
        updates = transport.train(round_, participants, server.parameters, config, attempt)
        try:
            seeds = _unmasking_step(transport, server, round_, updates, participants, config)
            server.aggregate(round_, updates, participants, sent=config, self_seeds=seeds)
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


def _unmasking_step(
    transport: Transport,
    server: FederatedServer,
    round_: int,
    updates: list[ClientUpdate],
    participants: list[str],
    config: ClientConfig,
) -> dict[str, bytes] | None:
    """Under secure aggregation, every participant's self-mask seed once all uploads are in.

    Raises :class:`~scinfl.federated.IncompleteRoundError` (the round is asked again) while an
    upload is missing. A site that uploaded but does not reveal its seed makes the round
    unreadable, and the others take part in no other attempt of it: the run stops with an
    error and can be resumed from its last checkpoint.
    """
    if not server.config.privacy.secure_aggregation:
        return None
    accepted = accept_updates(updates, server.key_fingerprint, server.key_version)
    missing = sorted(set(participants) - {u.site for u in accepted})
    if missing:
        raise IncompleteRoundError(f"Round {round_}: no update from {missing}.", missing)
    seeds = transport.reveal(round_, participants, config)
    unrevealed = sorted(set(participants) - set(seeds))
    if unrevealed:
        raise RuntimeError(
            f"Round {round_}: {unrevealed} uploaded but did not reveal their self masks, so the "
            "round's sum cannot be read, and the others reveal one attempt per round. Bring "
            "the sites back and continue with resume=True from the last checkpoint."
        )
    return seeds
