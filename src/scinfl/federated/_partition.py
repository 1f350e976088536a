"""Simulated sites: split one AnnData's observations into sites."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from scinfl._checks import check_value


def partition(
    adata: AnnData,
    n_sites: int = 3,
    method: Literal["iid", "dirichlet", "column"] = "iid",
    label_key: str | None = None,
    alpha: float = 0.5,
    column: str | None = None,
    key_added: str = "site",
    seed: int = 0,
) -> pd.Series:
    """Assign every observation to a simulated site and store it in ``adata.obs[key_added]``.

    Parameters
    ----------
    adata
        The data.
    n_sites
        Number of sites (``iid``, ``dirichlet``).
    method
        ``"iid"``: uniform random; ``"dirichlet"``: per label, site proportions drawn from
        ``Dirichlet(alpha)`` (non-IID label skew, smaller ``alpha`` = more skew); ``"column"``:
        one site per category of ``adata.obs[column]``.
    label_key
        Label column for ``dirichlet``.
    alpha
        Dirichlet concentration.
    column
        Column for ``column``.
    key_added
        Column written to ``adata.obs``.
    seed
        Random seed.

    Returns
    -------
    The site assignment (categorical), also written to ``adata.obs[key_added]``.

    Examples
    --------
    >>> import numpy as np, anndata
    >>> adata = anndata.AnnData(np.ones((30, 2)))
    >>> partition(adata, n_sites=3).value_counts().sort_index().tolist()
    [10, 10, 10]
    """
    rng = np.random.default_rng(seed)
    n = adata.n_obs
    if method != "column":
        _check_n_sites(n_sites, n)
    if method == "column":
        if column is None or column not in adata.obs:
            raise ValueError(
                "method='column' needs `column=`, the name of an existing .obs column."
            )
        _check_no_missing(adata, column)
        sites = adata.obs[column].astype(str).to_numpy()
    elif method == "iid":
        sites = np.empty(n, dtype=object)
        sites[rng.permutation(n)] = [f"site{i}" for i in np.arange(n) % n_sites]
    elif method == "dirichlet":
        if label_key is None or label_key not in adata.obs:
            raise ValueError(
                "method='dirichlet' needs `label_key=`, the name of an existing .obs column."
            )
        check_value("alpha", alpha, float, "a positive number", lambda v: v > 0)
        _check_no_missing(adata, label_key)
        sites = np.empty(n, dtype=object)
        labels = adata.obs[label_key].to_numpy()
        for label in pd.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites))[:-1] * len(rows)).astype(int)
            for i, chunk in enumerate(np.split(rows, cuts)):
                sites[chunk] = f"site{i}"
    else:
        raise ValueError(f"Unknown method {method!r}; use 'iid', 'dirichlet' or 'column'.")
    present = set(sites)
    # site2 before site10: the order of the sites' numbers, not of their names as text
    order = [f"site{i}" for i in range(n_sites)] if method != "column" else sorted(present)
    categories = [site for site in order if site in present]
    result = pd.Series(
        pd.Categorical(sites, categories=categories), index=adata.obs_names, name=key_added
    )
    adata.obs[key_added] = result
    return result


def _check_n_sites(n_sites, n_obs: int) -> None:
    check_value("n_sites", n_sites, int, "an integer >= 1", lambda v: v >= 1)
    if n_sites > n_obs:
        raise ValueError(
            f"n_sites={n_sites} but adata has {n_obs} observations: some sites would be empty."
        )


def _check_no_missing(adata: AnnData, key: str) -> None:
    n_missing = int(adata.obs[key].isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{key!r}] has {n_missing} missing values, which no site would get: "
            "fill or drop those rows first."
        )
