import numpy as np
import pytest
import torch

from scinfl import Key
from scinfl.federated import ClientConfig, SiteData, client_update, get_shared_parameters, site_seed
from scinfl.key import MissingKeyError
from scinfl.module import KeyedVAE
from scinfl.privacy import (
    analytic_attack,
    analytic_inversion,
    attacker_module,
    candidate_set,
    class_of_unit,
    class_order_from_prevalence,
    decoder_bias_attack,
    decoder_inversion,
    dlg,
    dlg_init,
    dlg_labels,
    dlg_optimize,
    gradient_from_update,
    infer_label,
    label_recovery,
    make_tensors,
    partial_correlation,
    reidentification_rate,
    reidentify,
    shared_parameter_names,
    spectral_alignment_attack,
    top_k_overlap,
    upload_gradient,
)

N_GENES = 60


@pytest.fixture(scope="module")
def cells():
    """Counts with a shared mean profile and cell-specific programmes, plus a public reference."""
    rng = np.random.default_rng(0)
    base = rng.gamma(1.0, 2.0, N_GENES)
    programmes = rng.gamma(1.0, 1.0, (4, N_GENES))
    types = rng.integers(0, 4, 300)
    x = rng.poisson(base * programmes[types] * rng.lognormal(0, 0.3, (300, 1))).astype(np.float32)
    x[:, 0] += 1  # no empty cell
    logx = np.log1p(x)
    return x, logx, logx[150:].mean(0), types


def _vae(mode, key=None, **kwargs):
    torch.manual_seed(0)
    vae = KeyedVAE(n_input=N_GENES, key_mode=mode, **kwargs)
    if mode is not None:
        vae.set_key(key or Key(bytes(range(32))))
        # away from the identity modulation of a freshly keyed layer
        with torch.no_grad():
            for name, p in vae.named_parameters():
                if "scale_out" in name or "film_out" in name:
                    p.normal_(0, 0.3)
    return vae


# -- metrics ---------------------------------------------------------------------------------------
def test_partial_correlation_is_scale_free_and_removes_the_reference():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=200)
    x = ref + rng.normal(size=200)
    assert partial_correlation(-2 * x + 5, x, ref) == pytest.approx(-1.0)
    # a reconstruction that is only the public profile scores ~0 given the profile, ~high raw
    only_ref = 3 * ref + 1
    assert abs(partial_correlation(only_ref, x, ref)) < 1e-8
    assert partial_correlation(only_ref, x) > 0.5
    rows = partial_correlation(np.stack([x, ref]), np.stack([x, x]), ref)
    assert rows.shape == (2,) and rows[0] == pytest.approx(1.0)


def test_reidentification_and_candidates():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(300, 40))
    rows = candidate_set(300, victim=5, n_candidates=100, seed=0)
    assert rows[0] == 5 and len(np.unique(rows)) == 100
    assert reidentify(data[rows[0]] * 3, data[rows]) == 0
    assert (
        reidentification_rate(data[:10] + 0.01 * rng.normal(size=(10, 40)), range(10), data) == 1.0
    )
    noise = rng.normal(size=(50, 40))
    assert reidentification_rate(noise, range(50), data) < 0.2
    with pytest.raises(ValueError):
        candidate_set(50, 0, n_candidates=100)


def test_top_k_overlap_and_label_recovery():
    x = np.arange(100.0)
    assert top_k_overlap(x, x, k=10) == 1.0
    assert top_k_overlap(-x, x, k=10) == 0.0
    assert label_recovery([0, 1, 2, 2], [0, 1, 2, 0]) == 0.75


# -- upload and analytic inversion ---------------------------------------------------------------------
def test_analytic_inversion_of_a_linear_layer_is_exact():
    layer = torch.nn.Linear(5, 3)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0, 3.0]])
    layer(x).tanh().sum().backward()
    grads = {"l.weight": layer.weight.grad, "l.bias": layer.bias.grad}
    np.testing.assert_allclose(analytic_inversion(grads, "l"), x[0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [None, "pooled"])
def test_analytic_attack_recovers_the_input_without_the_key(mode, cells):
    x, logx, ref, _ = cells
    vae = _vae(mode)
    recs = []
    for i in range(3):
        grads = upload_gradient(vae, make_tensors(x[i]), stochastic=True, seed=i)
        recs.append(analytic_attack(attacker_module(vae, "none"), grads))
        assert partial_correlation(recs[-1], logx[i], ref) > 0.99
    assert reidentification_rate(np.stack(recs), range(3), logx, ref) == 1.0


def test_analytic_attack_fails_against_feature_mode(cells):
    x, logx, ref, _ = cells
    key = Key(bytes(range(1, 33)))  # fixed: the test must not depend on a random draw
    vae = _vae("feature", key=key)
    scores = {"none": [], "wrong": [], "correct": []}
    for i in range(8):
        grads = upload_gradient(vae, make_tensors(x[i]), stochastic=True, seed=i)
        for guess in scores:
            att = attacker_module(vae, key if guess == "correct" else guess, seed=i)
            scores[guess].append(partial_correlation(analytic_attack(att, grads), logx[i], ref))
    assert abs(np.mean(scores["none"])) < 0.1
    assert abs(np.mean(scores["wrong"])) < 0.1
    # with the key the server would see a (lossy) projection of the input
    assert np.mean(scores["correct"]) > np.mean(scores["wrong"]) + 0.2


def test_feature_mode_shares_nothing_per_feature(key, cells):
    x, *_ = cells
    vae = _vae("feature", key=key)
    state = vae.state_dict()
    assert not [n for n in state if "coordinates" in n]
    # nothing that a sample moves has one entry per feature (the heads the NB likelihood does
    # not use are not part of the model)
    grads = upload_gradient(vae, make_tensors(x[:2]))
    moved = [n for n, g in grads.items() if N_GENES in g.shape and float(g.abs().sum()) > 0]
    assert not moved
    per_feature = {n.rsplit(".", 2)[1] for n, t in state.items() if N_GENES in t.shape}
    assert per_feature == set()
    # the per-feature parameters still exist, computed from the key
    assert vae.px_r.shape == (N_GENES,)


def test_feature_mode_output_depends_on_key(cells):
    x, *_ = cells
    vae = _vae("feature")
    vae.eval()
    t = make_tensors(x[:4])
    qz1 = vae.inference(**vae._get_inference_input(t))["qz"].loc
    vae.set_key(Key(bytes(range(2, 34))))
    qz2 = vae.inference(**vae._get_inference_input(t))["qz"].loc
    assert not torch.allclose(qz1, qz2)


def test_feature_mode_install_model_is_idempotent(key):
    vae = _vae("feature", key=key)
    names = sorted(vae.state_dict())
    vae._key_mode.install_model(vae)
    assert sorted(vae.state_dict()) == names


def test_gradient_recovered_from_a_one_step_adam_update(cells):
    """The server sees parameters, not gradients: one local Adam step is inverted exactly."""
    x, logx, ref, _ = cells
    vae = _vae(None)
    site = SiteData.from_arrays("victim", x[:1])
    config = ClientConfig(round=0, batch_size=8)
    global_parameters = get_shared_parameters(vae)
    update = client_update(vae, site, global_parameters, config)
    grads = gradient_from_update(
        global_parameters,
        update.parameters,
        lr=config.lr,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    rec = analytic_attack(attacker_module(vae), grads)
    assert partial_correlation(rec, logx[0], ref) > 0.99
    # and it is the gradient of the client's loss
    from scinfl.federated import set_shared_parameters

    set_shared_parameters(vae, global_parameters)
    direct = upload_gradient(
        vae, make_tensors(x[:1]), stochastic=True, seed=site_seed(0, 0, "victim")
    )
    name = "z_encoder.encoder.fc_layers.Layer 0.0.bias"
    np.testing.assert_allclose(grads[name].numpy(), direct[name].numpy(), rtol=1e-2, atol=1e-5)


def test_upload_gradient_covers_shared_parameters(key):
    vae = _vae("pooled", key=key)
    grads = upload_gradient(vae, make_tensors(np.ones(N_GENES)))
    assert set(grads) == set(shared_parameter_names(vae))
    assert not [n for n in grads if "coordinates" in n]


def test_attacker_module_key_guesses(key):
    vae = _vae("pooled", key=key)
    none = attacker_module(vae, "none")
    assert float(none.key_encoder.coordinates.abs().sum()) == 0
    wrong = attacker_module(vae, "wrong", seed=1)
    assert not torch.equal(wrong.key_encoder.coordinates, vae.key_encoder.coordinates)
    right = attacker_module(vae, key)
    assert torch.equal(right.key_encoder.coordinates, vae.key_encoder.coordinates)
    assert vae.key_encoder.coordinates is not None  # the original is untouched
    with pytest.raises(ValueError):
        attacker_module(vae, "guess")


def test_idlg_label_inference(cells):
    x, _, _, types = cells
    vae = _vae(None, n_labels=4, classify=True)
    found = [
        infer_label(upload_gradient(vae, make_tensors(x[i], labels=[types[i]])), "classifier.3")
        for i in range(6)
    ]
    assert label_recovery(found, types[:6]) == 1.0


def test_keyed_class_order_hides_the_idlg_label(cells):
    """The key decides which output unit carries each class: iDLG finds the unit, and only
    the correct key maps it to the class."""
    x, _, _, types = cells
    key = Key(bytes(range(32)))
    order = key.permutation(4).tolist()
    vae = _vae("pooled", key=key, n_labels=4, classify=True)
    assert vae.class_order.tolist() == order
    rows = [int(np.flatnonzero(types == c)[0]) for c in range(4)]  # one sample of each class
    units = [
        infer_label(upload_gradient(vae, make_tensors(x[i], labels=[types[i]])), "classifier.3")
        for i in rows
    ]
    assert units == order  # the unit of class c is order[c]
    recovered = {}
    for guess in ("correct", "none", "wrong"):
        attacker = attacker_module(vae, guess, seed=0)
        found = [class_of_unit(attacker, u) for u in units]
        guessed = attacker.class_order.tolist()
        # the attacker reads class c exactly when its order agrees with the key's on c
        expected = np.mean([guessed[c] == order[c] for c in range(4)])
        recovered[guess] = label_recovery(found, list(range(4)))
        assert recovered[guess] == expected
    assert recovered["correct"] == 1.0
    assert recovered["none"] < 1.0 and recovered["wrong"] < 1.0


def test_class_order_is_found_from_many_uploads_and_public_prevalence(cells):
    """The class order hides one upload's label, not the label frequencies over many."""
    x, _, _, _ = cells
    key = Key(bytes(range(32)))
    vae = _vae("pooled", key=key, n_labels=4, classify=True)
    rng = np.random.default_rng(1)
    prevalence = np.array([0.1, 0.5, 0.3, 0.1]) + np.array([0, 0, 0, 0.05])
    labels = rng.choice(4, 80, p=prevalence / prevalence.sum())
    units = [
        infer_label(upload_gradient(vae, make_tensors(x[i], labels=[labels[i]])), "classifier.3")
        for i in range(80)
    ]
    public_counts = np.bincount(rng.choice(4, 200, p=prevalence / prevalence.sum()), minlength=4)
    guess = class_order_from_prevalence(units, public_counts)
    assert guess.tolist() == key.permutation(4).tolist()
    with pytest.raises(ValueError, match="number of classes"):
        class_order_from_prevalence([5], [1, 1])


def test_class_order_needs_the_key_and_a_permutation():
    vae = KeyedVAE(n_input=N_GENES, n_labels=3, classify=True, key_mode="pooled")
    with pytest.raises(MissingKeyError, match="set_key"):
        vae.classification_logits(torch.zeros(2, vae.n_latent))
    with pytest.raises(ValueError, match="permutation"):
        vae.set_class_order(torch.tensor([0, 0, 1]))
    vae.set_key(Key(bytes(range(32))))
    assert vae.classification_logits(torch.zeros(2, vae.n_latent)).shape == (2, 3)
    vae.set_key(None)
    assert vae.class_order is None


def test_dlg_runs_and_improves_on_plain_model(cells):
    x, logx, ref, _ = cells
    vae = _vae(None)
    grads = upload_gradient(vae, make_tensors(x[0]))
    rec = dlg(vae, grads, n_iter=150, lr=0.1)
    assert rec.x.shape == (1, N_GENES)
    assert rec.history[0] > rec.loss
    assert partial_correlation(rec.x[0], logx[0], ref) > 0.5


def test_dlg_is_setup_then_optimisation_then_label_recovery(cells):
    """dlg composes its three steps: run by hand, they give the same reconstruction."""
    x, _, ref, _ = cells
    vae = _vae("pooled", n_labels=4, classify=True)
    grads = upload_gradient(vae, make_tensors(x[:2], labels=[1, 3]))
    attacker = attacker_module(vae, "wrong", seed=0)
    kwargs = {"n_iter": 12, "lr": 0.05, "prior_weight": 0.01, "reference": ref}
    rec = dlg(attacker, grads, n_samples=2, labels="optimize", init="mean", seed=3, **kwargs)
    dummy = dlg_init(attacker, grads, 2, labels="optimize", init="mean", reference=ref, seed=3)
    assert dummy.label_logits is not None and tuple(dummy.x.shape) == (2, N_GENES)
    loss, history, material = dlg_optimize(attacker, grads, dummy, **kwargs)
    np.testing.assert_array_equal(dummy.profile().detach().double().numpy(), rec.x)
    np.testing.assert_array_equal(dlg_labels(dummy), rec.labels)
    assert (loss, history, material) == (rec.loss, rec.history, None)


def test_adaptive_attacker_optimises_the_key_with_the_input(cells):
    """The adaptive attacker fits the key material too: it matches the upload better than the
    same attack held at its wrong key, and the attacker's own module is left as it was."""
    x, logx, ref, _ = cells
    vae = _vae("pooled", n_labels=4, classify=True)
    grads = upload_gradient(vae, make_tensors(x[0], labels=[1]))
    attacker = attacker_module(vae, "wrong", seed=0)
    start = attacker.key_encoder.coordinates.clone()
    kwargs = {"labels": "optimize", "n_iter": 60, "lr": 0.05, "init": "mean", "reference": ref}
    fixed = dlg(attacker, grads, **kwargs)
    adaptive = dlg(attacker, grads, optimize_key=True, **kwargs)
    assert adaptive.loss < fixed.loss
    assert adaptive.key_material.shape == tuple(start.shape)
    assert not np.allclose(adaptive.key_material, start.numpy())
    assert torch.equal(attacker.key_encoder.coordinates, start)
    assert fixed.key_material is None
    # a prior on the public profile pulls the reconstruction towards it
    pulled = dlg(attacker, grads, prior_weight=100.0, **kwargs)
    assert np.abs(pulled.x[0] - ref).mean() < np.abs(fixed.x[0] - ref).mean()


def test_adaptive_attacker_needs_continuous_key_material():
    with pytest.raises(ValueError, match="keyed module"):
        dlg(_vae(None), {}, optimize_key=True)
    feature = _vae("feature")
    with pytest.raises(ValueError, match="discrete"):
        dlg(feature, {}, optimize_key=True)


def test_constant_reconstruction_is_never_reidentified():
    data = np.random.default_rng(3).normal(size=(150, 20))
    assert reidentification_rate(np.ones((5, 20)), range(5), data) == 0.0


@pytest.mark.parametrize("mode", [None, "pooled"])
def test_decoder_gradients_alone_give_the_counts(mode, cells):
    """The output side leaks too: latent from the decoder's first layer, counts from the
    output-bias and dispersion gradients."""
    x, logx, ref, _ = cells
    vae = _vae(mode)
    for i in range(3):
        grads = upload_gradient(vae, make_tensors(x[i]))
        attacker = attacker_module(vae, "wrong", seed=i)
        assert partial_correlation(decoder_inversion(attacker, grads), logx[i], ref) > 0.99
        assert partial_correlation(decoder_bias_attack(attacker, grads), logx[i], ref) > 0.3


def test_decoder_attacks_fail_against_feature_mode_without_key(cells):
    x, logx, ref, _ = cells
    key = Key(bytes(range(1, 33)))  # fixed: the test must not depend on a random draw
    vae = _vae("feature", key=key)
    wrong, right = [], []
    for i in range(6):
        grads = upload_gradient(vae, make_tensors(x[i]))
        rec = decoder_inversion(attacker_module(vae, "wrong", seed=i), grads)
        wrong.append(partial_correlation(rec, logx[i], ref))
        right.append(
            partial_correlation(decoder_inversion(attacker_module(vae, key), grads), logx[i], ref)
        )
    assert abs(np.mean(wrong)) < 0.1
    assert np.mean(right) > 0.99


def test_secret_basis_is_orthogonal_and_keyed_layers_keep_the_function(key):
    from scinfl.module.experimental import BasisInputLinear, BasisOutputLinear, SecretBasis

    basis = SecretBasis(20)
    basis.set_coordinates(torch.from_numpy(key.coordinates(basis.size, dim=6, purpose="feature")))
    eye = torch.eye(basis.size)
    t = basis(eye)
    torch.testing.assert_close(t @ t.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(basis.inverse(basis(eye)), eye, atol=1e-5, rtol=0)
    linear_in, linear_out = torch.nn.Linear(20, 7), torch.nn.Linear(7, 20)
    x, h = torch.randn(5, 20), torch.randn(5, 7)
    keyed_in = BasisInputLinear.from_linear(linear_in, key_source=basis, n_features=20)
    keyed_out = BasisOutputLinear.from_linear(linear_out, key_source=basis)
    torch.testing.assert_close(keyed_in(x), linear_in(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keyed_out(h), linear_out(h), atol=1e-5, rtol=1e-5)
    # without the key the basis is the public Hadamard transform, not the secret one
    basis.set_coordinates(torch.zeros(basis.size, 6))
    assert not torch.allclose(keyed_in(x), linear_in(x), atol=1e-3)


def test_spectral_alignment_undoes_an_orthogonal_map_of_low_rank_data():
    rng = np.random.default_rng(0)
    scores = rng.gamma(1.0, 1.0, (600, 3)) * [6.0, 3.0, 1.5]
    data = scores @ rng.normal(size=(3, 32)) + 0.05 * rng.normal(size=(600, 32))
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    rec = spectral_alignment_attack(data[:300] @ q.T, data[300:], n_components=3)
    assert np.mean(partial_correlation(rec, data[:300], data[300:].mean(0))) > 0.9


def test_feature_mode_trains_federated(counts_adata, key):
    import scinfl

    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site")
    model = scinfl.model.INFL(counts_adata, key=key, key_mode="feature", n_hidden=16)
    model.module._key_mode.install_model(model.module)
    history = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
    assert np.isfinite(history["train_loss"]).all()
    assert model.get_latent().shape == (counts_adata.n_obs, 10)


def test_infl_feature_mode_keys_the_decoder_and_survives_save_load(tmp_path, counts_adata):
    import scinfl

    key = Key(bytes(range(2, 34)))
    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site")
    model = scinfl.model.INFL(counts_adata, key=key, key_mode="feature", n_hidden=16, n_latent=4)
    state = model.module.state_dict()
    # no per-feature dispersion or plain per-feature decoder head is shared
    assert not [n for n in state if n.endswith("px_r")]
    assert type(model.module.decoder.px_scale_decoder[0]).__name__ != "Linear"
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    model.save(tmp_path / "model")
    loaded = scinfl.model.INFL.load(tmp_path / "model", counts_adata, key=key)
    np.testing.assert_allclose(loaded.get_latent(), model.get_latent(), atol=1e-5)
