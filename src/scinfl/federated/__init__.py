"""Federated training: partitioning, client update, aggregation and engines."""

from ._aggregate import accept_updates, fedavg, is_finite_update
from ._client import (
    PROTOCOL_VERSION,
    ClientConfig,
    ClientUpdate,
    client_evaluate,
    client_update,
    site_seed,
)
from ._config import FederationConfig, PrivacyConfig
from ._dp import DPFedAvg, dp_fedavg_epsilon
from ._features import (
    agree_features,
    agree_features_from_reports,
    observed_features,
    site_feature_report,
)
from ._key_agreement import (
    KeyAdvertisement,
    advertise_key,
    generate_private_key,
    pair_secrets,
    public_key_of,
    verify_advertisements,
)
from ._local_engine import InProcessTransport, run_local
from ._parameters import (
    Parameters,
    check_parameters_fit,
    get_shared_parameters,
    set_shared_parameters,
    site_state_names,
)
from ._partition import partition
from ._round_loop import Transport, run_rounds, train_round
from ._sample_dp import DPSGDPlan, dp_sgd_epsilon, noise_seed
from ._secret_frames import (
    SecretFrames,
    frame_id,
    frames_for,
    hide_update,
    open_parameters,
    parameters_digest,
)
from ._secure_aggregation import (
    IncompleteRoundError,
    mask_update,
    protect_update,
    self_mask_seed,
    unmask_sum,
)
from ._server import FederatedServer
from ._site_data import SiteData
from ._site_identity import Roster, SiteIdentity
from ._site_runtime import (
    RefusedMessageError,
    SiteProtocol,
    SiteRuntime,
    SiteState,
    site_evaluate,
    site_parameters,
    site_train,
)

__all__ = [
    "PROTOCOL_VERSION",
    "ClientConfig",
    "ClientUpdate",
    "DPFedAvg",
    "DPSGDPlan",
    "FederatedServer",
    "FederationConfig",
    "PrivacyConfig",
    "InProcessTransport",
    "IncompleteRoundError",
    "KeyAdvertisement",
    "Parameters",
    "RefusedMessageError",
    "Roster",
    "SecretFrames",
    "SiteData",
    "SiteIdentity",
    "SiteProtocol",
    "SiteRuntime",
    "SiteState",
    "Transport",
    "accept_updates",
    "dp_fedavg_epsilon",
    "advertise_key",
    "agree_features",
    "agree_features_from_reports",
    "client_evaluate",
    "client_update",
    "dp_sgd_epsilon",
    "fedavg",
    "is_finite_update",
    "frame_id",
    "frames_for",
    "generate_private_key",
    "get_shared_parameters",
    "hide_update",
    "mask_update",
    "noise_seed",
    "observed_features",
    "open_parameters",
    "pair_secrets",
    "parameters_digest",
    "partition",
    "protect_update",
    "public_key_of",
    "run_local",
    "run_rounds",
    "self_mask_seed",
    "set_shared_parameters",
    "check_parameters_fit",
    "site_evaluate",
    "site_feature_report",
    "site_parameters",
    "site_seed",
    "site_state_names",
    "site_train",
    "train_round",
    "unmask_sum",
    "verify_advertisements",
]
