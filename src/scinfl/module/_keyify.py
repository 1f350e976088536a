"""Plug-and-play keying: swap every linear layer of a torch module for a keyed one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._keyed_linear import PooledKeyedLinear


def keyify(
    module: nn.Module,
    key_source: Callable[[], torch.Tensor],
    layer_cls: type[nn.Linear] = PooledKeyedLinear,
    **layer_kwargs: Any,
) -> nn.Module:
    """Replace, in place, every :class:`torch.nn.Linear` inside ``module`` by a keyed copy.

    Weights and biases are copied, and keyed layers start as the identity modulation, so the
    keyed module computes the same function as before until it is trained. Layers that are
    already keyed are left alone.

    Parameters
    ----------
    module
        Any torch module (an encoder, a classifier head, a whole network). A bare
        :class:`torch.nn.Linear` cannot be replaced in place: wrap it or use
        ``layer_cls.from_linear``.
    key_source
        Callable returning the key vector (e.g. a :class:`~scinfl.module.CoordinateKeyEncoder`).
    layer_cls
        Keyed layer class with a ``from_linear(linear, key_source=..., **kwargs)`` constructor.
    **layer_kwargs
        Passed to ``layer_cls.from_linear`` (e.g. ``key_strength``, ``key_dim``).

    Returns
    -------
    The same ``module``, modified.

    Examples
    --------
    >>> import torch
    >>> from scinfl.module import CoordinateKeyEncoder, keyify
    >>> enc = CoordinateKeyEncoder()
    >>> enc.set_coordinates(torch.rand(128, 2) * 2 - 1)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> before = net(x)
    >>> _ = keyify(net, enc)
    >>> torch.allclose(net(x), before)
    True
    """
    if isinstance(module, nn.Linear):
        raise TypeError(
            "keyify() swaps the linear layers *inside* a module; for a single layer use "
            "`layer_cls.from_linear(linear, key_source=...)`."
        )
    replacements = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in replacements:
        setattr(parent, name, layer_cls.from_linear(child, key_source=key_source, **layer_kwargs))
    return module
