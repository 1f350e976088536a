"""Flower engine: message codec, ServerApp/ClientApp logic, simulation == local engine."""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import json
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

import anndata
import numpy as np
import pytest

pytest.importorskip("flwr")

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import scinfl
from scinfl.federated import (
    PROTOCOL_VERSION,
    ClientConfig,
    ClientUpdate,
    FederatedServer,
    FederationConfig,
    PrivacyConfig,
    RefusedMessageError,
    Roster,
    SiteData,
    SiteIdentity,
    SiteProtocol,
    SiteRuntime,
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
from scinfl.federated.flower._records import record_to_advertisements
from scinfl.federated.flower.app import model_run_config
from scinfl.model import INFL
from scinfl.module import KeyedVAE

from ._equality import assert_same_weights
from ._loopback import LoopbackGrid

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
    server = run_local(
        local, sites, config, key.fingerprint, key.version, progress_bar=False, key=key
    )
    return get_shared_parameters(local), server


def _assert_same_parameters(a, b, atol=0.0):
    assert list(a) == list(b)
    for name in a:
        assert_same_weights(a[name], b[name], atol=atol, err_msg=name)


def _assert_same_history(a, b, rtol=1e-6):
    cols = [c for c in a.columns if c != "time_s"]
    assert sorted(cols) == sorted(c for c in b.columns if c != "time_s")
    np.testing.assert_allclose(
        a[cols].select_dtypes("number").to_numpy(float),
        b[cols].select_dtypes("number").to_numpy(float),
        rtol=rtol,
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


@pytest.mark.parametrize("protocol", [None, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1])
def test_instructions_of_another_protocol_are_refused(protocol):
    """A server on another scinfl version: refused at its first message, naming the fix."""
    record = config_to_record(ClientConfig(round=0))
    if protocol is None:  # a server from before the version entry
        del record["protocol"]
    else:
        record["protocol"] = protocol
    sent = "no protocol version" if protocol is None else f"protocol {protocol}"
    with pytest.raises(ValueError, match=f"in {sent}.*same scinfl version"):
        record_to_config(record)


def test_a_site_refuses_instructions_of_another_protocol():
    """In process too: the site's check of the instructions compares the protocol."""
    runtime = SiteRuntime(
        KeyedVAE(n_input=4, key_mode=None),
        SiteData.from_arrays("a", np.ones((10, 4))),
        federation=FederationConfig(max_rounds=2),
    )
    protocol = SiteProtocol(runtime)
    config = dataclasses.replace(runtime.federation.client_config(0), protocol=PROTOCOL_VERSION + 1)
    with pytest.raises(RefusedMessageError, match="protocol"):
        protocol.train(get_shared_parameters(runtime.module), config)


# -- the apps, driven by an in-process grid (no Ray) --------------------------------------


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
        config=config,
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
    # same client_update on the same inputs, FedAvg over the same (sorted) sites
    _assert_same_parameters(server.best_parameters, expected)
    assert server.best_round == local_server.best_round
    _assert_same_history(server.history(), local_server.history())


def test_initial_parameters_come_from_a_site(module, sites, config, key, task_identity):
    expected, _ = _local(module, sites, config, key)
    server, grid = _run_loopback(module, sites, config, key, parameters={})
    _assert_same_parameters(server.best_parameters, expected)
    assert grid.sent[len(sites)].metadata.message_type == "query"


class DyingGrid(LoopbackGrid):
    """A LoopbackGrid whose node ``dead`` goes down after ``after_messages`` messages to it.

    Then the SuperLink behaves as Flower 1.41's does for a node whose heartbeats stopped: a
    message to it is answered with an error reply ("node unavailable"), and once that has
    happened the node is no longer among ``get_node_ids()``.
    """

    def __init__(self, *args, dead: int, after_messages: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dead, self.budget, self.unavailable = dead, after_messages, 0

    def get_node_ids(self):
        return [n for n in self.contexts if n != self.dead or not self.unavailable]

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for message in messages:
            if message.metadata.dst_node_id == self.dead:
                if self.budget <= 0:
                    self.unavailable += 1
                    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                    out.append(Message(Error(code=5, reason="node unavailable"), reply_to=message))
                    continue
                self.budget -= 1
            out.extend(super().send_and_receive([message], timeout=timeout))
        return out


def _run_dying(module, sites, config, key, after_messages, on_error=None):
    table = SimulationSites(
        copy.deepcopy(module),
        sites,
        keys={site.name: key for site in sites},
        key_fingerprint=key.fingerprint,
        key_version=key.version,
        num_threads=torch.get_num_threads(),
        config=config,
    )
    server = FederatedServer(
        get_shared_parameters(module), config, key.fingerprint, key.version, n_sites=len(sites)
    )
    app = make_server_app(
        lambda context: server, expected_sites=len(sites), progress_bar=False, on_error=on_error
    )
    # node 102 answers the site query and round 0 (train + evaluate), then dies
    grid = DyingGrid(make_client_app(table), len(sites), dead=102, after_messages=after_messages)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app(grid, context)
    return server


def test_federation_goes_on_when_a_site_dies(module, sites, key, task_identity, caplog):
    config = FederationConfig(max_rounds=3, batch_size=32, seed=3, min_available=2)
    with caplog.at_level(logging.WARNING, logger="scinfl.federated"):
        server = _run_dying(module, sites, config, key, after_messages=3)
    history = server.history()
    dead_site = sorted(s.name for s in sites)[2]
    by_round = history.groupby("round")["site"].apply(sorted).to_dict()
    assert by_round[0] == sorted(s.name for s in sites)
    assert by_round[1] == by_round[2] == sorted(s.name for s in sites)[:2]
    assert any("node unavailable" in r.message and dead_site in r.message for r in caplog.records)
    assert any("disconnected" in r.message for r in caplog.records)
    assert server.best_parameters is not None and server.next_round == 3


def test_secure_aggregation_survives_a_dying_site(module, sites, key, task_identity, caplog):
    """A site dying mid-round leaves the others' masks uncancelled: the round is asked again of
    the survivors under fresh masks, and the federation ends where plain FedAvg does."""
    settings = {"max_rounds": 3, "batch_size": 32, "seed": 3, "min_available": 2}
    plain = _run_dying(module, sites, FederationConfig(**settings), key, after_messages=3)
    with caplog.at_level(logging.WARNING, logger="scinfl.federated"):
        # two more messages before round 0 (the public key asked, the list of keys sent) and
        # one in it (the self mask asked for, once every upload is in)
        secure = _run_dying(
            module, sites, FederationConfig(**settings, privacy="secagg"), key, after_messages=6
        )
    assert any("fresh masks (attempt 1)" in r.message for r in caplog.records)
    _assert_same_parameters(secure.parameters, plain.parameters, atol=1e-5)
    columns = ["round", "site", "n_train", "accepted"]
    assert secure.history()[columns].equals(plain.history()[columns])
    np.testing.assert_allclose(secure.history()["val_loss"], plain.history()["val_loss"], rtol=1e-4)


def test_secure_round_stops_when_a_site_dies_before_revealing(module, sites, key, task_identity):
    """Its upload is in, its self mask is not: the round cannot be read, and the others reveal
    one attempt per round, so the run stops (resumable from its last checkpoint)."""
    config = FederationConfig(max_rounds=2, batch_size=32, seed=3, privacy="secagg")
    errors = []
    with pytest.raises(RuntimeError, match="did not reveal their self masks"):
        _run_dying(module, sites, config, key, after_messages=4, on_error=errors.append)
    assert len(errors) == 1


def test_federation_stops_below_min_available(module, sites, key, task_identity):
    config = FederationConfig(max_rounds=3, batch_size=32, seed=3, min_available=3)
    errors = []
    with pytest.raises(RuntimeError, match="fewer than min_available=3"):
        _run_dying(module, sites, config, key, after_messages=3, on_error=errors.append)
    assert len(errors) == 1


def test_deployment_app_resumes_from_its_checkpoint(tmp_path, key, task_identity):
    from scinfl.federated.flower.app import client_app, load_results, server_app

    names, run_config, node_configs = _deployment_files(tmp_path, key)
    one_round = {**run_config, "num-rounds": 1}
    for settings in (one_round, {**run_config, "resume": True}):
        grid = LoopbackGrid(client_app, node_configs=node_configs, run_config=settings)
        context = Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=settings
        )
        server_app(grid, context)
    assert not any(m.metadata.message_type == "query" for m in grid.sent[3:])
    parameters, history, summary = load_results(tmp_path / "out", key=key)
    expected, server = _local_reference(tmp_path, names, run_config, key)
    _assert_same_parameters(parameters, expected)
    assert summary["best_round"] == server.best_round
    assert sorted(history["round"].unique()) == [0, 1]


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
    return SiteData(site.name, {**site.fields, "X": X}, site.train_idx, site.val_idx)


def test_failing_site_is_dropped(module, sites, config, key, task_identity, caplog):
    failing = sites[2].name
    with caplog.at_level(logging.WARNING, logger="scinfl.federated"):
        server, _ = _run_loopback(module, [*sites[:2], _broken(sites[2])], config, key)
    assert any(f"site {failing!r} failed its train step" in r.message for r in caplog.records)
    assert failing not in set(server.history()["site"])
    expected, _ = _local(module, sites[:2], config, key)
    _assert_same_parameters(server.best_parameters, expected)


def test_every_site_failing_raises(module, sites, config, key, task_identity):
    with pytest.raises(RuntimeError, match="no site completed its train step: site0: RuntimeError"):
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
@pytest.mark.parametrize("privacy", [None, "secagg"])
def test_simulation_matches_local_engine(module, sites, config, key, privacy):
    # under secret frames, so that the simulation's own frame code (initial model in the
    # initial frame, result decoded) runs too; the apps without frames are tested above.
    # Under secagg the sites agree on pairwise keys in Flower's per-node state first.
    config = dataclasses.replace(config, privacy=PrivacyConfig(privacy, secret_frames=True))
    expected, local_server = _local(module, sites, config, key)
    simulated = copy.deepcopy(module)
    print_before = builtins.print
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
    # Ray replaces print when it shuts down; numba (pynndescent: tl.cluster on 8,192 cells or
    # more) then fails in this session
    assert builtins.print is print_before
    # client_update is deterministic given global parameters, site, round and seed, the
    # workers run with the caller's torch thread count, and the server averages the updates
    # sorted by site (in float64) as the local engine does: the result is bitwise equal in
    # practice. The tolerance leaves room only for a kernel that reduces in another order in
    # the worker process (float32 rounding ~1e-7 per step, amplified over 2 rounds of Adam).
    _assert_same_parameters(get_shared_parameters(simulated), expected, atol=1e-5)
    assert server.best_round == local_server.best_round
    _assert_same_history(server.history(), local_server.history())
    print(f"flower simulation, 2 rounds x 3 sites, privacy={privacy}: {elapsed:.1f} s")


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
        "validation-size": 0.2,
        "setup-args": json.dumps(
            {
                "labels_key": "label",
                "categories": {"labels_key": sorted(adata.obs["label"].unique())},
            }
        ),
        "init-params": json.dumps({"n_hidden": 32, "n_latent": 5}),
        "features": json.dumps(list(adata.var_names)),
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
    from scinfl.federated.flower.app import federation_config, load_site

    loaded = [load_site(tmp_path / f"{name}.h5ad", name, run_config, key=key) for name in names]
    sites = [site for _, site in loaded]
    module = loaded[0][0].module
    server = run_local(
        module,
        sites,
        federation_config(run_config),
        key.fingerprint,
        key.version,
        progress_bar=False,
        key=key,
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
    setup = json.loads(run_config["setup-args"])
    setup["categories"]["labels_key"] = ["type0", "type1"]
    bad = {**run_config, "setup-args": json.dumps(setup)}
    with pytest.raises(ValueError, match="not in the agreed list"):
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
    parameters, history, summary = load_results(tmp_path / "out", key=key)
    expected, server = _local_reference(tmp_path, names, run_config, key)
    _assert_same_parameters(parameters, expected)
    assert summary["best_round"] == server.best_round
    assert history["accepted"].all() and sorted(set(history["site"])) == names


@pytest.mark.parametrize("pinned", [False, True])
def test_deployment_apps_aggregate_securely(tmp_path, key, task_identity, pinned, caplog):
    """run-config privacy="secagg": the sites send masked updates, the model is the plain one.

    ``pinned``: every site also has its identity and the roster in its node config, and signs
    its public key.
    """
    from scinfl.federated.flower.app import client_app, load_results, server_app

    names, run_config, node_configs = _deployment_files(tmp_path, key, {"privacy": "secagg"})
    identities = []
    if pinned:
        identities = [SiteIdentity.generate(name) for name in names]
        roster = Roster.from_identities(identities).save(tmp_path / "roster.json")
        for node, identity in zip(node_configs, identities, strict=True):
            path = identity.save(tmp_path / f"{identity.site}.identity")
            node.update({"identity-path": str(path), "roster-path": str(roster)})
    grid = LoopbackGrid(client_app, node_configs=node_configs, run_config=run_config)
    with caplog.at_level(logging.WARNING, logger="scinfl.federated"):
        server_app(
            grid,
            Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
        )
    unpinned = [r for r in caplog.records if "without pinned identities" in r.message]
    assert len(unpinned) == (0 if pinned else len(names))
    replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert replies and all(
        array.numpy().dtype == np.uint64
        for reply in replies
        for name, array in reply.content["parameters"].items()
        if name.endswith("weight")
    )
    advertised = [
        ad
        for reply in grid.replies
        if "public-keys" in reply.content.config_records
        for ad in record_to_advertisements(reply.content.config_records["public-keys"])
    ]
    assert len(advertised) == len(names)
    assert all(bool(ad.signature) == pinned for ad in advertised)
    secrets = [key._seed, key._seed.hex().encode(), key.secret_for("secure-aggregation")]
    # the identities' private keys never travel either (only their signatures)
    secrets += [i.private_key.encode() for i in identities]
    secrets += [bytes.fromhex(i.private_key) for i in identities]
    for message in grid.sent + grid.replies:
        blob = pickle.dumps(message.content)
        assert not any(secret in blob for secret in secrets)
    parameters, _, _ = load_results(tmp_path / "out", key=key)
    expected, _ = _local_reference(tmp_path, names, {**run_config, "privacy": ""}, key)
    _assert_same_parameters(parameters, expected, atol=1e-5)


def test_deployment_apps_under_secret_frames(tmp_path, key, task_identity):
    """run-config secret-frames (with secagg): nothing the server sees is in plain coordinates."""
    from scinfl.federated.flower.app import client_app, load_results, server_app
    from scinfl.key import MissingKeyError

    extra = {"secret-frames": True, "privacy": "secagg"}
    names, run_config, node_configs = _deployment_files(tmp_path, key, extra)
    grid = LoopbackGrid(client_app, node_configs=node_configs, run_config=run_config)
    server_app(
        grid,
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
    )
    with pytest.raises(MissingKeyError, match="key="):
        load_results(tmp_path / "out")
    parameters, _, summary = load_results(tmp_path / "out", key=key)
    assert isinstance(summary["secret_frame"], str)
    expected, _ = _local_reference(
        tmp_path, names, {**run_config, "privacy": "", "secret-frames": False}, key
    )
    _assert_same_parameters(parameters, expected, atol=1e-4)
    # the initial parameters, every global model sent and the result on disk are in frames
    name = "z_encoder.encoder.fc_layers.Layer 0.0.weight"
    seen = [
        m.content["parameters"][name].numpy()
        for m in grid.sent + grid.replies
        if "parameters" in m.content and m.content["parameters"][name].numpy().dtype == np.float32
    ]
    seen.append(np.load(tmp_path / "out" / "global_parameters.npz")[name])
    assert len(seen) > 4
    secrets = [key._seed, key._seed.hex().encode(), key.secret_for("secret-frames")]
    blobs = [pickle.dumps(m.content) for m in grid.sent + grid.replies]
    blobs += [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not any(secret in blob for secret in secrets for blob in blobs)
    for array in seen:
        assert abs(np.corrcoef(array.ravel(), expected[name].ravel())[0, 1]) < 0.2


def test_deployment_site_with_another_key_is_refused_on_both_sides(tmp_path, key, task_identity):
    from scinfl.federated.flower.app import client_app, server_app

    names, run_config, node_configs = _deployment_files(tmp_path, key)
    node_configs[2]["key-path"] = str(scinfl.Key.generate().save(tmp_path / "other.key"))
    grid = LoopbackGrid(client_app, node_configs=node_configs, run_config=run_config)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(RuntimeError, match=r"Only 2 of 3 sites answered") as error:
        server_app(grid, context)
    # the server's message carries the site's own explanation
    assert f"Site {names[2]!r}: the key file" in str(error.value)
    assert key.fingerprint in str(error.value) and "Point `key-path`" in str(error.value)


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
    _, history, summary = load_results(tmp_path / "out", key=key)
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


#: A model class of the user's own, in a module the sites import (run config ``model``): INFL
#: whose decoder also reads a continuous ``.obs`` covariate, a field INFL does not register.
_USER_MODEL_MODULE = """
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalJointObsField

from scinfl.model import INFL


class AgeINFL(INFL):
    @classmethod
    def setup_anndata(cls, adata, layer=None, site_key=None, labels_key=None, covariate_key=None):
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, None),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, [covariate_key]),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata)
        cls.register_manager(manager)
"""


def _user_model_files(tmp_path, key, run_config_extra):
    """Site files with an ``age`` column, and a run of the user's ``AgeINFL`` (importable)."""
    names, run_config, node_configs = _deployment_files(tmp_path, key, run_config_extra)
    (tmp_path / "user_models.py").write_text(_USER_MODEL_MODULE)
    for i, name in enumerate(names):
        site = anndata.read_h5ad(tmp_path / f"{name}.h5ad")
        rng = np.random.default_rng(i)
        site.obs["age"] = rng.normal(60, 10, site.n_obs).astype(np.float32)
        site.write_h5ad(tmp_path / f"{name}.h5ad")
    run_config["model"] = "user_models.AgeINFL"
    run_config["setup-args"] = json.dumps({"covariate_key": "age"})
    return names, run_config, node_configs


@pytest.mark.slow
def test_deployment_survives_a_killed_site(tmp_path, key, monkeypatch):
    """flower-superlink + 3 flower-supernode processes + ``flwr run`` over gRPC on 127.0.0.1.

    The sites build a model class of the user's own (``AgeINFL``: one more registered field,
    a continuous covariate), imported from the user's module. Round 0 must be the local
    engine's computation; then one SuperNode is killed (SIGKILL, with its ClientApp processes)
    and round 1 goes on with the two other sites (``min-available=2``) once the SuperLink has
    noticed the missing heartbeats.
    """
    from scinfl.federated.flower.app import load_results, write_flower_app

    bin_dir = Path(sys.executable).parent
    if not all(
        (bin_dir / exe).exists() for exe in ("flower-superlink", "flower-supernode", "flwr")
    ):
        pytest.skip("Flower's executables are not next to this Python.")
    names, run_config, node_configs = _user_model_files(
        tmp_path, key, {"min-available": 2, "round-timeout": 240.0}
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the local reference imports it too
    app = write_flower_app(tmp_path / "app", run_config)
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FLWR_HOME=str(home))
    # the sites' ClientApp processes import the user's model module, as a site would install it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    # every message starts a ClientApp process that imports torch and scvi-tools: let Python
    # cache their bytecode, or each process compiles them again (tens of seconds on 2 cores)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    processes, logs = {}, []

    def start(name, *args):
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        processes[name] = subprocess.Popen(
            [str(bin_dir / args[0]), *args[1:]],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, with the ClientApps it starts
        )

    checkpoint = tmp_path / "out" / "checkpoint" / "checkpoint.json"
    victim = names[2]
    killed_after_round = None
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
        run = subprocess.Popen(
            [str(bin_dir / "flwr"), "run", str(app), "test", "--stream"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 900
        while run.poll() is None and time.monotonic() < deadline:
            if killed_after_round is None and checkpoint.is_file():
                with contextlib.suppress(ValueError):  # being replaced: read it next time
                    completed = json.loads(checkpoint.read_text())["next_round"]
                    os.killpg(processes[f"supernode-{victim}"].pid, signal.SIGKILL)
                    killed_after_round = completed - 1
            time.sleep(0.2)
        if run.poll() is None:
            run.kill()
        output = run.communicate(timeout=30)[0]
    finally:
        _stop(list(processes.values()))
        for log in logs:
            log.close()
    assert run.returncode == 0, output[-4000:]
    assert killed_after_round == 0, f"killed after round {killed_after_round}"
    _, history, summary = load_results(tmp_path / "out", key=key)
    assert summary["key_fingerprint"] == key.fingerprint
    # round 0: the same computation as the local engine, in other processes (equal up to float
    # rounding: the ClientApp processes may use another torch thread count)
    reference, local = _local_reference(tmp_path, names, {**run_config, "num-rounds": 1}, key)
    # the decoder reads the latent (5) and the user's covariate
    assert reference["decoder.px_decoder.fc_layers.Layer 0.0.weight"].shape == (32, 6)
    ours = history[history["round"] == 0].reset_index(drop=True)
    _assert_same_history(ours, local.history(), rtol=1e-4)
    # round 1: the killed site is gone, the two others carried the round
    round1 = history[history["round"] == 1]
    assert sorted(round1["site"]) == names[:2] and round1["accepted"].all()
    assert summary["best_round"] in (0, 1)
    server_log = output + (tmp_path / "superlink.log").read_text()  # the ServerApp's process
    assert f"site {victim!r} did not answer" in server_log or (
        f"site {victim!r} failed its train step" in server_log
    ), server_log[-4000:]
    assert all(p.poll() is not None for p in processes.values())


def _raw_scale_files(tmp_path, key, privacy=""):
    """Log intensities on a raw scale (about 25 +- 3) with missing values, one file per site."""
    adata = scinfl.data.synthetic_counts(n_obs=180, n_vars=N_VARS, n_sites=3, seed=4)
    values = 3 * np.log1p(adata.X.toarray()) + 25
    values[np.random.default_rng(0).random(values.shape) < 0.1] = np.nan
    adata = anndata.AnnData(values.astype(np.float32), obs=adata.obs[["site", "label"]].copy())
    names = sorted(adata.obs["site"].unique())
    for name in names:
        adata[adata.obs["site"] == name].copy().write_h5ad(tmp_path / f"{name}.h5ad")
    INFL.setup_anndata(adata, site_key="site", labels_key="label")
    torch.manual_seed(3)  # a deployed site builds its model from the run's seed
    model = INFL(adata, key=key, gene_likelihood="normal", n_hidden=16, n_latent=4)
    settings = {"num-rounds": 2, "batch-size": 32, "seed": 3, "min-sites": 3, "privacy": privacy}
    run_config = model_run_config(model, **settings, **{"output-dir": str(tmp_path / "out")})
    key_path = key.save(tmp_path / "site.key", overwrite=True)
    nodes = [
        {"data-path": str(tmp_path / f"{n}.h5ad"), "key-path": str(key_path), "site": n}
        for n in names
    ]
    return model, run_config, nodes


@pytest.mark.parametrize("privacy", ["", "secagg"])
def test_deployment_agrees_on_the_feature_scale_of_continuous_data(
    tmp_path, key, task_identity, privacy
):
    """Deployed sites standardise with the scale of all sites' rows, as the local engine does."""
    from scinfl.federated.flower.app import client_app, load_results, server_app

    model, run_config, nodes = _raw_scale_files(tmp_path, key, privacy)
    grid = LoopbackGrid(client_app, node_configs=nodes, run_config=run_config)
    server_app(
        grid,
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
    )
    deployed, _, _ = load_results(tmp_path / "out", key=key)
    model.train_federated(max_rounds=2, batch_size=32, seed=3, privacy=privacy or None)
    assert float(model.module.feature_loc.min()) > 20  # the raw scale, not the identity
    for name, value in get_shared_parameters(model.module).items():
        assert_same_weights(deployed[name], value, atol=1e-5 if privacy else 0.0, err_msg=name)
    # the moments and the scale are asked once, before any model: a replay is refused
    moment_queries = [m for m in grid.sent if m.metadata.group_id == "moments"]
    assert len(moment_queries) == 3
    (replay,) = grid.send_and_receive([moment_queries[0]])
    assert replay.has_error() and "received a model already" in replay.error.reason


def test_a_site_file_is_read_by_the_runs_feature_names(tmp_path, key):
    """Weights are read by position: a site listing the features otherwise must be aligned."""
    from scinfl.federated.flower.app import load_site

    adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=N_VARS, n_sites=1, seed=2)
    INFL.setup_anndata(adata, labels_key="label")
    run_config = model_run_config(INFL(adata, key=key, n_hidden=16))
    adata.write_h5ad(tmp_path / "same.h5ad")
    adata[:, adata.var_names[::-1]].copy().write_h5ad(tmp_path / "reversed.h5ad")
    adata[:, 1:].copy().write_h5ad(tmp_path / "short.h5ad")
    same = load_site(tmp_path / "same.h5ad", "a", run_config, key=key)[1]
    reversed_ = load_site(tmp_path / "reversed.h5ad", "a", run_config, key=key)[1]
    np.testing.assert_array_equal(
        np.asarray(same.fields["X"].todense()), np.asarray(reversed_.fields["X"].todense())
    )
    with pytest.raises(ValueError, match="short.h5ad: .* lack 1 of the model's"):
        load_site(tmp_path / "short.h5ad", "a", run_config, key=key)


def test_a_perturbation_deployment_agrees_on_the_condition_codes(tmp_path, key):
    """Sites coded the condition by their own files' category order: stim read as ctrl."""
    from scinfl.federated.flower.app import load_site

    adata = scinfl.data.synthetic_perturbation(n_obs=80, n_vars=16, n_sites=1, seed=2)
    scinfl.model.PerturbationINFL.setup_anndata(adata, condition_key="condition")
    run_config = model_run_config(scinfl.model.PerturbationINFL(adata, key=key, n_hidden=8))
    assert json.loads(run_config["setup-args"])["categories"] == {"condition_key": ["ctrl", "stim"]}
    flipped = adata.copy()
    flipped.obs["condition"] = flipped.obs["condition"].cat.reorder_categories(["stim", "ctrl"])
    adata.write_h5ad(tmp_path / "a.h5ad")
    flipped.write_h5ad(tmp_path / "b.h5ad")
    codes = [
        np.asarray(
            load_site(tmp_path / f"{n}.h5ad", n, run_config, key=key)[1].fields[
                "extra_categorical_covs"
            ]
        )
        for n in "ab"
    ]
    np.testing.assert_array_equal(codes[0], codes[1])
    setup = json.loads(run_config["setup-args"])
    setup["categories"] = None
    unagreed = {**run_config, "setup-args": json.dumps(setup)}
    adata[adata.obs["condition"] == "ctrl"].copy().write_h5ad(tmp_path / "controls.h5ad")
    with pytest.raises(
        ValueError, match='no agreed categories for it: add "categories": {"condition_key"'
    ):
        load_site(tmp_path / "controls.h5ad", "c", unagreed, key=key)


def test_a_site_refuses_a_run_without_feature_names_or_the_wrong_file_kind(tmp_path, key):
    from scinfl.federated.flower.app import load_site

    adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=N_VARS, n_sites=1, seed=2)
    adata.write_h5ad(tmp_path / "a.h5ad")
    INFL.setup_anndata(adata)
    run_config = model_run_config(INFL(adata, key=key, n_hidden=16))
    del run_config["features"]  # sites would read their features by position
    with pytest.raises(ValueError, match="no `features` entry"):
        load_site(tmp_path / "a.h5ad", "a", run_config, key=key)
    with_features = model_run_config(INFL(adata, key=key, n_hidden=16))
    setup = {**json.loads(with_features["setup-args"]), "layer": "umis"}
    counts = {**with_features, "setup-args": json.dumps(setup)}
    with pytest.raises(ValueError, match=r"reads layers\['umis'\] at every site .*adata.layers"):
        load_site(tmp_path / "a.h5ad", "a", counts, key=key)
    multiomics = {**run_config, "model": "scinfl.model.MultiOmicsINFL"}
    with pytest.raises(ValueError, match="not a MuData file.*give the site an .h5mu file"):
        load_site(tmp_path / "a.h5ad", "a", multiomics, key=key)
