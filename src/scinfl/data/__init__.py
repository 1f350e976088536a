"""Data loaders (real data shipped by registry packages) and synthetic generators."""

from ._cptac import cptac_ucec
from ._cscc import cscc_spatial
from ._kang import kang2018
from ._mosaic import make_mosaic
from ._pbmc68k import pbmc68k
from ._synthetic import synthetic_counts
from ._synthetic_multiome import synthetic_multiome
from ._synthetic_perturbation import synthetic_perturbation
from ._synthetic_spatial import synthetic_spatial

__all__ = [
    "cptac_ucec",
    "cscc_spatial",
    "kang2018",
    "make_mosaic",
    "pbmc68k",
    "synthetic_counts",
    "synthetic_perturbation",
    "synthetic_multiome",
    "synthetic_spatial",
]
