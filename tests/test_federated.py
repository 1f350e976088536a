import logging

import numpy as np
import pytest
import torch

from scinfl.federated import (
    ClientConfig,
    ClientUpdate,
    FederatedServer,
    FederationConfig,
    SiteData,
    accept_updates,
    client_update,
    fedavg,
    get_shared_parameters,
    partition,
    set_shared_parameters,
)
from scinfl.module import KeyedVAE

from ._equality import assert_same_weights


def test_fedavg_weighted_by_n_by_hand():
    a = ClientUpdate("a", 10, {"w": np.array([[1.0, 2.0]], dtype=np.float32), "c": np.array(3)})
    b = ClientUpdate("b", 30, {"w": np.array([[5.0, -2.0]], dtype=np.float32), "c": np.array(7)})
    out = fedavg([a, b])
    # (10 * 1 + 30 * 5) / 40 = 4; (10 * 2 + 30 * -2) / 40 = -1
    np.testing.assert_allclose(out["w"], [[4.0, -1.0]])
    assert out["w"].dtype == np.float32
    assert out["c"] == 3  # integer tensors are not averaged


def test_fedavg_refuses_empty_and_mismatched():
    with pytest.raises(ValueError, match="No updates"):
        fedavg([])
    a = ClientUpdate("a", 1, {"w": np.zeros(1)})
    b = ClientUpdate("b", 1, {"v": np.zeros(1)})
    with pytest.raises(ValueError, match="another architecture"):
        fedavg([a, b])


def test_updates_under_another_key_are_rejected_and_logged(caplog):
    good = ClientUpdate("a", 1, {"w": np.full(1, 0.5)}, key_fingerprint="f1", key_version=1)
    wrong_key = ClientUpdate("b", 1, {"w": np.ones(1)}, key_fingerprint="f2", key_version=1)
    old_version = ClientUpdate("c", 1, {"w": np.ones(1)}, key_fingerprint="f1", key_version=0)
    with caplog.at_level(logging.WARNING):
        accepted = accept_updates([good, wrong_key, old_version], "f1", 1)
    assert accepted == [good]
    assert "site 'b'" in caplog.text and "site 'c'" in caplog.text
    server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=1), "f1", 1)
    np.testing.assert_array_equal(server.aggregate(0, [good, wrong_key])["w"], [0.5])
    with pytest.raises(RuntimeError, match="no update was accepted"):
        server.aggregate(1, [wrong_key])


def test_an_update_of_another_shape_is_rejected_not_broadcast(caplog):
    """numpy would broadcast a (1,) tensor into the average of (3,) ones without a word."""
    server = FederatedServer({"w": np.zeros(3)}, FederationConfig(max_rounds=2))
    good = ClientUpdate("a", 1, {"w": np.ones(3)})
    odd = ClientUpdate("b", 1, {"w": np.full(1, 100.0)})
    extra = ClientUpdate("c", 1, {"w": np.ones(3), "v": np.ones(2)})
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(server.aggregate(0, [good, odd, extra])["w"], np.ones(3))
    assert "site 'b'" in caplog.text and "shape (1,)" in caplog.text
    assert "site 'c'" in caplog.text and "not those of the global model" in caplog.text


def _vae_and_site(seed=0, n=64, p=12):
    torch.manual_seed(seed)
    vae = KeyedVAE(n_input=p, key_mode=None)
    rng = np.random.default_rng(seed)
    site = SiteData.from_arrays("a", rng.poisson(3, (n, p)), validation_size=0.25, seed=seed)
    return vae, site


def test_client_update_is_deterministic():
    vae, site = _vae_and_site()
    start = get_shared_parameters(vae)
    cfg = ClientConfig(round=2, batch_size=16, seed=5)
    u1 = client_update(vae, site, start, cfg)
    u2 = client_update(vae, site, start, cfg)
    for name in u1.parameters:
        assert_same_weights(u1.parameters[name], u2.parameters[name])
    assert u1.n == site.n_train == 48
    assert any(not np.array_equal(u1.parameters[n], start[n]) for n in start)


def test_fedprox_term_pulls_towards_global():
    vae, site = _vae_and_site()
    start = get_shared_parameters(vae)

    def drift(mu):
        update = client_update(
            vae, site, start, ClientConfig(round=0, batch_size=8, local_epochs=3, lr=1e-2, mu=mu)
        )
        return sum(float(((update.parameters[n] - start[n]) ** 2).sum()) for n in start)

    assert drift(100.0) < 0.5 * drift(0.0)


def test_kl_weight_follows_global_round():
    cfg = FederationConfig(max_rounds=10, kl_warmup_rounds=4)
    assert [cfg.kl_weight(r) for r in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert cfg.client_config(1).kl_weight == 0.5


def test_site_sampling_fraction_is_seeded():
    server = FederatedServer({}, FederationConfig(max_rounds=3, fraction=0.5, seed=1))
    sites = [f"s{i}" for i in range(6)]
    picked = server.sample_sites(sites, 0)
    assert len(picked) == 3 and picked == server.sample_sites(sites, 0)
    assert any(server.sample_sites(sites, r) != picked for r in range(1, 5))


def test_set_shared_parameters_refuses_other_feature_space():
    small, big = KeyedVAE(n_input=10, key_mode=None), KeyedVAE(n_input=12, key_mode=None)
    with pytest.raises(ValueError, match="feature space"):
        set_shared_parameters(small, get_shared_parameters(big))


def test_minibatches_cover_training_rows_once():
    site = SiteData.from_arrays("a", np.arange(50 * 2).reshape(50, 2), validation_size=0.2, seed=0)
    seen = np.concatenate(
        [
            b["X"][:, 0].numpy() // 2
            for b in site.minibatches("train", 16, torch.Generator().manual_seed(0))
        ]
    )
    assert sorted(seen.astype(int)) == sorted(site.train_idx)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition(method, counts_adata):
    sites = partition(
        counts_adata, n_sites=4, method=method, label_key="label", key_added="sim", seed=0
    )
    assert sites.nunique() <= 4 and (counts_adata.obs["sim"] == sites).all()


def test_partition_by_column(counts_adata):
    sites = partition(counts_adata, method="column", column="label")
    assert set(sites.cat.categories) == set(counts_adata.obs["label"].astype(str))
    with pytest.raises(ValueError, match="column="):
        partition(counts_adata, method="column")
