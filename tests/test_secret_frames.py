"""Secret frames: the server averages the model in key-derived coordinates, new every round."""

import json

import numpy as np
import pytest
import torch

import scinfl
from scinfl.federated import (
    ClientConfig,
    ClientUpdate,
    FederatedServer,
    FederationConfig,
    SecretFrames,
    SiteData,
    fedavg,
    frame_id,
    get_shared_parameters,
    hide_update,
    open_parameters,
    parameters_digest,
    protect_update,
    run_local,
)
from scinfl.federated._secret_frames import INITIAL_FRAME, AxisFrame
from scinfl.module import KeyedVAE
from scinfl.privacy import analytic_attack, framed_attackers, partial_correlation, upload_gradient

KEY = scinfl.Key(bytes(range(32)))


@pytest.mark.parametrize("n", [1, 5, 300])
def test_axis_frame_modes_are_the_matrix_and_its_inverse_and_transposes(n):
    frame = AxisFrame(n, np.random.default_rng(n))
    t = frame.apply(np.eye(n), "forward")
    x = np.random.default_rng(0).normal(size=(3, n))
    inverse = np.linalg.inv(t)
    for mode, matrix in (
        ("forward", t),
        ("inverse", inverse),
        ("transpose", t.T),
        ("inverse_transpose", inverse.T),
    ):
        np.testing.assert_allclose(frame.apply(x, mode), x @ matrix, atol=1e-9, err_msg=mode)
    singular = np.linalg.svd(t, compute_uv=False)
    assert singular[-1] > 0 and singular[0] / singular[-1] < 100
    if n > 1:
        # not orthogonal: angles (and so principal axes) are not preserved
        assert not np.allclose(t @ t.T, np.eye(n), atol=0.1)
        # every coordinate of the long axis depends on every input coordinate
        assert n < 256 or (np.abs(t) > 0).mean() > 0.99


def _updates(seed=0):
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(
            site,
            n,
            {
                "w": rng.normal(size=(40, 300)).astype(np.float32),
                "b": rng.normal(size=40).astype(np.float32),
                "count": np.array([3]),
            },
        )
        for site, n in (("a", 10), ("b", 30), ("c", 7))
    ]


def test_fedavg_commutes_with_the_frames_and_only_the_key_reads_it():
    frames = SecretFrames(KEY)
    updates = _updates()
    config = ClientConfig(round=4, secret_frames=True, frame="f4")
    frame = "f5"
    hidden = [hide_update(u, KEY, frame) for u in updates]
    assert all(h.n == u.n and h.site == u.site for h, u in zip(hidden, updates, strict=True))
    aggregate = fedavg(hidden)
    plain = fedavg(updates)
    # the sites read the server's aggregate as the plain FedAvg
    opened = open_parameters(aggregate, KEY, ClientConfig(round=5, secret_frames=True, frame=frame))
    for name in plain:
        np.testing.assert_allclose(opened[name], plain[name], atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(aggregate["count"], plain["count"])
    # what the server holds is unrelated to the plain values, in another frame or key too
    for other in (
        open_parameters(aggregate, KEY, config),
        SecretFrames(scinfl.Key(bytes(32))).decode(aggregate, frame),
        aggregate,
    ):
        r = np.corrcoef(other["w"].ravel(), plain["w"].ravel())[0, 1]
        assert abs(r) < 0.05
    # frames differ between frames and between parameters of the same shape
    w = {"w": plain["w"]}
    assert not np.allclose(frames.encode(w, "a")["w"], frames.encode(w, "b")["w"])
    assert not np.allclose(frames.encode({"v": plain["w"]}, "a")["v"], frames.encode(w, "a")["w"])
    # a site without the key object cannot take part
    with pytest.raises(ValueError, match="Pass key="):
        protect_update(updates[0], None, config, received=plain)


def test_a_frame_holds_one_upload_per_site_whatever_the_server_sends():
    received = fedavg(_updates())
    config = ClientConfig(round=2, secret_frames=True, frame="x")
    name = frame_id(received, config)
    assert name == frame_id({k: v.copy() for k, v in received.items()}, config)
    # other parameters, or other instructions (the frame of the sent model too): a new frame
    changed = {**received, "b": received["b"] + 1e-6}
    assert frame_id(changed, config) != name
    assert frame_id(received, ClientConfig(round=2, secret_frames=True, frame="x", lr=2e-3)) != name
    # the same tensors named as in another frame: another upload frame (issue #13)
    assert frame_id(received, ClientConfig(round=2, secret_frames=True, frame="y")) != name
    # a site that has the received model's digest names the same frame without hashing again
    assert frame_id(received, config, parameters_digest(received)) == name


def test_float32_parameters_round_trip_within_float32_rounding():
    """The maps are applied in float64: only the float32 values on the wire round.

    Applying them in float32 (6x faster block products) rounds 10x more (about 6e-6 relative
    per round trip on a CPTAC-sized model), which training amplifies: a deployment under
    frames then left the plain model's weights by up to 8e-4 after a few rounds.
    """
    frames = SecretFrames(KEY)
    wide = np.random.default_rng(0).normal(size=(40, 3000)).astype(np.float32)
    back = frames.decode(frames.encode({"w": wide, "b": wide[0]}, "f"), "f")
    for name, plain in (("w", wide), ("b", wide[0])):
        assert back[name].dtype == np.float32
        error = np.abs(back[name] - plain).max() / np.abs(plain).max()
        assert error < 1e-6, (name, error)


def test_a_site_hashes_the_model_it_receives_once_per_train_message(monkeypatch):
    from scinfl.federated import SiteProtocol, SiteRuntime, _secret_frames, _site_runtime

    calls = []
    digest = _secret_frames.parameters_digest

    def counted(parameters):
        calls.append(len(parameters))
        return digest(parameters)

    monkeypatch.setattr(_secret_frames, "parameters_digest", counted)
    monkeypatch.setattr(_site_runtime, "parameters_digest", counted)
    module = KeyedVAE(n_input=30, n_hidden=16)
    module.set_key(KEY)
    federation = FederationConfig.from_settings(max_rounds=2, batch_size=16, secret_frames=True)
    runtime = SiteRuntime(module, _sites()[0], key=KEY, federation=federation, secret_frames=True)
    sent = SecretFrames(KEY).encode(get_shared_parameters(module), INITIAL_FRAME)
    config = FederatedServer(sent, federation).client_config(0)
    update = SiteProtocol(runtime).train(sent, config)
    assert len(calls) == 1
    # the upload is in the frame the server names from what it sent
    frames = SecretFrames(KEY)
    opened = frames.decode(update.parameters, frame_id(sent, config))
    assert np.isfinite(opened["px_r"]).all()


def test_the_local_engine_hashes_each_message_once_whatever_the_number_of_sites(monkeypatch):
    from scinfl.federated import _local_engine, _secret_frames, _site_runtime

    digest = _secret_frames.parameters_digest
    calls = []

    def counted(parameters):
        calls.append(len(parameters))
        return digest(parameters)

    for module in (_secret_frames, _site_runtime, _local_engine):
        monkeypatch.setattr(module, "parameters_digest", counted)
    counts = []
    for n_sites in (2, 3):
        calls.clear()
        vae = KeyedVAE(n_input=30, n_hidden=16)
        vae.set_key(KEY)
        config = FederationConfig.from_settings(max_rounds=2, batch_size=16, secret_frames=True)
        run_local(vae, _sites()[:n_sites], config, progress_bar=False, key=KEY)
        counts.append(len(calls))
    assert counts[0] == counts[1] and 0 < counts[0] <= 4 * 2


def _sites(n_vars=30):
    rng = np.random.default_rng(0)
    return [SiteData.from_arrays(s, rng.poisson(2, (60, n_vars))) for s in "abc"]


def _run(privacy=None, secret_frames=False, rounds=3):
    torch.manual_seed(0)
    vae = KeyedVAE(n_input=30, key_mode=None, n_hidden=16)
    config = FederationConfig.from_settings(
        max_rounds=rounds, batch_size=16, privacy=privacy, secret_frames=secret_frames
    )
    server = run_local(vae, _sites(), config, progress_bar=False, key=KEY)
    return get_shared_parameters(vae), server


def test_local_engine_under_frames_trains_the_plain_model():
    plain, plain_server = _run()
    for privacy in (None, "secagg"):
        framed, server = _run(privacy=privacy, secret_frames=True)
        for name in plain:
            np.testing.assert_allclose(framed[name], plain[name], atol=1e-4, err_msg=name)
        assert server.best_round == plain_server.best_round
        assert server.best_frame not in (None, INITIAL_FRAME)
        # the server never held the model in its own coordinates
        held = server.best_parameters["z_encoder.encoder.fc_layers.Layer 0.0.weight"]
        truth = plain["z_encoder.encoder.fc_layers.Layer 0.0.weight"]
        assert abs(np.corrcoef(held.ravel(), truth.ravel())[0, 1]) < 0.2
    with pytest.raises(ValueError, match="secret_frames=False for DP-FedAvg"):
        FederationConfig.from_settings(privacy="dp", secret_frames=True)


def test_frames_defeat_the_analytic_attack_without_the_key():
    torch.manual_seed(0)
    vae = KeyedVAE(n_input=300, key_mode=None, n_hidden=16)
    vae.eval()
    attackers, views = framed_attackers(vae, KEY, 7, ["none", "wrong", "correct"], seed=1)
    reference = np.full(300, np.log1p(3.0))
    found = {guess: [] for guess in attackers}
    for _ in range(4):
        x = torch.distributions.Poisson(torch.full((1, 300), 3.0)).sample()
        tensors = {"X": x, "batch": torch.zeros(1, 1), "labels": torch.zeros(1, 1)}
        grads = upload_gradient(vae, tensors)
        for guess, attacker in attackers.items():
            rec = analytic_attack(attacker, views[guess](grads))[None]
            found[guess].append(partial_correlation(rec, torch.log1p(x).numpy(), reference)[0])
    assert min(found["correct"]) > 0.99  # the attack works: the frames are all that stops it
    for guess in ("none", "wrong"):
        assert max(np.abs(found[guess])) < 0.25 and abs(np.mean(found[guess])) < 0.1, found


def test_train_federated_with_frames(tmp_path):
    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=40, n_labels=3, n_sites=3, seed=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    kwargs = {"max_rounds": 3, "batch_size": 32, "seed": 0, "progress_bar": False}
    models = {}
    for frames in (False, True):
        torch.manual_seed(0)
        models[frames] = scinfl.model.INFL(adata, key=KEY, n_hidden=16, n_latent=4)
        models[frames].train_federated(secret_frames=frames, **kwargs)
    np.testing.assert_allclose(models[True].get_latent(), models[False].get_latent(), atol=1e-4)
    assert isinstance(models[True].secret_frame_, str)
    assert models[False].secret_frame_ is None
    # saved models are plain (the site holds the key); loading needs the key as before
    models[True].save(tmp_path / "m")
    loaded = scinfl.model.INFL.load(tmp_path / "m", adata, key=KEY)
    np.testing.assert_allclose(loaded.get_latent(), models[True].get_latent(), atol=1e-6)
    unkeyed = scinfl.model.INFL(adata, key_mode=None, n_hidden=16)
    with pytest.raises(ValueError, match="key=scinfl.Key.generate"):
        unkeyed.train_federated(secret_frames=True, **kwargs)
    with pytest.raises(ValueError, match="secret_frames=False"):
        models[True].train_federated(secret_frames=True, privacy="dp", **kwargs)


def test_frames_are_the_default_with_a_key():
    from scinfl.federated.flower.app import federation_config, secret_frames_on

    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=40, n_labels=3, n_sites=3, seed=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    kwargs = {"max_rounds": 2, "batch_size": 32, "seed": 0, "progress_bar": False}
    keyed = scinfl.model.INFL(adata, key=KEY, n_hidden=16, n_latent=4)
    keyed.train_federated(**kwargs)
    assert isinstance(keyed.secret_frame_, str)
    # a key for secure aggregation only (unkeyed model) turns them on too
    secured = scinfl.model.INFL(adata, key_mode=None, key=KEY, n_hidden=16, n_latent=4)
    secured.train_federated(**kwargs)
    assert isinstance(secured.secret_frame_, str)
    # no key, or DP (server-side clipping needs a common frame): off, without an error
    unkeyed = scinfl.model.INFL(adata, key_mode=None, n_hidden=16, n_latent=4)
    unkeyed.train_federated(**kwargs)
    assert unkeyed.secret_frame_ is None
    keyed.train_federated(privacy="dp", dp_noise_multiplier=0.1, **kwargs)
    assert keyed.secret_frame_ is None
    # the deployment's run config: "auto" by default, or an explicit switch
    assert federation_config({}).privacy.secret_frames
    unkeyed_model = {"init-params": json.dumps({"key_mode": None})}
    assert not federation_config(unkeyed_model).privacy.secret_frames
    assert federation_config({**unkeyed_model, "privacy": "secagg"}).privacy.secret_frames
    assert not secret_frames_on({"privacy": "dp"})
    assert not secret_frames_on({"secret-frames": False})
    assert secret_frames_on({**unkeyed_model, "secret-frames": "true"})
    with pytest.raises(ValueError, match="true, false or"):
        secret_frames_on({"secret-frames": "yes"})


def test_resumed_run_under_frames_equals_the_uninterrupted_one(tmp_path):
    def run(rounds, **kwargs):
        torch.manual_seed(0)
        vae = KeyedVAE(n_input=30, key_mode=None, n_hidden=16)
        config = FederationConfig.from_settings(
            max_rounds=rounds, batch_size=16, kl_warmup_rounds=2, secret_frames=True
        )
        server = run_local(vae, _sites(), config, progress_bar=False, key=KEY, **kwargs)
        return get_shared_parameters(vae), server

    straight, _ = run(4)
    run(2, checkpoint_dir=tmp_path)
    resumed, server = run(4, checkpoint_dir=tmp_path, resume=True)
    assert server.next_round == 4
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="secret_frames"):
        torch.manual_seed(0)
        run_local(
            KeyedVAE(n_input=30, key_mode=None, n_hidden=16),
            _sites(),
            FederationConfig(max_rounds=5, batch_size=16, kl_warmup_rounds=2),
            progress_bar=False,
            key=KEY,
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_audit_of_a_framed_model_runs_every_guess():
    from scinfl.privacy import audit

    adata = scinfl.data.synthetic_counts(n_obs=200, n_vars=300, n_sites=3, seed=1)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    torch.manual_seed(0)
    model = scinfl.model.INFL(adata, key=KEY, key_mode=None, n_hidden=16)
    model.train_federated(
        max_rounds=2, batch_size=32, seed=0, progress_bar=False, secret_frames=True
    )
    table = audit(model, attacks=["analytic", "inference"], n_victims=3, training_seed=0)
    assert set(table["defence"]) == {"plain+frames"}
    pc = table[table.metric == "partial_corr"].set_index("key_guess")["value"]
    assert pc["correct"] > 0.99 and abs(pc["none"]) < 0.2 and abs(pc["wrong"]) < 0.2


def test_the_default_keyed_model_defeats_the_analytic_attack():
    """INFL(adata, key=...) trained with the defaults (the paper's pooled key, secret frames on):
    without the key the analytic attack recovers nothing; the same model without frames gives
    every one-sample upload back (docs/privacy.md)."""
    from scinfl.privacy import audit

    adata = scinfl.data.synthetic_counts(n_obs=200, n_vars=300, n_sites=3, seed=1)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    pc = {}
    for frames in (None, False):
        torch.manual_seed(0)
        model = scinfl.model.INFL(adata, key=KEY, n_hidden=16)
        model.train_federated(
            max_rounds=2, batch_size=32, seed=0, progress_bar=False, secret_frames=frames
        )
        table = audit(model, attacks=["analytic"], n_victims=4, training_seed=0)
        pc[frames] = table[table.metric == "partial_corr"].set_index("key_guess")["value"]
        assert set(table["defence"]) == {"pooled+frames" if frames is None else "pooled"}
    assert pc[None]["correct"] > 0.99
    assert abs(pc[None]["none"]) < 0.2 and abs(pc[None]["wrong"]) < 0.2
    assert (pc[False] > 0.9).all()
