"""Shared by the test suite and the docstring examples run from ``src``."""

import logging

import pytest
import scvi


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
