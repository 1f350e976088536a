"""Data loaders (real data shipped by registry packages) and synthetic generators."""

from ._pbmc68k import pbmc68k
from ._synthetic import synthetic_counts

__all__ = ["pbmc68k", "synthetic_counts"]
