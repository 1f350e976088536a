"""Preprocessing: per-site spatial graphs, mosaic MuData padded for multi-modal models."""

from ._modalities import pad_modalities
from ._spatial_neighbors import spatial_neighbors

__all__ = ["pad_modalities", "spatial_neighbors"]
