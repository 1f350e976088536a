"""Per-feature standardisation of the normal likelihood (KeyedVAE.set_feature_scale)."""

import numpy as np
import pytest
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS

from scinfl.module import KeyedVAE, feature_moments, scale_from_moments


def _data(n=256, p=12, seed=0):
    # two latent factors, feature-specific noise
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    x = z @ rng.normal(size=(2, p)) + 0.3 * rng.normal(size=(n, p))
    return x.astype(np.float32)


def _tensors(x):
    n = x.shape[0]
    return {
        REGISTRY_KEYS.X_KEY: torch.as_tensor(x),
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(n, 1, dtype=torch.long),
        REGISTRY_KEYS.LABELS_KEY: torch.zeros(n, 1, dtype=torch.long),
    }


def _vae(p, seed=0):
    torch.manual_seed(seed)
    return KeyedVAE(n_input=p, gene_likelihood="normal", key_mode=None, n_hidden=16, n_latent=2)


def _fit(x, loc=None, scale=None, steps=150):
    vae = _vae(x.shape[1])
    if loc is not None:
        vae.set_feature_scale(loc, scale)
    optimiser = torch.optim.Adam(vae.parameters(), lr=1e-2)
    tensors = _tensors(x)
    torch.manual_seed(1)
    for _ in range(steps):
        optimiser.zero_grad()
        vae(tensors)[2].loss.backward()
        optimiser.step()
    vae.eval()
    with torch.no_grad():
        _, generative, loss = vae(tensors)
    return vae, generative["px"], loss


def test_identity_by_default():
    vae = _vae(12)
    assert torch.equal(vae.feature_loc, torch.zeros(12))
    assert torch.equal(vae.feature_scale, torch.ones(12))
    assert {"feature_loc", "feature_scale"} <= set(vae.state_dict())
    # count likelihoods have no feature scale
    counts = KeyedVAE(n_input=12, key_mode=None)
    assert "feature_loc" not in counts.state_dict()
    with pytest.raises(ValueError, match="normal"):
        counts.set_feature_scale(np.zeros(12), np.ones(12))


def test_state_dict_without_scale_keeps_the_modules_own():
    old = {k: v for k, v in _vae(12).state_dict().items() if not k.startswith("feature_")}
    fresh = _vae(12)
    fresh.load_state_dict(old)  # a model saved before feature scaling: the identity
    assert torch.equal(fresh.feature_loc, torch.zeros(12))
    assert torch.equal(fresh.feature_scale, torch.ones(12))
    vae = _vae(12)
    vae.set_feature_scale(np.full(12, 3.0), np.full(12, 2.0))
    vae.load_state_dict(old)  # the shared parameters never carry it: a site keeps its own
    assert torch.equal(vae.feature_loc, torch.full((12,), 3.0))


def test_feature_scale_never_travels():
    from scinfl.federated import get_shared_parameters, set_shared_parameters

    vae = _vae(6)
    vae.set_feature_scale(np.full(6, 25.0), np.full(6, 3.0))
    shared = get_shared_parameters(vae)
    assert not any(name.startswith("feature_") for name in shared)
    other = _vae(6)
    other.set_feature_scale(np.full(6, 25.0), np.full(6, 3.0))
    set_shared_parameters(other, shared)
    assert torch.equal(other.feature_scale, torch.full((6,), 3.0))
    with pytest.raises(ValueError, match="missing"):
        set_shared_parameters(other, {k: v for k, v in shared.items() if k != "px_r"})


def test_bad_feature_scale_is_refused():
    vae = _vae(4)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        vae.set_feature_scale(np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        vae.set_feature_scale(np.array([0.0, np.nan, 0.0, 0.0]), np.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        vae.set_feature_scale(np.zeros(4), -np.ones(4))
    vae.set_feature_scale(torch.zeros(4), torch.tensor([1.0, 0.0, 2.0, 1.0]))
    assert vae.feature_scale[1] > 0


def test_same_model_on_any_affine_scale():
    # 3 * x + 25 with its own location and scale trains the same network as x with its own
    x = _data()
    y = 3.0 * x + 25.0
    vae_x, px_x, loss_x = _fit(x, *scale_from_moments(*feature_moments(x)))
    vae_y, px_y, loss_y = _fit(y, *scale_from_moments(*feature_moments(y)))
    torch.testing.assert_close(loss_x.loss, loss_y.loss, rtol=1e-3, atol=1e-3)
    # reconstructions are on each input's own scale
    torch.testing.assert_close(3.0 * px_x.loc + 25.0, px_y.loc, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(3.0 * px_x.scale, px_y.scale, rtol=1e-3, atol=1e-3)
    # and the fit is good: standardised reconstruction error well below the variance (1)
    z = (x - x.mean(0)) / x.std(0)
    z_hat = (px_x.loc.numpy() - x.mean(0)) / x.std(0)
    assert np.mean((z - z_hat) ** 2) < 0.5


@pytest.mark.parametrize("factor", [1e-7, 1e-5, 1e6, 1e30])
def test_same_model_in_units_far_from_one(factor):
    # spreads below 1e-6 were taken as constant (the model ignored those features), and
    # values beyond ~1e19 overflowed float32 when the likelihood squared them (NaN loss)
    x = _data()
    y = x * np.float32(factor)
    loc, scale = scale_from_moments(*feature_moments(y))
    np.testing.assert_allclose(
        scale, scale_from_moments(*feature_moments(x))[1] * factor, rtol=1e-5
    )
    _, _, loss_x = _fit(x, *scale_from_moments(*feature_moments(x)), steps=20)
    _, _, loss_y = _fit(y, loc, scale, steps=20)
    torch.testing.assert_close(loss_x.loss, loss_y.loss, rtol=1e-3, atol=1e-3)


def test_raw_scale_without_standardisation_fits_worse():
    # the offset of 25 costs the unscaled model most of its training budget
    x = _data()
    y = 3.0 * x + 25.0
    _, _, scaled = _fit(y, *scale_from_moments(*feature_moments(y)))
    _, px_raw, _ = _fit(y)
    z = (y - y.mean(0)) / y.std(0)
    z_raw = (px_raw.loc.numpy() - y.mean(0)) / y.std(0)
    assert np.mean((z - z_raw) ** 2) > 5.0


def test_missing_values_stay_masked():
    x = _data(n=32)
    x[:, :3] = np.nan
    vae = _vae(x.shape[1])
    loc, scale = scale_from_moments(*feature_moments(x))
    vae.set_feature_scale(loc, scale)
    vae.eval()
    _, generative, loss = vae(_tensors(x))
    assert torch.isfinite(loss.loss)
    # a feature never observed has no scale (0: treated as missing); others are standardised
    assert np.all(loc[:3] == 0) and np.all(scale[:3] == 0)
    assert vae.feature_observed.tolist() == [False] * 3 + [True] * 9
    x_filled = x.copy()
    x_filled[:, :3] = 7.0
    px = generative["px"]
    expected = -(px.log_prob(torch.as_tensor(x_filled))[:, 3:] + torch.log(vae.feature_scale[3:]))
    torch.testing.assert_close(vae.reconstruction_loss(torch.as_tensor(x), px), expected.sum(-1))
    # missing entries reach the encoder as the feature's location (0 once standardised)
    inputs = vae._get_inference_input(_tensors(x))["x"]
    assert torch.equal(inputs[:, :3], torch.zeros(32, 3))
    assert torch.isfinite(inputs).all()


def test_features_too_rare_to_scale_are_missing_also_in_new_samples():
    """Values of a feature seen fewer than twice in training would meet untrained weights."""
    x = _data(n=32) + 25.0  # log2 intensities
    x[:, 0] = np.nan  # never quantified in training
    x[1:, 1] = np.nan  # quantified once
    vae = _vae(x.shape[1])
    vae.set_feature_scale(*scale_from_moments(*feature_moments(x)))
    assert vae.feature_observed.tolist() == [False, False] + [True] * 10
    new = _data(n=8, seed=3) + 25.0  # new samples that quantify both
    without = new.copy()
    without[:, :2] = np.nan
    vae.eval()
    with torch.no_grad():
        seen = vae._get_inference_input(_tensors(new))["x"]
        torch.testing.assert_close(seen, vae._get_inference_input(_tensors(without))["x"])
        px = vae(_tensors(new))[1]["px"]
        torch.testing.assert_close(
            vae.reconstruction_loss(torch.as_tensor(new), px),
            vae.reconstruction_loss(torch.as_tensor(without), px),
        )
    # a model saved before the mark existed loads as "every feature observed"
    state = {k: v for k, v in vae.state_dict().items() if k != "feature_observed"}
    fresh = _vae(x.shape[1])
    fresh.load_state_dict(state)
    assert fresh.feature_observed.all()


def test_a_spread_from_a_few_close_values_is_floored_at_the_typical_scale():
    x = np.random.default_rng(0).normal(25.0, 2.0, size=(40, 5))
    x[2:, 0] = np.nan
    x[:2, 0] = [25.0, 25.02]  # two close values: a scale of 0.01 would put new samples far out
    loc, scale = scale_from_moments(*feature_moments(x))
    assert scale[0] >= np.median(scale[1:]) and np.allclose(scale[1:], np.nanstd(x[:, 1:], 0))


@pytest.mark.parametrize("as_sparse", [False, True])
def test_moments_match_numpy(as_sparse):
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=(50, 6))
    x[rng.random(x.shape) < 0.3] = 0.0
    x[rng.random(x.shape) < 0.2] = np.nan
    x[:, 5] = 4.0  # constant
    data = sparse.csr_matrix(x) if as_sparse else x
    count, total, sumsq = feature_moments(data, chunk_rows=7)
    np.testing.assert_array_equal(count, (~np.isnan(x)).sum(0))
    loc, scale = scale_from_moments(count, total, sumsq)
    np.testing.assert_allclose(loc, np.nanmean(x, 0), rtol=1e-12)
    np.testing.assert_allclose(scale[:5], np.nanstd(x, 0)[:5], rtol=1e-10)
    assert scale[5] == 1.0


def test_moments_of_sites_add_up():
    x = np.random.default_rng(1).normal(25.0, 3.0, size=(40, 4)).astype(np.float32)
    x[3, 1] = np.nan
    parts = [feature_moments(x[:15]), feature_moments(x[15:])]
    summed = [a + b for a, b in zip(*parts, strict=True)]
    for got, want in zip(summed, feature_moments(x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        scale_from_moments(np.ones(3), np.ones(4), np.ones(4))


def test_normal_variance_unit_by_default_or_learned():
    x = torch.as_tensor(_data(n=16, p=4))
    unit = _vae(4)
    unit.set_feature_scale(np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]))
    unit.eval()
    px = unit(_tensors(x))[1]["px"]
    # unit standard deviation of every standardised feature: its own scale on the data's scale
    torch.testing.assert_close(px.scale, unit.feature_scale.expand(16, 4))
    torch.manual_seed(0)
    learned = KeyedVAE(
        n_input=4, gene_likelihood="normal", key_mode=None, normal_variance="feature"
    )
    learned.eval()
    expected = torch.nn.functional.softplus(learned.px_r) + 1e-3
    torch.testing.assert_close(learned(_tensors(x))[1]["px"].scale, expected.expand(16, 4))
    with pytest.raises(ValueError, match="normal_variance"):
        KeyedVAE(n_input=4, gene_likelihood="normal", normal_variance="gene")


def test_features_in_small_units_beside_large_ones_keep_their_spread():
    # a tolerance from the features' typical magnitude took molar values (1e-7) beside log2
    # intensities (25) as constant, and the model dropped their signal
    x = _data() + 25.0
    x[:, 0] = (x[:, 0] - 25.0) * 1e-7 + 3e-7
    loc, scale = scale_from_moments(*feature_moments(x))
    assert 1e-8 < scale[0] < 1e-6
