"""MultiOmicsINFL: MuData registration, mosaic federation, results where muon users look."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from mudata import MuData
from scvi.data.fields import MuDataLayerField
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import scinfl
from scinfl.federated import (
    ClientConfig,
    ClientUpdate,
    client_update,
    fedavg,
    get_shared_parameters,
)
from scinfl.model import MultiOmicsINFL
from scinfl.module import MultiModalKeyedVAE

from ._equality import assert_same_weights

SETTINGS = {"max_rounds": 20, "batch_size": 64, "seed": 0, "progress_bar": False}


def _mdata(n_obs=240, seed=0):
    return scinfl.data.synthetic_multiome(n_obs=n_obs, n_genes=60, n_proteins=12, seed=seed)


def _mosaic(mdata):
    mosaic = scinfl.data.make_mosaic(mdata, "site", {"site0": "prot", "site1": "rna"})
    return scinfl.pp.pad_modalities(mosaic)


def _model(mdata, key, **kwargs):
    MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"], site_key="site")
    return MultiOmicsINFL(mdata, key=key, n_hidden=32, **kwargs)


def _ari(z, labels):
    return adjusted_rand_score(labels, KMeans(6, n_init=5, random_state=0).fit_predict(z))


@pytest.fixture(scope="module")
def trained():
    mdata = _mdata()
    torch.manual_seed(0)  # a fixed key and initial weights: the same fit on every machine
    model = _model(mdata, scinfl.Key(bytes(32)))
    model.train_federated(**{**SETTINGS, "max_rounds": 40})
    return mdata, model


def test_every_modality_is_a_mudata_field_and_reaches_every_site(key):
    mdata = _mdata(120)
    model = _model(mdata, key)
    fields = model.adata_manager.fields
    assert sum(isinstance(f, MuDataLayerField) for f in fields) == 2
    assert model.module.likelihoods == {"rna": "nb", "prot": "nb"}
    sites = model._site_data(0.1, seed=0)
    assert len(sites) == 3
    for site in sites:
        assert site.fields["X"].shape[1] == 60 and site.fields["X_prot"].shape[1] == 12
    # the site's rows of each modality are the MuData's rows of that modality
    rows = np.flatnonzero(mdata.obs["site"] == "site1")
    np.testing.assert_array_equal(sites[1].fields["X_prot"], mdata.mod["prot"].X[rows])


def test_the_joint_latent_recovers_what_no_single_modality_does(trained):
    mdata, model = trained
    labels = mdata.obs["cell_type"].to_numpy()
    joint = _ari(model.get_latent(), labels)
    assert joint > 0.6
    for name in ("rna", "prot"):
        assert _ari(model.get_latent(modalities=[name]), labels) < joint - 0.1
    assert model.get_latent(modalities=["prot"]).shape == (240, 10)


def test_results_land_where_muon_users_look(trained):
    mdata, model = trained
    scinfl.tl.embed(mdata, model)
    assert mdata.obsm["X_scinfl"].shape == (240, 10)
    assert mdata.uns["X_scinfl"]["params"]["model"] == "MultiOmicsINFL"
    scinfl.tl.cluster(mdata, n_neighbors=10, umap=False)
    assert mdata.obs["scinfl_leiden"].dtype.name == "category"
    assert "scinfl_connectivities" in mdata.obsp
    assert mdata.uns["scinfl_leiden"]["params"]["use_rep"] == "X_scinfl"


def test_a_site_without_a_modality_leaves_its_parameters_alone(key):
    mdata = _mosaic(_mdata(150))
    model = _model(mdata, key)
    site0 = next(s for s in model._site_data(0.1, seed=0) if s.name == "site0")  # no protein
    start = get_shared_parameters(model.module)
    update = client_update(model.module, site0, start, ClientConfig(round=0, batch_size=32))
    protein = [
        n for n in start if n.startswith(("encoders.prot.", "decoders.prot.", "heads.prot."))
    ]
    assert protein and "px_r.prot" in update.counts
    assert all(update.counts[n] == 0 for n in protein)
    for name in protein:
        np.testing.assert_array_equal(update.parameters[name], start[name])
    assert not any(n.startswith("encoders.rna.") for n in update.counts)  # it trains RNA
    # FedAvg takes the protein parameters from the sites that trained them only
    other = ClientUpdate("b", 10, {n: v + 1 for n, v in update.parameters.items()})
    averaged = fedavg([update, other])
    np.testing.assert_allclose(averaged[protein[0]], start[protein[0]] + 1, rtol=1e-6)


def test_mosaic_training_keeps_the_samples_with_every_modality(trained, key):
    mdata = _mosaic(trained[0])
    model = _model(mdata, key)
    model.train_federated(**SETTINGS)
    labels = mdata.obs["cell_type"].to_numpy()
    paired = (mdata.obs["site"] == "site2").to_numpy()
    z = model.get_latent()
    assert np.isfinite(z).all()
    assert _ari(z[paired], labels[paired]) > 0.6


def test_the_subset_elbo_counts_the_rows_with_several_modalities_only():
    vae = MultiModalKeyedVAE(
        {"rna": 20, "prot": 5},
        {"rna": "X", "prot": "X_prot"},
        {"rna": "nb", "prot": "normal"},
        key_mode=None,
        n_hidden=8,
    )
    torch.manual_seed(0)
    x = {"X": torch.poisson(torch.ones(6, 20)), "X_prot": torch.randn(6, 5)}
    x["X_prot"][:2] = float("nan")  # two samples without protein data
    experts = vae.inference(x)["experts"]
    per_row = vae.subset_loss(x, experts, None, kl_weight=1.0)
    assert torch.equal(per_row[:2], torch.zeros(2)) and bool((per_row[2:] > 0).all())
    rna_only = {"X": x["X"][:2], "X_prot": x["X_prot"][:2]}
    assert vae.subset_loss(rna_only, vae.inference(rna_only)["experts"], None, 1.0) == 0.0
    tensors = {**x, "batch": torch.zeros(6, 1)}
    with_subsets = vae(tensors)[2]
    vae.subset_elbo = False
    without = vae(tensors)[2]
    assert float(with_subsets.extra_metrics["subset_elbo"]) > 0
    assert float(without.extra_metrics["subset_elbo"]) == 0


def test_the_latent_of_one_modality_stays_near_the_latent_of_all():
    """Each modality alone tells half of the type here; with the subset ELBO its latent lies
    nearer where the joint latent is (the mean of the types it cannot tell apart)."""
    mdata = _mdata(seed=1)
    shifts = {}
    for subset_elbo in (False, True):
        torch.manual_seed(0)
        model = _model(mdata.copy(), scinfl.Key(bytes(32)), subset_elbo=subset_elbo)
        model.train_centralized(max_epochs=40, batch_size=64, progress_bar=False, seed=0)
        z = model.get_latent()
        spread = np.median(np.linalg.norm(z[:, None] - z[None], axis=-1))
        shifts[subset_elbo] = np.mean(
            [
                np.median(np.linalg.norm(z - model.get_latent(modalities=[m]), axis=1)) / spread
                for m in ("rna", "prot")
            ]
        )
    assert shifts[True] < 0.8 * shifts[False]


@pytest.mark.parametrize("privacy", ["secagg", "dp"])
def test_mosaics_refuse_secure_aggregation_and_dp(key, privacy):
    model = _model(_mosaic(_mdata(150)), key)
    with pytest.raises(ValueError, match="mosaic is not supported"):
        model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, privacy=privacy)


def test_full_data_trains_under_secure_aggregation(key):
    model = _model(_mdata(150), key)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, privacy="secagg")
    assert np.isfinite(model.get_latent()).all()


def test_continuous_modalities_are_standardised_and_never_uploaded(key):
    mdata = _mdata(120)
    for name in ("rna", "prot"):
        mdata.mod[name].X = (
            3
            * np.log1p(
                np.asarray(mdata.mod[name].X.todense() if name == "rna" else mdata.mod[name].X)
            )
            + 20
        )
    mdata.mod["prot"].X[:5, :3] = np.nan
    model = _model(mdata, key)
    assert model.module.likelihoods == {"rna": "normal", "prot": "normal"}
    model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
    assert float(model.module.feature_loc_prot.min()) > 15
    assert not any(name.startswith("feature_") for name in get_shared_parameters(model.module))
    assert np.isfinite(model.get_latent()).all()


def test_updates_carry_their_counts_through_flower_records():
    pytest.importorskip("flwr")
    from scinfl.federated.flower._records import content_to_update, update_to_content

    update = ClientUpdate("a", 5, {"w": np.zeros(2)}, counts={"w": 0.0})
    assert content_to_update(update_to_content(update)).counts == {"w": 0.0}
    assert content_to_update(update_to_content(ClientUpdate("a", 5, {}))).counts == {}


# -- bad input -------------------------------------------------------------------------------
def _named(names, n=4):
    adata = AnnData(np.ones((n, 3), dtype=np.float32))
    adata.obs_names = names
    return adata


def test_modalities_with_different_sample_names_are_refused():
    mdata = MuData(
        {"rna": _named([f"s{i}" for i in range(4)]), "prot": _named([f"p{i}" for i in range(4)])}
    )
    with pytest.raises(ValueError, match="share no sample name"):
        MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"])
    with pytest.raises(ValueError, match="share no sample name"):
        scinfl.pp.pad_modalities(mdata)


def test_an_unpadded_mosaic_is_refused_with_the_fix():
    mdata = scinfl.data.make_mosaic(_mdata(60), "site", {"site0": "prot"})
    with pytest.raises(ValueError, match="pad_modalities"):
        MultiOmicsINFL.setup_mudata(mdata, ["rna", "prot"], site_key="site")


def test_a_modality_missing_at_every_site_is_refused():
    mdata = _mdata(60)
    padded = scinfl.pp.pad_modalities(mdata)
    padded.mod["prot"].X[:] = np.nan
    with pytest.raises(
        ValueError, match=r"'prot' holds no sample at any site.*modalities=\['rna'\]"
    ):
        MultiOmicsINFL.setup_mudata(padded, ["rna", "prot"], site_key="site")


def test_a_site_whose_samples_hold_no_modality_is_refused():
    padded = scinfl.pp.pad_modalities(_mdata(60))
    site0 = (padded.obs["site"] == "site0").to_numpy()
    padded.mod["rna"].X = padded.mod["rna"].X.toarray()
    for name in ("rna", "prot"):
        padded.mod[name].X[site0] = np.nan
    with pytest.raises(ValueError, match=r"hold none of the modalities.*'site0'"):
        MultiOmicsINFL.setup_mudata(padded, ["rna", "prot"], site_key="site")


def test_unknown_modalities_and_anndata_are_refused(trained):
    mdata, model = trained
    with pytest.raises(ValueError, match="no modality \\['atac'\\]"):
        MultiOmicsINFL.setup_mudata(mdata, ["rna", "atac"])
    with pytest.raises(ValueError, match="Unknown modalities"):
        model.get_latent(modalities=["atac"])
    with pytest.raises(TypeError, match="setup_mudata"):
        MultiOmicsINFL.setup_anndata(mdata.mod["rna"])


def test_padding_keeps_sample_order_and_marks_absent_rows():
    mdata = _mdata(60)
    mosaic = scinfl.data.make_mosaic(mdata, "site", {"site1": "rna"})
    padded = scinfl.pp.pad_modalities(mosaic)
    assert list(padded.obs_names) == list(mosaic.obs_names)
    held = scinfl.module.observed_rows(padded.mod["rna"].X)
    np.testing.assert_array_equal(held, (padded.obs["site"] != "site1").to_numpy())
    pd.testing.assert_series_equal(padded.obs["cell_type"], mosaic.obs["cell_type"])


@pytest.mark.realdata
def test_cptac_proteomics_and_transcriptomics_train_as_a_mosaic(key):
    full = scinfl.data.cptac_ucec(omics=("proteomics", "transcriptomics"))
    modalities = {}
    for name, modality in full.mod.items():
        variance = np.nan_to_num(np.nanvar(modality.X, axis=0))
        modalities[name] = modality[:, np.sort(np.argsort(-variance)[:300])].copy()
    # both omics name their features by gene: a new MuData, not update() of the old one
    mdata = MuData(modalities)
    padded = scinfl.pp.pad_modalities(mdata)
    padded.obs["site"] = pd.Categorical([f"site{i % 3}" for i in range(padded.n_obs)])
    MultiOmicsINFL.setup_mudata(padded, ["proteomics", "transcriptomics"], site_key="site")
    model = MultiOmicsINFL(padded, key=key, n_hidden=32)
    assert model.module.likelihoods == {"proteomics": "normal", "transcriptomics": "normal"}
    model.train_federated(max_rounds=3, batch_size=32, progress_bar=False, min_cells_per_site=2)
    z = model.get_latent()
    # continuous omics: a 30-dimensional latent by default, recorded for a saved model
    assert z.shape == (padded.n_obs, 30) and np.isfinite(z).all()
    assert model.init_params_["non_kwargs"]["n_latent"] == 30


@pytest.mark.slow
def test_a_mosaic_deploys_from_h5mu_files_as_it_trains_in_process(key, tmp_path):
    """Each site a .h5mu file (a modality it lacks as rows of NaN): simulation and deployment
    give the local engine's weights."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from scinfl.federated.flower.app import client_app, load_results, model_run_config, server_app

    from ._loopback import LoopbackGrid

    mdata = _mosaic(_mdata(180))
    settings = {"max_rounds": 2, "batch_size": 32, "seed": 3, "progress_bar": False}
    models = []
    for _ in range(2):
        torch.manual_seed(3)  # a deployed site builds its model from the run's seed
        models.append(_model(mdata.copy(), key))
    local, simulated = models
    local.train_federated(**settings)
    expected = get_shared_parameters(local.module)
    simulated.train_federated(engine="flower", **settings)
    for name, value in get_shared_parameters(simulated.module).items():
        assert_same_weights(value, expected[name], err_msg=name)

    key_path = key.save(tmp_path / "site.key")
    nodes = []
    for site in sorted(mdata.obs["site"].unique()):
        mdata[(mdata.obs["site"] == site).to_numpy()].copy().write_h5mu(tmp_path / f"{site}.h5mu")
        nodes.append(
            {"data-path": str(tmp_path / f"{site}.h5mu"), "key-path": str(key_path), "site": site}
        )
    run_config = model_run_config(
        _model(mdata.copy(), key),
        **{"num-rounds": 2, "batch-size": 32, "seed": 3, "min-sites": 3},
        **{"output-dir": str(tmp_path / "out")},
    )
    # the likelihoods are part of the architecture: a site without proteins builds them too
    assert json.loads(run_config["init-params"])["likelihoods"] == {"rna": "nb", "prot": "nb"}
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        grid = LoopbackGrid(client_app, node_configs=nodes, run_config=run_config)
        context = Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )
        server_app(grid, context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    assert not any(reply.has_error() for reply in grid.replies)
    deployed, _, _ = load_results(tmp_path / "out", key=key)
    for name, value in expected.items():
        assert_same_weights(deployed[name], value, err_msg=name)


@pytest.mark.parametrize("mode", ["feature", "feature-inr"])
def test_per_feature_key_modes_are_refused_rather_than_keying_nothing(mode, key, caplog):
    """They key a layer reading every feature; no encoder here does. A model saved with one
    by an earlier version (it keyed nothing) still loads, with a warning."""
    mdata = scinfl.data.synthetic_multiome(n_obs=60, n_sites=2, seed=0)
    MultiOmicsINFL.setup_mudata(mdata, modalities=["rna", "prot"], site_key="site")
    with pytest.raises(ValueError, match="key_mode='pooled'"):
        MultiOmicsINFL(mdata, key=key, key_mode=mode)
    with caplog.at_level("WARNING"):
        MultiModalKeyedVAE(
            {"rna": 6, "prot": 3},
            {"rna": "X", "prot": "X_prot"},
            {"rna": "nb", "prot": "normal"},
            key_mode=mode,
        )
    assert "no layer is keyed" in caplog.text


def test_a_modality_is_decoded_also_where_a_sample_lacks_it(trained):
    # totalVI users' denoised values; a sample with RNA only gets its proteins predicted
    mdata, model = trained
    truth = mdata.mod["prot"].X
    truth = np.asarray(truth.todense() if hasattr(truth, "todense") else truth)
    truth = truth / truth.sum(1, keepdims=True)
    decoded = model.get_normalized_expression(modality="prot")
    assert list(decoded.columns) == list(mdata.mod["prot"].var_names)
    np.testing.assert_allclose(decoded.sum(1), 1.0, rtol=1e-5)
    mosaic = _mosaic(mdata)
    rna_only = mosaic.obs_names[(mosaic.obs["site"] == "site1").to_numpy()]
    predicted = model.get_normalized_expression(mosaic, modality="prot").loc[rna_only]
    truth = pd.DataFrame(truth, index=mdata.obs_names).loc[rna_only].to_numpy()
    # how each sample departs from the features' means (which any row would get right)
    departs = (predicted - predicted.mean(0)).to_numpy()
    matched = np.corrcoef(departs.ravel(), (truth - truth.mean(0)).ravel())[0, 1]
    other = np.roll(truth, 7, axis=0)
    shuffled = np.corrcoef(departs.ravel(), (other - other.mean(0)).ravel())[0, 1]
    assert np.isfinite(departs).all() and matched > shuffled + 0.2, (matched, shuffled)
    with pytest.raises(ValueError, match="Unknown modality 'adt'"):
        model.get_normalized_expression(modality="adt")
