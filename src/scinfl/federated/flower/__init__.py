"""Flower engine: a ``ServerApp`` and a ``ClientApp`` built on scinfl's client and server code.

Needs the ``flower`` extra (``pip install "scinfl[flower]"``). The apps reuse
:func:`~scinfl.federated.client_update`, :func:`~scinfl.federated.client_evaluate` and
:class:`~scinfl.federated.FederatedServer` unchanged; Flower only moves the messages. The key
never enters a message: each site's ClientApp holds its own key and reports its fingerprint
and version, and the server drops updates under another key.

- :func:`run_flower_simulation`: Flower's simulation engine, same contract as
  :func:`~scinfl.federated.run_local`.
- :mod:`scinfl.federated.flower.app`: ``server_app`` / ``client_app`` for a deployment
  (``flower-superlink``, one ``flower-supernode`` per site, ``flwr run``).
- :func:`make_server_app` / :func:`make_client_app`: the apps, around any server state and
  any way of finding a node's site.
"""

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "scinfl.federated.flower needs Flower: pip install 'scinfl[flower]' "
        "(flwr[simulation]==1.41.*)."
    ) from err

from scinfl.federated._site_runtime import SiteRuntime

from ._client_app import make_client_app
from ._records import (
    config_to_record,
    content_to_update,
    parameters_to_record,
    record_to_config,
    record_to_parameters,
    update_to_content,
)
from ._server_app import (
    GridTransport,
    SiteDirectory,
    agree_public_keys,
    discover_sites,
    make_server_app,
    request_parameters,
    run_flower_rounds,
    share_feature_scale,
)
from ._simulation import SimulationSites, run_flower_simulation

__all__ = [
    "GridTransport",
    "SimulationSites",
    "SiteDirectory",
    "SiteRuntime",
    "agree_public_keys",
    "config_to_record",
    "content_to_update",
    "discover_sites",
    "make_client_app",
    "make_server_app",
    "parameters_to_record",
    "record_to_config",
    "record_to_parameters",
    "request_parameters",
    "run_flower_simulation",
    "share_feature_scale",
    "run_flower_rounds",
    "update_to_content",
]
