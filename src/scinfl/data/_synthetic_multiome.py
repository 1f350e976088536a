"""Synthetic single-cell RNA + protein counts (CITE-seq-like) with known cell types."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scipy import sparse

from scinfl._mudata import mudata_of

from ._sizes import check_sizes


def synthetic_multiome(
    n_obs: int = 600,
    n_genes: int = 200,
    n_proteins: int = 24,
    n_types: int = 6,
    n_sites: int = 3,
    seed: int = 0,
) -> MuData:
    """RNA and protein counts of the same cells, where each modality alone tells part of the type.

    Cell types come in pairs: the RNA separates the pairs (type ``t`` up-regulates the gene
    block of ``t // 2``, and only weakly a block of its own), the proteins the members of a
    pair (type ``t`` raises the markers of ``t % 2``) over a background every protein has
    in every cell, as in CITE-seq (ambient antibodies). Joining the modalities recovers the
    types; either alone confuses some.

    Parameters
    ----------
    n_obs
        Number of cells.
    n_genes, n_proteins
        Features of the ``"rna"`` and ``"prot"`` modalities.
    n_types
        Number of cell types (``.obs["cell_type"]``), even.
    n_sites
        Number of sites (``.obs["site"]``, assigned at random).
    seed
        Random seed.

    Returns
    -------
    MuData with modalities ``"rna"`` (CSR counts) and ``"prot"`` (dense counts), and
    ``.obs["cell_type"]`` and ``.obs["site"]``.

    Examples
    --------
    >>> mdata = synthetic_multiome(n_obs=50, n_sites=2)
    >>> mdata.mod["rna"].shape, mdata.mod["prot"].shape
    ((50, 200), (50, 24))
    """
    check_sizes(
        n_obs=n_obs, n_genes=n_genes, n_proteins=n_proteins, n_types=n_types, n_sites=n_sites
    )
    if n_types < 2 or n_types % 2:
        raise ValueError(f"n_types must be even and at least 2, got {n_types}.")
    rng = np.random.default_rng(seed)
    types = rng.integers(n_types, size=n_obs)
    sites = rng.integers(n_sites, size=n_obs)
    # RNA: a block per pair of types (strong), a block per type (weak)
    base = rng.gamma(2.0, 0.5, n_genes)
    pair_blocks = np.array_split(np.arange(n_genes // 2), n_types // 2)
    own_blocks = np.array_split(np.arange(n_genes // 2, n_genes), n_types)
    rate = np.tile(base, (n_obs, 1))
    for t in range(n_types):
        cells = types == t
        rate[np.ix_(cells, pair_blocks[t // 2])] *= 6.0
        rate[np.ix_(cells, own_blocks[t])] *= 1.5
    rate *= rng.lognormal(0.0, 0.3, (n_obs, 1))
    rna = rng.poisson(rng.gamma(5.0, rate / 5.0)).astype(np.float32)
    # proteins: background in every cell, markers of type parity on top
    background = rng.lognormal(np.log(20.0), 0.5, n_proteins)
    markers = np.array_split(np.arange(n_proteins), 2)
    fore = np.zeros((n_obs, n_proteins))
    for parity in (0, 1):
        cells = types % 2 == parity
        fore[np.ix_(cells, markers[parity])] = rng.lognormal(
            np.log(150.0), 0.4, len(markers[parity])
        )
    prot_rate = (background + fore) * rng.lognormal(0.0, 0.2, (n_obs, 1))
    prot = rng.poisson(rng.gamma(10.0, prot_rate / 10.0)).astype(np.float32)
    obs_names = [f"cell{i}" for i in range(n_obs)]
    rna_ad = AnnData(sparse.csr_matrix(rna), obs=pd.DataFrame(index=obs_names))
    rna_ad.var_names = [f"gene{i}" for i in range(n_genes)]
    prot_ad = AnnData(prot, obs=pd.DataFrame(index=obs_names))
    prot_ad.var_names = [f"protein{i}" for i in range(n_proteins)]
    mdata = mudata_of({"rna": rna_ad, "prot": prot_ad})
    mdata.obs["cell_type"] = pd.Categorical([f"type{t}" for t in types])
    mdata.obs["site"] = pd.Categorical(
        [f"site{s}" for s in sites], categories=[f"site{s}" for s in range(n_sites)]
    )
    return mdata
