"""Predicted vs observed response to a perturbation: mean expression and change."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.figure import Figure

from scinfl.tl._perturbation_scores import same_genes_as

from ._embedding import check_save_path, finish_figure


def perturbation(
    predicted: AnnData,
    observed: AnnData,
    control: AnnData,
    genes: Sequence[str],
    n_labels: int = 10,
    title: str | None = None,
    show: bool = False,
    save: str | None = None,
) -> Figure:
    """Predicted vs observed mean expression, and predicted vs observed change (scGen's plot).

    Left: mean expression per gene of the predicted and the observed perturbed cells, the
    response genes highlighted and the first ``n_labels`` of them named. Right: the change
    from the control mean, predicted vs observed, on the response genes. Each panel gives the
    Pearson correlation (and, left, the R^2) of what it shows.

    Parameters
    ----------
    predicted, observed, control
        Log-normalised cells with the same genes (matched by name): predicted and observed
        perturbed cells, observed control cells (e.g. from
        :func:`scinfl.tl.predict_perturbation`).
    genes
        Response genes, strongest first (:func:`scinfl.tl.response_genes`).
    n_labels
        Number of genes to name.
    title
        Figure title.
    show
        Show the figure.
    save
        Write the figure to this path (png, pdf, ...).

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> import matplotlib.pyplot as plt
    >>> import scinfl
    >>> rng = np.random.default_rng(0)
    >>> control = anndata.AnnData(rng.normal(size=(40, 30)))
    >>> observed = anndata.AnnData(rng.normal(size=(40, 30)) + np.linspace(0, 2, 30))
    >>> genes = list(observed.var_names[::-1][:10])
    >>> fig = scinfl.pl.perturbation(observed, observed, control, genes, n_labels=3)
    >>> len(fig.axes)
    2
    >>> plt.close(fig)
    """
    observed = same_genes_as(predicted, observed, "observed")
    control = same_genes_as(predicted, control, "control")
    names = predicted.var_names
    check_save_path(save)
    top = names.get_indexer(list(genes))
    if len(top) < 2 or (top < 0).any():
        raise ValueError(
            "genes must name two or more genes of `observed` (e.g. scinfl.tl.response_genes); "
            f"not found: {list(np.asarray(list(genes))[top < 0])[:5]}."
        )
    means = [np.asarray(a.X.mean(axis=0), dtype=float).ravel() for a in (predicted, observed)]
    reference = np.asarray(control.X.mean(axis=0), dtype=float).ravel()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    _scatter(left, means[1], means[0], top, names, n_labels)
    r = np.corrcoef(means[1], means[0])[0, 1]
    left.set(
        xlabel="observed mean expression",
        ylabel="predicted mean expression",
        title=f"all genes: Pearson {r:.3f}, R$^2$ {_r2(means[1], means[0]):.3f}",
    )
    changes = [m[top] - reference[top] for m in means]
    _scatter(right, changes[1], changes[0], np.arange(len(top)), names[top], n_labels)
    r = np.corrcoef(changes[1], changes[0])[0, 1]
    right.set(
        xlabel="observed change",
        ylabel="predicted change",
        title=f"top {len(top)} response genes: delta Pearson {r:.3f}",
    )
    right.axhline(0, color="0.8", lw=0.8, zorder=0)
    right.axvline(0, color="0.8", lw=0.8, zorder=0)
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    return finish_figure(fig, save, show)


def _scatter(ax, x: np.ndarray, y: np.ndarray, top: np.ndarray, names, n_labels: int) -> None:
    """All points grey, the response genes red, the first ``n_labels`` of them named."""
    ax.scatter(x, y, s=6, color="0.6", alpha=0.6, linewidths=0)
    ax.scatter(x[top], y[top], s=12, color="tab:red", linewidths=0, label="response genes")
    for i in top[:n_labels]:
        ax.annotate(
            str(names[i]), (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    low, high = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([low, high], [low, high], color="k", lw=0.8, ls="--", zorder=0)
    ax.legend(loc="upper left", frameon=False, fontsize=8)


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    total = ((observed - observed.mean()) ** 2).sum()
    return float(1.0 - ((observed - predicted) ** 2).sum() / total)
