"""Data as users bring it: reordered features and samples, leftovers, bad values, reloads.

Each test is a defect found by feeding the public API the way users' data arrive; every one
failed (a silently wrong result, a raw error from deep inside a library, or a half-written
object) before its fix.
"""

import anndata
import mudata
import numpy as np
import pandas as pd
import pytest
import torch

import scinfl
from scinfl.model import INFL, MultiOmicsINFL, PerturbationINFL


def _counts(seed=1):
    return scinfl.data.synthetic_counts(n_obs=120, n_vars=16, n_labels=3, n_sites=2, seed=seed)


def _infl(adata, key, **setup):
    INFL.setup_anndata(adata, site_key="site", **setup)
    torch.manual_seed(0)
    model = INFL(adata, key=key, n_hidden=16)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    return model


def _perturbation(key, **init):
    adata = scinfl.data.synthetic_perturbation(n_obs=200, n_vars=20, n_sites=2)
    PerturbationINFL.setup_anndata(adata, condition_key="condition", site_key="site")
    torch.manual_seed(0)
    model = PerturbationINFL(adata, key=key, **init)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    return adata, model


@pytest.fixture
def multiome(key):
    mdata = scinfl.data.synthetic_multiome(n_obs=80, n_genes=20, n_proteins=6, n_sites=2)
    MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"], site_key="site")
    torch.manual_seed(0)
    model = MultiOmicsINFL(mdata, key=key, n_hidden=8)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    return mdata, model


# -- reloads ----------------------------------------------------------------------------------
def test_a_perturbation_model_of_any_architecture_loads_back(key, tmp_path):
    adata, model = _perturbation(key, n_hidden=16)
    assert "key" not in model.init_params_["non_kwargs"]  # the record is saved: no key in it
    model.save(tmp_path, overwrite=True)
    loaded = PerturbationINFL.load(tmp_path, adata, key=key)
    assert loaded.module.z_encoder.encoder.fc_layers[0][0].out_features == 16
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_loading_with_a_key_file_path_names_key_load(key, tmp_path):
    adata = _counts()
    _infl(adata, key).save(tmp_path, overwrite=True)
    key.save(tmp_path / "fed.key")
    with pytest.raises(TypeError, match=r"key=scinfl.Key.load\(path\)"):
        INFL.load(tmp_path, adata, key=str(tmp_path / "fed.key"))


def test_loading_onto_genes_in_another_order_matches_them_by_name(key, tmp_path):
    adata = _counts()
    model = _infl(adata, key)
    model.save(tmp_path, overwrite=True)
    reordered = adata[:, adata.var_names[::-1]].copy()
    loaded = INFL.load(tmp_path, reordered, key=key)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-5
    )
    with pytest.raises(ValueError, match="lacks 1 of the saved model's 16 features"):
        INFL.load(tmp_path, adata[:, 1:].copy(), key=key)
    without_sites = adata.copy()
    del without_sites.obs["site"]
    with pytest.raises(ValueError, match="lacks the site column 'site'"):
        INFL.load(tmp_path, without_sites, key=key)


# -- new samples ------------------------------------------------------------------------------
def test_new_samples_are_checked_like_training_data(key):
    adata = _counts()
    model = _infl(adata, key, layer="counts")
    query = adata[:10].copy()
    del query.obs["site"]
    query.layers["counts"] = np.log1p(query.layers["counts"].toarray())
    with pytest.raises(
        ValueError, match="the new data's layers\\['counts'\\] holds .* non-integer"
    ):
        model.get_latent_representation(query)
    del query.layers["counts"]
    with pytest.raises(
        ValueError, match="reads adata.layers\\['counts'\\], which the new data lack"
    ):
        model.get_latent_representation(query)


def test_new_samples_with_labels_the_model_never_saw_still_embed(key):
    adata = _counts()
    model = _infl(adata, key, labels_key="label")
    query = adata[:10].copy()
    query.obs["label"] = "my own annotation"
    np.testing.assert_allclose(
        model.get_latent_representation(query), model.get_latent_representation()[:10], atol=1e-6
    )


def test_backed_and_numbered_data_embed_and_load(key, tmp_path):
    adata = _counts()
    model = _infl(adata, key)
    model.save(tmp_path / "model", overwrite=True)
    expected = model.get_latent_representation()
    adata[:, adata.var_names[::-1]].copy().write_h5ad(tmp_path / "reversed.h5ad")
    adata.write_h5ad(tmp_path / "same.h5ad")
    for name in ("same", "reversed"):  # AnnData.copy() of a backed object needs a file
        backed = anndata.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
        np.testing.assert_allclose(model.get_latent_representation(backed), expected, atol=1e-5)
        scinfl.tl.embed(backed, model, copy=True)
    backed = anndata.read_h5ad(tmp_path / "reversed.h5ad", backed="r")
    loaded = INFL.load(tmp_path / "model", backed, key=key)
    np.testing.assert_allclose(loaded.get_latent_representation(), expected, atol=1e-5)
    # var_names that are numbers name the same features as the strings the model saved
    numbered = adata.copy()
    numbered.var_names = pd.Index(np.arange(numbered.n_vars))
    INFL.setup_anndata(numbered, site_key="site")
    torch.manual_seed(0)
    INFL(numbered, key=key, n_hidden=16).save(tmp_path / "numbered", overwrite=True)
    INFL.load(tmp_path / "numbered", numbered, key=key)


def test_new_samples_sharing_no_feature_or_naming_two_alike_are_refused(key):
    adata = _counts()
    model = _infl(adata, key)
    query = adata[:5].copy()
    query.var_names = [f"ENSG{i}" for i in range(query.n_vars)]  # accessions, not symbols
    with pytest.raises(ValueError, match="share none of the model's 16 features"):
        model.get_latent_representation(query)
    query = adata[:5, [0, 0, *range(1, adata.n_vars)]].copy()
    with pytest.raises(ValueError, match="var_names_make_unique"):
        model.get_latent_representation(query)


def test_new_samples_need_the_columns_the_model_reads_as_inputs(key):
    adata = _counts()
    model = _infl(adata, key, batch_key="site")
    query = adata[:5].copy()
    del query.obs["site"]
    with pytest.raises(ValueError, match=r"lack adata.obs\['site'\], which the model reads"):
        model.get_latent_representation(query)
    query.obs["site"] = "another hospital"
    with pytest.raises(ValueError, match="categories the model was not trained on"):
        model.get_latent_representation(query)
    query.obs["site"] = np.nan
    with pytest.raises(ValueError, match="5 missing values"):
        model.get_latent_representation(query)
    adata, perturbation = _perturbation(key)
    query = adata[:5].copy()
    del query.obs["condition"]
    with pytest.raises(ValueError, match=r"lack adata.obs\['condition'\]"):
        perturbation.get_latent_representation(query)


def test_one_modality_may_be_a_string(multiome, key):
    mdata, model = multiome
    np.testing.assert_allclose(
        model.get_latent(modalities="prot"), model.get_latent(modalities=["prot"])
    )
    with pytest.raises(ValueError, match="names no modality"):
        model.get_latent(modalities=[])
    rna = mudata.MuData({"rna": mdata.mod["rna"].copy()})
    rna.obs["site"] = mdata.obs["site"]
    MultiOmicsINFL.setup_mudata(rna, "rna", site_key="site")
    assert MultiOmicsINFL(rna, key=key, n_hidden=8).module.modalities == {"rna": 20}


def test_multiomics_new_samples_are_matched_by_name(multiome):
    mdata, model = multiome
    expected = pd.DataFrame(model.get_latent(), index=mdata.obs_names)
    rna, prot = mdata.mod["rna"], mdata.mod["prot"]
    order = np.random.default_rng(0).permutation(mdata.n_obs)
    shuffled = mudata.MuData(
        {"rna": rna[:, rna.var_names[::-1]].copy(), "prot": prot[order].copy()}
    )
    latent = pd.DataFrame(model.get_latent(shuffled), index=shuffled.obs_names)
    np.testing.assert_allclose(latent.loc[expected.index], expected, atol=1e-5)
    rna_only = mudata.MuData({"rna": rna.copy()})
    from_rna = model.get_latent(rna_only)
    np.testing.assert_allclose(from_rna, model.get_latent(modalities=["rna"]), atol=1e-5)


def test_multiomics_refuses_likelihoods_of_unknown_modalities(multiome, key):
    mdata, _ = multiome
    with pytest.raises(ValueError, match="names modalities \\['protein'\\]"):
        MultiOmicsINFL(mdata, key=key, likelihoods={"protein": "normal"})


def test_multiomics_setup_combines_a_site_column_kept_in_the_modalities():
    """A mosaic: each modality's .obs names the site of the samples it holds."""
    full = scinfl.data.synthetic_multiome(n_obs=60, n_genes=10, n_proteins=4, n_sites=3)
    sites = full.obs["site"].astype(str)
    for mod in full.mod.values():
        mod.obs["hospital"] = sites.loc[mod.obs_names].to_numpy()
    mosaic = scinfl.data.make_mosaic(full, "site", {"site0": "prot", "site1": "rna"})
    mdata = scinfl.pp.pad_modalities(mosaic)
    MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"], site_key="hospital")
    assert mdata.obs["hospital"].astype(str).equals(sites.loc[mdata.obs_names])
    with pytest.raises(ValueError, match="pass site_key='hospital'"):
        MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"], site_key="rna:hospital")
    # numbered sites stay numbers through the padding (they became floats, 1 against 1.0)
    for mod in mosaic.mod.values():
        mod.obs["code"] = mod.obs["hospital"].str.removeprefix("site").astype(int)
    numbered = scinfl.pp.pad_modalities(mosaic)
    MultiOmicsINFL.setup_mudata(numbered, ["rna", "prot"], site_key="code")
    mdata.mod["prot"].obs.loc[mdata.obs_names[0], "hospital"] = "elsewhere"
    del mdata.obs["hospital"]
    with pytest.raises(ValueError, match="make them agree"):
        MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"], site_key="hospital")


# -- setup ------------------------------------------------------------------------------------
def test_setup_refuses_duplicate_features_and_views():
    adata = _counts()
    with pytest.raises(ValueError, match="is a view"):
        INFL.setup_anndata(adata[:50], site_key="site")
    adata.var_names = ["g"] * adata.n_vars
    with pytest.raises(ValueError, match="var_names_make_unique"):
        INFL.setup_anndata(adata, site_key="site")


def test_label_categories_without_cells_are_no_class(key):
    adata = _counts()
    adata.obs["label"] = adata.obs["label"].astype("category").cat.add_categories(["doublet"])
    model = _infl(adata, key, labels_key="label")
    assert model.module.n_labels == 3
    assert "doublet" not in set(model.predict())


# -- perturbation -----------------------------------------------------------------------------
def test_predicted_perturbation_follows_the_genes_by_name(key):
    adata, model = _perturbation(key, n_hidden=16)
    kwargs = {"cell_types": "type1", "output": "expected"}
    reference = scinfl.tl.predict_perturbation(adata, model, **kwargs)
    reordered = adata[:, adata.var_names[::-1]].copy()
    predicted = scinfl.tl.predict_perturbation(reordered, model, **kwargs)
    np.testing.assert_allclose(predicted.X, reference[:, predicted.var_names].X, rtol=1e-5)
    twice = anndata.concat([adata, adata])
    with pytest.raises(ValueError, match="obs_names_make_unique"):
        scinfl.tl.predict_perturbation(twice, model, **kwargs)
    with pytest.raises(TypeError, match="needs a scinfl.model.PerturbationINFL"):
        scinfl.tl.predict_perturbation(adata, object(), **kwargs)


def test_scores_refuse_more_top_genes_than_given_and_one_cell_conditions():
    rng = np.random.default_rng(0)
    control = anndata.AnnData(rng.normal(size=(20, 8)))
    observed = anndata.AnnData(rng.normal(size=(20, 8)) + 1)
    with pytest.raises(ValueError, match="top \\[100\\] genes but 5 genes"):
        scinfl.tl.perturbation_scores(observed, observed, control, list("01234"), n_top=(5, 100))
    both = anndata.concat({"ctrl": control, "stim": observed[:1]}, label="condition")
    with pytest.raises(ValueError, match="fewer than 2 cells of \\{'stim': 1\\}"):
        scinfl.tl.response_genes(both, "condition", "ctrl", "stim")


# -- spatial ----------------------------------------------------------------------------------
def test_spots_without_a_site_are_refused_before_any_graph():
    adata = scinfl.data.synthetic_spatial(n_sections=2, n_side=8, n_vars=10)
    adata.obs["site"] = adata.obs["site"].astype(object)
    adata.obs.iloc[:2, adata.obs.columns.get_loc("site")] = np.nan
    with pytest.raises(ValueError, match="has 2 missing values"):
        scinfl.pp.spatial_neighbors(adata, library_key="section")


def test_domains_refuse_more_domains_than_spots_and_write_nothing():
    adata = scinfl.data.synthetic_spatial(n_sections=1, n_side=8, n_vars=10)
    adata.obsm["X_scinfl"] = np.random.default_rng(0).normal(size=(adata.n_obs, 3))
    scinfl.pp.spatial_neighbors(adata)
    with pytest.raises(ValueError, match="n_domains=500 with 64 spots"):
        scinfl.tl.domains(adata, n_domains=500)
    assert "X_scinfl_domain" not in adata.obsm


def test_partly_labelled_data_train_the_classifier_on_the_labelled_rows(key):
    adata = _counts()
    truth = adata.obs["label"].astype(str).to_numpy()
    labels = adata.obs["label"].astype(object).copy()
    labels.iloc[::3] = np.nan
    adata.obs["label"] = labels
    with pytest.raises(ValueError, match="pass unlabeled_category='Unknown'"):
        INFL.setup_anndata(adata, site_key="site", labels_key="label")
    model = _infl(adata, key, labels_key="label", unlabeled_category="Unknown")
    assert sorted(model.classes) == sorted(set(truth)) and model.module.n_labels == 3
    assert (adata.obs["label"] == "Unknown").sum() == 40
    history = model.federated_history_
    assert np.isfinite(history["train_accuracy"]).all()
    assert set(model.predict()) <= set(truth)
    proba = model.predict(soft=True)
    assert list(proba.columns) == model.classes
    scinfl.tl.predict(adata, model)
    assert set(adata.obs["scinfl_prediction"].cat.categories) <= set(truth)


def test_the_labelled_cross_entropy_ignores_unlabelled_rows():
    from torch.nn import functional as F

    from scinfl.module._vae import labelled_cross_entropy

    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 3, 1, 3, 0])
    weight = torch.tensor([0.5, 2.0, 1.0])
    keep = y < 3
    expected = F.cross_entropy(logits[keep], y[keep], weight=weight)
    torch.testing.assert_close(labelled_cross_entropy(logits, y, weight), expected)
    logits.requires_grad_(True)
    none_labelled = labelled_cross_entropy(logits, torch.full((6,), 3), weight)
    none_labelled.backward()  # a row without a label: DP-SGD's per-row gradients stay finite
    assert float(none_labelled) == 0.0 and torch.isfinite(logits.grad).all()


def test_a_multiomics_model_loads_onto_a_reordered_mudata(multiome, key, tmp_path):
    mdata, model = multiome
    model.save(tmp_path, overwrite=True)
    rna = mdata.mod["rna"]
    reordered = mudata.MuData(
        {"rna": rna[:, rna.var_names[::-1]].copy(), "prot": mdata.mod["prot"].copy()}
    )
    reordered.obs["site"] = mdata.obs["site"].to_numpy()
    loaded = MultiOmicsINFL.load(tmp_path, reordered, key=key)
    np.testing.assert_allclose(loaded.get_latent(), model.get_latent(), atol=1e-5)
    assert MultiOmicsINFL.load(tmp_path, mdata, key=key).adata is mdata


def test_a_site_without_a_modality_pads_it_from_the_federation_features(multiome):
    mdata, model = multiome
    rna_only = mudata.MuData({"rna": mdata.mod["rna"].copy()})
    padded = scinfl.pp.pad_modalities(rna_only, features={"prot": model.modality_features_["prot"]})
    assert padded.mod["prot"].shape == (mdata.n_obs, 6)
    assert np.isnan(padded.mod["prot"].X).all()
    np.testing.assert_allclose(
        model.get_latent(padded), model.get_latent(modalities=["rna"]), atol=1e-5
    )


def test_asking_for_more_sites_than_the_federation_has_says_so(key):
    adata = _counts()
    INFL.setup_anndata(adata, site_key="site")
    model = INFL(adata, key=key, n_hidden=8)
    with pytest.raises(ValueError, match="min_sites=5 but the federation has only 2 sites"):
        model.train_federated(max_rounds=1, min_sites=5, progress_bar=False)
    # settings no round could meet are refused before training, not at round 0
    with pytest.raises(ValueError, match="asks 1 of the 2 sites to train each round"):
        model.train_federated(max_rounds=1, fraction=0.5, min_available=2, progress_bar=False)
    with pytest.raises(ValueError, match="secagg_min_participants=3 but a round asks 2"):
        model.train_federated(
            max_rounds=1, privacy="secagg", secagg_min_participants=3, progress_bar=False
        )


# -- utilities --------------------------------------------------------------------------------
def test_partition_refuses_what_would_leave_cells_without_a_true_site():
    adata = _counts()
    with pytest.raises(ValueError, match="alpha must be a positive number, got 0"):
        scinfl.federated.partition(adata, method="dirichlet", label_key="label", alpha=0)
    with pytest.raises(ValueError, match="n_sites must be an integer >= 1, got 2.5"):
        scinfl.federated.partition(adata, n_sites=2.5)
    with pytest.raises(ValueError, match="n_sites=500 but adata has 120 observations"):
        scinfl.federated.partition(adata, n_sites=500)
    adata.obs["hospital"] = adata.obs["site"].astype(object)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("hospital")] = None
    with pytest.raises(ValueError, match="'hospital'\\] has 3 missing values"):
        scinfl.federated.partition(adata, method="column", column="hospital")
    sites = scinfl.federated.partition(adata, n_sites=12)
    assert list(sites.cat.categories) == [f"site{i}" for i in range(12)]


def test_cluster_keeps_its_graph_and_parameters_apart():
    adata = _counts()
    adata.obsm["X_scinfl"] = np.random.default_rng(0).normal(size=(adata.n_obs, 4))
    with pytest.raises(ValueError, match="key_added and neighbors_key are both 'scinfl'"):
        scinfl.tl.cluster(adata, key_added="scinfl", umap=False)
    with pytest.raises(ValueError, match="resolution must be > 0"):
        scinfl.tl.cluster(adata, resolution=0.0, umap=False)
    assert "scinfl" not in adata.uns


def test_synthetic_sizes_mosaics_and_empty_data_are_checked(key):
    with pytest.raises(ValueError, match="n_sites must be an integer >= 1, got 0"):
        scinfl.data.synthetic_counts(n_sites=0)
    mdata = scinfl.data.synthetic_multiome(n_obs=40, n_genes=10, n_proteins=4, n_sites=2)
    with pytest.raises(ValueError, match="names modalities \\['atac'\\]"):
        scinfl.data.make_mosaic(mdata, "site", {"site0": "atac"})
    adata = _counts()
    model = _infl(adata, key)
    with pytest.raises(ValueError, match="no observations"):
        scinfl.tl.embed(adata[:0].copy(), model)


def test_dp_settings_without_dp_are_reported(key, caplog):
    adata = _counts()
    INFL.setup_anndata(adata, site_key="site")
    model = INFL(adata, key=key, n_hidden=8)
    with caplog.at_level("WARNING", logger="scinfl"):
        model.train_federated(max_rounds=1, dp_noise_multiplier=5.0, progress_bar=False)
    assert "dp_noise_multiplier=5.0 given without privacy='dp': no effect" in caplog.text


def test_umap_takes_scanpy_style_arguments():
    import matplotlib.pyplot as plt

    adata = _counts()
    adata.obsm["X_umap_scinfl"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    fig = scinfl.pl.umap(adata, color=None, basis="umap_scinfl")
    plt.close(fig)
    with pytest.raises(TypeError, match="save= takes a file path"):
        scinfl.pl.umap(adata, color="label", save=True)
    plt.close("all")


def test_spatial_plot_arguments_are_checked():
    adata = scinfl.data.synthetic_spatial(n_sections=1, n_side=8, n_vars=10)
    with pytest.raises(ValueError, match="ncols must be an integer >= 1, got 0"):
        scinfl.pl.spatial(adata, color="domain", ncols=0)
    with pytest.raises(TypeError, match="takes no ax="):
        scinfl.pl.spatial(adata, color="domain", ax=None)


def test_numbered_sites_labels_and_conditions(key):
    adata = _counts()
    adata.obs["site"] = adata.obs["site"].cat.codes.astype(int)
    adata.obs["label"] = adata.obs["label"].cat.codes.astype(int)
    # agreed categories as the column holds them (numbers) or as a run config does (strings)
    INFL.setup_anndata(adata, site_key="site", labels_key="label", categories={"site_key": [0, 1]})
    model = INFL(adata, key=key, n_hidden=16)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    model.view_anndata_setup()  # scvi-tools' own summary
    scinfl.tl.predict(adata, model)
    labels = adata.uns["scinfl_prediction"]["params"]["labels"]
    assert labels == adata.obs["scinfl_prediction"].cat.categories.tolist() == [0, 1, 2]
    perturbed = scinfl.data.synthetic_perturbation(n_obs=200, n_vars=20, n_sites=2)
    perturbed.obs["condition"] = (perturbed.obs["condition"] == "stim").astype(int)
    PerturbationINFL.setup_anndata(perturbed, condition_key="condition", site_key="site")
    torch.manual_seed(0)
    pert = PerturbationINFL(perturbed, key=key, n_hidden=16)
    pert.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    as_number = pert.predict_perturbation(perturbed, source=0, target=1, cell_type_key="cell_type")
    as_text = pert.predict_perturbation(
        perturbed, source="0", target="1", cell_type_key="cell_type"
    )
    pd.testing.assert_frame_equal(as_number, as_text)
    predicted = scinfl.tl.predict_perturbation(
        perturbed, pert, source=0, target=1, cell_type_key="cell_type"
    )
    assert set(predicted.obs["condition"]) == {1}


def test_a_site_takes_the_agreed_union_of_features_by_name():
    rng = np.random.default_rng(0)
    site = anndata.AnnData(
        rng.normal(25, 2, (6, 3)).astype(np.float32),
        var=pd.DataFrame({"gene": ["x", "y", "z"]}, index=["P3", "P1", "P9"]),
    )
    aligned = scinfl.pp.align_features(site, ["P1", "P2", "P3"])  # P2: another site's
    assert list(aligned.var_names) == ["P1", "P2", "P3"]
    np.testing.assert_array_equal(aligned.X[:, 0], site.X[:, 1])
    np.testing.assert_array_equal(aligned.X[:, 2], site.X[:, 0])
    assert np.isnan(aligned.X[:, 1]).all() and aligned.var["gene"].tolist()[0] == "y"
    same = scinfl.pp.align_features(site, ["P9", "P3"])
    np.testing.assert_array_equal(same.X, site.X[:, [2, 0]])
    with pytest.raises(ValueError, match="repeat"):
        scinfl.pp.align_features(site, ["P1", "P1"])
    # every matrix padded alike, whether or not the site lacks a feature
    site.layers["log2"] = site.X.copy()
    site.obsm["X_pca"] = np.zeros((6, 2))
    for features in (["P1", "P2"], ["P1", "P3"]):
        aligned = scinfl.pp.align_features(site, features)
        np.testing.assert_array_equal(aligned.layers["log2"][:, 0], site.X[:, 1])
        assert "X_pca" in aligned.obsm
    assert list(scinfl.pp.align_features(site, "P1").var_names) == ["P1"]  # one name
    for features, message in (([], "no feature"), (["Q1", "Q2"], "shares none")):
        with pytest.raises(ValueError, match=message):
            scinfl.pp.align_features(site, features)
    numbered = anndata.AnnData(site.X.copy())
    numbered.var_names = pd.Index([3, 1, 9])
    np.testing.assert_array_equal(
        scinfl.pp.align_features(numbered, ["9", "3"]).X, site.X[:, [2, 0]]
    )


def test_control_cells_alone_predict_load_and_set_up(key, tmp_path):
    """The held-out type's control cells are all a user (or a site) may hold."""
    adata, model = _perturbation(key)
    controls = adata[(adata.obs["condition"] == "ctrl") & (adata.obs["cell_type"] == "type0")]
    controls = controls.copy()  # anndata drops the now unused 'stim' category
    predicted = scinfl.tl.predict_perturbation(controls, model, cell_types=["type0"], batch_size=16)
    assert set(predicted.obs["condition"]) == {"stim"}
    assert list(predicted.obs["condition"].cat.categories) == model.condition_levels
    assert (predicted.var_names == adata.var_names).all()
    model.save(tmp_path, overwrite=True)
    loaded = PerturbationINFL.load(tmp_path, controls, key=key)
    assert loaded.predict_perturbation(controls, cell_type_key="cell_type").shape[0] == len(
        controls
    )
    site = controls.copy()  # a deployed site of controls, with the agreed levels
    PerturbationINFL.setup_anndata(
        site, condition_key="condition", categories={"condition_key": ["ctrl", "stim"]}
    )
    with pytest.raises(ValueError, match="one condition level"):
        PerturbationINFL.setup_anndata(controls.copy(), condition_key="condition")


def test_perturbation_setup_refuses_what_it_cannot_model(key):
    adata = scinfl.data.synthetic_perturbation(n_obs=60, n_vars=16, n_sites=2)
    with pytest.raises(TypeError, match="cell types are named when predicting"):
        PerturbationINFL.setup_anndata(adata, condition_key="condition", labels_key="cell_type")
    with pytest.raises(ValueError, match="batch_key='condition' is the condition column"):
        PerturbationINFL.setup_anndata(adata, condition_key="condition", batch_key="condition")
    PerturbationINFL.setup_anndata(adata, condition_key="condition", site_key="site")
    with pytest.raises(ValueError, match="gene_likelihood='normal' is not supported"):
        PerturbationINFL(adata, key=key, gene_likelihood="normal")
    model = PerturbationINFL(adata, key=key, n_hidden=8)
    with pytest.raises(ValueError, match="key_added must name"):
        scinfl.tl.predict_perturbation(adata, model, key_added=None)


# -- labels and their weight ------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-50.0, 0, float("nan"), "50"])
def test_a_classification_weight_that_is_not_positive_is_refused(ratio):
    # a negative weight trained a classifier to be wrong (training accuracy 0.01)
    adata = _counts()
    INFL.setup_anndata(adata, site_key="site", labels_key="label")
    with pytest.raises(ValueError, match="classification_ratio must be a number > 0"):
        INFL(adata, key_mode=None, classification_ratio=ratio)


def test_labels_that_train_no_classifier_are_refused_or_reported(caplog):
    adata = _counts()
    adata.obs["label"] = "Unknown"
    with pytest.raises(ValueError, match="nothing to train a classifier on"):
        INFL.setup_anndata(adata, site_key="site", labels_key="label", unlabeled_category="Unknown")
    adata.obs["label"] = np.where(np.arange(adata.n_obs) % 2, "a", "unknown")
    with caplog.at_level("WARNING", logger="scinfl"):
        INFL.setup_anndata(adata, site_key="site", labels_key="label", unlabeled_category="Unknown")
    assert "matches no row" in caplog.text
    caplog.clear()
    adata.obs["label"] = "a"
    with caplog.at_level("WARNING", logger="scinfl"):
        INFL.setup_anndata(adata, site_key="site", labels_key="label")
        INFL(adata, key_mode=None, classification_ratio=10.0)
    assert "holds one class" in caplog.text
    caplog.clear()
    INFL.setup_anndata(adata, site_key="site")
    with caplog.at_level("WARNING", logger="scinfl"):
        INFL(adata, key_mode=None, classification_ratio=10.0)
    assert "has no effect" in caplog.text


def test_labels_or_sites_mixing_text_and_numbers_are_refused():
    adata = _counts()
    numbers = np.where(np.arange(adata.n_obs) % 5 == 0, np.nan, np.arange(adata.n_obs) % 3)
    adata.obs["label"] = numbers
    with pytest.raises(ValueError, match="unlabeled_category='Unknown' is text, but"):
        INFL.setup_anndata(adata, site_key="site", labels_key="label", unlabeled_category="Unknown")
    adata.obs["label"] = np.nan_to_num(numbers, nan=-1).astype(int)
    INFL.setup_anndata(adata, site_key="site", labels_key="label", unlabeled_category=-1)
    assert sorted(INFL(adata, key_mode=None).classes) == [0, 1, 2]
    # merged .obs tables: site 1 and site "1" were one site, and half its cells went untrained
    mixed = pd.Series([1 if i % 2 else "1" for i in range(adata.n_obs)], index=adata.obs_names)
    adata.obs["site"] = mixed.astype(object)
    with pytest.raises(ValueError, match=r"mixes text and numbers .*astype\(str\)"):
        INFL.setup_anndata(adata, site_key="site")


def test_a_diverged_training_says_so_and_names_the_fix(key):
    # the weights became NaN: torch's "Expected parameter loc ... Normal" from deep inside
    adata = _counts()
    INFL.setup_anndata(adata, site_key="site")
    model = INFL(adata, key=key, n_hidden=16)
    with pytest.raises(
        FloatingPointError, match=r"(?i)training diverged .*lower the learning rate"
    ):
        model.train_federated(max_rounds=2, batch_size=32, lr=1e6, progress_bar=False)


def test_multiomics_samples_in_no_modality_of_the_model_are_named(multiome):
    # tl.embed failed with anndata's "incorrect shape (70,) ... (80,)"
    mdata, model = multiome
    atac = anndata.AnnData(np.ones((10, 3), np.float32))
    atac.obs_names = [f"atac_only{i}" for i in range(10)]
    new = mudata.MuData({"rna": mdata.mod["rna"].copy(), "atac": atac})
    with pytest.raises(ValueError, match=r"10 samples .*'atac_only0'.*only in \['atac'\]"):
        scinfl.tl.embed(new, model)


def test_agreed_labels_need_not_list_the_unlabelled_category():
    adata = _counts()
    labels = adata.obs["label"].astype(object).copy()
    labels.iloc[::3] = np.nan
    adata.obs["label"] = labels
    agreed = sorted(map(str, pd.unique(labels.dropna())))
    INFL.setup_anndata(
        adata,
        site_key="site",
        labels_key="label",
        unlabeled_category="Unknown",
        categories={"labels_key": agreed},
    )
    assert INFL(adata, key_mode=None).classes == agreed


def test_new_samples_without_any_value_get_a_warning(key, caplog):
    adata = _counts()
    adata.X = np.log2(np.asarray(adata.X.toarray()) + 1.0).astype(np.float32)
    INFL.setup_anndata(adata, site_key="site")
    model = INFL(adata, key=key, gene_likelihood="normal", n_hidden=8)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    new = adata[:4].copy()
    new.X[0] = np.nan
    with caplog.at_level("WARNING", logger="scinfl"):
        model.get_latent_representation(new)
    assert "1 new samples have no value" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scinfl"):
        model.get_latent_representation(adata[4:8].copy())
    assert "have no value" not in caplog.text


def test_classes_keep_their_order_beside_the_unlabelled_category():
    # scvi-tools swapped the placeholder with the last class: [c2, c0, c1]
    adata = _counts()
    labels = np.where(np.arange(adata.n_obs) % 4 == 0, "Unknown", adata.obs["label"].astype(str))
    adata.obs["label"] = pd.Categorical(labels, categories=["Unknown", "type0", "type1", "type2"])
    INFL.setup_anndata(adata, site_key="site", labels_key="label", unlabeled_category="Unknown")
    assert INFL(adata, key_mode=None).classes == ["type0", "type1", "type2"]
    codes = pd.Series(labels).str.removeprefix("type").replace("Unknown", "-1").astype(int)
    adata.obs["label"] = codes.to_numpy()
    INFL.setup_anndata(adata, site_key="site", labels_key="label", unlabeled_category=-1)
    assert INFL(adata, key_mode=None).classes == [0, 1, 2]


def test_a_model_trains_on_its_own_setup_after_another_on_the_same_data(key):
    # the second setup rewrote the label codes, and the first model trained on them silently
    adata = _counts()
    rng = np.random.default_rng(0)
    adata.obs["other"] = pd.Categorical(rng.choice(list("abcde"), adata.n_obs))
    first = _infl(adata, key, labels_key="label")
    INFL.setup_anndata(adata, site_key="site", labels_key="other")
    INFL(adata, key_mode=None)
    first.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    labels = first.adata_manager.get_from_registry("labels")
    np.testing.assert_array_equal(np.asarray(labels).ravel(), adata.obs["label"].cat.codes)


def test_features_changed_in_place_since_setup(key):
    adata = _counts()
    model = _infl(adata, key)
    before = pd.DataFrame(model.get_latent_representation(), index=adata.obs_names)
    names = adata.var_names.copy()
    adata.var_names = [f"symbol{i}" for i in range(adata.n_vars)]  # renamed: by position
    np.testing.assert_allclose(model.get_latent_representation(), before, atol=1e-5)
    adata.var_names = names
    adata._inplace_subset_var(adata.var_names[::-1])  # reordered: matched by name
    np.testing.assert_allclose(model.get_latent_representation(), before, atol=1e-5)
    with pytest.raises(ValueError, match="features changed since setup .*another order"):
        model.train_federated(max_rounds=1, progress_bar=False)
    adata._inplace_subset_var(adata.var_names[:10])  # subset: counts cannot be missing
    with pytest.raises(ValueError, match="lack 6 of the model's 16 features"):
        model.get_latent_representation()


def test_a_modality_changed_in_place_since_setup(multiome):
    # read by position before: another latent silently, a raw shape error for a subset
    mdata, model = multiome
    before = model.get_latent(mdata)
    mdata.mod["rna"] = mdata.mod["rna"][:, ::-1].copy()
    mdata.update()
    np.testing.assert_allclose(model.get_latent(mdata), before, atol=1e-5)
    with pytest.raises(ValueError, match="modality 'rna': the same 20 features in another"):
        model.train_federated(max_rounds=1, progress_bar=False)
    mdata.mod["rna"] = mdata.mod["rna"][:, :15].copy()
    mdata.update()
    with pytest.raises(ValueError, match="Modality 'rna' of the new data lack 5 of the"):
        scinfl.tl.embed(mdata, model)


def test_predicting_with_a_model_that_has_no_classifier_says_which_has(multiome, key):
    # "pass labels_key= to INFL.setup_anndata", which PerturbationINFL refuses; a raw
    # AttributeError for MultiOmicsINFL
    adata, model = _perturbation(key, n_hidden=8)
    with pytest.raises(ValueError, match="PerturbationINFL trains no classifier"):
        scinfl.tl.predict(adata, model)
    mdata, multi = multiome
    with pytest.raises(TypeError, match="MultiOmicsINFL trains no classifier"):
        scinfl.tl.predict(mdata, multi)


def test_a_site_of_a_federation_that_agreed_its_classes_may_hold_no_label():
    # one site's part of semi-supervised data: its rows all unlabelled, the classes agreed
    adata = _counts()
    adata.obs["label"] = "Unknown"
    INFL.setup_anndata(
        adata,
        labels_key="label",
        unlabeled_category="Unknown",
        categories={"labels_key": ["Unknown", "type0", "type1", "type2"]},
    )
    assert INFL(adata, key_mode=None).classes == ["type0", "type1", "type2"]
    numbers = _counts()
    numbers.obs["label"] = np.where(np.arange(numbers.n_obs) % 4 == 0, -1, np.arange(120) % 3)
    INFL.setup_anndata(
        numbers, labels_key="label", unlabeled_category=-1, categories={"labels_key": [0, 1, 2]}
    )
    assert INFL(numbers, key_mode=None).classes == ["0", "1", "2"]


def test_a_round_where_every_site_diverged_says_so():
    from scinfl.federated import ClientUpdate, FederatedServer, FederationConfig

    server = FederatedServer({"w": np.zeros(2, np.float32)}, FederationConfig(max_rounds=1))
    updates = [ClientUpdate(s, 10, {"w": np.array([np.nan, 0], np.float32)}) for s in "ab"]
    with pytest.raises(FloatingPointError, match="training diverged at every site"):
        server.aggregate(0, updates)


def test_multiomics_data_a_model_cannot_pair_or_read_are_named(multiome, key, tmp_path):
    mdata, model = multiome
    rna = mdata.mod["rna"].copy()
    rna.obs_names = [rna.obs_names[0]] * 2 + list(rna.obs_names[2:])
    with pytest.raises(ValueError, match=r"mod\['rna'\].obs_names repeat names"):
        MultiOmicsINFL.setup_mudata(
            mudata.MuData({"rna": rna, "prot": mdata.mod["prot"]}), ["rna", "prot"]
        )
    prot = mdata.mod["prot"][:, []].copy()
    with pytest.raises(ValueError, match=r"mod\['prot'\] has no features"):
        MultiOmicsINFL.setup_mudata(
            mudata.MuData({"rna": mdata.mod["rna"], "prot": prot}), ["rna", "prot"]
        )
    with pytest.raises(TypeError, match="reads a MuData, got AnnData"):
        model.get_latent(mdata.mod["rna"])
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="saved without its data"):
        MultiOmicsINFL.load(tmp_path / "m", key=key)


def test_a_latent_from_modalities_a_sample_lacks_is_nan(key):
    mdata = scinfl.data.synthetic_multiome(n_obs=80, n_genes=20, n_proteins=6, n_sites=2)
    mdata.mod["prot"] = mdata.mod["prot"][:40].copy()
    mdata.update()
    padded = scinfl.pp.pad_modalities(mdata)
    MultiOmicsINFL.setup_mudata(padded, ["rna", "prot"], site_key="site")
    model = MultiOmicsINFL(padded, key=key, n_hidden=8)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    z = model.get_latent(modalities=["prot"])  # the 40 without proteins were the prior's 0
    held = np.isin(padded.obs_names, mdata.mod["prot"].obs_names)
    assert np.isnan(z[~held]).all() and np.isfinite(z[held]).all()


def test_padding_keeps_each_modalitys_per_sample_arrays_and_uns():
    mdata = scinfl.data.synthetic_multiome(n_obs=40, n_genes=10, n_proteins=4, n_sites=2)
    mdata.mod["rna"].obsm["X_pca"] = np.random.default_rng(0).random((40, 3))
    mdata.mod["rna"].uns["note"] = "kept"
    mdata.mod["prot"] = mdata.mod["prot"][:20].copy()
    mdata.mod["prot"].obsm["X_pca"] = np.ones((20, 2))
    mdata.update()
    padded = scinfl.pp.pad_modalities(mdata)
    np.testing.assert_allclose(
        padded.mod["rna"].obsm["X_pca"], mdata.mod["rna"].obsm["X_pca"], rtol=1e-6
    )
    assert padded.mod["rna"].uns["note"] == "kept"
    assert np.isnan(padded.mod["prot"].obsm["X_pca"]).all(axis=1).sum() == 20


def test_federation_level_label_check_and_nan_latents_in_cluster(key):
    adata = _counts()
    adata.obs["label"] = "Unknown"  # agreed classes skip the per-setup check: not training's
    INFL.setup_anndata(
        adata,
        site_key="site",
        labels_key="label",
        unlabeled_category="Unknown",
        categories={"labels_key": ["type0", "type1"]},
    )
    with pytest.raises(ValueError, match="No row of the training data is labelled"):
        INFL(adata, key=key, n_hidden=8).train_federated(max_rounds=1, progress_bar=False)
    adata.obsm["X_part"] = np.where(np.arange(adata.n_obs)[:, None] < 10, np.nan, 1.0) * np.ones(
        (1, 3)
    )
    with pytest.raises(ValueError, match="10 rows of adata.obsm\\['X_part'\\] hold NaN"):
        scinfl.tl.cluster(adata, use_rep="X_part")


def test_rotating_the_key_of_an_unkeyed_model_keeps_it_trained():
    adata = _counts()
    INFL.setup_anndata(adata, site_key="site")
    model = INFL(adata, key_mode=None, key=scinfl.Key.generate(), n_hidden=8)
    model.train_federated(max_rounds=1, progress_bar=False)
    model.set_key(scinfl.Key.generate(), allow_mismatch=True)
    assert model.is_trained_ and model.get_latent_representation().shape[0] == adata.n_obs


def test_a_loaded_model_fine_tunes_on_unlabelled_data_and_sparse_latents_cluster(key, tmp_path):
    import scipy.sparse as sp

    adata = _counts()
    model = _infl(adata, key, labels_key="label", unlabeled_category="Unknown")
    model.save(tmp_path / "m")
    query = _counts(seed=2)
    query.obs["label"] = "Unknown"  # scANVI's query step: no label, the VAE still trains
    loaded = INFL.load(tmp_path / "m", query, key=key)
    loaded.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    query.obsm["X_sparse"] = sp.csr_matrix(np.abs(loaded.get_latent_representation()))
    scinfl.tl.cluster(query, use_rep="X_sparse", n_neighbors=5)
    assert "scinfl_leiden" in query.obs


def test_views_and_backed_data_get_the_copy_that_works(multiome, key, tmp_path):
    mdata, model = multiome
    view = mdata[mdata.obs["site"] == mdata.obs["site"].iloc[0]]
    with pytest.raises(ValueError, match=r"mdata = mdata\[mask\].copy\(\)"):
        MultiOmicsINFL.setup_mudata(view, ["rna", "prot"], site_key="site")
    model.save(tmp_path / "model", overwrite=True)
    with pytest.raises(ValueError, match=r"mdata is a view"):
        MultiOmicsINFL.load(tmp_path / "model", view, key=key)
    mudata.write_h5mu(tmp_path / "m.h5mu", mdata)
    with pytest.raises(ValueError, match="The MuData is backed"):
        model.get_latent(mudata.read_h5mu(tmp_path / "m.h5mu", backed=True))
    adata = _counts()
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"adata\[mask\].to_memory\(\)"):
        INFL.setup_anndata(backed[:10], site_key="site")


def test_names_the_registry_cannot_hold_are_refused_at_setup(multiome):
    mdata, _ = multiome
    dotted = mudata.MuData({"rna": mdata.mod["rna"].copy(), "prot.adt": mdata.mod["prot"].copy()})
    dotted.obs["site"] = mdata.obs["site"].reindex(dotted.obs_names)
    with pytest.raises(ValueError, match=r"mdata.mod\['prot_adt'\] = mdata.mod.pop"):
        MultiOmicsINFL.setup_mudata(dotted, ["rna", "prot.adt"], site_key="site")
    adata = _counts()
    adata.obs["treatment.arm"] = np.where(np.arange(adata.n_obs) % 2, "stim", "ctrl")
    with pytest.raises(ValueError, match="'treatment_arm'"):
        PerturbationINFL.setup_anndata(adata, condition_key="treatment.arm")


def test_multiomics_latent_under_scvi_tools_names(multiome):
    mdata, model = multiome
    expected = model.get_latent(mdata)
    np.testing.assert_array_equal(model.get_latent_representation(adata=mdata), expected)
    np.testing.assert_array_equal(model.get_latent_representation(mdata=mdata), expected)
    with pytest.raises(ValueError, match="latent means only"):
        model.get_latent_representation(give_mean=False)


def test_a_perturbation_model_names_its_predictions_to_scgen_users(key):
    _, model = _perturbation(key, n_hidden=8)
    with pytest.raises(ValueError, match=r"predict_perturbation\(source=, target="):
        model.predict(ctrl_key="ctrl", stim_key="stim", celltype_to_predict="B")


def test_a_mosaic_of_sites_coded_as_numbers(multiome):
    mdata, _ = multiome
    mdata = mdata.copy()
    mdata.obs["site"] = mdata.obs["site"].cat.codes.to_numpy() + 1
    mosaic = scinfl.data.make_mosaic(mdata, "site", {1: "prot"})
    assert mosaic.mod["prot"].n_obs < mdata.mod["prot"].n_obs
