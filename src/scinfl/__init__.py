"""scinfl: federated omics models with a secret key embedded in the architecture (INFL)."""

from importlib.metadata import version

from . import data, federated, model, module, pl, privacy, tl
from .key import Key, KeyFileError, KeyMismatchError, MissingKeyError

__all__ = [
    "Key",
    "KeyFileError",
    "KeyMismatchError",
    "MissingKeyError",
    "data",
    "federated",
    "model",
    "module",
    "pl",
    "privacy",
    "tl",
]

__version__ = version("scinfl")
