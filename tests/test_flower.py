"""Flower engine: message codec, ServerApp/ClientApp logic, simulation == local engine."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import scinfl
from scinfl.federated import (
    ClientConfig,
    ClientUpdate,
    FederatedServer,
    FederationConfig,
    SiteData,
    get_shared_parameters,
    run_local,
)
from scinfl.federated.flower import (
    SimulationSites,
    config_to_record,
    content_to_update,
    make_client_app,
    make_server_app,
    parameters_to_record,
    record_to_config,
    record_to_parameters,
    run_flower_simulation,
    update_to_content,
)
from scinfl.module import KeyedVAE

N_VARS = 30


@pytest.fixture(scope="module")
def sites() -> list[SiteData]:
    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=N_VARS, n_sites=3, seed=0)
    out = []
    for i, name in enumerate(sorted(adata.obs["site"].unique())):
        sub = adata[adata.obs["site"] == name]
        out.append(SiteData.from_arrays(str(name), sub.X, validation_size=0.2, seed=i))
    return out


@pytest.fixture(scope="module")
def key() -> scinfl.Key:
    return scinfl.Key.generate()


@pytest.fixture
def module(key) -> KeyedVAE:
    torch.manual_seed(0)
    vae = KeyedVAE(n_input=N_VARS, n_hidden=32, n_latent=5)
    vae.set_key(key)
    return vae


@pytest.fixture
def config() -> FederationConfig:
    return FederationConfig(max_rounds=2, batch_size=32, seed=3)


def _local(module, sites, config, key):
    local = copy.deepcopy(module)
    server = run_local(local, sites, config, key.fingerprint, key.version, progress_bar=False)
    return get_shared_parameters(local), server


def _assert_same_parameters(a, b, atol=0.0):
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def _assert_same_history(a, b):
    cols = [c for c in a.columns if c != "time_s"]
    assert sorted(cols) == sorted(c for c in b.columns if c != "time_s")
    np.testing.assert_allclose(
        a[cols].select_dtypes("number").to_numpy(float),
        b[cols].select_dtypes("number").to_numpy(float),
        rtol=1e-6,
    )
    assert a["site"].tolist() == b["site"].tolist()
    assert a["accepted"].tolist() == b["accepted"].tolist()


# -- codec ---------------------------------------------------------------------------------


def test_records_roundtrip_exactly():
    params = {
        "b": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "a": np.array(3, dtype=np.int64),
    }
    back = record_to_parameters(parameters_to_record(params))
    assert list(back) == ["b", "a"]
    for name in params:
        assert back[name].dtype == params[name].dtype
        np.testing.assert_array_equal(back[name], params[name])
    config = ClientConfig(round=4, local_epochs=2, lr=1e-3 / 3, kl_weight=0.1 + 0.2, seed=12345)
    assert record_to_config(config_to_record(config)) == config
    update = ClientUpdate("s", 7, params, {"train_loss": 1.5, "nan": float("nan")}, None, None)
    back = content_to_update(update_to_content(update))
    assert (back.site, back.n, back.key_fingerprint, back.key_version) == ("s", 7, None, None)
    assert back.metrics["train_loss"] == 1.5 and np.isnan(back.metrics["nan"])


def test_unknown_instruction_is_refused():
    record = config_to_record(ClientConfig(round=0))
    record["secret"] = "x"
    with pytest.raises(ValueError, match="Unknown round instructions"):
        record_to_config(record)


# -- the apps, driven by an in-process grid (no Ray) --------------------------------------


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp of its node, in this process, and logs it."""

    def __init__(self, client_app, n_nodes: int = 0, node_configs=None, run_config=None) -> None:
        self.client_app = client_app
        if node_configs is None:
            node_configs = [{"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)]
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_config in enumerate(node_configs)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        return None

    def create_message(
        self, content, message_type, dst_node_id, group_id, ttl=None
    ):  # pragma: no cover
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            try:
                reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - as Flower's runtime does: an error reply
                reply = Message(
                    Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message
                )
            self.replies.append(reply)
            out.append(reply)
        return out


@pytest.fixture
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _run_loopback(module, sites, config, key, keys=None, parameters=None):
    template = copy.deepcopy(module)
    if keys is not None:
        template.set_key(None)
    table = SimulationSites(
        template,
        sites,
        keys=keys,
        key_fingerprint=key.fingerprint,
        key_version=key.version,
        num_threads=torch.get_num_threads(),
    )
    server = FederatedServer(
        get_shared_parameters(module) if parameters is None else parameters,
        config,
        key_fingerprint=key.fingerprint,
        key_version=key.version,
    )
    app = make_server_app(lambda context: server, expected_sites=len(sites), progress_bar=False)
    grid = LoopbackGrid(make_client_app(table), len(sites))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app(grid, context)
    return server, grid


def test_apps_match_local_engine(module, sites, config, key, task_identity):
    expected, local_server = _local(module, sites, config, key)
    server, _ = _run_loopback(module, sites, config, key, keys={s.name: key for s in sites})
    # same client_update on the same inputs, FedAvg over the same (sorted) sites: bitwise equal
    _assert_same_parameters(server.best_parameters, expected)
    assert server.best_round == local_server.best_round
    _assert_same_history(server.history(), local_server.history())


def test_initial_parameters_come_from_a_site(module, sites, config, key, task_identity):
    expected, _ = _local(module, sites, config, key)
    server, grid = _run_loopback(module, sites, config, key, parameters={})
    _assert_same_parameters(server.best_parameters, expected)
    assert grid.sent[len(sites)].metadata.message_type == "query"


def test_update_under_another_key_is_dropped(module, sites, config, key, task_identity, caplog):
    intruder = sites[1].name
    keys = {s.name: key for s in sites}
    keys[intruder] = scinfl.Key.generate()
    with caplog.at_level(logging.WARNING, logger="scinfl.federated"):
        server, _ = _run_loopback(module, sites, config, key, keys=keys)
    history = server.history()
    assert not history.loc[history["site"] == intruder, "accepted"].any()
    assert history.loc[history["site"] != intruder, "accepted"].all()
    assert any("Rejected the update" in r.message and intruder in r.message for r in caplog.records)
    # the federation went on with the other sites exactly as the local engine does without it
    others = [s for s in sites if s.name != intruder]
    expected, _ = _local(module, others, config, key)
    _assert_same_parameters(server.best_parameters, expected)


def _broken(site: SiteData) -> SiteData:
    # one feature too many: the site introduces itself, then every train/evaluate step fails
    X = np.ones((site.X.shape[0], N_VARS + 1), dtype=np.float32)
    return SiteData(site.name, X, site.batch, site.labels, site.train_idx, site.val_idx)


def test_failing_site_is_dropped(module, sites, config, key, task_identity, caplog):
    failing = sites[2].name
    with caplog.at_level(logging.WARNING, logger="scinfl.federated"):
        server, _ = _run_loopback(module, [*sites[:2], _broken(sites[2])], config, key)
    assert any(f"site {failing!r} failed its train step" in r.message for r in caplog.records)
    assert failing not in set(server.history()["site"])
    expected, _ = _local(module, sites[:2], config, key)
    _assert_same_parameters(server.best_parameters, expected)


def test_every_site_failing_raises(module, sites, config, key, task_identity):
    with pytest.raises(RuntimeError, match="every site failed its train step"):
        _run_loopback(module, [_broken(s) for s in sites], config, key)


def test_no_key_material_in_messages(module, sites, config, key, task_identity):
    keys = {s.name: key for s in sites}
    _, grid = _run_loopback(module, sites, config, key, keys=keys)
    coordinates = key.coordinates(128, dim=2, purpose="pooled")
    secrets = [key._seed, key._seed.hex().encode(), coordinates.tobytes()[:64]]
    assert grid.sent and grid.replies
    for message in grid.sent + grid.replies:
        for record in message.content.array_records.values():
            assert not any("coordinates" in name or "key_seed" in name for name in record)
        blob = pickle.dumps(message.content)
        assert not any(secret in blob for secret in secrets)
    identities = [r.content["identity"] for r in grid.replies]
    assert {i["key-fingerprint"] for i in identities} == {key.fingerprint}
    assert {i["key-version"] for i in identities} == {key.version}


# -- Flower's simulation engine (Ray) ------------------------------------------------------


@pytest.mark.slow
def test_simulation_matches_local_engine(module, sites, config, key):
    expected, local_server = _local(module, sites, config, key)
    simulated = copy.deepcopy(module)
    start = time.perf_counter()
    server = run_flower_simulation(
        simulated,
        sites,
        config,
        key.fingerprint,
        key.version,
        initial_parameters=get_shared_parameters(module),
        progress_bar=False,
        key=key,
    )
    elapsed = time.perf_counter() - start
    # client_update is deterministic given global parameters, site, round and seed, the
    # workers run with the caller's torch thread count, and the server averages the updates
    # sorted by site (in float64) as the local engine does: the result is bitwise equal in
    # practice. The tolerance leaves room only for a kernel that reduces in another order in
    # the worker process (float32 rounding ~1e-7 per step, amplified over 2 rounds of Adam).
    _assert_same_parameters(get_shared_parameters(simulated), expected, atol=1e-5)
    assert server.best_round == local_server.best_round
    _assert_same_history(server.history(), local_server.history())
    print(f"flower simulation, 2 rounds x 3 sites: {elapsed:.1f} s")


# -- deployment apps (scinfl.federated.flower.app) -----------------------------------------


def _deployment_files(tmp_path, key, run_config_extra=None):
    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=N_VARS, n_sites=3, seed=0)
    names = sorted(adata.obs["site"].unique())
    for name in names:
        adata[adata.obs["site"] == name].copy().write_h5ad(tmp_path / f"{name}.h5ad")
    key_path = key.save(tmp_path / "site.key", overwrite=True)
    run_config = {
        "num-rounds": 2,
        "min-sites": 3,
        "batch-size": 32,
        "seed": 3,
        "n-hidden": 32,
        "n-latent": 5,
        "validation-size": 0.2,
        "labels-key": "label",
        "labels": ",".join(sorted(adata.obs["label"].unique())),
        "key-fingerprint": key.fingerprint,
        "key-version": key.version,
        "output-dir": str(tmp_path / "out"),
        "discovery-timeout": 300.0,
        **(run_config_extra or {}),
    }
    node_configs = [
        {"data-path": str(tmp_path / f"{name}.h5ad"), "key-path": str(key_path), "site": name}
        for name in names
    ]
    return names, run_config, node_configs


def _local_reference(tmp_path, names, run_config, key):
    from scinfl.federated.flower.app import build_module, federation_config, load_site_data

    sites = [load_site_data(tmp_path / f"{name}.h5ad", name, run_config) for name in names]
    module = build_module(run_config, n_input=N_VARS)
    module.set_key(key)
    server = run_local(
        module,
        sites,
        federation_config(run_config),
        key.fingerprint,
        key.version,
        progress_bar=False,
    )
    return get_shared_parameters(module), server


def test_deployed_site_is_loaded_from_node_config(tmp_path, key):
    from scinfl.federated.flower.app import resolve_deployed_site

    names, run_config, node_configs = _deployment_files(tmp_path, key)
    context = Context(
        run_id=1, node_id=7, node_config=node_configs[1], state=RecordDict(), run_config=run_config
    )
    runtime = resolve_deployed_site(context)
    assert runtime.site.name == names[1]
    assert (runtime.key_fingerprint, runtime.key_version) == (key.fingerprint, key.version)
    assert runtime.module.classifier is not None and runtime.module.has_key
    assert set(np.unique(runtime.site.labels)) <= {0, 1, 2}
    bad = {**run_config, "labels": "type0,type1"}
    with pytest.raises(ValueError, match="agreed categories"):
        resolve_deployed_site(
            Context(
                run_id=1, node_id=7, node_config=node_configs[0], state=RecordDict(), run_config=bad
            )
        )


def test_deployment_apps_match_local_engine(tmp_path, key, task_identity):
    from scinfl.federated.flower.app import client_app, load_results, server_app

    names, run_config, node_configs = _deployment_files(tmp_path, key)
    grid = LoopbackGrid(client_app, node_configs=node_configs, run_config=run_config)
    server_app(
        grid,
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
    )
    parameters, history, summary = load_results(tmp_path / "out")
    expected, server = _local_reference(tmp_path, names, run_config, key)
    _assert_same_parameters(parameters, expected)
    assert summary["best_round"] == server.best_round
    assert history["accepted"].all() and sorted(set(history["site"])) == names


def test_deployment_adopts_first_site_key_when_unpinned(tmp_path, key, task_identity, caplog):
    from scinfl.federated.flower.app import client_app, load_results, server_app

    names, run_config, node_configs = _deployment_files(
        tmp_path, key, {"key-fingerprint": "", "key-version": 0, "num-rounds": 1}
    )
    intruder_key = scinfl.Key.generate()
    node_configs[2]["key-path"] = str(intruder_key.save(tmp_path / "other.key"))
    grid = LoopbackGrid(client_app, node_configs=node_configs, run_config=run_config)
    with caplog.at_level(logging.WARNING, logger="scinfl.federated"):
        server_app(
            grid,
            Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
        )
    _, history, summary = load_results(tmp_path / "out")
    assert summary["key_fingerprint"] == key.fingerprint
    assert any("adopting the key of site" in r.message for r in caplog.records)
    assert history.set_index("site")["accepted"].to_dict() == {
        names[0]: True,
        names[1]: True,
        names[2]: False,
    }


# -- deployment: flower-superlink + one flower-supernode per site on 127.0.0.1 -------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(processes) -> None:
    for process in processes:  # each was started in its own session: end its whole group
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SCINFL_TEST_FLOWER_DEPLOYMENT"),
    reason="starts a SuperLink, 3 SuperNodes and one process per message (minutes on 2 cores); "
    "set SCINFL_TEST_FLOWER_DEPLOYMENT=1",
)
def test_deployment_matches_local_engine(tmp_path, key):
    from scinfl.federated.flower.app import load_results, write_flower_app

    bin_dir = Path(sys.executable).parent
    if not all(
        (bin_dir / exe).exists() for exe in ("flower-superlink", "flower-supernode", "flwr")
    ):
        pytest.skip("Flower's executables are not next to this Python.")
    names, run_config, node_configs = _deployment_files(tmp_path, key)
    app = write_flower_app(tmp_path / "app", run_config)
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FLWR_HOME=str(home))
    processes, logs = [], []

    def start(name, *args):
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        processes.append(
            subprocess.Popen(
                [str(bin_dir / args[0]), *args[1:]],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start("superlink", "flower-superlink", "--insecure", "--port", str(port))
        for name, node in zip(names, node_configs, strict=True):
            node_config = " ".join(f'{k}="{v}"' for k, v in node.items())
            start(
                f"supernode-{name}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(_free_port()),
                "--node-config",
                node_config,
            )
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "test", "--stream"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    finally:
        _stop(processes)
        for log in logs:
            log.close()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parameters, history, summary = load_results(tmp_path / "out")
    # the same computation as the local engine, site by site, in other processes: equal up to
    # float rounding (the ClientApp processes may use another torch thread count)
    expected, server = _local_reference(tmp_path, names, run_config, key)
    _assert_same_parameters(parameters, expected, atol=1e-5)
    assert summary["best_round"] == server.best_round
    assert summary["key_fingerprint"] == key.fingerprint
    assert history["accepted"].all() and sorted(set(history["site"])) == names
