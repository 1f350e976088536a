"""Preprocessing: agreed features by name, per-site spatial graphs, mosaic MuData padded."""

from ._features import align_features
from ._modalities import pad_modalities
from ._spatial_neighbors import spatial_neighbors

__all__ = ["align_features", "pad_modalities", "spatial_neighbors"]
