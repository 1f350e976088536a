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

    Parameters
    ----------
    module
        A module; the names come from its ``site_state_names`` attribute, if any.

    Returns
    -------
    The names (empty for a module without site-owned state).

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

    Parameters
    ----------
    module
        The model's module (any :class:`torch.nn.Module`).

    Returns
    -------
    Parameter and buffer name to a numpy copy (on the CPU), in ``state_dict`` order.

    Raises
    ------
    RuntimeError
        When a key buffer would be in the state dict (it never is by design).

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


def check_parameters_fit(module: nn.Module, parameters: Mapping[str, np.ndarray]) -> None:
    """Refuse parameters that are not ``module``'s shared parameters: names, shapes, kinds, values.

    Every tensor must be there under its name with its shape; a floating-point tensor must
    arrive as float32 or float64 (an integer, boolean, complex or half-precision copy would be
    cast silently, losing its values) and finite; an integer one as integers. Checked before
    anything else reads a model (a secret frame is drawn per axis, so a huge tensor would cost
    its memory first).

    Parameters
    ----------
    module
        The module the parameters are meant for.
    parameters
        Name to array (numpy or torch), as received.

    Raises
    ------
    ValueError
        When a name is missing or unexpected, or a shape, kind or value does not fit.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(2, 3)
    >>> check_parameters_fit(layer, {"weight": np.zeros((3, 2), np.int32), "bias": np.zeros(3)})
    Traceback (most recent call last):
    ...
    ValueError: Parameter 'weight' arrived as int32, but it is float32 in the model: its values would be cast (a model of another scinfl version, or a tampered message).
    """
    own = set(site_state_names(module))
    expected = {k: v for k, v in module.state_dict().items() if k not in own}
    missing = sorted(set(expected) - set(parameters))
    unexpected = sorted(set(parameters) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "The parameters do not fit this model "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}). All sites must build the "
            "same architecture: same features, categories, likelihood and key_mode."
        )
    for name, value in parameters.items():
        target = expected[name]
        shape = tuple(np.shape(value))
        if shape != tuple(target.shape):
            raise ValueError(
                f"Parameter {name!r} has shape {shape} here but {tuple(target.shape)} in the "
                "model: sites disagree on the feature space or on the categories. Agree on the "
                "feature names and categories before training."
            )
        dtype = _dtype_name(
            value.dtype if isinstance(value, torch.Tensor) else np.asarray(value).dtype
        )
        floating = target.is_floating_point()
        wanted = _dtype_name(target.dtype)
        if not dtype_fits(dtype, wanted, floating):
            raise ValueError(
                f"Parameter {name!r} arrived as {dtype}, but it is {wanted} in the model: its "
                "values would be cast (a model of another scinfl version, or a tampered message)."
            )
        if floating and not torch.isfinite(torch.as_tensor(value)).all():
            raise ValueError(
                f"Parameter {name!r} holds NaN or infinite values: the model it comes from "
                "diverged, or the message was tampered with."
            )


def dtype_fits(dtype, wanted, floating: bool, masked: bool = False) -> bool:
    """Whether a tensor of ``dtype`` can stand for one of ``wanted`` without its values being cast.

    A floating-point tensor must arrive as float32 or float64 (as ``uint64`` when ``masked``:
    secure aggregation's fixed-point encoding), an integer one as integers.

    Parameters
    ----------
    dtype, wanted
        The dtype that arrived and the model's (numpy or torch dtypes, or their names).
    floating
        Whether ``wanted`` is a floating-point dtype.
    masked
        The tensor is a masked upload.

    Returns
    -------
    ``True`` if it fits.

    Examples
    --------
    >>> dtype_fits(np.dtype("float64"), torch.float32, True), dtype_fits("int32", "float32", True)
    (True, False)
    """
    dtype, wanted = _dtype_name(dtype), _dtype_name(wanted)
    if floating:
        return dtype == "uint64" if masked else dtype in ("float32", "float64")
    return dtype == wanted or (_is_integer(dtype) and _is_integer(wanted))


def _dtype_name(dtype) -> str:
    """``"float32"`` for numpy's and torch's float32 alike."""
    return str(dtype).removeprefix("torch.")


def _is_integer(name: str) -> bool:
    return name.startswith(("int", "uint"))


def set_shared_parameters(module: nn.Module, parameters: Mapping[str, np.ndarray]) -> None:
    """Load shared parameters into ``module`` (strictly: see :func:`check_parameters_fit`).

    Parameters
    ----------
    module
        The module to load into (in place); its site-owned state
        (:func:`site_state_names`) keeps its values.
    parameters
        Shared parameters, as :func:`get_shared_parameters` gives them.

    Raises
    ------
    ValueError
        When the parameters do not fit ``module``.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(2, 3)
    >>> set_shared_parameters(layer, get_shared_parameters(torch.nn.Linear(2, 3)))
    """
    check_parameters_fit(module, parameters)
    state = {name: torch.as_tensor(np.asarray(value)) for name, value in parameters.items()}
    own = set(site_state_names(module))
    # the site's own state is absent by design (the module keeps its values); all else strict
    module.load_state_dict(state, strict=not own)
