"""Plots."""

from ._embedding import umap
from ._perturbation import perturbation
from ._privacy import privacy
from ._spatial import spatial

__all__ = ["perturbation", "privacy", "spatial", "umap"]
