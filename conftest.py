"""Settings shared by the tests (``tests/``) and the docstring examples collected under ``src/``."""

import logging
import os

# one thread: the tests and examples use tiny data, where more threads only compete for cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util

import pytest
import scvi
import torch

torch.set_num_threads(1)

# the Flower engine's examples need the optional `flower` extra
collect_ignore_glob = (
    [] if importlib.util.find_spec("flwr") else ["src/scinfl/federated/flower/*.py"]
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one torch thread, whatever a library called before it left behind."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_scvi_in_doctests(request):
    """scvi-tools logs through rich to stdout, which a doctest would read as output."""
    if isinstance(request.node, pytest.DoctestItem):
        verbosity = scvi.settings.verbosity
        scvi.settings.verbosity = logging.WARNING
        yield
        scvi.settings.verbosity = verbosity
    else:
        yield
