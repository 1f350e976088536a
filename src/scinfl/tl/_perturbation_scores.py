"""Scores of a predicted perturbation response against the observed one."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.metrics import pairwise_distances

from scinfl._checks import check_value

logger = logging.getLogger(__name__)

#: log1p of normalised counts stays far below this; counts and expected counts do not
_LOG_MAX = 30.0


def response_genes(
    adata: AnnData, condition_key: str, source: str, target: str, n_genes: int = 100
) -> list[str]:
    """The genes that respond most to a perturbation: scanpy's Wilcoxon ranking of target vs source.

    Parameters
    ----------
    adata
        Log-normalised cells of one cell type (the observed data, the same for every method).
    condition_key
        ``.obs`` column of the condition.
    source, target
        Reference and perturbed levels.
    n_genes
        Number of genes (ranked by the absolute Wilcoxon score, up and down together).

    Returns
    -------
    Gene names, strongest response first.

    Examples
    --------
    >>> import scanpy as sc, scinfl
    >>> adata = scinfl.data.synthetic_perturbation(n_obs=200, n_vars=40)
    >>> sc.pp.normalize_total(adata, target_sum=1e4)
    >>> sc.pp.log1p(adata)
    >>> genes = response_genes(adata, "condition", "ctrl", "stim", n_genes=5)
    >>> set(genes) <= set(adata.var_names[adata.var["response"]]) | set(adata.var_names[-5:])
    True
    """
    check_value("n_genes", n_genes, int, "an integer >= 1", lambda v: v >= 1)
    source, target = str(source), str(target)  # levels as strings: a condition coded 0 / 1
    if source == target:
        raise ValueError(f"source and target are the same level ({source!r}): nothing to rank.")
    _check_levels(adata, condition_key, (source, target))
    _warn_not_log(adata, "adata")
    # the condition as string categories, on a light copy (the user's column keeps its dtype)
    conditions = adata.obs[condition_key].astype(str).astype("category")
    work = AnnData(adata.X, obs=pd.DataFrame({"condition": conditions}), var=adata.var[[]])
    result = sc.tl.rank_genes_groups(
        work,
        "condition",
        groups=[target],
        reference=source,
        method="wilcoxon",
        n_genes=adata.n_vars,
        copy=True,
    ).uns["rank_genes_groups"]
    scores = pd.Series(
        np.asarray(result["scores"][target], dtype=float),
        index=np.asarray(result["names"][target], dtype=str),
    )
    return scores.abs().sort_values(ascending=False, kind="stable").index[:n_genes].tolist()


def perturbation_scores(
    predicted: AnnData,
    observed: AnnData,
    control: AnnData,
    genes: Sequence[str],
    n_top: Sequence[int] = (20, 100),
    n_cells: int = 500,
    seed: int = 0,
) -> pd.Series:
    """Agreement of predicted and observed perturbed cells, on means, changes and distributions.

    All three inputs are log-normalised cells of one cell type with the same genes (matched by
    name; values that look like counts get a warning). Scores:

    - ``r2_mean_all``, ``pearson_mean_all``: coefficient of determination and Pearson
      correlation of the predicted and observed mean expression over all genes;
      ``r2_mean_top{n}``, ``pearson_mean_top{n}`` on the ``n`` strongest response genes;
    - ``delta_pearson_top{n}``: Pearson correlation of the predicted and observed change
      from the control mean (the direction of the response) on the top ``n`` genes;
    - ``e_distance``: energy distance between predicted and observed cells in the first 30
      principal components of the observed (control and perturbed) cells; 0 for the same
      distribution.

    Parameters
    ----------
    predicted
        Predicted perturbed cells.
    observed
        Observed perturbed cells.
    control
        Observed control cells (the source of the prediction).
    genes
        Response genes, strongest first (:func:`response_genes` on the observed data).
    n_top
        Numbers of top genes to score on (or one number), each at least 2.
    n_cells
        Cells drawn from each set for the energy distance.
    seed
        Seed of that draw.

    Returns
    -------
    One score per name.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> rng = np.random.default_rng(0)
    >>> control = anndata.AnnData(rng.normal(size=(50, 30)))
    >>> observed = anndata.AnnData(rng.normal(size=(60, 30)) + np.linspace(0, 3, 30))
    >>> genes = list(observed.var_names[::-1][:20])
    >>> s = perturbation_scores(observed, observed, control, genes, n_top=(10,))
    >>> round(float(s["delta_pearson_top10"]), 6), round(float(s["e_distance"]), 6)
    (1.0, 0.0)
    """
    n_top = [n_top] if isinstance(n_top, int | np.integer) else list(n_top)
    for n in n_top:
        check_value("each n_top", n, int, "an integer >= 2 (a correlation needs 2 genes)", _two)
    genes = list(genes)
    if len(set(genes)) < len(genes):
        raise ValueError("genes repeat a name: each response gene must be given once.")
    observed, control = (
        same_genes_as(predicted, a, name)
        for a, name in ((observed, "observed"), (control, "control"))
    )
    names = predicted.var_names
    for adata, name in ((predicted, "predicted"), (observed, "observed"), (control, "control")):
        _warn_not_log(adata, name)
    too_many = [n for n in n_top if n > len(genes)]
    if too_many:
        raise ValueError(
            f"n_top={tuple(n_top)} asks for the top {too_many} genes but {len(genes)} genes "
            f"were given: pass n_top up to {len(genes)} or more response genes."
        )
    means = {k: _mean(a) for k, a in (("p", predicted), ("o", observed), ("c", control))}
    scores = {
        "r2_mean_all": _r2(means["o"], means["p"]),
        "pearson_mean_all": _pearson(means["o"], means["p"]),
    }
    for n in n_top:
        top = names.get_indexer(list(genes)[:n])
        if (top < 0).any():
            raise ValueError(f"Genes not in the data: {list(np.asarray(genes)[:n][top < 0])[:5]}.")
        scores[f"r2_mean_top{n}"] = _r2(means["o"][top], means["p"][top])
        scores[f"pearson_mean_top{n}"] = _pearson(means["o"][top], means["p"][top])
        scores[f"delta_pearson_top{n}"] = _pearson(
            means["o"][top] - means["c"][top], means["p"][top] - means["c"][top]
        )
    scores["e_distance"] = e_distance(predicted, observed, control, n_cells=n_cells, seed=seed)
    return pd.Series(scores)


def e_distance(
    predicted: AnnData, observed: AnnData, control: AnnData, n_cells: int = 500, seed: int = 0
) -> float:
    """Energy distance of predicted and observed cells in the principal components of the data.

    ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Euclidean), in the first 30 principal components
    of the observed control and perturbed cells, on at most ``n_cells`` cells of each set.

    Parameters
    ----------
    predicted, observed
        Predicted and observed perturbed cells, log-normalised, with the same genes in the
        same order.
    control
        Observed control cells (with ``observed``, they define the principal components).
    n_cells
        Cells drawn from each of ``predicted`` and ``observed`` (all, if fewer).
    seed
        Seed of the draw.

    Returns
    -------
    The energy distance: 0 for identical distributions, larger the further apart.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = (anndata.AnnData(rng.normal(size=(80, 10)) + s) for s in (0, 2))
    >>> e_distance(a, b, a) > e_distance(a, a, b)
    True
    """
    rng = np.random.default_rng(seed)
    x = {k: _draw(_dense(a.X), n_cells, rng) for k, a in (("p", predicted), ("o", observed))}
    fit = np.vstack([_dense(observed.X), _dense(control.X)])
    pca = PCA(n_components=min(30, *fit.shape), random_state=0).fit(fit)
    p, o = pca.transform(x["p"]), pca.transform(x["o"])
    between = pairwise_distances(p, o).mean()
    return float(2 * between - pairwise_distances(p).mean() - pairwise_distances(o).mean())


def same_genes_as(reference: AnnData, adata: AnnData, name: str) -> AnnData:
    """``adata`` with ``reference``'s genes in its order (matched by name), or an error.

    Examples
    --------
    >>> import numpy as np, anndata, pandas as pd
    >>> a = anndata.AnnData(np.arange(6.0).reshape(2, 3), var=pd.DataFrame(index=["x", "y", "z"]))
    >>> list(same_genes_as(a, a[:, ::-1], "observed").var_names)
    ['x', 'y', 'z']
    """
    genes = reference.var_names
    if adata.var_names.equals(genes):
        return adata
    if not adata.var_names.is_unique or not genes.isin(adata.var_names).all():
        raise ValueError(
            f"{name} must hold the predicted cells' genes, once each (e.g. "
            f"{name} = {name}[:, predicted.var_names].copy()); missing: "
            f"{list(genes[~genes.isin(adata.var_names)][:5])}."
        )
    return adata[:, genes]


def _two(n: int) -> bool:
    return n >= 2


def _warn_not_log(adata: AnnData, name: str) -> None:
    """Warn when values look like counts or expected counts: scores compare log-normalised data."""
    x = adata.X
    largest = float(x.max()) if x.shape[0] and x.shape[1] else 0.0
    if largest > _LOG_MAX:
        logger.warning(
            "%s holds values up to %.3g: the scores compare log-normalised expression "
            "(sc.pp.normalize_total, then sc.pp.log1p; predict_perturbation's default "
            "output='log_change' gives it).",
            name,
            largest,
        )


def _check_levels(adata: AnnData, key: str, levels: Sequence[str]) -> None:
    if key not in adata.obs:
        raise ValueError(f"{key!r} is not a column of adata.obs.")
    found = sorted(pd.unique(adata.obs[key].astype(str)))
    missing = [level for level in levels if level not in found]
    if missing:
        raise ValueError(f"adata.obs[{key!r}] has no {missing} cells; levels found: {found}.")
    counts = adata.obs[key].astype(str).value_counts()
    few = {level: int(counts[level]) for level in levels if counts[level] < 2}
    if few:
        raise ValueError(
            f"adata.obs[{key!r}] has fewer than 2 cells of {few}: ranking genes between two "
            "conditions needs at least 2 cells of each."
        )


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def _mean(adata: AnnData) -> np.ndarray:
    return np.asarray(adata.X.mean(axis=0), dtype=np.float64).ravel()


def _draw(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    total = ((observed - observed.mean()) ** 2).sum()
    return float(1.0 - ((observed - predicted) ** 2).sum() / total)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN (no warning) when either side is constant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(a, b)[0, 1])
