import anndata
import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from scipy import sparse

import scinfl
from scinfl import Key, KeyMismatchError, MissingKeyError
from scinfl.federated import client_update, get_shared_parameters
from scinfl.model import INFL
from scinfl.model._validation import validate_matrix

from ._equality import assert_same_weights

FAST = {"max_rounds": 2, "batch_size": 32, "progress_bar": False}


def _model(adata, key, **kwargs):
    INFL.setup_anndata(adata, layer="counts", site_key="site", labels_key="label")
    return INFL(adata, key=key, n_hidden=32, **kwargs)


def test_train_federated_history_and_outputs(counts_adata, key):
    model = _model(counts_adata, key)
    history = model.train_federated(**FAST)
    assert isinstance(history, pd.DataFrame)
    assert set(history["site"]) == {"site0", "site1", "site2"}
    assert {
        "round",
        "site",
        "n_train",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "kl_weight",
    } <= set(history)
    assert history["n_train"].sum() == 2 * sum(
        int(round(n * 0.9)) for n in counts_adata.obs["site"].value_counts()
    )
    assert model.is_trained_
    latent = model.get_latent()
    assert latent.shape == (counts_adata.n_obs, 10)
    assert np.allclose(latent, model.get_latent_representation())
    predictions = model.predict()
    assert set(predictions) <= set(counts_adata.obs["label"].cat.categories)
    probs = model.predict(soft=True)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    # scvi-tools' model.history: one row per round, losses weighted by the sites' rows
    rounds = FAST["max_rounds"]
    loss = model.history["train_loss"]["train_loss"]
    first = history[history["round"] == 0]
    assert len(loss) == rounds and loss.index.name == "epoch"
    assert np.isclose(loss.iloc[0], np.average(first["train_loss"], weights=first["n_train"]))
    # and the classifier's, as scANVI logs them, weighted by the labelled rows
    accuracy = model.history["validation_accuracy"]["validation_accuracy"]
    expected = np.average(first["val_accuracy"], weights=first["val_labelled"])
    assert len(accuracy) == rounds and np.isclose(accuracy.iloc[0], expected)
    assert {"train_accuracy", "train_classification_loss", "validation_classification_loss"} <= set(
        model.history
    )
    kl_weight = model.history["kl_weight"]["kl_weight"]  # scvi-tools logs it every epoch
    assert kl_weight.tolist() == history.groupby("round")["kl_weight"].first().tolist()
    model.train_federated(**FAST)  # a second run continues it
    assert len(model.history["validation_loss"]) == 2 * rounds


def test_scvi_tools_scores_of_several_draws_at_once(counts_adata, key):
    # the likelihood on a leading axis of posterior draws: a raw expand error before
    model = _model(counts_adata, key)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=4, n_mc_samples_per_pass=2))
    de = model.differential_expression(
        groupby="label", group1="type0", weights="importance", silent=True
    )
    assert len(de) == counts_adata.n_vars


def test_training_is_deterministic_for_a_seed(counts_adata, key):
    latents = []
    for _ in range(2):
        scvi.settings.seed = 3  # scvi-tools' way: seeds weight init and, by default, the federation
        model = _model(counts_adata.copy(), key)
        model.train_federated(**FAST)
        latents.append(model.get_latent())
    assert_same_weights(latents[0], latents[1])


def test_fedprox_and_fraction_run(counts_adata, key):
    model = _model(counts_adata, key)
    history = model.train_federated(**FAST, strategy="fedprox", mu=0.1, fraction=0.3)
    trained = history[history["n_train"] > 0].groupby("round")["site"].nunique()
    assert (trained == 1).all()
    # a site that was not sampled validated only: it is not a rejected upload
    assert history["trained"].tolist() == (history["n_train"] > 0).tolist()
    assert history.loc[history["trained"], "accepted"].all()


def test_upload_carries_no_key_material(counts_adata, key):
    model = _model(counts_adata, key)
    sites = model._site_data(0.1, seed=0)
    update = client_update(
        model.module,
        sites[0],
        get_shared_parameters(model.module),
        scinfl.federated.ClientConfig(round=0, batch_size=32),
        key.fingerprint,
        key.version,
    )
    coords = key.coordinates(128, purpose="pooled")
    assert update.key_fingerprint == key.fingerprint
    assert not [n for n in update.parameters if "coordinates" in n]
    for value in update.parameters.values():
        assert coords.tobytes() not in value.tobytes()
        if value.shape == coords.shape:
            assert not np.allclose(value, coords)


def test_save_load_roundtrip_never_saves_key(tmp_path, counts_adata, key):
    model = _model(counts_adata, key)
    model.train_federated(**FAST)
    latent = model.get_latent()
    model.save(tmp_path / "model")
    blob = b"".join(p.read_bytes() for p in (tmp_path / "model").iterdir())
    assert key._seed not in blob and key._seed.hex().encode() not in blob
    assert key.coordinates(128).tobytes() not in blob
    loaded = INFL.load(tmp_path / "model", counts_adata, key=key)
    np.testing.assert_allclose(loaded.get_latent(), latent, atol=1e-6)
    with pytest.raises(MissingKeyError, match="key="):
        INFL.load(tmp_path / "model", counts_adata)
    with pytest.raises(KeyMismatchError, match="federation's key"):
        INFL.load(tmp_path / "model", counts_adata, key=Key.generate())


def test_wrong_key_refused_and_rotation_allowed(counts_adata, key):
    model = _model(counts_adata, key)
    with pytest.raises(KeyMismatchError, match="allow_mismatch"):
        model.set_key(Key.generate())
    new = key.rotate()
    model.set_key(new, allow_mismatch=True)
    assert model.key_version_ == 2


def test_a_rotated_model_counts_as_untrained_until_fine_tuned(counts_adata, key, tmp_path):
    # saved right after rotation, it loaded under the new key and predicted 4% correctly
    model = _model(counts_adata, key)
    model.train_federated(**FAST)
    model.save(tmp_path / "old")
    new = key.rotate()
    model.set_key(new, allow_mismatch=True)
    assert not model.is_trained_
    with pytest.raises(RuntimeError, match="untrained"):
        model.predict()  # it answered, with 4% of the labels right
    with pytest.raises(KeyMismatchError, match="after a key rotation, pass allow_mismatch=True"):
        INFL.load(tmp_path / "old", counts_adata, key=new)
    loaded = INFL.load(tmp_path / "old", counts_adata, key=new, allow_mismatch=True)
    assert loaded.key_version_ == 2 and not loaded.is_trained_
    loaded.train_federated(**FAST)
    assert loaded.is_trained_


def test_loading_onto_a_category_the_model_lacks_names_it(counts_adata, key, tmp_path):
    model = _model(counts_adata, key)
    model.train_federated(**FAST)
    model.save(tmp_path / "m")
    joined = counts_adata.copy()
    joined.obs["label"] = joined.obs["label"].cat.add_categories(["new"])
    joined.obs.iloc[:5, joined.obs.columns.get_loc("label")] = "new"
    with pytest.raises(ValueError, match="category new .*fixed with its weights"):
        INFL.load(tmp_path / "m", joined, key=key)


def test_training_without_key_is_refused(counts_adata):
    INFL.setup_anndata(counts_adata, layer="counts", site_key="site")
    model = INFL(counts_adata)
    with pytest.raises(MissingKeyError, match="set_key"):
        model.train_federated(**FAST)


def test_plain_model_without_key(counts_adata):
    INFL.setup_anndata(counts_adata, layer="counts", site_key="site")
    model = INFL(counts_adata, key_mode=None, n_hidden=32)
    model.train_federated(**FAST)
    assert model.get_latent().shape[0] == counts_adata.n_obs


def test_normal_likelihood_with_missing_values(key):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 25)).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan
    adata = scinfl.data.synthetic_counts(n_obs=120, n_vars=25)
    adata.X = X
    INFL.setup_anndata(adata, site_key="site", labels_key="label")
    model = INFL(adata, key=key, gene_likelihood="normal", n_hidden=16)
    history = model.train_federated(**FAST)
    assert np.isfinite(history["train_loss"]).all()
    assert np.isfinite(model.get_latent()).all()


@pytest.mark.parametrize(("n_vars", "expected"), [(30, 50.0), (50, 50.0), (400, 400.0)])
def test_default_classification_weight_grows_with_the_features(n_vars, expected, key):
    adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=n_vars, n_sites=2)
    INFL.setup_anndata(adata, layer="counts", site_key="site", labels_key="label")
    assert INFL(adata, key=key, n_hidden=8).module.classification_ratio == expected
    explicit = INFL(adata, key=key, n_hidden=8, classification_ratio=7.0)
    assert explicit.module.classification_ratio == 7.0
    assert explicit.init_params_["non_kwargs"]["classification_ratio"] == 7.0


def test_default_latent_size_follows_the_likelihood_and_survives_save_and_load(key, tmp_path):
    adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=12, n_sites=2)
    INFL.setup_anndata(adata, layer="counts", site_key="site")
    assert INFL(adata, key=key, n_hidden=8).module.n_latent == 10
    assert INFL(adata, key=key, n_hidden=8, n_latent=4).module.n_latent == 4
    continuous = adata.copy()
    continuous.X = np.log1p(continuous.layers["counts"]).astype(np.float32)
    INFL.setup_anndata(continuous, site_key="site")
    model = INFL(continuous, key=key, n_hidden=8, gene_likelihood="normal")
    assert model.module.n_latent == 30
    # the size is recorded, not the rule: a saved model loads with the latent it was trained with
    assert model.init_params_["non_kwargs"]["n_latent"] == 30
    model.train_federated(**FAST)
    model.save(tmp_path / "model", overwrite=True)
    loaded = INFL.load(tmp_path / "model", adata=continuous, key=key)
    assert loaded.get_latent().shape == (continuous.n_obs, 30)


# -- bad input ---------------------------------------------------------------------------------
def test_missing_layer(counts_adata):
    with pytest.raises(ValueError, match="not found in adata.layers.*available"):
        INFL.setup_anndata(counts_adata, layer="raw_counts")


def test_missing_obs_column(counts_adata):
    with pytest.raises(ValueError, match="site_key='hospital' is not a column"):
        INFL.setup_anndata(counts_adata, layer="counts", site_key="hospital")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda X: X.__setitem__((0, 0), np.nan), "NaN"),
        (lambda X: X.__setitem__((0, 0), -3.0), "negative"),
        (lambda X: X.__setitem__((0, 0), 0.5), "non-integer"),
        (lambda X: X.__setitem__((0, 0), np.inf), "infinite"),
    ],
)
def test_counts_validation(counts_adata, key, corrupt, message):
    X = counts_adata.layers["counts"].toarray()
    corrupt(X)
    counts_adata.layers["counts"] = sparse.csr_matrix(X)
    INFL.setup_anndata(counts_adata, layer="counts", site_key="site")
    with pytest.raises(ValueError, match=message):
        INFL(counts_adata, key=key)


def test_counts_with_float_rounding_are_counts(counts_adata, key):
    """``(counts / size) * size`` in float32, zeros stored as -1e-8: still counts (as scvi-tools)."""
    X = counts_adata.layers["counts"].toarray().astype(np.float32)
    size = np.float32(3.7) * (1 + np.arange(X.shape[0], dtype=np.float32)[:, None] % 5)
    rounded = (X / size) * size
    rounded[X == 0] = -1e-8
    assert 0 < np.abs(rounded - X).max() < 1e-2
    counts_adata.layers["counts"] = rounded
    INFL.setup_anndata(counts_adata, layer="counts", site_key="site")
    INFL(counts_adata, key=key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: np.where(np.isnan(x), 0.0, x), "replace zeros by NaN"),
        (lambda x: np.exp2(x), "linear intensities"),
        (lambda x: np.log2(np.where(np.isnan(x), 0.0, np.exp2(x))), "replace them by NaN"),
        (lambda x: x, None),
    ],
)
def test_continuous_data_as_tables_come_get_the_fix(key, change, message, caplog):
    adata = _small_cohort()
    adata.X = change(adata.X.astype(np.float64)).astype(np.float32)
    INFL.setup_anndata(adata, site_key="site")
    with caplog.at_level("WARNING", logger="scinfl"):
        if message == "replace them by NaN":  # log2 of the zeros: infinities
            with pytest.raises(ValueError, match=message):
                INFL(adata, key=key, gene_likelihood="normal")
            return
        INFL(adata, key=key, gene_likelihood="normal")
    if message is None:
        assert "WARNING" not in caplog.text
    else:
        assert message in caplog.text


def test_the_magnitude_checks_judge_the_whole_matrix_not_its_first_rows(caplog):
    """Linear intensities in all but the first rows were judged by those first rows."""
    rng = np.random.default_rng(0)
    logged = 20 + rng.normal(0, 1, (10_000, 10))
    linear = 1e6 * rng.lognormal(0, 1, (20_000, 10))
    with caplog.at_level("WARNING", logger="scinfl"):
        validate_matrix(np.vstack([logged, linear]).astype(np.float32), "normal", "adata.X")
    assert "linear intensities" in caplog.text


def test_tiny_site_is_refused_with_fix(counts_adata, key):
    counts_adata.obs["site"] = counts_adata.obs["site"].cat.add_categories("tiny")
    counts_adata.obs.iloc[:1, counts_adata.obs.columns.get_loc("site")] = "tiny"
    model = _model(counts_adata, key)
    with pytest.raises(ValueError, match="'tiny' has 1 rows; .* Merge it"):
        model.train_federated(**FAST)


def test_site_smaller_than_batch_trains_in_one_minibatch(counts_adata, key, caplog):
    model = _model(counts_adata, key)
    with caplog.at_level("INFO"):
        history = model.train_federated(max_rounds=1, batch_size=512, progress_bar=False)
    assert "fewer training rows than batch_size=512" in caplog.text
    assert (history["n_train"] > 0).all()


def _small_cohort(n_per_site=6, n_sites=3, n_vars=40, seed=0):
    """Continuous bulk data as users have it: raw log2 intensities, NaN, tiny sites."""
    rng = np.random.default_rng(seed)
    n = n_per_site * n_sites
    labels = np.array(["tumor", "normal"] * (n // 2))
    x = rng.normal(0, 1, (n, n_vars))
    x[labels == "tumor", :10] += 2.0
    x = 3 * x + 25
    x[rng.random(x.shape) < 0.1] = np.nan
    obs = pd.DataFrame(
        {"site": np.repeat([f"plex{i}" for i in range(n_sites)], n_per_site), "type": labels},
        index=[f"s{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"P{j}" for j in range(n_vars)])
    return anndata.AnnData(x.astype(np.float32), obs=obs, var=var)


def test_three_sites_of_six_samples_train_at_the_defaults(key):
    adata = _small_cohort()
    INFL.setup_anndata(adata, site_key="site", labels_key="type")
    model = INFL(adata, key=key, gene_likelihood="normal")
    history = model.train_federated(max_rounds=2, progress_bar=False)
    assert set(history["site"]) == {"plex0", "plex1", "plex2"}
    assert np.isfinite(history["train_loss"]).all()


def test_new_samples_need_no_site_column_and_are_aligned_by_name(key):
    adata = _small_cohort()
    INFL.setup_anndata(adata, site_key="site", labels_key="type")
    model = INFL(adata, key=key, gene_likelihood="normal", n_hidden=16)
    model.train_federated(max_rounds=2, progress_bar=False)
    expected = model.predict(adata[:4])
    latent = model.get_latent(adata[:4])
    new = adata[:4].copy()
    del new.obs["site"], new.obs["type"]
    new = new[:, new.var_names[::-1]].copy()  # another order
    new.obs_names = [f"new{i}" for i in range(4)]
    new.var["extra"] = 1
    np.testing.assert_array_equal(model.predict(new), expected)
    np.testing.assert_allclose(model.get_latent(new), latent, rtol=1e-5, atol=1e-6)
    assert "site" not in new.obs and list(new.var_names) == list(adata.var_names[::-1])
    fewer = new[:, new.var_names[2:]].copy()  # normal likelihood: absent features are missing
    assert model.get_latent(fewer).shape == (4, model.module.n_latent)


def test_new_samples_missing_features_under_counts_are_refused(counts_adata, key):
    model = _model(counts_adata, key)
    model.train_federated(**FAST)
    new = counts_adata[:5, 3:].copy()
    with pytest.raises(ValueError, match="lack 3 of the model's 30 features"):
        model.get_latent(new)


def test_no_site_key(counts_adata, key):
    INFL.setup_anndata(counts_adata, layer="counts")
    model = INFL(counts_adata, key=key)
    with pytest.raises(ValueError, match="partition"):
        model.train_federated(**FAST)


def test_integer_codes_turned_into_floats_keep_their_names(counts_adata):
    # a merge that adds a missing value makes 1, 2, 10 into 1.0, 2.0, 10.0
    codes = counts_adata.obs["label"].cat.codes.to_numpy()
    counts_adata.obs["label"] = np.array([1.0, 2.0, 10.0])[codes]
    INFL.setup_anndata(
        counts_adata, layer="counts", labels_key="label", categories={"labels_key": [1, 2, 10]}
    )
    assert list(counts_adata.obs["label"].cat.categories) == ["1", "2", "10"]
    assert (counts_adata.obs["label"].cat.codes.to_numpy() == codes).all()


def test_agreed_categories(counts_adata):
    agreed = ["type0", "type1", "type2", "type3"]
    INFL.setup_anndata(
        counts_adata,
        layer="counts",
        site_key="site",
        labels_key="label",
        categories={"labels_key": agreed},
    )
    model = INFL(counts_adata, key_mode=None)
    assert model.summary_stats.n_labels == 4
    site0 = counts_adata[counts_adata.obs["site"] == "site0"].copy()
    site0.obs["label"] = site0.obs["label"].astype(str)
    site0.obs.iloc[0, site0.obs.columns.get_loc("label")] = "type9"
    with pytest.raises(ValueError, match="not in the agreed list.*every site"):
        INFL.setup_anndata(
            site0, layer="counts", labels_key="label", categories={"labels_key": agreed}
        )


def test_predict_without_labels(counts_adata, key):
    INFL.setup_anndata(counts_adata, layer="counts", site_key="site")
    model = INFL(counts_adata, key=key)
    with pytest.raises(ValueError, match="labels_key"):
        model.predict()


def test_get_latent_without_key_refused(counts_adata, key):
    model = _model(counts_adata, key)
    model.module.set_key(None)
    with pytest.raises(MissingKeyError):
        model.get_latent()
    assert torch.is_tensor(model.module.px_r)


def test_balance_classes_uses_local_label_counts(counts_adata, key):
    model = _model(counts_adata, key)
    history = model.train_federated(**FAST, balance_classes=True)
    assert np.isfinite(history["train_loss"]).all()
    scinfl.tl.predict(counts_adata, model)
    assert counts_adata.obsm["scinfl_proba"].shape == (counts_adata.n_obs, 3)
    assert set(counts_adata.obs["scinfl_prediction"].cat.categories) == {"type0", "type1", "type2"}


@pytest.mark.slow
def test_flower_engine_gives_the_local_weights(counts_adata, key):
    pytest.importorskip("flwr")
    results = []
    for engine in ("local", "flower"):
        scvi.settings.seed = 0
        model = _model(counts_adata.copy(), key)
        model.train_federated(max_rounds=2, batch_size=32, progress_bar=False, engine=engine)
        results.append(get_shared_parameters(model.module))
    for name, value in results[0].items():
        # same client code, same order of aggregation: only float32 kernel order could differ
        np.testing.assert_allclose(results[1][name], value, atol=1e-5, err_msg=name)


def test_accelerator_chooses_where_sites_train(key):
    from scinfl.model.base._federated import training_device

    adata = scinfl.data.synthetic_counts(n_obs=90, n_vars=10, n_sites=3, seed=5)
    INFL.setup_anndata(adata, site_key="site")
    model = INFL(adata, key=key, n_hidden=8)
    model.train_federated(max_rounds=1, accelerator="cpu", progress_bar=False)
    assert model.device.type == "cpu"
    with pytest.raises(ValueError, match="engine='local'"):
        model.train_federated(max_rounds=1, engine="flower", accelerator="gpu")
    assert training_device("auto", engine="flower").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sites_train_on_a_gpu_as_on_cpu(key):
    adata = scinfl.data.synthetic_counts(n_obs=300, n_vars=30, n_labels=3, n_sites=3, seed=6)
    INFL.setup_anndata(adata, layer="counts", site_key="site", labels_key="label")
    losses = {}
    for accelerator in ("cpu", "gpu"):
        torch.manual_seed(0)
        model = INFL(adata, key=key, n_hidden=16)
        history = model.train_federated(max_rounds=3, accelerator=accelerator, progress_bar=False)
        assert model.device.type == ("cpu" if accelerator == "cpu" else "cuda")
        assert model.get_latent().shape == (300, 10)
        losses[accelerator] = history.groupby("round")["val_loss"].mean().iloc[-1]
    # the same arithmetic in other kernels: the same fit, not bitwise the same weights
    assert losses["gpu"] == pytest.approx(losses["cpu"], rel=0.05)


def test_normalized_expression_and_differential_expression_as_scvi(counts_adata, key):
    model = _model(counts_adata, key)
    model.train_federated(**FAST)
    expression = model.get_normalized_expression(library_size=1e4)
    assert expression.shape == counts_adata.shape
    np.testing.assert_allclose(expression.sum(1), 1e4, rtol=1e-3)
    markers = model.differential_expression(groupby="label", batch_size=64)
    assert {"bayes_factor", "scale1", "scale2"} <= set(markers.columns)
    continuous = counts_adata.copy()
    continuous.X = np.log1p(continuous.layers["counts"].toarray())
    INFL.setup_anndata(continuous, site_key="site")
    normal = INFL(continuous, key=key, gene_likelihood="normal", n_hidden=16)
    with pytest.raises(NotImplementedError, match="count proportions"):
        normal.get_normalized_expression()
    with pytest.raises(NotImplementedError, match="has none of these"):
        normal.get_likelihood_parameters()
    # each says its own name (scvi-tools' internals failed on the normal's missing theta)
    for method in ("differential_expression", "get_feature_correlation_matrix"):
        with pytest.raises(NotImplementedError, match=f"^{method} works on expected count"):
            getattr(normal, method)()


def test_zeros_of_log_rna_seq_are_measurements_not_missing(caplog):
    """log RNA-seq reaches down to 0 (CPTAC's transcriptomics: median 8.6, 20% zeros)."""
    from scinfl.model._validation import validate_matrix

    rng = np.random.default_rng(0)
    values = rng.exponential(15.0, size=(200, 50))
    values[rng.random(values.shape) < 0.2] = 0.0
    with caplog.at_level("WARNING", logger="scinfl"):
        validate_matrix(values, "normal", "adata.X")
    assert "zeros" not in caplog.text


def test_history_keeps_one_epoch_axis_across_training_paths(counts_adata, key):
    # validation_loss of the federated rounds was indexed 0-1 after three Lightning epochs
    model = _model(counts_adata, key)
    model.train(max_epochs=3, enable_progress_bar=False, check_val_every_n_epoch=1)
    model.train_federated(**FAST)
    assert model.history["train_loss"].index.tolist() == [0, 1, 2, 3, 4]
    assert model.history["validation_loss"].index.tolist()[-2:] == [3, 4]
