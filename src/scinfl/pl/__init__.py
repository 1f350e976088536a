"""Plots."""

from ._embedding import umap
from ._privacy import privacy

__all__ = ["privacy", "umap"]
