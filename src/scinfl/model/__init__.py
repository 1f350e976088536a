"""User-facing models, and the base classes (:mod:`scinfl.model.base`) they are built from."""

from . import base
from ._infl import INFL
from ._multiomics import MultiOmicsINFL
from ._perturbation import PerturbationINFL

__all__ = ["INFL", "MultiOmicsINFL", "PerturbationINFL", "base"]
