"""What a user sees and controls while training: verbosity, argument names, messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scvi

import scinfl
from scinfl.federated import FederatedServer, FederationConfig
from scinfl.model._infl import _undertrained_advice


@pytest.fixture
def followed_verbosity():
    # the "scinfl" logger follows scvi-tools' verbosity until a level is set on it (pytest's
    # caplog sets one): start each test from the level a user's session has
    logger, scvi_logger = logging.getLogger("scinfl"), logging.getLogger("scvi")
    own, verbosity = logger.__dict__.get("_own_level"), scvi_logger.level
    logger.setLevel(logging.NOTSET)
    yield logger
    logger.setLevel(own or logging.NOTSET)
    scvi.settings.verbosity = verbosity


def test_scvi_tools_verbosity_silences_scinfl_too(followed_verbosity):
    module_logger = logging.getLogger("scinfl.model._validation")
    assert module_logger.isEnabledFor(logging.INFO)
    scvi.settings.verbosity = logging.WARNING
    assert not module_logger.isEnabledFor(logging.INFO)
    assert module_logger.isEnabledFor(logging.WARNING)
    followed_verbosity.setLevel(logging.DEBUG)  # scinfl's own level wins
    assert module_logger.isEnabledFor(logging.DEBUG)


@pytest.fixture
def model():
    adata = scinfl.data.synthetic_counts(n_obs=90, n_vars=10, n_sites=3)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    return scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=8)


@pytest.mark.parametrize(
    ("method", "settings", "match"),
    [
        (
            "train_federated",
            {"enable_progress_bar": False},
            r"enable_progress_bar \(here: progress_bar\)",
        ),
        ("train_federated", {"max_epochs": 2}, r"max_epochs \(here: max_rounds\)"),
        ("train_federated", {"progress_bar": "yes"}, "progress_bar must be True or False"),
        ("train_centralized", {"max_rounds": 2}, r"max_rounds \(here: max_epochs\)"),
        (
            "train_centralized",
            {"local_epochs": 5},
            "pooled as one site: local_epochs=5 would change",
        ),
        ("train_centralized", {"privacy": "secagg"}, "sample_dp_epsilon"),
        ("train_centralized", {"min_available": 2}, "settings of train_federated"),
    ],
)
def test_training_arguments_are_named_as_the_method_names_them(model, method, settings, match):
    with pytest.raises(TypeError, match=match):
        getattr(model, method)(**settings)


def test_centralized_ignores_what_has_no_use_for_one_site(model, caplog):
    # a settings dict shared with train_federated, to compare the two
    shared = {"fraction": 0.5, "min_cells_per_site": 5, "local_epochs": 1, "privacy": None}
    with caplog.at_level(logging.INFO, logger="scinfl"):
        model.train_centralized(max_epochs=1, batch_size=32, progress_bar=False, **shared)
    assert "fraction, min_cells_per_site: no use when every row is one site" in caplog.text


def test_centralized_checks_speak_of_epochs(model):
    with pytest.raises(ValueError, match="max_epochs must be an integer >= 1"):
        model.train_centralized(max_epochs=0)
    with pytest.raises(ValueError, match="kl_warmup_epochs must be"):
        model.train_centralized(max_epochs=2, kl_warmup_epochs=0)


def test_a_refused_run_of_a_continuous_model_is_not_said_to_have_stopped(tmp_path, caplog):
    # fitting the feature scale changed the module before the checkpoint was refused
    adata = scinfl.data.synthetic_counts(n_obs=90, n_vars=10, n_sites=3)
    adata.X = 3 * np.log1p(adata.X.toarray()) + 20
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    settings = {"max_rounds": 1, "batch_size": 32, "progress_bar": False}
    first = scinfl.model.INFL(adata, key=scinfl.Key.generate(), gene_likelihood="normal")
    first.train_federated(checkpoint_dir=tmp_path, **settings)
    second = scinfl.model.INFL(adata, key=scinfl.Key.generate(), gene_likelihood="normal")
    with caplog.at_level(logging.WARNING, logger="scinfl"), pytest.raises(ValueError):
        second.train_federated(checkpoint_dir=tmp_path, **settings)
    assert "Training stopped" not in caplog.text


def test_undertrained_advice_names_what_the_run_did_not_do():
    plain = _undertrained_advice(FederationConfig(max_rounds=10), "rounds")
    assert "max_rounds=20" in plain and "local_epochs=5" in plain and "balance_classes" in plain
    private = FederationConfig.from_settings(
        max_rounds=10, local_epochs=5, batch_size=32, sample_dp_epsilon=5.0
    )
    advice = _undertrained_advice(private, "rounds")
    assert "local_epochs" not in advice and "batch_size" not in advice
    assert "balance_classes" not in advice  # refused under sample-level DP
    assert "differential privacy" in advice
    assert "max_epochs=20" in _undertrained_advice(FederationConfig(max_rounds=10), "epochs")


def test_the_progress_bar_shows_the_selections_validation_loss():
    server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=2))
    server.record_evaluation(
        0, {"a": {"n_val": 30, "val_loss": 1.0}, "b": {"n_val": 10, "val_loss": 3.0}}
    )
    assert server.last_val_loss == pytest.approx(1.5)  # weighted by rows, not 2.0
    assert server.best_val_loss == server.last_val_loss


def test_centralized_takes_sample_level_dp_as_a_privacy_config(model):
    # a PrivacyConfig of DP-SGD alone (or the default one) means the same pooled
    privacy = scinfl.federated.PrivacyConfig(sample_dp_epsilon=50.0)
    model.train_centralized(max_epochs=1, batch_size=32, progress_bar=None, privacy=privacy)
    model.train_centralized(max_epochs=1, batch_size=32, progress_bar=np.bool_(False))


def test_resuming_longer_says_which_kl_warm_up_it_keeps(tmp_path, caplog):
    adata = scinfl.data.synthetic_counts(n_obs=90, n_vars=10, n_sites=3)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=8)
    settings = {"batch_size": 32, "progress_bar": False, "checkpoint_dir": tmp_path}
    model.train_federated(max_rounds=2, **settings)
    with caplog.at_level(logging.INFO, logger="scinfl"):
        model.train_federated(max_rounds=4, resume=True, **settings)
    assert "KL warm-up stays as the run began: 1 round(s)" in caplog.text
