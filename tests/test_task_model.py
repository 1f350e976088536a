"""A model class with a field of its own trains federated with no change under federated/."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalJointObsField

import scinfl
from scinfl.federated import get_shared_parameters
from scinfl.model import INFL

from ._equality import assert_same_weights
from ._loopback import LoopbackGrid


class CovariateINFL(INFL):
    """INFL whose decoder also reads a continuous ``.obs`` covariate (e.g. a sample's age)."""

    @classmethod
    def setup_anndata(cls, adata, layer=None, site_key=None, covariate_key=None, categories=None):
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, None),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, None),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, [covariate_key]),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata)
        cls.register_manager(manager)


def _adata():
    adata = scinfl.data.synthetic_counts(n_obs=180, n_vars=20, n_sites=3, seed=2)
    adata.obs["age"] = np.random.default_rng(0).normal(60, 10, adata.n_obs).astype(np.float32)
    return adata


def _model(adata, key):
    CovariateINFL.setup_anndata(adata, site_key="site", covariate_key="age")
    torch.manual_seed(3)  # a deployed site builds its model from the run's seed
    return CovariateINFL(adata, key=key, n_hidden=16, n_latent=4)


SETTINGS = {"max_rounds": 2, "batch_size": 32, "seed": 3, "progress_bar": False}


def test_the_extra_field_reaches_every_site(key):
    model = _model(_adata(), key)
    first = model.module.decoder.px_decoder.fc_layers[0][0]
    assert first.in_features == 4 + 1  # the latent and the covariate
    sites = model._site_data(0.1, seed=3)
    assert all(REGISTRY_KEYS.CONT_COVS_KEY in site.fields for site in sites)
    batch = next(sites[0].minibatches(batch_size=8))
    assert batch[REGISTRY_KEYS.CONT_COVS_KEY].shape == (8, 1)
    model.train_federated(**SETTINGS)
    assert model.get_latent().shape == (180, 4)


@pytest.mark.slow
def test_local_simulation_and_deployment_give_the_same_model(key, tmp_path, monkeypatch):
    from scinfl.federated.flower.app import (
        client_app,
        load_results,
        model_run_config,
        server_app,
    )

    adata = _adata()
    local = _model(adata.copy(), key)
    local.train_federated(**SETTINGS)
    expected = get_shared_parameters(local.module)
    simulated = _model(adata.copy(), key)
    simulated.train_federated(engine="flower", **SETTINGS)
    for name, value in get_shared_parameters(simulated.module).items():
        assert_same_weights(value, expected[name], err_msg=name)

    key_path = key.save(tmp_path / "site.key")
    names = sorted(adata.obs["site"].unique())
    node_configs = []
    for name in names:
        adata[adata.obs["site"] == name].copy().write_h5ad(tmp_path / f"{name}.h5ad")
        node_configs.append(
            {"data-path": str(tmp_path / f"{name}.h5ad"), "key-path": str(key_path), "site": name}
        )
    run_config = model_run_config(
        local,
        **{"num-rounds": 2, "batch-size": 32, "seed": 3, "min-sites": 3},
        **{"output-dir": str(tmp_path / "out")},
    )
    assert json.loads(run_config["setup-args"])["covariate_key"] == "age"
    grid = LoopbackGrid(client_app, node_configs=node_configs, run_config=run_config)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    server_app(grid, context)
    deployed, _, _ = load_results(tmp_path / "out", key=key)
    for name, value in deployed.items():
        assert_same_weights(value, expected[name], err_msg=name)
