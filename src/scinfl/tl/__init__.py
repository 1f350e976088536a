"""Scanpy-style tools that write into ``.obs`` / ``.obsm`` / ``.uns`` (never key material)."""

from ._cluster import cluster
from ._domains import domains
from ._embed import embed
from ._predict import predict

__all__ = ["cluster", "domains", "embed", "predict"]
