r"""Flower App components for a real deployment: one ``flower-supernode`` per site.

Reference them from a Flower App's ``pyproject.toml`` (:func:`write_flower_app` writes one)::

    [tool.flwr.app.components]
    serverapp = "scinfl.federated.flower.app:server_app"
    clientapp = "scinfl.federated.flower.app:client_app"

Each site starts a SuperNode with its own data and key file, which never leave the site::

    flower-supernode --insecure --superlink LINK_HOST:LINK_PORT --port 9094 \\
        --node-config 'data-path="/data/site_a.h5ad" key-path="/secrets/site.key" site="a"'

The run configuration (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``)
holds the federation settings (:data:`DEFAULT_RUN_CONFIG`); the server writes the history and
the selected global parameters to ``output-dir``. The server never sees a key: the run
configuration carries the federation key's public *fingerprint* and *version*, and updates
made under another key are dropped.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from scinfl.federated._local_engine import start_server
from scinfl.federated._secret_frames import frames_for
from scinfl.federated._server import FederatedServer, FederationConfig
from scinfl.federated._site_data import SiteData
from scinfl.key import Key, KeyMismatchError, MissingKeyError
from scinfl.module import KeyedVAE

from ._client_app import SiteRuntime, make_client_app
from ._server_app import discover_sites, request_parameters, run_rounds

logger = logging.getLogger(__name__)

#: Run configuration of the app, with its defaults (TOML types; ``""``/``0`` mean "not set").
DEFAULT_RUN_CONFIG: dict[str, Any] = {
    # federation (server)
    "num-rounds": 10,
    "local-epochs": 1,
    "fraction": 1.0,
    "min-sites": 2,
    "batch-size": 128,
    "lr": 1e-3,
    "weight-decay": 1e-6,
    "mu": 0.0,
    "kl-warmup-rounds": 0,
    "early-stopping": False,
    "early-stopping-patience": 10,
    "seed": 0,
    "key-fingerprint": "",
    "key-version": 0,
    "output-dir": "scinfl-flower-output",
    "resume": False,
    "min-available": 1,
    "privacy": "",
    "dp-noise-multiplier": 1.0,
    "dp-clipping-norm": 1.0,
    "dp-delta": 1e-5,
    # "auto": on whenever the sites hold a key (keyed model or secure aggregation), but with DP
    "secret-frames": "auto",
    "round-timeout": 0.0,
    "discovery-timeout": 600.0,
    # data and model (every site builds the same architecture)
    "layer": "",
    "labels-key": "",
    "labels": "",
    "batch-key": "",
    "batches": "",
    "gene-likelihood": "nb",
    "key-mode": "pooled",
    "key-strength": 1.0,
    "n-hidden": 128,
    "n-latent": 10,
    "n-layers": 1,
    "dropout-rate": 0.1,
    "classification-ratio": 50.0,
    "validation-size": 0.1,
}


def _settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(run_config) - set(DEFAULT_RUN_CONFIG))
    if unknown:
        logger.warning("Ignoring unknown run-config entries %s.", unknown)
    return {
        **DEFAULT_RUN_CONFIG,
        **{k: v for k, v in run_config.items() if k in DEFAULT_RUN_CONFIG},
    }


def _categories(value: str) -> list[str]:
    return [c.strip() for c in str(value).split(",") if c.strip()]


def federation_config(run_config: Mapping[str, Any]) -> FederationConfig:
    """Build the :class:`~scinfl.federated.FederationConfig` of a run configuration.

    Examples
    --------
    >>> federation_config({"num-rounds": 3, "batch-size": 64}).max_rounds
    3
    """
    s = _settings(run_config)
    return FederationConfig(
        max_rounds=int(s["num-rounds"]),
        local_epochs=int(s["local-epochs"]),
        fraction=float(s["fraction"]),
        min_sites=int(s["min-sites"]),
        batch_size=int(s["batch-size"]),
        lr=float(s["lr"]),
        weight_decay=float(s["weight-decay"]),
        mu=float(s["mu"]),
        kl_warmup_rounds=int(s["kl-warmup-rounds"]) or None,
        early_stopping=bool(s["early-stopping"]),
        early_stopping_patience=int(s["early-stopping-patience"]),
        seed=int(s["seed"]),
        min_available=int(s["min-available"]),
        privacy=str(s["privacy"]) or None,
        dp_noise_multiplier=float(s["dp-noise-multiplier"]),
        dp_clipping_norm=float(s["dp-clipping-norm"]),
        dp_delta=float(s["dp-delta"]),
        secret_frames=secret_frames_on(s),
    )


def secret_frames_on(run_config: Mapping[str, Any]) -> bool:
    """Whether a run's parameters travel in secret frames (the ``secret-frames`` entry).

    ``true`` or ``false``, or ``"auto"`` (the default): on whenever the sites hold the
    federation's key (a keyed ``key-mode``, or ``privacy = "secagg"``), except with
    ``privacy = "dp"``, whose server-side clipping needs updates in a common frame.

    Examples
    --------
    >>> secret_frames_on({})  # the default model is keyed
    True
    >>> secret_frames_on({"key-mode": "none"}), secret_frames_on({"privacy": "dp"})
    (False, False)
    """
    s = _settings(run_config)
    value = s["secret-frames"]
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            keyed = _key_mode(s) is not None
            privacy = str(s["privacy"])
            return (keyed or privacy == "secagg") and privacy != "dp"
        if text not in ("true", "false"):
            raise ValueError(
                f'run-config secret-frames must be true, false or "auto", got {value!r}.'
            )
        return text == "true"
    return bool(value)


def _key_mode(run_config: Mapping[str, Any]) -> str | None:
    """The run's ``key-mode`` (``None`` for an unkeyed model: ``""`` or ``"none"``)."""
    value = str(_settings(run_config)["key-mode"])
    return None if value.lower() in ("", "none") else value


def build_module(run_config: Mapping[str, Any], n_input: int) -> torch.nn.Module:
    """Build the keyed module every site builds from the run configuration (seeded init).

    Examples
    --------
    >>> build_module({"key-mode": "none", "n-hidden": 16}, n_input=8).n_input
    8
    """
    s = _settings(run_config)
    labels, batches = _categories(s["labels"]), _categories(s["batches"])
    key_mode = _key_mode(s)
    torch.manual_seed(int(s["seed"]))
    return KeyedVAE(
        n_input=n_input,
        n_batch=len(batches),
        n_labels=len(labels),
        gene_likelihood=str(s["gene-likelihood"]),
        key_mode=key_mode,
        key_strength=float(s["key-strength"]),
        classify=bool(s["labels-key"]) and len(labels) > 0,
        classification_ratio=float(s["classification-ratio"]),
        n_hidden=int(s["n-hidden"]),
        n_latent=int(s["n-latent"]),
        n_layers=int(s["n-layers"]),
        dropout_rate=float(s["dropout-rate"]),
    )


def _codes(values, categories: list[str], what: str, path: Path) -> np.ndarray:
    values = np.asarray(values).astype(str)
    lookup = {c: i for i, c in enumerate(categories)}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise ValueError(
            f"{path}: {what} {unknown[:5]} are not among the agreed categories {categories}; agree "
            "on the full category list in the run config before training."
        )
    return np.array([lookup[v] for v in values], dtype=np.int64)


def load_site_data(path: str | Path, site: str, run_config: Mapping[str, Any]) -> SiteData:
    """Read one site's data file (``.h5ad``, or ``.npz`` with ``X``, ``batch``, ``labels``).

    Labels and batches are coded with the categories agreed in the run configuration
    (``labels`` / ``batches``, comma-separated), never with categories of the local data.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.npz")
    >>> np.savez(path, X=np.ones((20, 5), dtype=np.float32))
    >>> load_site_data(path, "a", {"validation-size": 0.2}).n_val
    4
    """
    s = _settings(run_config)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {path} (node-config `data-path`).")
    labels_cats, batch_cats = _categories(s["labels"]), _categories(s["batches"])
    if path.suffix == ".npz":
        with np.load(path) as npz:
            X = npz["X"]
            batch = npz["batch"] if "batch" in npz else None
            labels = npz["labels"] if "labels" in npz else None
    else:
        import anndata

        adata = anndata.read_h5ad(path)
        X = adata.layers[s["layer"]] if s["layer"] else adata.X
        batch = (
            _codes(adata.obs[s["batch-key"]], batch_cats, "batches", path)
            if s["batch-key"]
            else None
        )
        labels = (
            _codes(adata.obs[s["labels-key"]], labels_cats, "labels", path)
            if s["labels-key"]
            else None
        )
    seed = int(
        np.random.SeedSequence([int(s["seed"]), zlib.crc32(site.encode())]).generate_state(1)[0]
    )
    return SiteData.from_arrays(
        site,
        X,
        batch=batch,
        labels=labels,
        validation_size=float(s["validation-size"]),
        seed=seed,
    )


@lru_cache(maxsize=4)
def _load_runtime(data_path: str, key_path: str, site: str, run_config_json: str) -> SiteRuntime:
    run_config = json.loads(run_config_json)
    data = load_site_data(data_path, site, run_config)
    module = build_module(run_config, n_input=data.X.shape[1])
    keyed = getattr(module, "is_keyed", False)
    if keyed and not key_path:
        raise ValueError(
            f"Site {site!r}: the model is keyed but the node config has no `key-path`."
        )
    if str(run_config.get("privacy", "")) == "secagg" and not key_path:
        raise ValueError(
            f"Site {site!r}: privacy='secagg' masks the updates with the federation's key, but "
            "the node config has no `key-path`."
        )
    if secret_frames_on(run_config) and not key_path:
        raise ValueError(
            f"Site {site!r}: secret-frames draws the parameters' frames from the federation's "
            "key, but the node config has no `key-path`."
        )
    key = fingerprint = version = None
    if key_path:
        key = Key.load(key_path)
        expected = str(run_config.get("key-fingerprint", "")), int(run_config.get("key-version", 0))
        if (expected[0] and key.fingerprint != expected[0]) or (
            expected[1] and key.version != expected[1]
        ):
            # refuse here too, so the site's own log says why its updates would be dropped
            raise KeyMismatchError(
                f"Site {site!r}: the key file {key_path} holds key {key.fingerprint} (version "
                f"{key.version}), but this federation uses key {expected[0] or '(any)'} (version "
                f"{expected[1] or '(any)'}). Point `key-path` in --node-config at the "
                "federation's key file (after a rotation: the new one)."
            )
        fingerprint, version = key.fingerprint, key.version
        if keyed:
            module.set_key(key)
    return SiteRuntime(module, data, fingerprint, version, key=key)


def resolve_deployed_site(context: Context) -> SiteRuntime:
    """Load the site of a SuperNode from its node config (``data-path``, ``key-path``, ``site``).

    Examples
    --------
    >>> runtime = resolve_deployed_site(context)  # doctest: +SKIP
    """
    node = context.node_config
    if "data-path" not in node:
        raise ValueError(
            "This SuperNode has no `data-path` in its --node-config; start it with "
            '--node-config \'data-path="..." key-path="..." site="..."\'.'
        )
    data_path = str(node["data-path"])
    site = str(node.get("site", "")) or Path(data_path).stem
    run_config = json.dumps(_settings(context.run_config), sort_keys=True)
    return _load_runtime(data_path, str(node.get("key-path", "")), site, run_config)


def save_results(server: FederatedServer, output_dir: str | Path) -> Path:
    """Write ``history.csv``, ``global_parameters.npz`` (selected round) and ``summary.json``.

    Under ``secret-frames`` the parameters are written as the server holds them, in a secret
    frame (``summary["secret_frame"]``): only :func:`load_results` with the key reads them.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=1))
    >>> _ = server.record_evaluation(0, {})
    >>> sorted(p.name for p in save_results(server, tempfile.mkdtemp()).iterdir())
    ['global_parameters.npz', 'history.csv', 'summary.json']
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    server.history().to_csv(out / "history.csv", index=False)
    np.savez(out / "global_parameters.npz", **server.best_parameters)
    summary = {
        "best_round": server.best_round,
        "best_val_loss": None if not np.isfinite(server.best_val_loss) else server.best_val_loss,
        "key_fingerprint": server.key_fingerprint,
        "key_version": server.key_version,
        "dp_epsilon": server.dp_epsilon(),
        "sites": sorted(pd.unique(server.history()["site"]).tolist()) if server.rows else [],
        "parameter_order": list(server.best_parameters),
        "secret_frame": server.best_frame,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out


def load_results(
    output_dir: str | Path, key: Key | None = None
) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict]:
    """Read what :func:`save_results` wrote: parameters (in model order), history, summary.

    Parameters
    ----------
    output_dir
        The run's ``output-dir``.
    key
        The federation's key: needed when the run used ``secret-frames`` (the parameters are
        decoded from their secret frame).

    Examples
    --------
    >>> parameters, history, summary = load_results("scinfl-flower-output")  # doctest: +SKIP
    """
    out = Path(output_dir)
    summary = json.loads((out / "summary.json").read_text())
    with np.load(out / "global_parameters.npz") as npz:
        parameters = {name: npz[name] for name in summary["parameter_order"]}
    frame = summary.get("secret_frame")
    if frame is not None:
        if key is None:
            raise MissingKeyError(
                f"The parameters in {out} are in a secret frame of the federation's key "
                "(secret-frames): pass key=scinfl.Key.load(path) to load_results."
            )
        if summary.get("key_fingerprint") not in (None, key.fingerprint):
            raise KeyMismatchError(
                f"The parameters in {out} were trained under key {summary['key_fingerprint']}, "
                f"not {key.fingerprint}: pass the federation's key to load_results."
            )
        parameters = frames_for(key).decode(parameters, str(frame))
    return parameters, pd.read_csv(out / "history.csv"), summary


client_app = make_client_app(resolve_deployed_site)

server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    s = _settings(context.run_config)
    checkpoint_dir = Path(s["output-dir"]) / "checkpoint"
    round_timeout = float(s["round-timeout"]) or None
    directory = discover_sites(
        grid, int(s["min-sites"]), timeout=float(s["discovery-timeout"]) or None
    )
    logger.info("Sites: %s", ", ".join(f"{n} (node {directory.nodes[n]})" for n in directory.sites))
    fingerprint, version = str(s["key-fingerprint"]) or None, int(s["key-version"]) or None
    if s["resume"] and fingerprint is None and (checkpoint_dir / "checkpoint.json").is_file():
        # unpinned key: the run being resumed adopted one; keep it
        saved = json.loads((checkpoint_dir / "checkpoint.json").read_text())
        fingerprint, version = saved.get("key_fingerprint"), saved.get("key_version")
    server = start_server(
        {},
        federation_config(s),
        fingerprint,
        version,
        n_sites=len(directory.sites),
        checkpoint_dir=checkpoint_dir,
        resume=bool(s["resume"]),
    )
    if server.key_fingerprint is None:
        first = directory.sites[0]
        server.key_fingerprint, version = directory.keys[first]
        server.key_version = server.key_version or version
        logger.warning(
            "No key-fingerprint in the run config: adopting the key of site %r (fingerprint %s, "
            "version %s). Set key-fingerprint to the federation key's fingerprint to pin it.",
            first,
            server.key_fingerprint,
            server.key_version,
        )
    if not server.parameters:
        server.parameters = request_parameters(
            grid, directory, round_timeout, in_secret_frame=server.config.secret_frames
        )
    run_rounds(grid, server, directory, round_timeout=round_timeout, progress_bar=False)
    out = save_results(server, s["output-dir"])
    logger.info("Best round %s; results written to %s.", server.best_round, out.resolve())


def write_flower_app(
    directory: str | Path,
    run_config: Mapping[str, Any] | None = None,
    name: str = "scinfl-federation",
) -> Path:
    """Write a Flower App project (``pyproject.toml``) that runs scinfl's apps with ``flwr run``.

    Parameters
    ----------
    directory
        Where to write it (created if needed).
    run_config
        Defaults to change in ``[tool.flwr.app.config]`` (see :data:`DEFAULT_RUN_CONFIG`).
    name
        Project name.

    Returns
    -------
    The directory, to pass to ``flwr run``.

    Examples
    --------
    >>> import tempfile
    >>> app = write_flower_app(tempfile.mkdtemp(), {"num-rounds": 5})
    >>> 'num-rounds = 5' in (app / "pyproject.toml").read_text()
    True
    """
    import tomli_w

    unknown = sorted(set(run_config or {}) - set(DEFAULT_RUN_CONFIG))
    if unknown:
        raise ValueError(
            f"Unknown run-config entries {unknown}; known: {sorted(DEFAULT_RUN_CONFIG)}."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": name,
            "version": "1.0.0",
            "description": "scinfl federation (keyed VAE) on Flower",
            "license": "BSD-3-Clause",
            "dependencies": [],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"bypass-selection": True}}}},
            "flwr": {
                "app": {
                    "publisher": "scinfl",
                    "components": {
                        "serverapp": "scinfl.federated.flower.app:server_app",
                        "clientapp": "scinfl.federated.flower.app:client_app",
                    },
                    "config": {**DEFAULT_RUN_CONFIG, **dict(run_config or {})},
                }
            },
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    return directory
