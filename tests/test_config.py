"""The federation's settings: one nested dataclass, flat names at the edges."""

import json
import re

import numpy as np
import pytest

import scinfl
from scinfl.federated import FederatedServer, FederationConfig, PrivacyConfig
from scinfl.federated._config import TRAJECTORY_SETTINGS
from scinfl.federated.flower.app import DEFAULT_RUN_CONFIG, federation_config


def test_flat_settings_round_trip_and_privacy_is_nested():
    config = FederationConfig.from_settings(
        max_rounds=7, lr=3e-3, privacy="secagg", secret_frames=True, sample_dp_epsilon=2.0
    )
    assert isinstance(config.privacy, PrivacyConfig)
    assert config.privacy.mode == "secagg" and config.privacy.secure_aggregation
    assert config.privacy.sample_dp_epsilon == 2.0 and config.validation_size == 0.0
    flat = config.settings()
    assert flat["privacy"] == "secagg" and "mode" not in flat
    assert set(flat) == set(FederationConfig.setting_defaults())
    assert FederationConfig.from_settings(**flat) == config


def test_a_privacy_object_is_changed_by_flat_names():
    privacy = PrivacyConfig("dp", dp_noise_multiplier=2.0)
    config = FederationConfig.from_settings(privacy=privacy, dp_clipping_norm=0.5)
    assert config.privacy == PrivacyConfig("dp", dp_noise_multiplier=2.0, dp_clipping_norm=0.5)
    assert FederationConfig(privacy="dp").privacy == PrivacyConfig("dp")


def test_unknown_or_invalid_settings_are_refused_with_the_known_names():
    with pytest.raises(TypeError, match="Unknown training settings \\['dp_noise'\\].*dp_delta"):
        FederationConfig.from_settings(dp_noise=1.0)
    with pytest.raises(ValueError, match="privacy must be None, 'dp' or 'secagg'"):
        FederationConfig.from_settings(privacy="homomorphic")
    with pytest.raises(ValueError, match="secret_frames=False for DP-FedAvg"):
        PrivacyConfig("dp", secret_frames=True)


def test_every_setting_is_a_run_config_entry_read_back_with_its_type():
    entries = {name.replace("_", "-") for name in FederationConfig.setting_defaults()}
    assert (
        entries - {"max-rounds"} <= set(DEFAULT_RUN_CONFIG) and "num-rounds" in DEFAULT_RUN_CONFIG
    )
    config = federation_config(
        {"num-rounds": 3, "privacy": "dp", "dp-noise-multiplier": 2, "sample-dp-epsilon": ""}
    )
    assert config.max_rounds == 3 and config.privacy.mode == "dp"
    assert config.privacy.dp_noise_multiplier == 2.0 and config.privacy.sample_dp_epsilon is None
    assert config.privacy.secret_frames is False  # DP-FedAvg needs a common frame


def test_checkpoint_keeps_flat_settings_and_refuses_a_changed_privacy_part(tmp_path):
    config = FederationConfig(max_rounds=2, privacy=PrivacyConfig(dp_noise_multiplier=2.0))
    server = FederatedServer({"w": np.zeros(1)}, config)
    server.record_evaluation(0, {})
    server.save_checkpoint(tmp_path)
    saved = json.loads((tmp_path / "checkpoint.json").read_text())["config"]
    assert saved == config.settings()
    assert {"privacy", "dp_noise_multiplier", "secret_frames"} <= set(TRAJECTORY_SETTINGS)
    longer = FederationConfig(max_rounds=4, privacy=PrivacyConfig(dp_noise_multiplier=2.0))
    assert FederatedServer.from_checkpoint(tmp_path, longer).next_round == 1
    with pytest.raises(ValueError, match=r"dp_noise_multiplier \(2.0 -> 1.0\)"):
        FederatedServer.from_checkpoint(tmp_path, FederationConfig(max_rounds=4))


def test_train_federated_takes_the_privacy_part_whole_or_by_name():
    adata = scinfl.data.synthetic_counts(n_obs=90, n_vars=10, n_sites=3, seed=1)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=8, n_latent=3)
    by_name = model._federation_config(privacy="secagg", max_rounds=2)
    whole = model._federation_config(privacy=PrivacyConfig("secagg"), max_rounds=2)
    assert by_name == whole and whole.privacy.secret_frames  # decided for the key
    epsilons = {}
    for noise in (0.5, 2.0):
        history = model.train_federated(
            max_rounds=1, privacy=PrivacyConfig("dp", dp_noise_multiplier=noise), progress_bar=False
        )
        epsilons[noise] = history["dp_epsilon"].max()
    assert epsilons[0.5] > epsilons[2.0] > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kl_warmup_rounds": -1}, "kl_warmup_rounds must be an integer >= 1 or None, got -1"),
        ({"kl_warmup_rounds": 0}, "kl_warmup_rounds must be an integer >= 1"),
        ({"balance_classes": "no"}, "balance_classes must be True or False, got 'no'"),
        ({"secret_frames": "no"}, "secret_frames must be True, False or None"),
        ({"fraction": "half"}, "fraction must be a number in (0, 1]"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a number > 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"min_cells_per_site": 0}, "min_cells_per_site must be an integer >= 2"),
        ({"early_stopping_patience": 0}, "early_stopping_patience must be an integer >= 1"),
        ({"privacy": "dp", "dp_delta": 0.0}, "dp_delta must be a number in (0, 1)"),
        ({"sample_dp_epsilon": float("inf")}, "sample_dp_epsilon must be a number > 0"),
        ({"sample_dp_epsilon": 3.0, "privacy": "dp"}, "use one of them"),
        ({"early_stopping": True, "validation_size": 0.0}, "it would never stop"),
    ],
)
def test_settings_of_the_wrong_type_or_range_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FederationConfig.from_settings(**settings)
