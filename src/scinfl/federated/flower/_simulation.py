"""Flower's simulation engine (``flwr.simulation.run_simulation``), one virtual node per site."""

from __future__ import annotations

import builtins
import contextlib
import copy
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.simulation import run_simulation
from torch import nn

from scinfl.federated._config import FederationConfig
from scinfl.federated._local_engine import start_server
from scinfl.federated._parameters import Parameters, get_shared_parameters, set_shared_parameters
from scinfl.federated._secret_frames import INITIAL_FRAME, SecretFrames, frames_for
from scinfl.federated._server import FederatedServer
from scinfl.federated._site_data import SiteData
from scinfl.federated._site_runtime import SiteRuntime
from scinfl.key import Key

from ._client_app import make_client_app
from ._server_app import make_server_app

logger = logging.getLogger(__name__)


@dataclass
class SimulationSites:
    """The in-process site table of a simulation: which virtual node plays which site.

    Node ``partition-id`` ``i`` plays the ``i``-th site (sorted by name). The table travels to
    the simulation's worker processes on this machine (never into a Flower message): the
    module (without key material when ``keys`` are given), the sites' data and the keys.

    Parameters
    ----------
    module
        Template module; each node trains its own copy.
    sites
        The sites' data.
    keys
        Key of each site (``None``: the module already holds the key).
    key_fingerprint, key_version
        Key identity the sites report when ``keys`` is ``None``.
    num_threads
        Torch threads in a worker (the caller's, so results match the local engine).
    config
        The federation's settings, which every site checks the server's instructions
        against (:class:`~scinfl.federated.SiteProtocol`); without them a site trains
        nothing.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> sites = [SiteData.from_arrays(s, np.ones((10, 4))) for s in "ba"]
    >>> table = SimulationSites(KeyedVAE(n_input=4, key_mode=None), sites)
    >>> [s.name for s in table.sites]
    ['a', 'b']
    """

    module: nn.Module
    sites: Sequence[SiteData]
    keys: Mapping[str, Key] | None = None
    key_fingerprint: str | None = None
    key_version: int | None = None
    num_threads: int = 1
    config: FederationConfig | None = None
    initial: Parameters = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # what a site sends to a query: the template as built, never the shared module as a
        # node of this process left it (a model decoded from a frame, or another site's)
        self.initial = get_shared_parameters(self.module)
        self.sites = sorted(self.sites, key=lambda s: s.name)
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"Site names must be unique, got {names}.")
        if self.keys is not None:
            missing = sorted(set(names) - set(self.keys))
            if missing:
                raise ValueError(f"No key given for sites {missing}.")

    def __call__(self, context: Context) -> SiteRuntime:
        """Return the runtime of the node of ``context`` (by its ``partition-id``)."""
        torch.set_num_threads(self.num_threads)
        site = self.sites[int(context.node_config["partition-id"])]
        for name in ("train_idx", "val_idx"):  # arrays arrive read-only from Ray's object store
            index = getattr(site, name)
            if not index.flags.writeable:
                setattr(site, name, index.copy())
        settings = {
            "secret_frames": bool(self.config is not None and self.config.privacy.secret_frames),
            "federation": self.config,
            "initial": self.initial,
        }
        if self.keys is None:
            return SiteRuntime(
                self.module, site, self.key_fingerprint, self.key_version, **settings
            )
        key = self.keys[site.name]
        set_key = getattr(self.module, "set_key", None)
        if set_key is not None:
            set_key(key)
        return SiteRuntime(self.module, site, key.fingerprint, key.version, key=key, **settings)


class _DropRunSimulationDeprecation(logging.Filter):
    # flwr 1.41 deprecates the Python entry point in favour of `flwr run` on a project
    # directory; in-process objects (module, sites, keys) can only go through the former
    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@contextlib.contextmanager
def _quiet_deprecation():
    flwr_logger = logging.getLogger("flwr")
    log_filter = _DropRunSimulationDeprecation()
    flwr_logger.addFilter(log_filter)
    try:
        yield
    finally:
        flwr_logger.removeFilter(log_filter)


@contextlib.contextmanager
def _print_kept():
    """Put back Python's ``print``, which Ray replaces in this process when it shuts down.

    Ray's progress bars install their own ``print`` (``RAY_TQDM_PATCH_PRINT``) and leave it
    there: numba then cannot compile functions that print, such as pynndescent's, which
    scanpy's neighbour graph of 8,192 cells or more runs (``tl.cluster`` failed after a Flower
    simulation in the same session).
    """
    kept = builtins.print
    try:
        yield
    finally:
        builtins.print = kept


def _default_backend_config() -> dict[str, Any]:
    # one worker process holding all CPUs of the simulation: sites train in turn, as in the
    # local engine, with the caller's thread count (so the arithmetic is the same)
    return {
        "init_args": {"num_cpus": 1, "num_gpus": 0},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }


def _site_keys(key: Key | Mapping[str, Key] | None, sites: Sequence[SiteData]) -> dict | None:
    """The key of each site by name (``None``: the module's own key travels)."""
    if isinstance(key, Key):
        return {site.name: key for site in sites}
    return None if key is None else dict(key)


def _coordinator_frames(
    config: FederationConfig, key: Key | Mapping[str, Key] | None
) -> SecretFrames | None:
    """The secret frames the coordinator encodes the initial model and decodes the result in."""
    if not config.privacy.secret_frames:
        return None
    if not isinstance(key, Key):
        raise ValueError(
            "secret_frames=True: the coordinator needs the federation's key (one Key, the "
            "same at every site) to put the initial model in its frame and read the result."
        )
    return frames_for(key)


def run_flower_simulation(
    module: nn.Module,
    sites: Sequence[SiteData],
    config: FederationConfig,
    key_fingerprint: str | None = None,
    key_version: int | None = None,
    initial_parameters: Parameters | None = None,
    progress_bar: bool = True,
    key: Key | Mapping[str, Key] | None = None,
    backend_config: Mapping[str, Any] | None = None,
    verbose_logging: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> FederatedServer:
    """Run a federation with Flower's simulation engine; leave the selected model in ``module``.

    Same contract as :func:`~scinfl.federated.run_local`: one virtual Flower node per site
    runs the scinfl ``ClientApp`` (:func:`~scinfl.federated.client_update` /
    :func:`~scinfl.federated.client_evaluate`), the ``ServerApp`` drives a
    :class:`~scinfl.federated.FederatedServer` (sampling, FedAvg, key check, selection), and
    the same seed gives the same global parameters as the local engine. Messages carry
    parameters, round instructions, metrics and the key's fingerprint and version, never
    the key.

    Parameters
    ----------
    module
        Keyed module (with its key set, unless ``key`` is given).
    sites
        The sites' data; node ``partition-id`` ``i`` plays the ``i``-th site by name.
    config
        Federation settings.
    key_fingerprint, key_version
        Identity of the federation's key: the server rejects updates under another key.
    initial_parameters
        Start from these global parameters instead of the module's.
    progress_bar
        Show a progress bar over rounds.
    key
        The sites' key (one for all, or one per site name). Then the nodes receive the module
        without key material and each installs its own key; a site holding another key
        reports another fingerprint and its updates are rejected. ``None``: the module's key.
    backend_config
        Flower's Ray backend settings (default: one worker process, 1 CPU).
    verbose_logging
        Flower's debug logs.
    checkpoint_dir, resume
        Checkpoint after every round, and continue from it (as in
        :func:`~scinfl.federated.run_local`).

    Returns
    -------
    The :class:`~scinfl.federated.FederatedServer`, with the history and the selected round.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=8, key_mode=None)
    >>> sites = [SiteData.from_arrays(s, np.random.poisson(2, (40, 8))) for s in "ab"]
    >>> config = FederationConfig(max_rounds=2, batch_size=16)
    >>> server = run_flower_simulation(vae, sites, config, progress_bar=False)  # doctest: +SKIP
    >>> server.history()["round"].max()  # doctest: +SKIP
    1
    """
    sites = list(sites)
    if not sites:
        raise ValueError("No sites to federate.")
    keys = _site_keys(key, sites)
    template = copy.deepcopy(module)
    if keys is not None and hasattr(template, "set_key"):
        template.set_key(None)  # the nodes install their own key
    initial = initial_parameters or get_shared_parameters(module)
    frames = _coordinator_frames(config, key)
    if frames is not None:
        initial = frames.encode(initial, INITIAL_FRAME)
    server = start_server(
        initial,
        config,
        key_fingerprint,
        key_version,
        n_sites=len(sites),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        site_rows={site.name: (site.n_train, site.n_val) for site in sites},
    )
    table = SimulationSites(
        template,
        sites,
        keys=keys,
        key_fingerprint=key_fingerprint,
        key_version=key_version,
        num_threads=torch.get_num_threads(),
        # the server's settings: a resumed run keeps the default KL warm-up it began with
        config=server.config,
    )
    failures: list[BaseException] = []
    server_app = make_server_app(
        lambda context: server,
        expected_sites=[site.name for site in table.sites],
        progress_bar=progress_bar,
        discovery_timeout=None,
        on_error=failures.append,
        cancelled=(cancelled := threading.Event()),
    )
    client_app = make_client_app(table)
    if backend_config is None:
        backend_config = _default_backend_config()
    try:
        with _quiet_deprecation(), _print_kept():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(table.sites),
                backend_config=dict(backend_config),
                verbose_logging=verbose_logging,
            )
    except BaseException:
        # interrupted (Ctrl-C): end the ServerApp thread's waits, or the process cannot exit
        cancelled.set()
        raise
    if failures:  # Flower's simulation logs a ServerApp's exception and returns: re-raise it
        raise failures[0]
    best, frame = server.selected()
    set_shared_parameters(module, frames.decode(best, frame) if frames else best)
    return server
