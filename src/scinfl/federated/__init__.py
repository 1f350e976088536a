"""Federated training: partitioning, client update, aggregation and engines."""

from ._aggregate import accept_updates, fedavg
from ._client import ClientConfig, ClientUpdate, client_evaluate, client_update, site_seed
from ._dp import DPFedAvg
from ._features import (
    agree_features,
    agree_features_from_reports,
    observed_features,
    site_feature_report,
)
from ._local_engine import run_local
from ._parameters import (
    Parameters,
    get_shared_parameters,
    set_shared_parameters,
    site_state_names,
)
from ._partition import partition
from ._secret_frames import (
    SecretFrames,
    frame_id,
    frames_for,
    hide_update,
    open_parameters,
)
from ._secure_aggregation import IncompleteRoundError, mask_update, protect_update, unmask_sum
from ._server import FederatedServer, FederationConfig
from ._site_data import SiteData

__all__ = [
    "ClientConfig",
    "ClientUpdate",
    "DPFedAvg",
    "FederatedServer",
    "FederationConfig",
    "IncompleteRoundError",
    "Parameters",
    "SecretFrames",
    "SiteData",
    "accept_updates",
    "agree_features",
    "agree_features_from_reports",
    "client_evaluate",
    "client_update",
    "fedavg",
    "frame_id",
    "frames_for",
    "get_shared_parameters",
    "hide_update",
    "mask_update",
    "observed_features",
    "open_parameters",
    "partition",
    "protect_update",
    "run_local",
    "set_shared_parameters",
    "site_feature_report",
    "site_state_names",
    "site_seed",
    "unmask_sum",
]
