"""DP-FedAvg baseline: clipping, calibrated noise, accounting, and the model option."""

import math

import numpy as np
import pytest

pytest.importorskip("dp_accounting")

import scinfl
from scinfl.federated import ClientUpdate, DPFedAvg, FederatedServer, FederationConfig


def _update(site, delta):
    return ClientUpdate(site, 10, {"w": np.asarray(delta, dtype=np.float32)})


def test_each_update_is_clipped_then_averaged_uniformly():
    dp = DPFedAvg(noise_multiplier=1e-9, clipping_norm=1.0, n_sites=2)
    current = {"w": np.zeros(2, dtype=np.float32), "step": np.array(3)}
    # update norms 5 and 0.5: the first is scaled to norm 1, the second is kept;
    # the sites' n_k (10 each, or anything) does not weight a DP average
    updates = [
        ClientUpdate("a", 1, {"w": np.array([3.0, 4.0], np.float32), "step": np.array(3)}),
        ClientUpdate("b", 99, {"w": np.array([0.0, 0.5], np.float32), "step": np.array(3)}),
    ]
    out = dp.aggregate(current, updates, round_=0)
    np.testing.assert_allclose(out["w"], [(0.6 + 0.0) / 2, (0.8 + 0.5) / 2], atol=1e-6)
    assert out["w"].dtype == np.float32 and out["step"] == 3


def test_noise_has_the_calibrated_scale_and_is_seeded():
    z, c, m = 1.5, 0.2, 4
    dp = DPFedAvg(noise_multiplier=z, clipping_norm=c, n_sites=m, seed=1)
    current = {"w": np.zeros(20_000, dtype=np.float32)}
    updates = [_update(s, np.zeros(20_000)) for s in "abcd"]
    noisy = dp.aggregate(current, updates, round_=0)["w"]
    assert noisy.std() == pytest.approx(z * c / m, rel=0.03)
    again = DPFedAvg(noise_multiplier=z, clipping_norm=c, n_sites=m, seed=1)
    np.testing.assert_array_equal(again.aggregate(current, updates, round_=0)["w"], noisy)
    assert not np.array_equal(again.aggregate(current, updates, round_=1)["w"], noisy)


def test_epsilon_matches_the_gaussian_rdp_bound():
    z, rounds, delta = 1.2, 10, 1e-5
    dp = DPFedAvg(noise_multiplier=z, clipping_norm=1.0, n_sites=3, delta=delta)
    current = {"w": np.zeros(3, dtype=np.float32)}
    epsilons = []
    for r in range(rounds):
        dp.aggregate(current, [_update(s, np.ones(3)) for s in "abc"], round_=r)
        epsilons.append(dp.epsilon())
    assert all(b > a for a, b in zip(epsilons, epsilons[1:], strict=False))
    # Gaussian mechanism, sensitivity 1 in units of the noise: RDP(alpha) = alpha / (2 z^2) per
    # release; converted with eps = RDP + log(1/delta) / (alpha - 1), minimised over alpha
    alphas = np.linspace(1.01, 200, 200_000)
    bound = np.min(rounds * alphas / (2 * z**2) + math.log(1 / delta) / (alphas - 1))
    # dp-accounting uses a tighter conversion on a grid of orders: at most the classic bound
    assert 0.7 * bound < epsilons[-1] <= bound * 1.001
    weaker = DPFedAvg(noise_multiplier=2 * z, clipping_norm=1.0, n_sites=3, delta=delta)
    for r in range(rounds):
        weaker.aggregate(current, [_update(s, np.ones(3)) for s in "abc"], round_=r)
    assert weaker.epsilon() < epsilons[-1] / 2


def test_server_uses_dp_and_reports_epsilon_per_round():
    config = FederationConfig.from_settings(max_rounds=2, privacy="dp", dp_noise_multiplier=1.0)
    server = FederatedServer({"w": np.zeros(2, np.float32)}, config, n_sites=2)
    server.aggregate(0, [_update("a", [10.0, 0.0]), _update("b", [10.0, 0.0])])
    history = server.history()
    assert (history["dp_epsilon"] > 0).all()
    assert server.dp_epsilon() == history["dp_epsilon"].iloc[0]
    assert np.linalg.norm(server.parameters["w"]) < 5  # clipped to 1, plus noise of sd 0.5
    with pytest.raises(ValueError, match="privacy must be None, 'dp' or 'secagg'"):
        FederationConfig(privacy="rdp")


def test_model_trains_with_dp_and_resumes_its_accounting(tmp_path, counts_adata, key):
    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site", labels_key="label")
    model = scinfl.model.INFL(counts_adata, key=key, n_hidden=16, n_latent=4)
    kwargs = {"batch_size": 32, "privacy": "dp", "dp_noise_multiplier": 0.8, "progress_bar": False}
    history = model.train_federated(max_rounds=2, checkpoint_dir=tmp_path, **kwargs)
    two_rounds = model.dp_epsilon_
    assert two_rounds > 0 and history["dp_epsilon"].max() == pytest.approx(two_rounds)
    model.train_federated(max_rounds=3, checkpoint_dir=tmp_path, resume=True, **kwargs)
    fresh = DPFedAvg(noise_multiplier=0.8, clipping_norm=1.0, n_sites=3)
    fresh.releases = [3, 3, 3]
    assert model.dp_epsilon_ == pytest.approx(fresh.epsilon())
    assert model.dp_epsilon_ > two_rounds


def test_the_noise_is_secret_to_the_server():
    # seeded from the federation's seed, which every site receives, anyone could draw the
    # noise again and subtract it (released update 8.3 from the clean mean, 6e-7 after)
    current = {"w": np.zeros(1000, np.float32)}
    updates = [_update(s, np.full(1000, 0.01)) for s in "abc"]
    config = FederationConfig.from_settings(max_rounds=1, privacy="dp", seed=0)
    releases = [
        FederatedServer(dict(current), config, n_sites=3).aggregate(0, updates)["w"]
        for _ in range(2)
    ]
    clean = np.full(1000, 0.01)
    public = DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, n_sites=3, seed=0)
    guessed = public.aggregate(current, updates, round_=0)["w"] - clean
    for release in releases:
        assert np.abs((release - clean) - guessed).max() > 0.1
    assert np.abs(releases[0] - releases[1]).max() > 0.1


def test_dp_releases_the_last_round_and_composes_continued_runs(counts_adata, key):
    with pytest.raises(ValueError, match="early_stopping reads the sites' validation losses"):
        FederationConfig.from_settings(privacy="dp", early_stopping=True)
    config = FederationConfig.from_settings(max_rounds=2, privacy="dp")
    server = FederatedServer({"w": np.zeros(2, np.float32)}, config, n_sites=1)
    for round_, loss in enumerate([1.0, 5.0]):  # the raw losses would pick round 0
        server.aggregate(round_, [_update("a", [0.1, 0.0])])
        server.record_evaluation(round_, {"a": {"n_val": 3, "val_loss": loss}})
    assert server.best_round == 1
    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site")
    model = scinfl.model.INFL(counts_adata, key=key, n_hidden=8, n_latent=4)
    kwargs = {"batch_size": 64, "privacy": "dp", "progress_bar": False}
    model.train_federated(max_rounds=2, **kwargs)
    first = model.dp_epsilon_
    model.train_federated(max_rounds=2, **kwargs)  # continues from the released weights
    four = DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, n_sites=3)
    four.releases = [3, 3, 3, 3]
    assert model.dp_epsilon_ == pytest.approx(four.epsilon()) and model.dp_epsilon_ > first
    model.train_federated(max_rounds=1, batch_size=64, progress_bar=False)
    assert model.dp_epsilon_ is None  # trained without DP after: no guarantee to report
    model.train_federated(max_rounds=1, **kwargs)
    assert model.dp_epsilon_ is None  # nor after a later DP run: its start is not covered


def test_a_resumed_dp_run_composes_what_its_start_held(counts_adata, key, tmp_path):
    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site")
    model = scinfl.model.INFL(counts_adata, key=key, n_hidden=8, n_latent=4)
    kwargs = {"batch_size": 64, "privacy": "dp", "progress_bar": False}
    model.train_federated(max_rounds=2, **kwargs)
    model.save(tmp_path / "after_one")
    model.train_federated(max_rounds=1, checkpoint_dir=tmp_path / "ckpt", **kwargs)
    # another model object (loaded from disk) resumes the run and grows it to 2 rounds
    loaded = scinfl.model.INFL.load(tmp_path / "after_one", counts_adata, key=key)
    loaded.train_federated(max_rounds=2, checkpoint_dir=tmp_path / "ckpt", resume=True, **kwargs)
    four = DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, n_sites=3)
    four.releases = [3, 3, 3, 3]
    assert loaded.dp_epsilon_ == pytest.approx(four.epsilon())


def test_an_update_that_is_not_finite_is_rejected(caplog):
    from scinfl.federated._aggregate import accept_updates

    updates = [_update("a", [np.nan, 50.0]), _update("b", [np.inf, 0.0]), _update("c", [0.1, 0])]
    with caplog.at_level("WARNING", logger="scinfl"):
        accepted = accept_updates(updates, None, None)
    assert [u.site for u in accepted] == ["c"]
    assert "NaN or infinite" in caplog.text


def test_a_delta_not_below_one_over_the_sites_is_warned_of(caplog):
    with caplog.at_level("WARNING", logger="scinfl"):
        DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, n_sites=3, delta=0.5)
    assert "dp_delta=0.5 is not below 1/n for n=3 sites" in caplog.text


def test_a_divergence_under_dp_fedavg_names_its_noise():
    # 3 sites at the defaults: noise of std 1/3 per parameter a round, which tiny data did
    # not survive (round 9), with advice about learning rates only
    config = FederationConfig(max_rounds=2, privacy=scinfl.federated.PrivacyConfig(mode="dp"))
    server = FederatedServer({"w": np.zeros(3, np.float32)}, config, n_sites=3)
    broken = [ClientUpdate(s, 10, {"w": np.full(3, np.nan, np.float32)}) for s in "abc"]
    with pytest.raises(FloatingPointError, match="noise of std 0.333 per parameter"):
        server.aggregate(0, broken)
