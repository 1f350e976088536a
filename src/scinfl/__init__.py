"""scinfl: federated omics models with a secret key embedded in the architecture (INFL).

:mod:`scinfl.privacy` (the privacy audit) is imported on first use (``scinfl.privacy``), not by
``import scinfl``.
"""

from importlib import import_module
from importlib.metadata import version

from . import data, federated, model, module, pl, pp, tl
from ._logging import configure_logging
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
    "pp",
    "privacy",
    "tl",
]

__version__ = version("scinfl")

configure_logging()

_LAZY_SUBMODULES = ("privacy",)


def __getattr__(name: str):
    # PEP 562: import the lazy submodules on first attribute access
    if name in _LAZY_SUBMODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
