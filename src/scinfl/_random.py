"""Draws that leave torch's global random generator as the user left it."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn


def forked_rng(module: nn.Module) -> AbstractContextManager:
    """A fork of torch's global generator (and of the module's GPU's): restored on exit.

    Training seeds torch from the run's seed, and inference draws (dropout aside, sampling):
    on a fork, the user's own draws afterwards (the next model's initial weights) go on from
    where they were, as if nothing had drawn.

    Examples
    --------
    >>> layer = torch.nn.Linear(2, 2)
    >>> _ = torch.manual_seed(0)
    >>> with forked_rng(layer):
    ...     _ = torch.manual_seed(1)
    >>> first = torch.rand(1)
    >>> _ = torch.manual_seed(0)
    >>> bool(torch.equal(first, torch.rand(1)))
    True
    """
    device = next(iter(module.parameters()), torch.empty(0)).device
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
