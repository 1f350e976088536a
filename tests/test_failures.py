"""Runs, saves and tools stopped part-way (an error, Ctrl-C): nothing is left half-written."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch

import scinfl

from ._equality import assert_same_weights


def _model(labels: bool = False, key: scinfl.Key | None = None) -> scinfl.model.INFL:
    adata = scinfl.data.synthetic_counts(n_obs=160, n_vars=16, n_sites=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label" if labels else None)
    return scinfl.model.INFL(adata, key=key or scinfl.Key.generate(), n_hidden=16)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.module.state_dict().items()}


def _interrupt_after(monkeypatch, steps: int, error=KeyboardInterrupt) -> None:
    """Make the optimiser raise ``error`` after ``steps`` steps (Ctrl-C mid-epoch)."""
    step = torch.optim.Adam.step
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise error
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted)


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError("disk gone")])
def test_an_interrupted_run_leaves_the_trained_model_as_it_was(monkeypatch, error):
    model = _model()
    model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
    before, history = _state(model), model.history["elbo_train"].copy()
    latent = model.get_latent_representation()
    _interrupt_after(monkeypatch, 5, error)
    with pytest.raises(type(error) if isinstance(error, Exception) else error):
        model.train_federated(max_rounds=3, batch_size=32, progress_bar=False)
    after = model.module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not model.module.training and model.is_trained_
    assert model.history["elbo_train"].equals(history)
    assert_same_weights(model.get_latent_representation(), latent)  # eval mode: no dropout


def test_a_run_restarted_after_an_interrupt_equals_an_uninterrupted_one(monkeypatch):
    key = scinfl.Key.generate()
    first, second = _model(key=key), _model(key=key)
    second.module.load_state_dict(first.module.state_dict())
    first.train_federated(max_rounds=2, batch_size=32, progress_bar=False, seed=3)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            second.train_federated(max_rounds=2, batch_size=32, progress_bar=False, seed=3)
    assert not second.is_trained_
    second.train_federated(max_rounds=2, batch_size=32, progress_bar=False, seed=3)
    assert_same_weights(first.get_latent_representation(), second.get_latent_representation())


def test_a_site_that_fails_is_named(monkeypatch):
    from scinfl.federated import SiteData

    model = _model()
    minibatches = SiteData.minibatches

    def unreadable(self, *args, **kwargs):
        if self.name == "site1":
            raise OSError("the site's disk is gone")
        return minibatches(self, *args, **kwargs)

    monkeypatch.setattr(SiteData, "minibatches", unreadable)
    with pytest.raises(OSError) as error:
        model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    assert error.value.__notes__ == ["(raised at site 'site1' in round 0)"]


def test_an_interrupted_save_leaves_the_saved_model_as_it_was(monkeypatch, tmp_path):
    model = _model()
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    path = tmp_path / "model"
    model.save(path)
    saved = (path / "model.pt").read_bytes()
    fresh = tmp_path / "new" / "model"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save(path, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        model.save(fresh)
    assert (path / "model.pt").read_bytes() == saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]  # nor staging, nor "new"
    monkeypatch.undo()
    loaded = scinfl.model.INFL.load(path, model.adata, key=model._key)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save(path)


def test_an_interrupted_cluster_leaves_adata_as_it_was(monkeypatch):
    adata = scinfl.data.synthetic_counts(n_obs=80, n_vars=12)
    adata.obsm["X_scinfl"] = np.log1p(adata.X.toarray())
    scinfl.tl.cluster(adata, n_neighbors=10, resolution=0.5)
    before = (adata.obs.copy(), dict(adata.obsp), dict(adata.uns))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sc.tl, "umap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scinfl.tl.cluster(adata, n_neighbors=5, resolution=3.0)
    assert adata.obs.equals(before[0])
    assert all((adata.obsp[k] != v).nnz == 0 for k, v in before[1].items())
    assert adata.uns["scinfl_leiden"] == before[2]["scinfl_leiden"]
    with pytest.raises(ValueError, match="random_state"):
        scinfl.tl.cluster(adata, random_state="abc")


def test_tools_do_not_write_over_the_columns_they_did_not_write():
    model = _model(labels=True)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    adata = model.adata
    labels = adata.obs["label"].copy()
    with pytest.raises(ValueError, match=r"adata.obs\['label'\] holds data"):
        scinfl.tl.predict(adata, model, key_added="label")
    scinfl.tl.embed(adata, model)
    with pytest.raises(ValueError, match=r"del adata.obs\['site'\]"):
        scinfl.tl.cluster(adata, key_added="site", n_neighbors=5)
    assert adata.obs["label"].equals(labels)
    scinfl.tl.predict(adata, model, key_added="pred")
    scinfl.tl.predict(adata, model, key_added="pred")  # its own column: written again
    scinfl.tl.cluster(adata, n_neighbors=5)
    scinfl.tl.cluster(adata, n_neighbors=5, resolution=0.5)


def test_a_failed_checkpoint_write_leaves_no_partial_file(monkeypatch, tmp_path):
    from scinfl.federated import FederatedServer, FederationConfig

    server = FederatedServer({"w": np.zeros(3)}, FederationConfig(max_rounds=3))
    server.record_evaluation(0, {})
    server.save_checkpoint(tmp_path)
    listed = sorted(p.name for p in tmp_path.iterdir())

    def full(*args, **kwargs):
        raise OSError("No space left on device")

    server.record_evaluation(1, {})
    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError):
        server.save_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == listed


def test_a_save_interrupted_while_moving_its_files_in_puts_the_old_ones_back(monkeypatch, tmp_path):
    import os

    model = _model()
    path = tmp_path / "model"
    model.save(path, save_anndata=True)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    replace, calls = os.replace, {"n": 0}

    def interrupted(source, destination):
        calls["n"] += 1
        if calls["n"] == 3:  # the second file: the first is in, its old one kept aside
            raise KeyboardInterrupt
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save(path, overwrite=True, save_anndata=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_saving_over_a_model_saved_with_its_data_does_not_pair_it_with_that_data(tmp_path):
    model = _model()
    model.save(tmp_path / "model", save_anndata=True)
    other = _model()
    other.save(tmp_path / "model", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.pt"]
