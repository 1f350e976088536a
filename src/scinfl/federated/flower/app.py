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

import importlib
import json
import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from scvi import REGISTRY_KEYS

from scinfl.federated._config import FederationConfig, PrivacyConfig
from scinfl.federated._local_engine import start_server
from scinfl.federated._secret_frames import frames_for
from scinfl.federated._server import FederatedServer
from scinfl.federated._site_data import SiteData
from scinfl.federated._site_identity import Roster, SiteIdentity
from scinfl.federated._site_runtime import SiteRuntime
from scinfl.key import Key, KeyMismatchError, MissingKeyError
from scinfl.model.base._new_samples import check_feature_names, features_by_name

from ._client_app import make_client_app
from ._server_app import (
    agree_public_keys,
    discover_sites,
    request_parameters,
    run_flower_rounds,
    share_feature_scale,
)

if TYPE_CHECKING:
    from scvi.data import AnnDataManager
    from scvi.model.base import BaseModelClass

logger = logging.getLogger(__name__)

#: Entries of the run configuration that are no federation setting: where the key
#: and the results are, and how long the server waits.
_DEPLOYMENT_ENTRIES: dict[str, Any] = {
    "key-fingerprint": "",
    "key-version": 0,
    "output-dir": "scinfl-flower-output",
    "resume": False,
    "round-timeout": 0.0,
    "discovery-timeout": 600.0,
}
#: Every site builds the same model: its class, its ``setup_anndata`` arguments and its init
#: parameters (JSON), the model's own ``registry["setup_args"]`` and ``init_params_``.
_MODEL_ENTRIES: dict[str, Any] = {
    "model": "scinfl.model.INFL",
    "setup-args": "{}",
    "init-params": "{}",
    "features": "",
}


def _run_config_entry(name: str) -> str:
    """The run-config entry of a setting (``num-rounds``: Flower's own name)."""
    return "num-rounds" if name == "max_rounds" else name.replace("_", "-")


#: TOML has no null: the entries of the settings whose default is ``None``, and what stands
#: for it (``secret-frames = "auto"`` is decided by :meth:`PrivacyConfig.for_key`).
_TOML_NONE = {
    "privacy": "",
    "kl_warmup_rounds": 0,
    "sample_dp_epsilon": "",
    "secret_frames": "auto",
}


def _federation_entries() -> dict[str, Any]:
    entries = {
        _run_config_entry(name): _TOML_NONE[name] if default is None else default
        for name, default in FederationConfig.setting_defaults().items()
    }
    entries["min-sites"] = 2
    return entries


#: Run configuration of the app, with its defaults (TOML types): every field of
#: :class:`~scinfl.federated.FederationConfig` (``num-rounds`` for ``max_rounds``;
#: ``batch-size``; ``privacy``; ...), the deployment's own entries, and the model every site
#: builds (``model``, ``setup-args``, ``init-params``).
DEFAULT_RUN_CONFIG: dict[str, Any] = {
    **_federation_entries(),
    **_DEPLOYMENT_ENTRIES,
    **_MODEL_ENTRIES,
}


def _settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(run_config) - set(DEFAULT_RUN_CONFIG))
    if unknown:
        logger.warning("Ignoring unknown run-config entries %s.", unknown)
    return {
        **DEFAULT_RUN_CONFIG,
        **{k: v for k, v in run_config.items() if k in DEFAULT_RUN_CONFIG},
    }


def federation_config(run_config: Mapping[str, Any]) -> FederationConfig:
    """Build the :class:`~scinfl.federated.FederationConfig` of a run configuration.

    Each field is read from its entry (``batch_size`` from ``batch-size``), with the field's
    own type; ``secret-frames = "auto"`` is decided as :meth:`FederationConfig.for_key`
    decides it for the model's key mode.

    Parameters
    ----------
    run_config
        The run configuration (entries missing from it take
        :data:`DEFAULT_RUN_CONFIG`'s values).

    Returns
    -------
    The federation's settings.

    Examples
    --------
    >>> federation_config({"num-rounds": 3, "batch-size": 64}).max_rounds
    3
    """
    s = _settings(run_config)
    values = {}
    for name, default in FederationConfig.setting_defaults().items():
        if name == "secret_frames":
            continue
        value = s[_run_config_entry(name)]
        values[name] = (value or None) if default is None else type(default)(value)
    return FederationConfig.from_settings(**values, secret_frames=secret_frames_on(s))


def secret_frames_on(run_config: Mapping[str, Any]) -> bool:
    """Whether a run's parameters travel in secret frames (the ``secret-frames`` entry).

    ``true`` or ``false``, or ``"auto"`` (the default): on whenever the sites hold the
    federation's key (a keyed ``key_mode`` in ``init-params``, or ``privacy = "secagg"``),
    except with ``privacy = "dp"`` (:meth:`FederationConfig.for_key`).

    Parameters
    ----------
    run_config
        The run configuration.

    Returns
    -------
    ``True`` when the parameters travel in secret frames.

    Raises
    ------
    ValueError
        When ``secret-frames`` is another string than ``true``, ``false`` or ``"auto"``.

    Examples
    --------
    >>> secret_frames_on({})  # the default model is keyed
    True
    >>> secret_frames_on({"init-params": '{"key_mode": null}'}), secret_frames_on({"privacy": "dp"})
    (False, False)
    """
    s = _settings(run_config)
    value = s["secret-frames"]
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            privacy = str(s["privacy"]) or None
            has_key = _init_params(s).get("key_mode", "pooled") is not None or privacy == "secagg"
            return bool(PrivacyConfig(privacy).for_key(has_key).secret_frames)
        if text not in ("true", "false"):
            raise ValueError(
                f'run-config secret-frames must be true, false or "auto", got {value!r}.'
            )
        return text == "true"
    return bool(value)


def _json_entry(s: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = s[name]
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(str(value) or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"run-config {name} must be a JSON object, got {value!r}: {err}") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"run-config {name} must be a JSON object, got {value!r}.")
    return parsed


def _json_value(s: Mapping[str, Any], name: str) -> Any:
    value = s[name]
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"run-config {name} must be JSON, got {value[:80]!r}: {err}") from err


def _init_params(s: Mapping[str, Any]) -> dict[str, Any]:
    return _json_entry(s, "init-params")


def model_class(run_config: Mapping[str, Any]) -> type:
    """The model class every site builds (run-config ``model``: ``package.module.Class``).

    Parameters
    ----------
    run_config
        The run configuration (default model: :class:`~scinfl.model.INFL`).

    Returns
    -------
    The imported class.

    Raises
    ------
    ValueError
        When the class cannot be imported.

    Examples
    --------
    >>> model_class({}).__name__
    'INFL'
    """
    path = str(_settings(run_config)["model"])
    module_name, _, name = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"run-config model = {path!r} is not an importable model class; every site needs "
            "the package that defines it installed."
        ) from err


def model_run_config(model: BaseModelClass, **entries: Any) -> dict[str, Any]:
    """The run-config entries that make every site build ``model``'s architecture.

    The model's ``setup_anndata`` arguments (with the categories of its registered
    categorical fields agreed, so codes mean the same at every site) and its init
    parameters, as JSON, plus the key's public identity; ``entries`` are added as they are.

    Parameters
    ----------
    model
        A set-up scinfl model (its data registry and init parameters are read).
    **entries
        Further run-config entries (``"num-rounds"``, ``"privacy"``, ...), added as given.

    Returns
    -------
    Run-config entries: ``model``, ``setup-args``, ``init-params``, ``features``,
    ``key-fingerprint``, ``key-version`` and ``entries``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=8, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key_mode=None, n_hidden=16)
    >>> config = model_run_config(model, **{"num-rounds": 5})
    >>> json.loads(config["setup-args"])["categories"]
    {'labels_key': ['type0', 'type1', 'type2']}
    >>> json.loads(config["features"])[:3]
    ['gene0', 'gene1', 'gene2']
    """
    setup = dict(model.adata_manager.registry["setup_args"])
    setup.pop("site_key", None)  # a deployed site is one site
    categories = dict(setup.get("categories") or {})
    for argument, mapping in categorical_arguments(model.adata_manager, setup).items():
        categories.setdefault(argument, mapping)
    setup["categories"] = categories or None
    init = {**model.init_params_.get("non_kwargs", {}), **model.init_params_.get("kwargs", {})}
    init.pop("key", None)
    init = {**init.pop("module_kwargs", {}), **init}
    cls = type(model)
    return {
        "model": f"{cls.__module__}.{cls.__qualname__}",
        "setup-args": json.dumps(setup),
        "init-params": json.dumps(init),
        "features": json.dumps(_feature_names(model)),
        "key-fingerprint": model.key_fingerprint_ or "",
        "key-version": model.key_version_ or 0,
        **entries,
    }


def categorical_arguments(
    manager: AnnDataManager, setup: Mapping[str, Any]
) -> dict[str, list[str]]:
    """The categories of every categorical ``.obs`` column a setup registered, by argument.

    Labels, batches and the categorical covariates (a perturbation model's condition): their
    codes are inputs or targets of the model, so every site must code them alike.

    Parameters
    ----------
    manager
        The model's data manager (its registry holds the categories).
    setup
        The ``setup_anndata`` arguments the data was registered with.

    Returns
    -------
    ``setup_anndata`` argument (``labels_key``, ``batch_key``, a covariate's key) to its
    categories, in code order.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_perturbation(n_obs=40, n_vars=16)
    >>> scinfl.model.PerturbationINFL.setup_anndata(adata, condition_key="condition")
    >>> model = scinfl.model.PerturbationINFL(adata, key_mode=None)
    >>> categorical_arguments(model.adata_manager, model.adata_manager.registry["setup_args"])
    {'condition_key': ['ctrl', 'stim']}
    """
    registries = manager.registry["field_registries"]
    out = {}
    for argument, registry_key in (("labels_key", "labels"), ("batch_key", "batch")):
        if setup.get(argument) is not None and registry_key in registries:
            mapping = manager.get_state_registry(registry_key).categorical_mapping
            out[argument] = [str(c) for c in mapping]
    if REGISTRY_KEYS.CAT_COVS_KEY in registries:
        mappings = manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY).get("mappings", {})
        for column, mapping in mappings.items():
            for argument, value in setup.items():
                if argument.endswith("_key") and argument != "site_key" and value == column:
                    out[argument] = [str(c) for c in mapping]
    return out


def _feature_names(model) -> list[str] | dict[str, list[str]]:
    """The features the model reads, in order: a list, or one per modality of a MuData model."""
    data = model.adata
    modalities = model.adata_manager.registry["setup_args"].get("modalities")
    if modalities is not None and hasattr(data, "mod"):
        return {name: [str(v) for v in data.mod[name].var_names] for name in modalities}
    return [str(v) for v in data.var_names]


def _with_run_features(data, features, init: Mapping[str, Any], path):
    """A site's data with the run's ``features`` in the run's order, matched by name.

    Weights are read by position: a site whose file lists the agreed features in another
    order would feed every input to the wrong weights, and one lacking a feature would build
    a model of another width. Reordered (or extra) features are aligned with an info line;
    missing ones become missing values under the normal likelihood and are refused for counts
    (:func:`~scinfl.model.base._new_samples.features_by_name`).
    """
    if isinstance(features, dict):
        for name, names in features.items():
            held = data.mod[name].var_names if name in data.mod else None
            if held is None or not held.astype(str).equals(pd.Index(names)):
                raise ValueError(
                    f"{path}: modality {name!r} does not list the run's {len(names)} features "
                    f"in the run's order (run-config features); write the file with "
                    f"mdata.mod[{name!r}] = mdata.mod[{name!r}][:, features] (scinfl.pp."
                    "pad_modalities(mdata, features=...) adds a modality the site lacks)."
                )
        return data
    names = pd.Index(features)
    if data.var_names.astype(str).equals(names):
        return data
    likelihood = init.get("gene_likelihood", "nb")
    try:
        check_feature_names(data, names, "The site's data")
        return features_by_name(data, names, likelihood, "The site's data")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_site(
    path: str | Path, site: str, run_config: Mapping[str, Any], key: Key | None = None
) -> tuple[Any, SiteData]:
    """Build a deployed site's model and data from its data file and the run config.

    The site reads its ``.h5ad`` (an AnnData, set up with the model's ``setup_anndata``) or
    ``.h5mu`` (a MuData, set up with its ``setup_mudata``: every modality of the model present,
    a modality the site lacks as rows of ``NaN``, see :func:`scinfl.pp.pad_modalities`) with
    the run's ``setup-args`` (its categories agreed in ``categories``: values outside them are
    refused), builds the run's ``model`` with ``init-params`` from the run's seed, and takes
    its data from the model's registry, split as every engine splits it
    (:meth:`~scinfl.federated.SiteData.from_registry`). With the run's ``features``
    (:func:`model_run_config` writes them), the file's features are matched to them by name.

    Parameters
    ----------
    path
        The site's ``.h5ad`` or ``.h5mu`` file.
    site
        The site's name.
    run_config
        The run configuration (``setup-args``, ``init-params``, ``features``, ``seed``, ...).
    key
        The federation's key, set on the model (``None``: a keyless model).

    Returns
    -------
    ``(model, site_data)``: the built model and the site's data.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a file.
    ValueError
        When the file does not fit the run (features, layer, categories, values).

    Examples
    --------
    >>> import scinfl, tempfile, os
    >>> adata = scinfl.data.synthetic_counts(n_obs=30, n_vars=8, n_sites=1)
    >>> path = os.path.join(tempfile.mkdtemp(), "a.h5ad")
    >>> adata.write_h5ad(path)
    >>> features = json.dumps(list(adata.var_names))
    >>> model, site = load_site(path, "a", {"init-params": '{"key_mode": null}', "features": features})
    >>> site.n_train + site.n_val, model.module.n_input
    (30, 8)
    """
    s = _settings(run_config)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {path} (node-config `data-path`).")
    cls = model_class(s)
    adata, setup_data = _read_site_data(path, cls)
    setup = _json_entry(s, "setup-args")
    if not str(s.get("features") or ""):
        # without the run's names a site could only read its features by position
        raise ValueError(
            "The run config has no `features` entry (the model's feature names, in its order), "
            "so sites cannot match their files' features by name: write the run config with "
            "model_run_config(model), or add features = '[\"gene0\", ...]' as JSON."
        )
    adata = _with_run_features(adata, _json_value(s, "features"), _init_params(s), path)
    for argument in getattr(cls, "agreed_category_arguments", ("labels_key", "batch_key")):
        _require_agreed(setup, argument)
    layer = setup.get("layer")
    if isinstance(layer, str) and hasattr(adata, "layers") and layer not in adata.layers:
        # the layer is the federation's choice: the fix is in the site's file
        raise ValueError(
            f"{path}: the run reads layers[{layer!r}] at every site (its setup-args), which this "
            f"file lacks (layers: {list(adata.layers)}). Store the site's values there before "
            f"writing the file, e.g. adata.layers[{layer!r}] = adata.X for raw counts in X."
        )
    try:
        setup_data(adata, **setup)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    torch.manual_seed(int(s["seed"]))
    try:  # the model checks the values (counts, finite): name the file they came from
        model = cls(adata, key=key, **_init_params(s))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    for argument in categorical_arguments(model.adata_manager, setup):
        _require_agreed(setup, argument)
    config = federation_config(s)
    data = SiteData.from_registry(
        model.adata_manager, site, None, config.validation_size, config.seed
    )
    return model, data


def _require_agreed(setup: Mapping[str, Any], argument: str) -> None:
    """Refuse a categorical setup argument without categories agreed in the run config."""
    if setup.get(argument) and argument not in (setup.get("categories") or {}):
        raise ValueError(
            f"run-config setup-args sets {argument} but no agreed categories for it: add "
            f'"categories": {{"{argument}": [...]}} (model_run_config does) so that codes '
            "mean the same at every site."
        )


def _read_site_data(path: Path, cls: type):
    """A site's data file and the model class's method that sets it up."""
    if path.suffix == ".h5mu":
        if not hasattr(cls, "setup_mudata"):
            raise ValueError(
                f"{path} is a MuData file, but the run's model {cls.__name__} sets up AnnData "
                "only: give the site an .h5ad file, or run a MuData model "
                '(run-config model = "scinfl.model.MultiOmicsINFL").'
            )
        import mudata

        return mudata.read_h5mu(path), cls.setup_mudata
    if hasattr(cls, "setup_mudata"):
        raise ValueError(
            f"{path} is not a MuData file, but the run's model {cls.__name__} reads MuData: "
            "give the site an .h5mu file (mdata.write_h5mu('site.h5mu'), every modality of the "
            "model present; scinfl.pp.pad_modalities adds one the site lacks)."
        )
    import anndata

    return anndata.read_h5ad(path), cls.setup_anndata


@lru_cache(maxsize=4)
def _load_runtime(
    data_path: str,
    key_path: str,
    site: str,
    run_config_json: str,
    identity_path: str = "",
    roster_path: str = "",
) -> SiteRuntime:
    run_config = json.loads(run_config_json)
    # the site's own settings decide frames and every instruction, never a message
    federation = federation_config(run_config)
    secure = federation.privacy.secure_aggregation
    needs = {
        "the model is keyed": _init_params(run_config).get("key_mode", "pooled") is not None,
        "privacy='secagg' masks the updates with it": secure,
        "secret-frames draws the parameters' frames from it": federation.privacy.secret_frames,
    }
    for why, needed in needs.items():
        if needed and not key_path:
            raise ValueError(
                f"Site {site!r}: {why}, but the node config has no `key-path` to the "
                "federation's key file."
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
    if bool(identity_path) != bool(roster_path):
        raise ValueError(
            f"Site {site!r}: the node config has only one of `identity-path` (this site's "
            "identity) and `roster-path` (the federation's roster): give both, or neither."
        )
    identity = SiteIdentity.load(identity_path) if identity_path else None
    roster = Roster.load(roster_path) if roster_path else None
    if roster is None and secure:
        logger.warning(
            "Site %r: secure aggregation without pinned identities: a coordinator colluding with "
            "another site (which holds the federation's key) can substitute public keys and "
            "unmask this site. Give every site `identity-path` and the federation's "
            "`roster-path` (scinfl identity / scinfl roster).",
            site,
        )
    model, data = load_site(data_path, site, run_config, key=key)
    return SiteRuntime(
        model.module,
        data,
        fingerprint,
        version,
        key=key,
        secret_frames=bool(federation.privacy.secret_frames),
        federation=federation,
        identity=identity,
        roster=roster,
    )


def resolve_deployed_site(context: Context) -> SiteRuntime:
    """Load the site of a SuperNode from its node config (``data-path``, ``key-path``, ``site``).

    With ``identity-path`` and ``roster-path`` (a :class:`~scinfl.federated.SiteIdentity` and
    the federation's :class:`~scinfl.federated.Roster`), secure aggregation's public keys are
    signed and pinned.

    Parameters
    ----------
    context
        The ClientApp's Flower context (its ``node_config`` and ``run_config``).

    Returns
    -------
    The site's runtime (cached per node config and run config).

    Raises
    ------
    ValueError
        When the node config has no ``data-path``.

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
    paths = (str(node.get(entry, "")) for entry in ("key-path", "identity-path", "roster-path"))
    key_path, identity_path, roster_path = paths
    return _load_runtime(data_path, key_path, site, run_config, identity_path, roster_path)


def save_results(server: FederatedServer, output_dir: str | Path) -> Path:
    """Write ``history.csv``, ``global_parameters.npz`` (selected round) and ``summary.json``.

    Under ``secret-frames`` the parameters are written as the server holds them, in a secret
    frame (``summary["secret_frame"]``): only :func:`load_results` with the key reads them.

    Parameters
    ----------
    server
        The server after the run (its selected round is written).
    output_dir
        Where to write (created if missing).

    Returns
    -------
    ``output_dir``, as a :class:`~pathlib.Path`.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=1))
    >>> _ = server.record_evaluation(0, {})
    >>> sorted(p.name for p in save_results(server, tempfile.mkdtemp()).iterdir())
    ['global_parameters.npz', 'history.csv', 'summary.json']
    """
    best, frame = server.selected()  # a diverged run writes nothing
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    server.history().to_csv(out / "history.csv", index=False)
    np.savez(out / "global_parameters.npz", **best)
    summary = {
        "best_round": server.best_round,
        "best_val_loss": None if not np.isfinite(server.best_val_loss) else server.best_val_loss,
        "key_fingerprint": server.key_fingerprint,
        "key_version": server.key_version,
        "dp_epsilon": server.dp_epsilon(),
        "sites": sorted(pd.unique(server.history()["site"]).tolist()) if server.rows else [],
        "parameter_order": list(best),
        "secret_frame": frame,
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

    Returns
    -------
    ``(parameters, history, summary)``: the selected round's parameters (plain, name to
    array, in the model's order), the history (:meth:`FederatedServer.history`) and the
    summary (``best_round``, ``best_val_loss``, key identity, ``dp_epsilon``, ``sites``, ...).

    Raises
    ------
    MissingKeyError
        When the parameters are in a secret frame and no ``key`` is given.
    KeyMismatchError
        When ``key`` is not the one the run was trained under.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> server = FederatedServer({"w": np.zeros(2)}, FederationConfig(max_rounds=1))
    >>> _ = server.record_evaluation(0, {"a": {"n_val": 3, "val_loss": 1.5}})
    >>> parameters, history, summary = load_results(save_results(server, tempfile.mkdtemp()))
    >>> parameters["w"], summary["best_round"], history["val_loss"].tolist()
    (array([0., 0.]), 0, [1.5])
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
    secure = server.config.privacy.secure_aggregation
    if _init_params(s).get("gene_likelihood") == "normal":
        if secure:  # the moments are masked: pairwise keys first (run_rounds resends the same)
            agree_public_keys(grid, directory, directory.sites, round_timeout)
        # continuous features: every site standardises with the scale of all sites' rows
        share_feature_scale(grid, directory, secure, round_timeout)
    if not server.parameters:
        server.parameters = request_parameters(
            grid,
            directory,
            round_timeout,
            in_secret_frame=bool(server.config.privacy.secret_frames),
        )
    run_flower_rounds(grid, server, directory, round_timeout=round_timeout, progress_bar=False)
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
