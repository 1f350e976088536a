"""In-process engine: every site trained in turn in this Python process."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from scinfl.key import Key

from ._client import ClientConfig, ClientUpdate
from ._config import FederationConfig
from ._parameters import Parameters, get_shared_parameters, set_shared_parameters
from ._round_loop import run_rounds
from ._secret_frames import INITIAL_FRAME, SecretFrames, frames_for, parameters_digest
from ._server import FederatedServer
from ._site_data import SiteData
from ._site_runtime import SiteProtocol, SiteRuntime

logger = logging.getLogger(__name__)


def run_local(
    module: nn.Module,
    sites: Sequence[SiteData],
    config: FederationConfig,
    key_fingerprint: str | None = None,
    key_version: int | None = None,
    initial_parameters: Parameters | None = None,
    progress_bar: bool | str = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    key: Key | None = None,
) -> FederatedServer:
    """Run a federation in this process and leave the selected global model in ``module``.

    One module object plays every site in turn: it is reset to the global parameters before
    each local update, so nothing passes between sites except through the server.

    Parameters
    ----------
    module
        Keyed module with the key set.
    sites
        The sites' data.
    config
        Federation settings.
    key_fingerprint, key_version
        Identity of the key the sites use.
    initial_parameters
        Start from these global parameters instead of the module's.
    progress_bar
        Show a progress bar over rounds (a string: shown, with that label).
    checkpoint_dir
        Write the server state there after every round (see
        :meth:`FederatedServer.save_checkpoint`).
    resume
        Continue from the checkpoint in ``checkpoint_dir`` instead of starting afresh.
    key
        The federation's key, needed by ``privacy="secagg"`` (the sites' masks) and
        secret frames.

    Returns
    -------
    The :class:`FederatedServer`, with the history and the selected round.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=8, key_mode=None)
    >>> sites = [SiteData.from_arrays(s, np.random.poisson(2, (40, 8))) for s in "ab"]
    >>> server = run_local(vae, sites, FederationConfig(max_rounds=2, batch_size=16), progress_bar=False)
    >>> int(server.history()["round"].max())
    1
    """
    names = [site.name for site in sites]
    if len(set(names)) < len(names):
        doubled = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(
            f"Two sites are named {doubled[0]!r} (sites {doubled}): the server tells sites "
            "apart by name, so one would silently take the other's place. Give every site its "
            "own name."
        )
    initial = initial_parameters or get_shared_parameters(module)
    frames = frames_for(key) if config.privacy.secret_frames else None
    server = start_server(
        frames.encode(initial, INITIAL_FRAME) if frames else initial,
        config,
        key_fingerprint,
        key_version,
        n_sites=len(sites),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        site_rows={site.name: (site.n_train, site.n_val) for site in sites},
    )
    runtimes = {
        site.name: SiteRuntime(
            module,
            site,
            key_fingerprint,
            key_version,
            key=key,
            secret_frames=bool(config.privacy.secret_frames),
            # the server's settings: a resumed run keeps the default KL warm-up it began with
            federation=server.config,
            initial=initial,
        )
        for site in sites
    }
    run_rounds(InProcessTransport(runtimes, frames), server, progress_bar=progress_bar)
    best, frame = server.selected()
    set_shared_parameters(module, frames.decode(best, frame) if frames else best)
    return server


class InProcessTransport:
    """The sites of this process as a :class:`~scinfl.federated.Transport`.

    One module can play every site in turn (it is reset to the global parameters before each
    local update, so nothing passes between sites except through the server). Every site
    receives the same global model, so it is decoded from its secret frame once per frame and
    hashed once per message.
    Each site answers through its own :class:`~scinfl.federated.SiteProtocol`, whose state
    lives as long as the transport (one run; a resumed run starts with new sites' states).

    Parameters
    ----------
    runtimes
        Each site's runtime, by name.
    frames
        The federation's secret frames, when the parameters travel in them.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> site = SiteData.from_arrays("a", np.ones((10, 4)))
    >>> InProcessTransport({"a": SiteRuntime(KeyedVAE(n_input=4, key_mode=None), site)}).available(0)
    ['a']
    """

    def __init__(self, runtimes: Mapping[str, SiteRuntime], frames: SecretFrames | None = None):
        self.runtimes = dict(runtimes)
        self.protocols = {name: SiteProtocol(runtime) for name, runtime in self.runtimes.items()}
        self.frames = frames
        self._opened: tuple[str, Parameters] | None = None

    def available(self, round_: int) -> list[str]:
        """Every site: none of them can be away.

        Parameters
        ----------
        round_
            Global round (0-based; unused).

        Returns
        -------
        The names of all the transport's sites, sorted.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> vae = KeyedVAE(n_input=4, key_mode=None)
        >>> runtimes = {s: SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4)))) for s in "ba"}
        >>> InProcessTransport(runtimes).available(3)
        ['a', 'b']
        """
        return sorted(self.runtimes)

    def agree_keys(self, sites: list[str]) -> None:
        """Each site's public key advertised, and the list installed at every site.

        Parameters
        ----------
        sites
            The sites that take part in secure aggregation (each must hold the key and have
            ``privacy="secagg"`` in its settings).

        Examples
        --------
        >>> import json
        >>> import numpy as np
        >>> from scinfl import Key
        >>> from scinfl.module import KeyedVAE
        >>> config, vae, key = FederationConfig(privacy="secagg"), KeyedVAE(n_input=4, key_mode=None), Key.generate()
        >>> runtimes = {s: SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), key=key, federation=config) for s in "ab"}
        >>> transport = InProcessTransport(runtimes)
        >>> transport.agree_keys(["a", "b"])
        >>> sorted(json.loads(transport.protocols["b"].state.peer_keys))
        ['a', 'b']
        """
        advertisements = [self.protocols[s].advertise_key() for s in sorted(sites)]
        for site in sorted(sites):
            self.protocols[site].install_peer_keys(advertisements)

    def reveal(self, round_: int, sites: list[str], config: ClientConfig) -> dict[str, bytes]:
        """Each site's self-mask seed of the attempt ``config`` names.

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
        Each site's 32-byte self-mask seed, by site.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl import Key
        >>> from scinfl.module import KeyedVAE
        >>> config = FederationConfig.from_settings(max_rounds=1, batch_size=8, privacy="secagg", secagg_min_participants=2)
        >>> vae, key = KeyedVAE(n_input=4, key_mode=None), Key.generate()
        >>> runtimes = {s: SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), key=key, federation=config) for s in "ab"}
        >>> transport = InProcessTransport(runtimes)
        >>> transport.agree_keys(["a", "b"])
        >>> sent = config.client_config(0, ["a", "b"])
        >>> _ = transport.train(0, ["a", "b"], get_shared_parameters(vae), sent)
        >>> sorted(transport.reveal(0, ["a", "b"], sent))
        ['a', 'b']
        """
        return {s: self.protocols[s].reveal_self_mask(config) for s in sorted(sites)}

    def _open(self, parameters: Parameters, config: ClientConfig) -> Parameters:
        if self.frames is None:
            return parameters
        if self._opened is None or self._opened[0] != config.frame:
            self._opened = (config.frame, self.frames.decode(parameters, config.frame))
        return self._opened[1]

    def train(
        self,
        round_: int,
        sites: list[str],
        parameters: Parameters,
        config: ClientConfig,
        attempt: int = 0,
    ) -> list[ClientUpdate]:
        """Each site's update, in turn.

        Parameters
        ----------
        round_
            Global round (0-based).
        sites
            The sites asked to train.
        parameters
            The global parameters, as the server holds them (decoded once per frame).
        config
            The round's instructions.
        attempt
            Attempt of the round (under secure aggregation; ``config`` carries it too).

        Returns
        -------
        The sites' updates, sorted by site.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> config, vae = FederationConfig(max_rounds=1, batch_size=8), KeyedVAE(n_input=4, key_mode=None)
        >>> runtimes = {s: SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), federation=config) for s in "ab"}
        >>> updates = InProcessTransport(runtimes).train(0, ["a", "b"], get_shared_parameters(vae), config.client_config(0))
        >>> [(u.site, u.n) for u in updates]
        [('a', 9), ('b', 9)]
        """
        opened, digest = self._open(parameters, config), parameters_digest(parameters)
        updates = []
        for s in sorted(sites):
            with _named_site(s, round_):
                updates.append(self.protocols[s].train(parameters, config, opened, digest))
        return updates

    def evaluate(
        self, round_: int, sites: list[str], parameters: Parameters, config: ClientConfig
    ) -> list[ClientUpdate]:
        """Each site's validation metrics of the global model.

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
        The sites' updates, sorted by site: validation metrics, no parameters.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> config, vae = FederationConfig(max_rounds=1), KeyedVAE(n_input=4, key_mode=None)
        >>> runtime = SiteRuntime(vae, SiteData.from_arrays("a", np.ones((20, 4))), federation=config)
        >>> [update] = InProcessTransport({"a": runtime}).evaluate(0, ["a"], get_shared_parameters(vae), config.client_config(0))
        >>> update.metrics["n_val"], update.parameters
        (2.0, {})
        """
        opened, digest = self._open(parameters, config), parameters_digest(parameters)
        updates = []
        for s in sorted(sites):
            with _named_site(s, round_):
                updates.append(self.protocols[s].evaluate(parameters, config, opened, digest))
        return updates


@contextmanager
def _named_site(site: str, round_: int) -> Iterator[None]:
    """Add the site and round to an error raised while a site trains or validates."""
    try:
        yield
    except Exception as error:
        if repr(site) not in str(error):
            error.add_note(f"(raised at site {site!r} in round {round_})")
        raise


def start_server(
    parameters: Parameters,
    config: FederationConfig,
    key_fingerprint: str | None,
    key_version: int | None,
    n_sites: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    site_rows: Mapping[str, tuple[int, int]] | None = None,
) -> FederatedServer:
    """A new :class:`FederatedServer`, or the one saved in ``checkpoint_dir`` when ``resume``.

    ``site_rows``: the training and validation rows of every site of this run, by name (the
    server's :attr:`~FederatedServer.site_rows`); a resumed run must have the checkpoint's
    sites with their training rows (see :func:`check_same_sites`).

    Examples
    --------
    >>> import numpy as np
    >>> start_server({"w": np.zeros(1)}, FederationConfig(), None, None).next_round
    0
    """
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the run to continue.")
        server = FederatedServer.from_checkpoint(
            checkpoint_dir, config, key_fingerprint, key_version, n_sites=n_sites
        )
        if site_rows is not None:
            check_same_sites(server.rows, {name: rows[0] for name, rows in site_rows.items()})
            server.site_rows = dict(site_rows)
        return server
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file():
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} is a file: give a directory.")
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "checkpoint.json").exists():
        # a new run would overwrite it round by round: the interrupted run could not resume
        raise ValueError(
            f"{checkpoint_dir} holds the checkpoint of a run: pass resume=True to continue it, "
            "or give this run another checkpoint_dir (delete that one to start over)."
        )
    return FederatedServer(
        parameters=parameters,
        config=config,
        key_fingerprint=key_fingerprint,
        key_version=key_version,
        checkpoint_dir=checkpoint_dir,
        n_sites=n_sites,
        site_rows=None if site_rows is None else dict(site_rows),
    )


def check_same_sites(rows: Sequence[Mapping], site_rows: Mapping[str, int]) -> None:
    """Refuse to resume a run whose sites, or their training rows, differ from the checkpoint's.

    Selection compares validation losses across rounds: over other sites they measure another
    thing, and a site's split is drawn from its name and rows, so a renamed or changed site
    would validate on rows it trained on.

    Examples
    --------
    >>> check_same_sites([{"site": "a", "n_train": 9}], {"a": 9})
    >>> check_same_sites([{"site": "a", "n_train": 9}], {"b": 9})
    Traceback (most recent call last):
    ...
    ValueError: The checkpoint's run had sites ['a'], this one has ['b']: ...
    """
    trained = {row["site"]: row.get("n_train", 0) for row in rows if row.get("n_train", 0) > 0}
    saved = sorted({row["site"] for row in rows})
    now = sorted(site_rows)
    changed = [name for name, n in trained.items() if name in site_rows and site_rows[name] != n]
    if saved != now or changed:
        detail = f"this one has {now}"
        if changed:
            name = changed[0]
            detail = f"site {name!r} trains on {site_rows[name]} rows, {trained[name]} then"
        raise ValueError(
            f"The checkpoint's run had sites {saved}, {detail}: resume continues that run, with "
            "the same sites and rows. To train with a site that joined or left, call "
            "train_federated without resume (it continues from the model's weights)."
        )
