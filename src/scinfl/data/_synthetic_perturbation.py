"""Synthetic counts with cell types, two conditions and a cell-type-dependent response."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._sizes import check_sizes


def synthetic_perturbation(
    n_obs: int = 600,
    n_vars: int = 60,
    n_cell_types: int = 4,
    n_sites: int = 3,
    seed: int = 0,
) -> AnnData:
    """Negative-binomial counts of cell types under a control and a stimulated condition.

    Each cell type up-regulates its own block of genes. Stimulation up-regulates a block of
    response genes shared by every type, with a strength that differs between types, and
    down-regulates a second block: what a perturbation model must carry over to a cell type
    whose stimulated cells it never saw.

    Parameters
    ----------
    n_obs, n_vars
        Shape (``n_vars`` of at least ``4 * n_cell_types``).
    n_cell_types
        Number of cell types (``.obs["cell_type"]``: ``"type0"``, ...).
    n_sites
        Number of sites (``.obs["site"]``, assigned at random).
    seed
        Random seed.

    Returns
    -------
    AnnData with counts (CSR) in ``.X`` and ``.layers["counts"]``, ``.obs["condition"]``
    (``"ctrl"`` / ``"stim"``), ``.obs["cell_type"]`` and ``.obs["site"]``; ``.var["response"]``
    marks the up-regulated response genes.

    Examples
    --------
    >>> adata = synthetic_perturbation(n_obs=100, n_vars=40)
    >>> adata.obs["condition"].cat.categories.tolist()
    ['ctrl', 'stim']
    >>> int(adata.var["response"].sum())
    5
    """
    check_sizes(n_obs=n_obs, n_vars=n_vars, n_cell_types=n_cell_types, n_sites=n_sites)
    if n_vars < 4 * n_cell_types:
        raise ValueError(f"n_vars must be at least 4 * n_cell_types = {4 * n_cell_types}.")
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_cell_types, n_obs)
    stim = rng.random(n_obs) < 0.5
    base = rng.gamma(2.0, 1.0, n_vars)
    block = n_vars // (2 * n_cell_types)
    programme = np.ones((n_cell_types, n_vars))
    for k in range(n_cell_types):
        programme[k, k * block : (k + 1) * block] = 6.0
    response = np.zeros(n_vars, dtype=bool)
    response[n_vars - 2 * block : n_vars - block] = True
    repressed = np.zeros(n_vars, dtype=bool)
    repressed[n_vars - block :] = True
    strength = rng.uniform(3.0, 8.0, n_cell_types)
    effect = np.ones((n_obs, n_vars))
    effect[np.ix_(stim, response)] = strength[types[stim], None]
    effect[np.ix_(stim, repressed)] = 0.3
    library = rng.lognormal(0.0, 0.3, n_obs)[:, None]
    mean = base[None, :] * programme[types] * effect * library
    theta = 5.0
    counts = sparse.csr_matrix(rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32))
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(np.where(stim, "stim", "ctrl"), ["ctrl", "stim"]),
            "cell_type": pd.Categorical([f"type{k}" for k in types]),
            "site": pd.Categorical([f"site{s}" for s in rng.integers(0, n_sites, n_obs)]),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame({"response": response}, index=[f"gene{j}" for j in range(n_vars)])
    adata = AnnData(X=counts, obs=obs, var=var)
    adata.layers["counts"] = counts.copy()
    return adata
