"""Perturbation response: PerturbationINFL, tl.predict_perturbation, the scores, the plot."""

import anndata
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from scvi import REGISTRY_KEYS

import scinfl
from scinfl.model import PerturbationINFL

from ._notebooks import TUTORIALS, execute, outputs_text, stored_run

HELD_OUT = "type0"


def _data(seed=1):
    return scinfl.data.synthetic_perturbation(n_obs=600, n_vars=40, seed=seed)


def _without_held_out_stim(adata):
    held_out = (adata.obs["cell_type"] == HELD_OUT) & (adata.obs["condition"] == "stim")
    return adata[~held_out.to_numpy()].copy()


def _model(adata, key, **kwargs):
    PerturbationINFL.setup_anndata(adata, condition_key="condition", site_key="site")
    torch.manual_seed(0)
    return PerturbationINFL(adata, key=key, n_hidden=32, n_latent=6, **kwargs)


@pytest.fixture(scope="module")
def trained():
    """A model trained federated without the held-out type's stimulated cells."""
    scinfl_key = scinfl.Key.generate()
    full = _data()
    train = _without_held_out_stim(full)
    model = _model(train, scinfl_key)
    model.train_federated(max_rounds=60, batch_size=64, seed=0, progress_bar=False)
    return full, train, model


def _log_normalized(adata):
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def test_the_condition_reaches_the_decoder_and_every_site(key):
    model = _model(_data(), key)
    first = model.module.decoder.px_decoder.fc_layers[0][0]
    assert first.in_features == 6 + 2  # the latent and the one-hot condition
    assert model.conditions == ["ctrl", "stim"]
    sites = model._site_data(0.1, seed=0)
    assert len(sites) == 3
    assert all(REGISTRY_KEYS.CAT_COVS_KEY in site.fields for site in sites)
    batch = next(sites[0].minibatches(batch_size=8))
    assert batch[REGISTRY_KEYS.CAT_COVS_KEY].shape == (8, 1)


def test_the_predicted_change_follows_the_held_out_response(trained):
    full, train, model = trained
    observed = _log_normalized(full)
    mine = observed.obs["cell_type"] == HELD_OUT
    control = observed[mine & (observed.obs["condition"] == "ctrl")]
    stim = observed[mine & (observed.obs["condition"] == "stim")]
    genes = scinfl.tl.response_genes(observed[mine].copy(), "condition", "ctrl", "stim", 20)
    predicted = scinfl.tl.predict_perturbation(train, model, cell_types=[HELD_OUT])
    assert predicted.var_names.equals(control.var_names)
    scores = scinfl.tl.perturbation_scores(predicted, stim, control, genes, n_top=(20,))
    # the model transfers the response learnt on the other types: change and level
    assert scores["delta_pearson_top20"] > 0.75
    assert scores["r2_mean_top20"] > 0.5
    unchanged = control.copy()  # predicting no response at all
    none = scinfl.tl.perturbation_scores(unchanged, stim, control, genes, n_top=(20,))
    assert scores["e_distance"] < none["e_distance"]
    assert scores["r2_mean_top20"] > none["r2_mean_top20"] + 0.2


@pytest.mark.parametrize("method", ["decoder", "latent", "both"])
def test_outputs(trained, method):
    _, train, model = trained
    n_source = int(
        ((train.obs["cell_type"] == HELD_OUT) & (train.obs["condition"] == "ctrl")).sum()
    )
    kwargs = {"cell_types": [HELD_OUT], "method": method}
    expected = model.predict_perturbation(train, output="expected", library_size=10.0, **kwargs)
    assert expected.shape == (n_source, train.n_vars)
    np.testing.assert_allclose(expected.sum(axis=1), 10.0, rtol=1e-4)
    counts = model.predict_perturbation(train, output="counts", seed=3, **kwargs)
    assert (counts.to_numpy() >= 0).all()
    np.testing.assert_array_equal(counts.to_numpy(), np.round(counts.to_numpy()))
    again = model.predict_perturbation(train, output="counts", seed=3, **kwargs)
    np.testing.assert_array_equal(counts.to_numpy(), again.to_numpy())
    change = model.predict_perturbation(train, **kwargs)
    assert np.isfinite(change.to_numpy()).all()
    assert list(change.index) == list(expected.index)
    # batch_size is memory only, for encoding and both decodings
    small = model.predict_perturbation(train, batch_size=7, **kwargs)
    np.testing.assert_allclose(small.to_numpy(), change.to_numpy(), rtol=1e-5, atol=1e-6)


def test_the_decoder_changes_the_response_genes(trained):
    full, train, model = trained
    kwargs = {"cell_types": [HELD_OUT], "output": "expected"}
    stim = model.predict_perturbation(train, **kwargs).mean(axis=0)
    ctrl = model.predict_perturbation(train, target="ctrl", **kwargs).mean(axis=0)
    response = full.var["response"].to_numpy()
    fold = np.log(stim / ctrl).to_numpy()
    assert fold[response].min() > 0.5  # up-regulated
    assert np.median(np.abs(fold[~response])) < 0.5 * fold[response].min()


def test_get_normalized_expression(trained):
    _, train, model = trained
    values = model.get_normalized_expression(library_size=1.0)
    assert values.shape == train.shape
    np.testing.assert_allclose(values.sum(axis=1), 1.0, rtol=1e-4)


def test_new_data_and_load_read_the_condition_by_name_not_by_code(key, tmp_path):
    train = _data()
    model = _model(train, key)
    model.train_federated(max_rounds=1, batch_size=64, seed=0, progress_bar=False)
    flipped = train.copy()
    flipped.obs["condition"] = flipped.obs["condition"].cat.reorder_categories(["stim", "ctrl"])
    registered = model.adata_manager.get_from_registry(REGISTRY_KEYS.CAT_COVS_KEY)
    new = model.get_anndata_manager(model._validate_anndata(flipped), required=True)
    np.testing.assert_array_equal(
        np.asarray(new.get_from_registry(REGISTRY_KEYS.CAT_COVS_KEY)), np.asarray(registered)
    )
    model.save(tmp_path / "model")
    loaded = PerturbationINFL.load(tmp_path / "model", flipped, key=key)
    np.testing.assert_array_equal(
        np.asarray(loaded.adata_manager.get_from_registry(REGISTRY_KEYS.CAT_COVS_KEY)),
        np.asarray(registered),
    )


def test_tl_writes_a_new_anndata_with_its_parameters(trained):
    _, train, model = trained
    result = scinfl.tl.predict_perturbation(
        train, model, cell_types=[HELD_OUT], output="counts", key_added="pred"
    )
    assert result.obs_names[0].endswith("-stim-predicted")
    assert result.layers["counts"].format == "csr"
    assert set(result.obs["condition"]) == {"stim"}
    assert set(result.obs["cell_type"]) == {HELD_OUT}
    params = result.uns["pred"]["params"]
    assert params["source"] == "ctrl" and params["target"] == "stim"
    assert params["output"] == "counts" and params["cell_types"] == [HELD_OUT]
    assert result.X.format == "csr"
    assert "pred" not in train.uns  # the input is left alone


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "control"}, r"source='control'.*'condition'.*\['ctrl', 'stim'\]"),
        ({"target": "IFN"}, r"target='IFN'.*'condition'.*\['ctrl', 'stim'\]"),
        ({"cell_types": ["T cell"]}, r"\['T cell'\].*'cell_type'.*\['type0', 'type1'"),
        ({"cell_type_key": "celltype"}, r"cell_type_key='celltype'"),
        ({"method": "mean"}, "method must be"),
        ({"output": "log"}, "output must be"),
    ],
)
def test_bad_input_names_the_column_and_the_levels(trained, kwargs, match):
    _, train, model = trained
    with pytest.raises(ValueError, match=match):
        model.predict_perturbation(train, **kwargs)


def test_a_cell_type_absent_from_a_site(trained):
    _, train, model = trained
    site = train[(train.obs["site"] == "site0") & (train.obs["cell_type"] != HELD_OUT)].copy()
    with pytest.raises(ValueError, match=r"No 'ctrl' cells of cell type\(s\) \['type0'\]"):
        model.predict_perturbation(site, cell_types=[HELD_OUT])


def test_the_shift_needs_another_type_in_both_conditions(trained):
    _, train, model = trained
    only = train[train.obs["cell_type"] == HELD_OUT].copy()
    with pytest.raises(ValueError, match="No cell type other than 'type0'"):
        model.predict_perturbation(only, method="latent")
    assert model.predict_perturbation(only).shape[0] == only.n_obs  # the decoder needs none


def test_one_condition_level_is_refused():
    adata = _data()
    adata = adata[adata.obs["condition"] == "ctrl"].copy()
    with pytest.raises(ValueError, match=r"adata.obs\['condition'\] has one condition level"):
        PerturbationINFL.setup_anndata(adata, condition_key="condition")


def test_agreed_condition_categories():
    adata = _data()
    PerturbationINFL.setup_anndata(
        adata, condition_key="condition", categories={"condition_key": ["ctrl", "stim", "IFNg"]}
    )
    assert adata.obs["condition"].cat.categories.tolist() == ["ctrl", "stim", "IFNg"]
    with pytest.raises(ValueError, match="categories= takes"):
        PerturbationINFL.setup_anndata(
            adata, condition_key="condition", categories={"labels_key": ["a"]}
        )


def test_scores_of_a_perfect_and_of_a_null_prediction():
    rng = np.random.default_rng(0)
    control = anndata.AnnData(rng.normal(size=(80, 50)))
    observed = anndata.AnnData(rng.normal(size=(90, 50)) + np.linspace(0, 4, 50))
    genes = list(observed.var_names[::-1])
    perfect = scinfl.tl.perturbation_scores(observed, observed, control, genes, n_top=(20,))
    assert perfect["r2_mean_all"] == pytest.approx(1.0)
    assert perfect["delta_pearson_top20"] == pytest.approx(1.0)
    assert perfect["e_distance"] == pytest.approx(0.0, abs=1e-6)
    null = scinfl.tl.perturbation_scores(control, observed, control, genes, n_top=(20,))
    assert null["r2_mean_all"] < 0.5
    assert null["e_distance"] > 1.0
    # genes are matched by name: another order scores the same, a missing gene is refused
    reordered = scinfl.tl.perturbation_scores(
        observed, observed[:, ::-1], control[:, ::-1], genes, n_top=20
    )
    pd.testing.assert_series_equal(reordered, perfect)
    with pytest.raises(ValueError, match="observed must hold the predicted cells' genes"):
        scinfl.tl.perturbation_scores(observed, observed[:, :10], control, genes)
    with pytest.raises(ValueError, match="each n_top must be an integer >= 2"):
        scinfl.tl.perturbation_scores(observed, observed, control, genes, n_top=(1,))
    with pytest.raises(ValueError, match="repeat"):
        scinfl.tl.perturbation_scores(observed, observed, control, genes + genes[:1], n_top=20)


def test_scores_warn_of_counts(caplog):
    rng = np.random.default_rng(0)
    counts = anndata.AnnData(rng.poisson(40, size=(30, 10)).astype(np.float32))
    genes = list(counts.var_names)
    with caplog.at_level("WARNING", logger="scinfl"):
        scinfl.tl.perturbation_scores(counts, counts, counts, genes, n_top=5)
    assert "log-normalised" in caplog.text


def test_response_genes_refuses_missing_levels():
    adata = _log_normalized(_data())
    with pytest.raises(ValueError, match=r"no \['IFN'\] cells; levels found: \['ctrl', 'stim'\]"):
        scinfl.tl.response_genes(adata, "condition", "ctrl", "IFN")
    with pytest.raises(ValueError, match="the same level"):
        scinfl.tl.response_genes(adata, "condition", "ctrl", "ctrl")
    with pytest.raises(ValueError, match="n_genes must be an integer >= 1"):
        scinfl.tl.response_genes(adata, "condition", "ctrl", "stim", n_genes=0)
    # a condition coded 0 / 1: the levels as numbers or as text
    expected = scinfl.tl.response_genes(adata, "condition", "ctrl", "stim", n_genes=5)
    adata.obs["condition"] = (adata.obs["condition"] == "stim").astype(int)
    for source, target in ((0, 1), ("0", "1")):
        assert scinfl.tl.response_genes(adata, "condition", source, target, 5) == expected


def test_plot(trained, tmp_path):
    full, train, model = trained
    observed = _log_normalized(full)
    mine = observed.obs["cell_type"] == HELD_OUT
    control = observed[mine & (observed.obs["condition"] == "ctrl")]
    stim = observed[mine & (observed.obs["condition"] == "stim")]
    predicted = scinfl.tl.predict_perturbation(train, model, cell_types=[HELD_OUT])
    genes = list(full.var_names[full.var["response"]])
    fig = scinfl.pl.perturbation(
        predicted, stim, control, genes, n_labels=3, save=tmp_path / "p.png"
    )
    assert len(fig.axes) == 2
    assert len(fig.axes[0].texts) == 3
    assert (tmp_path / "p.png").stat().st_size > 0
    plt.close(fig)


def test_tutorial_is_stored_with_the_outputs_of_a_full_run():
    """The docs render the notebook as stored: every cell ran, in order, without an error."""
    nb, outputs = stored_run("perturbation.ipynb")
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1
    text = outputs_text(nb)
    assert "13999 cells x 1000 genes" in text and "trained 10 rounds" in text  # the full run
    link = TUTORIALS.parents[1] / "tutorials" / "perturbation.ipynb"
    assert link.is_symlink() and link.resolve() == TUTORIALS / "perturbation.ipynb"


@pytest.mark.slow
@pytest.mark.realdata
def test_tutorial_runs(tmp_path, monkeypatch):
    # a quick run: 2 rounds on 2,000 cells and 300 genes
    env = {
        f"SCINFL_TUTORIAL_{k}": v for k, v in (("ROUNDS", "2"), ("CELLS", "2000"), ("GENES", "300"))
    }
    text = execute("perturbation.ipynb", tmp_path, monkeypatch, env)
    assert "2000 cells x 300 genes" in text and "trained 2 rounds" in text
    assert "'output': 'log_change'" in text
    assert "delta_pearson_top100" in text
