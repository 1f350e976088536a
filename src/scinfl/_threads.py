"""Keep the user's torch thread count across calls into libraries that reset it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def keeps_torch_threads(function: F) -> F:
    """Decorate ``function`` so that ``torch.get_num_threads()`` is the same after it as before.

    scanpy's neighbour graph runs numba's OpenMP layer, which sets the OpenMP thread count of
    the process to the number of cores; torch shares that runtime, so after
    ``sc.pp.neighbors`` a user's ``torch.set_num_threads(k)`` is silently gone (and training
    afterwards follows other float32 summation orders). The count is put back after the call.

    Examples
    --------
    >>> import torch
    >>> @keeps_torch_threads
    ... def noisy():
    ...     torch.set_num_threads(torch.get_num_threads() + 1)
    >>> before = torch.get_num_threads()
    >>> noisy()
    >>> torch.get_num_threads() == before
    True
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    return wrapper
