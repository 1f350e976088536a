"""Plots of the scinfl latent space."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from matplotlib.figure import Figure

from scinfl._checks import check_not_empty


def check_save_path(save) -> None:
    """Refuse a ``save=`` that is no file path, or whose folder does not exist.

    Examples
    --------
    >>> check_save_path(True)
    Traceback (most recent call last):
    ...
    TypeError: save= takes a file path (e.g. 'figure.png'), got True.
    """
    if save is None:
        return
    if not isinstance(save, str | os.PathLike):
        raise TypeError(f"save= takes a file path (e.g. 'figure.png'), got {save!r}.")
    folder = os.path.dirname(os.fspath(save))
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(f"save={save!r}: the folder {folder!r} does not exist.")


def finish_figure(fig, save, show: bool):
    """Save (``save``) and show (``show``) a figure; return it.

    A figure saved and not shown is closed, as scanpy does: it is written, and a loop that
    saves one per sample leaves no pile of open figures (matplotlib warns past 20). The
    returned figure can still be saved or displayed.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> fig = finish_figure(plt.figure(), None, False)
    >>> plt.fignum_exists(fig.number)
    True
    >>> plt.close(fig)
    """
    if save is not None:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show:
        plt.show()
    elif save is not None:
        plt.close(fig)
    return fig


def _mudata_for_plot(mdata, basis: str, colors: Sequence[str], layer: str | None) -> AnnData:
    """An AnnData with ``mdata``'s samples, ``basis`` and ``colors`` as ``.obs`` columns.

    A colour that is not a column of ``mdata.obs`` is a feature: ``"modality:feature"`` or a
    feature name of one modality, its values in ``layer`` (``None``: ``.X``); samples without
    that modality get no value (NaN). The colours scanpy keeps in ``mdata.uns`` are used.
    """
    plot = AnnData(obs=mdata.obs.copy())
    plot.obsm[basis] = np.asarray(mdata.obsm[basis])
    plot.uns.update({k: v for k, v in mdata.uns.items() if k.endswith("_colors")})
    for name in colors:
        if name in plot.obs:
            continue
        modality, _, feature = name.partition(":")
        holders = [modality] if feature and modality in mdata.mod else []
        if not holders:
            feature = name
            holders = [m for m, mod in mdata.mod.items() if feature in mod.var_names]
            if len(holders) > 1:
                raise ValueError(
                    f"color={name!r} is a feature of several modalities {holders}: name one, "
                    f"e.g. {holders[0] + ':' + name!r}."
                )
        if not holders or feature not in mdata.mod[holders[0]].var_names:
            raise ValueError(
                f"color={name!r} is neither a column of mdata.obs nor a feature of a modality "
                f"(name it 'modality:feature'; modalities: {list(mdata.mod)})."
            )
        mod = mdata.mod[holders[0]]
        if layer is not None and layer not in mod.layers:
            raise ValueError(
                f"layer={layer!r} is not a layer of modality {holders[0]!r} ({list(mod.layers)})."
            )
        values = mod[:, feature].X if layer is None else mod[:, feature].layers[layer]
        values = values.toarray() if hasattr(values, "toarray") else np.asarray(values)
        series = pd.Series(values.ravel().astype(np.float64), index=mod.obs_names)
        plot.obs[name] = series[~series.index.duplicated()].reindex(plot.obs_names).to_numpy()
    return plot


def umap(
    adata: AnnData,
    color: str | Sequence[str] | None = "scinfl_leiden",
    basis: str = "X_umap_scinfl",
    show: bool = False,
    save: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Figure:
    """UMAP of the scinfl latent space coloured by ``.obs`` columns (after :func:`scinfl.tl.cluster`).

    Parameters
    ----------
    adata
        AnnData with ``.obsm[basis]``.
    color
        Column(s) to colour by, or features (``None``: one colour). On a MuData, a feature is
        named ``"modality:feature"`` (or by its name, if one modality has it).
    basis
        ``.obsm`` key of the 2-D coordinates (``f"X_umap_{neighbors_key}"`` of
        :func:`scinfl.tl.cluster`; the ``X_`` may be left out, as in scanpy).
    show
        Show the figure.
    save
        Write the figure to this path (png, pdf, ...).
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> import numpy as np
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20)
    >>> adata.obsm["X_scinfl"] = np.log1p(adata.X.toarray())  # or scinfl.tl.embed(adata, model)
    >>> scinfl.tl.cluster(adata, n_neighbors=5)
    >>> fig = scinfl.pl.umap(adata, color=["scinfl_leiden", "label"])  # save="umap.png" writes it
    >>> len(fig.axes)
    2
    >>> plt.close(fig)
    """
    if basis not in adata.obsm and f"X_{basis}" in adata.obsm:
        basis = f"X_{basis}"  # scanpy's convention: a basis may omit the X_
    if basis not in adata.obsm:
        raise ValueError(f"adata.obsm[{basis!r}] not found; run scinfl.tl.cluster(adata) first.")
    check_save_path(save)
    check_not_empty(adata.n_obs)
    kwargs.pop("return_fig", None)  # the figure is what it returns
    colors = None if color is None else [color] if isinstance(color, str) else list(color)
    mdata = adata if hasattr(adata, "mod") else None
    if mdata is not None:  # a MuData: scanpy reads .X, which a MuData does not have
        adata = _mudata_for_plot(mdata, basis, colors or [], kwargs.pop("layer", None))
    axes = sc.pl.embedding(adata, basis=basis, color=colors, show=False, **kwargs)
    if mdata is not None:
        # the colours scanpy chose for the samples' columns, kept where scanpy keeps them
        for name in colors or []:
            if name in mdata.obs and f"{name}_colors" in adata.uns:
                mdata.uns[f"{name}_colors"] = adata.uns[f"{name}_colors"]
    axes = list(np.atleast_1d(axes))
    fig = axes[0].figure
    name = basis.removeprefix("X_").split("_")[0].upper()
    for ax in axes:
        ax.set_xlabel(f"{name}1")
        ax.set_ylabel(f"{name}2")
    _make_room_for_legends(fig, axes)
    return finish_figure(fig, save, show)


def _make_room_for_legends(fig, axes) -> None:
    """Space the panels so that no legend beside a panel runs into the next one.

    scanpy puts each legend in the panel's right margin with a fixed gap between panels; long
    category names then overlap the next panel. (``tight_layout`` does not apply to scanpy's
    grid of panels.) ``savefig(bbox_inches="tight")`` keeps the last legend in the image.
    """
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
    if len(axes) < 2 or not legends:
        return
    renderer = fig.canvas.get_renderer()
    widest = max(legend.get_window_extent(renderer).width for legend in legends)
    panel = axes[0].get_window_extent(renderer).width
    grid = axes[0].get_subplotspec().get_gridspec()
    grid.update(wspace=widest / panel + 0.3)
