"""Small synthetic data sets for tests, examples and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._sizes import check_sizes


def synthetic_counts(
    n_obs: int = 600,
    n_vars: int = 100,
    n_labels: int = 3,
    n_sites: int = 3,
    sparse_output: bool = True,
    seed: int = 0,
) -> AnnData:
    """Negative-binomial counts with label-specific programmes and simulated sites.

    Each label up-regulates its own block of genes, so labels are recoverable from the data.

    Parameters
    ----------
    n_obs, n_vars
        Shape.
    n_labels
        Number of labels (``.obs["label"]``).
    n_sites
        Number of sites (``.obs["site"]``, assigned at random).
    sparse_output
        Store counts as CSR.
    seed
        Random seed.

    Returns
    -------
    AnnData with counts in ``.X`` and ``.layers["counts"]``.

    Examples
    --------
    >>> adata = synthetic_counts(n_obs=50, n_vars=20)
    >>> adata.shape
    (50, 20)
    """
    check_sizes(n_obs=n_obs, n_vars=n_vars, n_labels=n_labels, n_sites=n_sites)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n_obs)
    base = rng.gamma(2.0, 1.0, n_vars)
    programme = np.ones((n_labels, n_vars))
    block = max(1, n_vars // (2 * n_labels))
    for k in range(n_labels):
        programme[k, k * block : (k + 1) * block] = 6.0
    library = rng.lognormal(0.0, 0.3, n_obs)[:, None]
    mean = base[None, :] * programme[labels] * library
    theta = 5.0
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    X = sparse.csr_matrix(counts) if sparse_output else counts
    obs = pd.DataFrame(
        {
            "label": pd.Categorical([f"type{k}" for k in labels]),
            "site": pd.Categorical([f"site{s}" for s in rng.integers(0, n_sites, n_obs)]),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)]))
    adata.layers["counts"] = X.copy()
    return adata
