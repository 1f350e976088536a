"""Plots."""

from ._embedding import umap
from ._privacy import privacy
from ._spatial import spatial

__all__ = ["privacy", "spatial", "umap"]
