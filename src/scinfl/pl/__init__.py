"""Plots."""

from ._embedding import umap

__all__ = ["umap"]
