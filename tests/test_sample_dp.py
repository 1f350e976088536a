"""Sample-level DP at the sites (DP-SGD): the accountant, the clipped noisy step, the protocol."""

import logging

import numpy as np
import pytest
import torch

import scinfl
from scinfl.federated import (
    ClientConfig,
    DPSGDPlan,
    FederationConfig,
    RefusedMessageError,
    SiteData,
    SiteProtocol,
    SiteRuntime,
    client_update,
    dp_sgd_epsilon,
    get_shared_parameters,
)
from scinfl.federated._sample_dp import private_gradients
from scinfl.module import KeyedVAE

from ._equality import assert_same_weights

pytest.importorskip("flwr", reason="the accountant is Flower's")


@pytest.mark.parametrize(
    ("epsilon", "n_rows", "batch_size", "rounds"),
    [(1.0, 200, 128, 10), (3.0, 600, 128, 20), (8.0, 40, 128, 50)],
)
def test_plan_spends_at_most_the_target_over_the_run(epsilon, n_rows, batch_size, rounds):
    plan = DPSGDPlan.for_site(epsilon, 1.0, 1e-5, n_rows, batch_size, rounds, 2)
    steps = rounds * 2 * plan.steps_per_epoch
    spent = plan.epsilon(steps)
    assert 0.97 * epsilon <= spent <= epsilon
    assert plan.epsilon(steps // 2) < spent  # spent grows with the rounds
    assert plan.sample_rate == min(1.0, batch_size / n_rows)


def test_a_smaller_site_needs_more_noise_for_the_same_epsilon():
    small = DPSGDPlan.for_site(3.0, 1.0, 1e-5, 100, 32, 10, 1)
    large = DPSGDPlan.for_site(3.0, 1.0, 1e-5, 1000, 32, 10, 1)
    assert small.noise_multiplier > large.noise_multiplier
    # more noise for less epsilon, everything else equal
    assert dp_sgd_epsilon(2.0, 0.1, 50, 500, 1e-5) < dp_sgd_epsilon(1.0, 0.1, 50, 500, 1e-5)


def _site(n=60, n_vars=10, seed=0):
    rng = np.random.default_rng(seed)
    return SiteData.from_arrays("a", rng.poisson(3, (n, n_vars)), validation_size=0)


def test_one_row_step_is_that_rows_gradient_clipped():
    """Without noise, one row's private gradient is its own gradient, clipped to the norm."""
    site = _site()
    vae = KeyedVAE(n_input=10, key_mode=None, dropout_rate=0.0)
    vae.train()
    row = np.array([3])
    torch.manual_seed(0)
    vae.zero_grad()
    _, _, out = vae(site.tensors(row), loss_kwargs={"kl_weight": 0.5})
    out.loss.backward()
    reference = [p.grad.clone() for p in vae.parameters() if p.requires_grad]
    norm = float(torch.sqrt(sum((g**2).sum() for g in reference)))
    for clipping in (10 * norm, norm / 4):  # unclipped, then clipped
        plan = DPSGDPlan(1, 1.0, 1, noise_multiplier=0.0, clipping_norm=clipping, delta=1e-5)
        torch.manual_seed(0)
        grads = private_gradients(vae, site, row, plan, 0.5, torch.Generator())
        scale = min(1.0, clipping / norm)
        for got, want in zip(grads, reference, strict=True):
            torch.testing.assert_close(got, want * scale, atol=1e-5, rtol=1e-4)


def test_every_row_is_bounded_by_the_clipping_norm():
    site = _site()
    vae = KeyedVAE(n_input=10, key_mode=None)
    plan = DPSGDPlan(60, 0.5, 2, noise_multiplier=0.0, clipping_norm=1e-3, delta=1e-5)
    rows = np.arange(30)
    grads = private_gradients(vae, site, rows, plan, 1.0, torch.Generator())
    total = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    # the sum of 30 clipped rows over the expected batch (30): at most the clipping norm
    assert 0 < total <= 1e-3 * 1.0001


def test_noise_comes_from_the_sites_secret_not_the_federation_seed():
    site = _site()
    config = ClientConfig(round=0, batch_size=16, max_rounds=3, sample_dp_epsilon=3.0)

    def upload(dp_seed):
        vae = KeyedVAE(n_input=10, key_mode=None)
        torch.manual_seed(1)
        start = get_shared_parameters(KeyedVAE(n_input=10, key_mode=None))
        return client_update(vae, site, start, config, dp_seed=dp_seed)

    same, again, other = upload(7), upload(7), upload(8)
    name = next(iter(same.parameters))
    # the same seed: the same upload, up to float32 rounding (kernels may sum in another order)
    assert_same_weights(again.parameters[name], same.parameters[name])
    assert not np.allclose(other.parameters[name], same.parameters[name], rtol=1e-3)
    assert set(same.metrics) == {"dp_epsilon", "dp_noise_multiplier"}  # no losses


def test_settings_that_read_the_data_outside_the_noise_are_refused():
    with pytest.raises(ValueError, match="early_stopping"):
        FederationConfig.from_settings(sample_dp_epsilon=3.0, early_stopping=True)
    with pytest.raises(ValueError, match="balance_classes"):
        FederationConfig.from_settings(sample_dp_epsilon=3.0, balance_classes=True)
    with pytest.raises(ValueError, match="> 0"):
        FederationConfig.from_settings(sample_dp_epsilon=0.0)
    assert (
        FederationConfig.from_settings(sample_dp_epsilon=3.0, validation_size=0.2).validation_size
        == 0.0
    )


def test_a_site_refuses_weaker_privacy_than_its_own_settings():
    site = _site()
    federation = FederationConfig.from_settings(max_rounds=3, batch_size=16, sample_dp_epsilon=3.0)
    protocol = SiteProtocol(
        SiteRuntime(KeyedVAE(n_input=10, key_mode=None), site, federation=federation)
    )
    initial = protocol.parameters()
    honest = federation.client_config(0)
    for weaker in (
        ClientConfig(**{**honest.__dict__, "sample_dp_epsilon": 0.0}),
        ClientConfig(**{**honest.__dict__, "sample_dp_epsilon": 50.0}),
        ClientConfig(**{**honest.__dict__, "max_rounds": 1}),
    ):
        with pytest.raises(RefusedMessageError, match="instructions differ"):
            protocol.train(initial, weaker)
    update = protocol.train(initial, honest)
    assert update.metrics["dp_epsilon"] < 3.0
    reply = protocol.evaluate(update.parameters, federation.client_config(1))
    assert reply.metrics == {"n_val": 0.0}  # no validation loss leaves the site


def test_train_federated_with_sample_dp_reports_epsilon_in_the_history(caplog):
    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=20, n_sites=3)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    with caplog.at_level(logging.INFO):
        history = model.train_federated(
            max_rounds=3, batch_size=32, sample_dp_epsilon=2.0, progress_bar=False
        )
    assert history["dp_epsilon"].max() <= 2.0
    assert history.groupby("site")["dp_epsilon"].is_monotonic_increasing.all()
    assert "train_loss" not in history and (history["n_val"] == 0).all()
    assert np.isfinite(model.get_latent_representation()).all()
    assert set(model.predict()) <= set(adata.obs["label"])


def test_secure_aggregation_and_frames_combine_with_sample_dp():
    adata = scinfl.data.synthetic_counts(n_obs=180, n_vars=12, n_sites=3)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    history = model.train_federated(
        max_rounds=2, batch_size=32, privacy="secagg", sample_dp_epsilon=4.0, progress_bar=False
    )
    assert history["dp_epsilon"].max() <= 4.0
    assert np.isfinite(model.get_latent_representation()).all()


def test_resume_under_sample_dp_keeps_the_planned_rounds(tmp_path):
    adata = scinfl.data.synthetic_counts(n_obs=120, n_vars=12, n_sites=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    settings = {"batch_size": 32, "sample_dp_epsilon": 4.0, "progress_bar": False}
    model.train_federated(max_rounds=2, checkpoint_dir=tmp_path, **settings)
    with pytest.raises(ValueError, match="part of the budget"):
        model.train_federated(max_rounds=4, checkpoint_dir=tmp_path, resume=True, **settings)
