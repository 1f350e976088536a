"""Preprocessing that writes into ``.obsp`` / ``.uns`` (per-site spatial graphs)."""

from ._spatial_neighbors import spatial_neighbors

__all__ = ["spatial_neighbors"]
