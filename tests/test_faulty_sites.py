"""A faulty or malicious site's upload or evaluation is rejected, naming it; the others train on."""

import dataclasses
import logging

import numpy as np
import pytest

import scinfl
from scinfl.federated import (
    ClientUpdate,
    FederatedServer,
    FederationConfig,
    SiteData,
    accept_updates,
    run_local,
)
from scinfl.federated import _site_runtime as runtime
from scinfl.module import KeyedVAE

REFERENCE = {"w": np.ones((4, 3), np.float32), "steps": np.zeros(1, np.int64)}


def _upload(site="a", n=10, w=None, steps=None):
    w = np.full((4, 3), 1.1, np.float32) if w is None else w
    steps = np.ones(1, np.int64) if steps is None else steps
    return ClientUpdate(site, n, {"w": w, "steps": steps})


@pytest.mark.parametrize("n", [0, -3, float("nan"), float("inf"), 2.5, True, "10"])
def test_a_count_that_is_not_a_positive_integer_is_rejected(n, caplog):
    with caplog.at_level(logging.WARNING):
        assert accept_updates([_upload(n=n)], None, None, reference=REFERENCE) == []
    assert "site 'a'" in caplog.text and "training samples" in caplog.text


def test_a_count_other_than_the_declared_one_is_rejected_and_a_whole_float_is_taken(caplog):
    lying, honest = _upload("a", n=10**9), _upload("b", n=40.0)
    with caplog.at_level(logging.WARNING):
        kept = accept_updates(
            [lying, honest], None, None, reference=REFERENCE, expected_rows={"a": 40, "b": 40}
        )
    assert kept == [honest]
    assert "declared 40" in caplog.text


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, np.float16])
def test_a_float_tensor_of_another_kind_is_rejected(dtype, caplog):
    odd = _upload(w=np.ones((4, 3), dtype))
    with caplog.at_level(logging.WARNING):
        assert accept_updates([odd], None, None, reference=REFERENCE) == []
    assert "arrived as" in caplog.text


def test_an_upload_of_the_model_it_was_sent_is_rejected(caplog):
    echo = _upload(w=REFERENCE["w"].copy())
    with caplog.at_level(logging.WARNING):
        assert accept_updates([echo], None, None, reference=REFERENCE) == []
    assert "did not train" in caplog.text


@pytest.mark.parametrize("value", [1e30, 1e6])
def test_an_upload_far_larger_than_the_model_is_rejected(value, caplog):
    w = np.full((4, 3), 1.1, np.float32)
    w[0, 0] = value
    with caplog.at_level(logging.WARNING):
        assert accept_updates([_upload(w=w)], None, None, reference=REFERENCE) == []
    assert "norm" in caplog.text


def test_masked_uploads_are_checked_for_kind_and_count_only():
    masked = _upload(w=np.zeros((4, 3), np.uint64))
    assert accept_updates([masked], None, None, reference=REFERENCE, masked=True) == [masked]
    assert accept_updates([masked], None, None, reference=REFERENCE) == []
    zero = dataclasses.replace(masked, n=0)
    assert accept_updates([zero], None, None, reference=REFERENCE, masked=True) == []


def test_a_broken_evaluation_leaves_the_selection_to_the_others(caplog):
    server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=2))
    server.site_rows = {"a": (30, 5), "b": (30, 5), "c": (30, 5)}
    with caplog.at_level(logging.WARNING):
        server.record_evaluation(
            0,
            {
                "a": {"n_val": 5, "val_loss": 2.0},
                "b": {"n_val": 5, "val_loss": float("nan")},
                "c": {"n_val": 10**12, "val_loss": 1e-9},
            },
        )
    assert server.best_round == 0 and server.best_val_loss == 2.0
    assert "site 'b'" in caplog.text and "site 'c'" in caplog.text


def test_a_site_cannot_rewrite_the_server_columns_of_the_history(caplog):
    server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=2))
    spoof = ClientUpdate("a", 3, {"w": np.ones(1)}, metrics={"round": 7, "site": "z", "x": 1.0})
    with caplog.at_level(logging.WARNING):
        server.aggregate(0, [spoof])
    row = server.history().iloc[0]
    assert (row["round"], row["site"], row["x"]) == (0, "a", 1.0)
    assert "named like the server's columns" in caplog.text


def test_two_sites_of_one_name_are_refused():
    sites = [SiteData.from_arrays("a", np.random.default_rng(0).poisson(2, (20, 4))) for _ in "ab"]
    with pytest.raises(ValueError, match="Two sites are named 'a'"):
        run_local(KeyedVAE(n_input=4, key_mode=None), sites, FederationConfig(max_rounds=1))


def _huge(parameters):
    """The upload with its first weight matrix a million times larger."""
    name = next(n for n, v in parameters.items() if v.dtype.kind == "f" and v.ndim == 2)
    return {**parameters, name: parameters[name] * np.float32(1e6)}


@pytest.mark.parametrize("fault", [_huge, None], ids=["huge", "echo"])
def test_one_faulty_site_does_not_take_the_federation_down(fault, monkeypatch, caplog):
    """The faulty site's uploads are rejected every round; the model trains on the others."""
    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=30, n_sites=3, seed=0)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16, n_latent=4)
    train = runtime.site_train
    faulty = sorted(adata.obs["site"].unique())[1]

    def faulty_train(site_runtime, received, config, *args, **kwargs):
        update = train(site_runtime, received, config, *args, **kwargs)
        if site_runtime.site.name != faulty:
            return update
        # the echo: the model it received, in the frame it came in
        parameters = received if fault is None else fault(update.parameters)
        return dataclasses.replace(update, parameters=parameters)

    monkeypatch.setattr(runtime, "site_train", faulty_train)
    with caplog.at_level(logging.WARNING):
        history = model.train_federated(max_rounds=3, batch_size=32, progress_bar=False, seed=0)
    trained = history[history["trained"]]
    assert not trained.loc[trained["site"] == faulty, "accepted"].any()
    assert trained.loc[trained["site"] != faulty, "accepted"].all()
    assert np.isfinite(model.get_latent()).all()
    assert f"site {faulty!r}" in caplog.text
