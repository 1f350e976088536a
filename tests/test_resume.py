"""Checkpoint after every round, resume, and the minimum number of available sites."""

import json

import numpy as np
import pytest
import torch

import scinfl
from scinfl.federated import (
    ClientUpdate,
    FederatedServer,
    FederationConfig,
    SiteData,
    _site_runtime,
    get_shared_parameters,
    run_local,
)
from scinfl.module import KeyedVAE

from ._equality import assert_same_weights

N_VARS = 12


def _sites(n_sites=3, n=48, seed=0):
    rng = np.random.default_rng(seed)
    return [
        SiteData.from_arrays(
            f"s{i}", rng.poisson(2 + i, (n, N_VARS)), validation_size=0.25, seed=seed + i
        )
        for i in range(n_sites)
    ]


def _module(key):
    torch.manual_seed(0)
    module = KeyedVAE(n_input=N_VARS, n_hidden=16, n_latent=4, key_mode="pooled")
    module.set_key(key)
    return module


def _config(**kwargs):
    return FederationConfig.from_settings(
        **{"max_rounds": 4, "batch_size": 16, "seed": 5, **kwargs}
    )


def _run(module, sites, config, key, **kwargs):
    """run_local under ``key``'s identity, quietly."""
    return run_local(
        module, sites, config, key.fingerprint, key.version, progress_bar=False, **kwargs
    )


def _without_time(history):
    return history.drop(columns=[c for c in history if c.endswith("time_s")])


class _Interrupt(Exception):
    pass


def _run_interrupted(monkeypatch, module, sites, config, key, checkpoint_dir, fail_round):
    real = _site_runtime.client_update

    def dying(module, site, parameters, client_config, **kwargs):
        if client_config.round == fail_round:
            raise _Interrupt("the machine went down")
        return real(module, site, parameters, client_config, **kwargs)

    monkeypatch.setattr(_site_runtime, "client_update", dying)
    with pytest.raises(_Interrupt):
        _run(module, sites, config, key, checkpoint_dir=checkpoint_dir)
    monkeypatch.setattr(_site_runtime, "client_update", real)


def test_resume_gives_the_uninterrupted_result(tmp_path, key, monkeypatch):
    sites, config = _sites(), _config()
    module = _module(key)
    reference = _run(module, sites, config, key)
    expected = get_shared_parameters(module)

    _run_interrupted(monkeypatch, _module(key), sites, config, key, tmp_path / "ckpt", 2)
    state = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert state["next_round"] == 2  # rounds 0 and 1 completed, round 2 lost

    fresh = _module(key)
    for p in fresh.parameters():  # the resumed weights come from the checkpoint, not from here
        torch.nn.init.normal_(p)
    resumed = _run(fresh, sites, config, key, checkpoint_dir=tmp_path / "ckpt", resume=True)
    got = get_shared_parameters(fresh)
    assert list(got) == list(expected)
    for name in expected:
        assert_same_weights(got[name], expected[name], err_msg=name)
    assert resumed.best_round == reference.best_round
    assert _without_time(resumed.history()).equals(_without_time(reference.history()))


def test_checkpoint_has_no_key_material(tmp_path, key):
    module = _module(key)
    _run(module, _sites(), _config(max_rounds=1), key, checkpoint_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.json", "round-00001.npz"]
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert key._seed not in blob and key._seed.hex().encode() not in blob
    coordinates = module.key_encoder.coordinates.detach().numpy()
    assert coordinates.tobytes() not in blob
    with np.load(tmp_path / "round-00001.npz") as npz:
        stored = {name.split("/", 1)[1] for name in npz.files}
    assert stored == set(get_shared_parameters(module))
    assert not any("coordinates" in name for name in stored)


def test_resume_extends_a_finished_run(tmp_path, key):
    sites = _sites()
    module = _module(key)
    _run(module, sites, _config(max_rounds=2), key, checkpoint_dir=tmp_path)
    # the default KL warm-up (max_rounds // 2) follows the run that started, not the new max
    server = _run(module, sites, _config(max_rounds=3), key, checkpoint_dir=tmp_path, resume=True)
    assert sorted(server.history()["round"].unique()) == [0, 1, 2]
    assert server.config.kl_warmup_rounds == 1


def test_resume_grown_past_the_warm_up_keeps_the_sites_in_step(tmp_path, key):
    """After 2 of 2 rounds (warm-up 1), 9 rounds would warm up over 4: the sites keep 1.

    The sites refused the server's KL weight (1.0 against their 0.75) before.
    """
    sites, module = _sites(), _module(key)
    _run(module, sites, _config(max_rounds=2), key, checkpoint_dir=tmp_path)
    server = _run(module, sites, _config(max_rounds=9), key, checkpoint_dir=tmp_path, resume=True)
    assert set(server.history().loc[lambda h: h["round"] >= 2, "kl_weight"]) == {1.0}


def test_resume_refuses_other_settings_another_key_or_no_checkpoint(tmp_path, key):
    module, sites = _module(key), _sites()
    _run(module, sites, _config(max_rounds=1), key, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"settings differ.*lr \(0.001 -> 0.01\)"):
        _run(module, sites, _config(lr=0.01), key, checkpoint_dir=tmp_path, resume=True)
    other = scinfl.Key.generate()
    with pytest.raises(ValueError, match="trained under key fingerprint"):
        _run(module, sites, _config(), other, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        _run(module, sites, _config(), key, checkpoint_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="needs the checkpoint_dir"):
        _run(module, sites, _config(), key, resume=True)
    # a site that left, or one whose rows changed: selection would compare other validation sets
    with pytest.raises(ValueError, match=r"had sites \['s0', 's1', 's2'\], this one has"):
        _run(module, sites[:2], _config(), key, checkpoint_dir=tmp_path, resume=True)
    fewer = [*sites[:2], _sites(n=40)[2]]
    with pytest.raises(ValueError, match="site 's2' trains on 30 rows, 36 then"):
        _run(module, fewer, _config(), key, checkpoint_dir=tmp_path, resume=True)


def test_round_with_too_few_sites_fails_and_leaves_the_last_model(tmp_path):
    config = FederationConfig(max_rounds=3, min_available=2)
    server = FederatedServer({"w": np.zeros(2)}, config, checkpoint_dir=tmp_path)
    updates = [ClientUpdate(s, 10, {"w": np.ones(2) * (i + 1)}) for i, s in enumerate("ab")]
    with pytest.raises(RuntimeError, match="fewer than min_available=2.*train again"):
        server.aggregate(0, updates[:1])  # no round is checkpointed yet: nothing to resume
    server.aggregate(0, updates)
    server.record_evaluation(0, {})
    np.testing.assert_array_equal(server.parameters["w"], [1.5, 1.5])
    with pytest.raises(RuntimeError, match="fewer than min_available=2.*resume=True"):
        server.aggregate(1, updates[:1])
    np.testing.assert_array_equal(server.parameters["w"], [1.5, 1.5])
    assert set(server.history()["round"]) == {0}


def test_model_checkpoint_and_resume(tmp_path, counts_adata, key):
    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site")
    model = scinfl.model.INFL(counts_adata, key=key, n_hidden=16, n_latent=4)
    kwargs = {"max_rounds": 3, "batch_size": 32, "progress_bar": False, "checkpoint_dir": tmp_path}
    full = model.train_federated(**kwargs)
    expected = get_shared_parameters(model.module)
    again = scinfl.model.INFL(counts_adata, key=key, n_hidden=16, n_latent=4)
    history = again.train_federated(**kwargs, resume=True)  # already complete: nothing to redo
    assert _without_time(history).equals(_without_time(full))
    for name, value in get_shared_parameters(again.module).items():
        assert_same_weights(value, expected[name])
    # resumed on the same model object: model.history holds each round once
    model.train_federated(**{**kwargs, "max_rounds": 4}, resume=True)
    assert len(model.history["train_loss"]) == 4
    with pytest.raises(ValueError, match="min_available=9"):
        model.train_federated(max_rounds=1, min_available=9, batch_size=32, progress_bar=False)


def test_a_new_run_does_not_overwrite_a_checkpoint_and_resume_gives_no_fewer_rounds(tmp_path, key):
    sites = _sites()
    _run(_module(key), sites, _config(max_rounds=2), key, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="holds the checkpoint of a run: pass resume=True"):
        _run(_module(key), sites, _config(max_rounds=2), key, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="holds 2 completed rounds; max_rounds=1"):
        _run(_module(key), sites, _config(max_rounds=1), key, checkpoint_dir=tmp_path, resume=True)
