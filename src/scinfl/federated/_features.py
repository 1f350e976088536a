"""Agree on a feature set across sites by name, from decisions each site takes on its own rows.

Bulk proteomics (TMT, label-free) leaves many proteins unquantified, and which ones depends on
the site. Filtering features by their missing fraction over the *pooled* data would need the
pooled data. Here every site decides on its own rows which features it observes well enough,
and only the resulting feature-name lists are combined. In a real deployment each site runs
:func:`site_feature_report` (or just sends :func:`observed_features`) and the coordinator runs
:func:`agree_features_from_reports`; no values, counts or statistics are exchanged beyond the
names (and, optionally, each site's own missing fractions if the federation chooses to share
them). :func:`agree_features` simulates the whole exchange on one AnnData that holds all sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

__all__ = [
    "agree_features",
    "agree_features_from_reports",
    "observed_features",
    "site_feature_report",
]


def _check_max_missing(max_missing: float) -> float:
    value = float(max_missing)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"max_missing must be in [0, 1); got {max_missing!r}.")
    return value


def _check_how(how: str) -> str:
    if how not in ("intersection", "union"):
        raise ValueError(f"how must be 'intersection' or 'union'; got {how!r}.")
    return how


def _matrix(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} not found in adata.layers ({list(adata.layers)}).")
    return adata.layers[layer]


def site_feature_report(adata: AnnData, layer: str | None = None) -> pd.Series:
    """Fraction of missing (NaN) values of every feature, computed on one site's rows only.

    A site runs this on its own data. Only what it derives from the report (a list of feature
    names, see :func:`observed_features`) needs to leave the site.

    Parameters
    ----------
    adata
        The site's own observations x features.
    layer
        Layer holding the values (``None``: ``adata.X``). In a sparse matrix, stored NaN are
        missing and implicit zeros are observed.

    Returns
    -------
    Missing fraction per feature, indexed by ``adata.var_names``.

    Examples
    --------
    >>> import numpy as np, anndata
    >>> site = anndata.AnnData(np.array([[1.0, np.nan], [2.0, np.nan], [3.0, 0.5]]))
    >>> site.var_names = ["P1", "P2"]
    >>> site_feature_report(site).round(2).to_dict()
    {'P1': 0.0, 'P2': 0.67}
    """
    X = _matrix(adata, layer)
    n = X.shape[0]
    if n == 0:
        raise ValueError("The site has no observations.")
    if sparse.issparse(X):
        X = sparse.csr_matrix(X)
        counts = np.bincount(X.indices[np.isnan(X.data)], minlength=X.shape[1])
    else:
        counts = np.isnan(np.asarray(X, dtype=float)).sum(axis=0)
    return pd.Series(np.asarray(counts, dtype=float) / n, index=adata.var_names.copy())


def observed_features(
    adata: AnnData, max_missing: float = 0.5, layer: str | None = None
) -> list[str]:
    """Names of the features a site observes in at least ``1 - max_missing`` of its rows.

    Parameters
    ----------
    adata
        The site's own observations x features.
    max_missing
        Largest accepted fraction of missing values of a feature at this site.
    layer
        Layer holding the values (``None``: ``adata.X``).

    Returns
    -------
    Feature names, in ``adata.var_names`` order.

    Examples
    --------
    >>> import numpy as np, anndata
    >>> site = anndata.AnnData(np.array([[1.0, np.nan], [2.0, np.nan], [3.0, 0.5]]))
    >>> site.var_names = ["P1", "P2"]
    >>> observed_features(site, max_missing=0.5)
    ['P1']
    """
    max_missing = _check_max_missing(max_missing)
    report = site_feature_report(adata, layer)
    return report.index[report.to_numpy() <= max_missing + 1e-12].tolist()


def agree_features_from_reports(
    reports: Mapping[str, Sequence[str] | pd.Series],
    max_missing: float = 0.5,
    how: Literal["intersection", "union"] = "intersection",
    order: Sequence[str] | None = None,
) -> list[str]:
    """Agree on a feature set from what each site reports, by feature name.

    This is the coordinator's side of the exchange: it only sees, for each site, either the
    list of feature names the site observes well enough (what a real deployment sends), or
    that site's own missing fractions (a :func:`site_feature_report`), which it thresholds per
    site. Nothing is pooled across sites: a feature's fate is decided by each site's own
    report, and the decisions are combined by name.

    Parameters
    ----------
    reports
        Site name -> list of observed feature names, or -> missing fraction per feature
        (a Series indexed by feature name).
    max_missing
        Threshold applied to missing-fraction reports (ignored for name lists, which the site
        has already thresholded).
    how
        ``"intersection"``: features every site observes (default; every site can then train
        on every feature). ``"union"``: features at least one site observes (the others
        contribute NaN, masked out of the model's loss).
    order
        Order of the result (e.g. the federation's agreed feature list); features not in it
        are dropped. Default: the order of first appearance in the reports.

    Returns
    -------
    Agreed feature names.

    Examples
    --------
    >>> reports = {"a": ["P1", "P2", "P3"], "b": ["P2", "P3", "P4"]}
    >>> agree_features_from_reports(reports)
    ['P2', 'P3']
    >>> agree_features_from_reports(reports, how="union")
    ['P1', 'P2', 'P3', 'P4']
    >>> import pandas as pd
    >>> agree_features_from_reports({"a": pd.Series({"P1": 0.1, "P2": 0.9})}, max_missing=0.5)
    ['P1']
    """
    max_missing = _check_max_missing(max_missing)
    how = _check_how(how)
    if not reports:
        raise ValueError("No site reports given.")
    per_site: list[list[str]] = []
    for site, report in reports.items():
        if isinstance(report, pd.Series):
            names = report.index[report.to_numpy(dtype=float) <= max_missing + 1e-12]
            per_site.append([str(name) for name in names])
        elif isinstance(report, str):
            raise TypeError(f"The report of site {site!r} must be a list of names, not a string.")
        else:
            per_site.append([str(name) for name in report])
    if order is None:
        seen: dict[str, None] = {}
        for names in per_site:
            seen.update(dict.fromkeys(names))
        order = list(seen)
    sets = [set(names) for names in per_site]
    agreed = set.intersection(*sets) if how == "intersection" else set.union(*sets)
    return [str(name) for name in order if str(name) in agreed]


def agree_features(
    adata: AnnData,
    site_key: str,
    max_missing: float = 0.5,
    how: Literal["intersection", "union"] = "intersection",
    layer: str | None = None,
) -> list[str]:
    """Simulate the federation's feature agreement on an AnnData that holds every site.

    Each site (a category of ``adata.obs[site_key]``) computes, on its own rows only, which
    features it observes in at least ``1 - max_missing`` of its samples
    (:func:`observed_features`); the name lists are then combined by
    :func:`agree_features_from_reports`. No statistic is computed over the pooled rows, so the
    result is what a real federation obtains when each site sends only its list of feature
    names (the sites must use the same feature names, e.g. gene symbols or UniProt accessions).

    Parameters
    ----------
    adata
        Observations x features of all sites (NaN = missing).
    site_key
        ``.obs`` column with the site of each observation.
    max_missing
        Largest fraction of missing values a site accepts for a feature.
    how
        ``"intersection"`` (default) or ``"union"`` of the sites' lists.
    layer
        Layer holding the values (``None``: ``adata.X``).

    Returns
    -------
    Agreed feature names, in ``adata.var_names`` order. Subset with ``adata[:, features]``.

    Examples
    --------
    >>> import numpy as np, anndata, pandas as pd
    >>> X = np.array([[1.0, np.nan, 1.0], [1.0, np.nan, 1.0], [1.0, 1.0, np.nan], [1.0, 1.0, np.nan]])
    >>> adata = anndata.AnnData(X, obs=pd.DataFrame({"site": ["a", "a", "b", "b"]}))
    >>> adata.var_names = ["P1", "P2", "P3"]
    >>> agree_features(adata, "site")
    ['P1']
    >>> agree_features(adata, "site", how="union")
    ['P1', 'P2', 'P3']
    """
    max_missing = _check_max_missing(max_missing)
    how = _check_how(how)
    if site_key not in adata.obs:
        raise ValueError(f"site_key={site_key!r} is not a column of adata.obs.")
    sites = adata.obs[site_key]
    if sites.isna().any():
        raise ValueError(f"adata.obs[{site_key!r}] has missing values; assign every row a site.")
    reports: dict[str, list[str]] = {}
    for site in pd.unique(sites.astype(str)):
        rows = np.flatnonzero((sites.astype(str) == site).to_numpy())
        # Each site's decision uses that site's rows only.
        reports[site] = observed_features(adata[rows], max_missing=max_missing, layer=layer)
    return agree_features_from_reports(
        reports, max_missing=max_missing, how=how, order=list(adata.var_names)
    )
