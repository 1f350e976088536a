"""Scanpy-style tools that write into ``.obs`` / ``.obsm`` / ``.uns`` (never key material)."""

from ._cluster import cluster
from ._domains import domains
from ._embed import embed
from ._perturbation import predict_perturbation
from ._perturbation_scores import e_distance, perturbation_scores, response_genes
from ._predict import predict

__all__ = [
    "cluster",
    "domains",
    "e_distance",
    "embed",
    "perturbation_scores",
    "predict",
    "predict_perturbation",
    "response_genes",
]
