"""One site's side of a round, whatever carries the messages: train, evaluate, initial weights.

The Flower ``ClientApp`` and the in-process transport of :func:`~scinfl.federated.run_local`
both answer the server with these functions, so the two engines compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from scinfl.key import Key

from ._client import ClientConfig, ClientUpdate, client_evaluate, client_update
from ._parameters import Parameters, get_shared_parameters
from ._secret_frames import INITIAL_FRAME, frames_for, open_parameters
from ._secure_aggregation import protect_update
from ._site_data import SiteData


@dataclass
class SiteRuntime:
    """What one site needs to answer the server: its module (key set), its data, its key.

    The key lives in the module's non-persistent buffers (and in ``key``, for secure
    aggregation's masks and secret frames); only its fingerprint and version are ever sent.

    Parameters
    ----------
    module
        The site's module with the federation's key set.
    site
        The site's data.
    key_fingerprint, key_version
        Public identity of the site's key, sent with every reply.
    key
        The key itself (never sent).

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> runtime.site.name
    'a'
    """

    module: nn.Module
    site: SiteData
    key_fingerprint: str | None = None
    key_version: int | None = None
    key: Key | None = field(default=None, repr=False)


def site_train(
    runtime: SiteRuntime,
    received: Parameters,
    config: ClientConfig,
    opened: Parameters | None = None,
) -> ClientUpdate:
    """Train from what the server sent; the update as it goes back (framed, masked).

    Parameters
    ----------
    runtime
        The site.
    received
        The global parameters as sent (in the secret frame ``config.frame`` under frames).
    config
        The round's instructions.
    opened
        ``received`` already decoded from its frame (a caller playing several sites decodes
        once per round).

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> site_train(runtime, get_shared_parameters(runtime.module), ClientConfig(round=0)).n
    9
    """
    if opened is None:
        opened = open_parameters(received, runtime.key, config)
    update = client_update(
        runtime.module,
        runtime.site,
        opened,
        config,
        key_fingerprint=runtime.key_fingerprint,
        key_version=runtime.key_version,
    )
    return protect_update(update, runtime.key, config, received)


def site_evaluate(
    runtime: SiteRuntime,
    received: Parameters,
    config: ClientConfig | None = None,
    opened: Parameters | None = None,
) -> ClientUpdate:
    """Validation metrics of what the server sent, as an update without parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> site_evaluate(runtime, get_shared_parameters(runtime.module)).metrics["n_val"]
    1.0
    """
    if opened is None:
        opened = received if config is None else open_parameters(received, runtime.key, config)
    metrics = client_evaluate(runtime.module, runtime.site, opened)
    return ClientUpdate(
        site=runtime.site.name,
        n=runtime.site.n_val,
        parameters={},
        metrics=metrics,
        key_fingerprint=runtime.key_fingerprint,
        key_version=runtime.key_version,
    )


def site_parameters(runtime: SiteRuntime, in_secret_frame: bool = False) -> Parameters:
    """The site's freshly built shared parameters, to start a federation from.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> "px_r" in site_parameters(runtime)
    True
    """
    parameters = get_shared_parameters(runtime.module)
    if in_secret_frame:
        parameters = frames_for(runtime.key).encode(parameters, INITIAL_FRAME)
    return parameters
