"""What travels: the shared parameters of a module, as plain numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

#: Shared parameters by name, as numpy arrays: what a site uploads and the server averages.
Parameters = dict[str, np.ndarray]

# names that would betray key material; the key lives in non-persistent buffers, so none of
# these can appear in a state_dict, but every upload is checked all the same
_FORBIDDEN_SUBSTRINGS = ("coordinates", "key_seed")


def site_state_names(module: nn.Module) -> tuple[str, ...]:
    """``state_dict`` entries every site sets itself and never shares (``site_state_names``).

    Examples
    --------
    >>> import torch
    >>> site_state_names(torch.nn.Linear(2, 3))
    ()
    """
    return tuple(getattr(module, "site_state_names", ()))


def get_shared_parameters(module: nn.Module) -> Parameters:
    """Copy of everything a site shares: the module's ``state_dict`` as numpy arrays.

    Key material is held in non-persistent buffers and is therefore never part of it; state
    each site sets itself (:func:`site_state_names`, e.g. the feature scale) is left out.

    Examples
    --------
    >>> import torch
    >>> params = get_shared_parameters(torch.nn.Linear(2, 3))
    >>> sorted(params)
    ['bias', 'weight']
    """
    state = module.state_dict()
    leaked = [name for name in state if any(s in name for s in _FORBIDDEN_SUBSTRINGS)]
    if leaked:
        raise RuntimeError(f"Refusing to share key material: {leaked}.")
    own = set(site_state_names(module))
    return {name: t.detach().cpu().numpy().copy() for name, t in state.items() if name not in own}


def set_shared_parameters(module: nn.Module, parameters: Mapping[str, np.ndarray]) -> None:
    """Load shared parameters into ``module`` (strictly: names and shapes must match).

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(2, 3)
    >>> set_shared_parameters(layer, get_shared_parameters(torch.nn.Linear(2, 3)))
    """
    state = {name: torch.as_tensor(np.asarray(value)) for name, value in parameters.items()}
    own = set(site_state_names(module))
    expected = {k: v for k, v in module.state_dict().items() if k not in own}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "The parameters do not fit this model "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}). All sites must build the "
            "same architecture: same features, categories, likelihood and key_mode."
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(value.shape)} here but "
                f"{tuple(expected[name].shape)} in the model: sites disagree on the feature space "
                "or on the categories. Agree on the feature names and categories before training."
            )
    # the site's own state is absent by design (the module keeps its values); all else strict
    module.load_state_dict(state, strict=not own)
