"""What a model says about itself and about new samples: an undertrained classifier, unlike data."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import scinfl


def _labelled(n_obs: int = 150):
    adata = scinfl.data.synthetic_counts(n_obs=n_obs, n_vars=20, n_sites=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    return adata


def test_a_classifier_that_says_one_class_is_warned_of(caplog, monkeypatch):
    adata = _labelled()
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    majority = adata.obs["label"].value_counts().index[-1]  # the rarest: said for all rows
    monkeypatch.setattr(
        scinfl.model.INFL,
        "predict",
        lambda self, indices=None, **kw: np.full(len(indices), majority),
    )
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.train_federated(max_rounds=2, batch_size=64, progress_bar=False)
    assert f"says {majority!r} for 100% of the labelled training rows" in caplog.text
    assert "4 optimiser steps at its largest site (2 rounds x 2 steps each)" in caplog.text


def test_the_classifier_check_reads_the_labels_training_read(caplog):
    """Labels renamed or dropped after setup: the check reads the registered codes."""
    adata = _labelled()
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    del adata.obs["label"]
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.train_federated(max_rounds=10, local_epochs=3, batch_size=16, progress_bar=False)
    assert model.is_trained_ and "has not learned" not in caplog.text


def test_a_classifier_that_tells_classes_apart_is_not_warned_of(caplog):
    adata = _labelled(240)
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.train_federated(max_rounds=10, local_epochs=3, batch_size=16, progress_bar=False)
    assert (model.predict() == adata.obs["label"].to_numpy()).mean() > 0.8
    assert "has not learned" not in caplog.text


@pytest.fixture(scope="module")
def continuous_model():
    rng = np.random.default_rng(0)
    adata = scinfl.data.synthetic_counts(n_obs=200, n_vars=30, n_sites=2)
    adata.X = (np.log2(adata.X.toarray() + 1) + 20 + rng.normal(0, 0.3, adata.shape)).astype(
        np.float32
    )
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), gene_likelihood="normal")
    model.train_federated(max_rounds=2, batch_size=64, progress_bar=False)
    return model, adata


def test_new_samples_far_from_the_training_data_are_warned_of(continuous_model, caplog):
    model, adata = continuous_model
    like = adata[:40].copy()
    one_class = adata[adata.obs["label"] == adata.obs["label"].iloc[0]].copy()
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.get_latent_representation(like)
        model.get_latent_representation(one_class)  # narrower than all classes: no alarm
        assert "lie far" not in caplog.text
        shifted = like.copy()
        shifted.X = shifted.X + 5.0  # another instrument's gain, on the log scale
        model.get_latent_representation(shifted)
    assert "lie far from the training data" in caplog.text
    caplog.clear()
    rescaled = like.copy()
    centre = adata.X.mean(axis=0)
    rescaled.X = centre + 3.0 * (rescaled.X - centre)  # another logarithm's base
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.get_latent_representation(rescaled)
    assert "spreads" in caplog.text


def test_new_samples_with_few_values_are_warned_of_however_they_lack_them(continuous_model, caplog):
    model, adata = continuous_model
    new = adata[:40].copy()
    new.X[:, 5:] = np.nan  # present by name, all missing (as align_features writes them)
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.get_latent_representation(new)
    assert "new samples (40) hold values for 5 of the model's 30 features" in caplog.text
    caplog.clear()
    one = adata[:1].copy()
    one.X[:, ::2] = np.nan  # one sample lacking half its values: no sign of absent features
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.get_latent_representation(one)
    assert "hold values" not in caplog.text and "lie far" not in caplog.text


def test_new_samples_of_a_continuous_modality_far_from_training_are_warned_of(caplog):
    mdata = scinfl.data.synthetic_multiome(n_obs=200)
    scinfl.model.MultiOmicsINFL.setup_mudata(mdata, modalities=["rna", "prot"], site_key="site")
    model = scinfl.model.MultiOmicsINFL(
        mdata, key=scinfl.Key.generate(), likelihoods={"rna": "nb", "prot": "normal"}
    )
    model.train_federated(max_rounds=1, batch_size=64, progress_bar=False)
    new = mdata[:40].copy()
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        model.get_latent_representation(new)
        assert "lie far" not in caplog.text
        new.mod["prot"].X = new.mod["prot"].X + 1000.0  # ten training SDs
        model.get_latent_representation(new.copy())
    assert "The new samples' 'prot' values lie far from the training data" in caplog.text


def test_a_latent_that_separates_the_sites_is_warned_of(caplog):
    rng = np.random.default_rng(0)
    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=30, n_sites=2)
    values = np.log2(adata.X.toarray() + 1) + 20 + rng.normal(0, 0.3, adata.shape)
    adata.X = values.astype(np.float32)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), gene_likelihood="normal")
    model.train_federated(max_rounds=5, batch_size=64, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        scinfl.tl.embed(adata, model)
    assert "separates the sites" not in caplog.text
    shifted = adata.copy()
    offsets = rng.normal(0, 3, adata.n_vars)  # another instrument at site1, per feature
    shifted.X[(shifted.obs["site"] == "site1").to_numpy()] += offsets.astype(np.float32)
    scinfl.model.INFL.setup_anndata(shifted, site_key="site")
    model = scinfl.model.INFL(shifted, key=scinfl.Key.generate(), gene_likelihood="normal")
    model.train_federated(max_rounds=5, batch_size=64, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        scinfl.tl.embed(shifted, model)
    assert "separates the sites" in caplog.text


def test_a_mosaic_compares_the_samples_that_hold_every_modality(caplog):
    """Sites holding other modalities have latents that differ by design: no alarm."""
    full = scinfl.data.synthetic_multiome(n_obs=600, n_sites=3, seed=0)
    mosaic = scinfl.data.make_mosaic(full, "site", {"site0": "prot", "site1": "rna"})
    mdata = scinfl.pp.pad_modalities(mosaic)
    scinfl.model.MultiOmicsINFL.setup_mudata(mdata, modalities=["rna", "prot"], site_key="site")
    model = scinfl.model.MultiOmicsINFL(mdata, key=scinfl.Key.generate())
    model.train_federated(max_rounds=10, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="scinfl"):
        scinfl.tl.embed(mdata, model)
        assert "separates the sites" not in caplog.text
        # over every sample, the sites do separate (site0 holds proteins only, site1 RNA only)
        latent, sites = mdata.obsm["X_scinfl"], mdata.obs["site"].to_numpy()
        scinfl.tl._embed.warn_if_sites_separate(latent, sites)
    assert "separates the sites" in caplog.text
