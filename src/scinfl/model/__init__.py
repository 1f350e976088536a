"""User-facing models, and the base classes (:mod:`scinfl.model.base`) they are built from."""

# scvi-tools 1.4.2's view_anndata_setup() calls rich.pretty.pprint without importing the
# submodule (AttributeError where nothing else imported it): import it for the models' users
import rich.pretty  # noqa: F401

from . import base
from ._infl import INFL
from ._multiomics import MultiOmicsINFL
from ._perturbation import PerturbationINFL

__all__ = ["INFL", "MultiOmicsINFL", "PerturbationINFL", "base"]
