"""In-process engine: every site trained in turn in this Python process."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from scinfl.key import Key

from ._client import client_evaluate, client_update
from ._parameters import Parameters, get_shared_parameters, set_shared_parameters
from ._secret_frames import INITIAL_FRAME, frames_for
from ._secure_aggregation import protect_update
from ._server import FederatedServer, FederationConfig
from ._site_data import SiteData

logger = logging.getLogger(__name__)


def run_local(
    module: nn.Module,
    sites: Sequence[SiteData],
    config: FederationConfig,
    key_fingerprint: str | None = None,
    key_version: int | None = None,
    initial_parameters: Parameters | None = None,
    progress_bar: bool = True,
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
        Show a progress bar over rounds.
    checkpoint_dir
        Write the server state there after every round (see
        :meth:`FederatedServer.save_checkpoint`).
    resume
        Continue from the checkpoint in ``checkpoint_dir`` instead of starting afresh.
    key
        The federation's key, needed by ``config.privacy="secagg"`` (the sites' masks) and
        ``config.secret_frames``.

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
    by_name = {site.name: site for site in sites}
    initial = initial_parameters or get_shared_parameters(module)
    frames = frames_for(key) if config.secret_frames else None
    server = start_server(
        frames.encode(initial, INITIAL_FRAME) if frames else initial,
        config,
        key_fingerprint,
        key_version,
        n_sites=len(by_name),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    rounds = tqdm(server.rounds(), desc="federated rounds", disable=not progress_bar)
    # every site receives the same global model: decode it from its frame once per round
    opened = frames.decode(server.parameters, server.frame) if frames else server.parameters
    for round_ in rounds:
        selected = server.sample_sites(list(by_name), round_)
        client_config = server.client_config(round_, selected)
        updates = [
            protect_update(
                client_update(
                    module,
                    by_name[name],
                    opened,
                    client_config,
                    key_fingerprint,
                    key_version,
                ),
                key,
                client_config,
                received=server.parameters,
            )
            for name in selected
        ]
        parameters = server.aggregate(round_, updates, selected, sent=client_config)
        opened = frames.decode(parameters, server.frame) if frames else parameters
        set_shared_parameters(module, opened)
        evaluation = {name: client_evaluate(module, site) for name, site in by_name.items()}
        stop = server.record_evaluation(round_, evaluation)
        val = [m["val_loss"] for m in evaluation.values() if m["n_val"] > 0]
        if val:
            rounds.set_postfix(val_loss=f"{np.mean(val):.4g}", best_round=server.best_round)
        if stop:
            break
    best = server.best_parameters
    set_shared_parameters(module, frames.decode(best, server.best_frame) if frames else best)
    return server


def start_server(
    parameters: Parameters,
    config: FederationConfig,
    key_fingerprint: str | None,
    key_version: int | None,
    n_sites: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> FederatedServer:
    """A new :class:`FederatedServer`, or the one saved in ``checkpoint_dir`` when ``resume``.

    Examples
    --------
    >>> import numpy as np
    >>> start_server({"w": np.zeros(1)}, FederationConfig(), None, None).next_round
    0
    """
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the run to continue.")
        return FederatedServer.from_checkpoint(
            checkpoint_dir, config, key_fingerprint, key_version, n_sites=n_sites
        )
    return FederatedServer(
        parameters=parameters,
        config=config,
        key_fingerprint=key_fingerprint,
        key_version=key_version,
        checkpoint_dir=checkpoint_dir,
        n_sites=n_sites,
    )
