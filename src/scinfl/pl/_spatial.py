"""Spots on the tissue coordinates, one panel per section."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from matplotlib.figure import Figure
from scanpy.plotting._utils import _set_default_colors_for_categorical_obs

from scinfl._checks import check_not_empty, check_value

from ._embedding import _make_room_for_legends, check_save_path, finish_figure

#: ``library_key`` default: the sections ``pp.spatial_neighbors`` built its graph over
AUTO = "auto"


def _sections(adata: AnnData, library_key: str | None) -> tuple[pd.Series, bool]:
    """The panel of each spot, and whether panels are named sections (not one panel)."""
    if library_key == AUTO:
        params = adata.uns.get("spatial_neighbors", {}).get("params", {})
        found = [params.get("library_key"), params.get("site_key"), "site"]
        library_key = next((key for key in found if key is not None and key in adata.obs), None)
    if library_key is None:
        return pd.Series("all", index=adata.obs_names), False
    if library_key not in adata.obs:
        raise ValueError(f"adata.obs[{library_key!r}] (the section of each spot) not found.")
    return adata.obs[library_key].astype(str), True


def _values(adata: AnnData, color: str, layer: str | None) -> pd.Series:
    """The ``.obs`` column or the feature (``.var_names``, from ``layer`` or ``.X``) to colour by."""
    if color in adata.obs:
        values = adata.obs[color]
        categorical = isinstance(values.dtype, pd.CategoricalDtype)
        # True / False are categories (as scanpy draws them), not numbers on a colour scale
        if pd.api.types.is_bool_dtype(values) or not (
            categorical or pd.api.types.is_numeric_dtype(values)
        ):
            values = values.astype("category")
        return values
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer={layer!r} is not in adata.layers ({list(adata.layers)}).")
    if color in adata.var_names:
        column = adata[:, color].layers[layer] if layer is not None else adata[:, color].X
        column = column.toarray() if hasattr(column, "toarray") else np.asarray(column)
        return pd.Series(column.ravel().astype(np.float64), index=adata.obs_names, name=color)
    raise ValueError(f"color={color!r} is neither a column of adata.obs nor a feature (var_names).")


def _palette(adata: AnnData, color: str, values: pd.Series) -> dict:
    """One colour per category for every panel: scanpy's ``.uns[f"{color}_colors"]``.

    Colours scanpy would give the column (its default palettes, chosen by the number of
    categories; grey beyond 102) are set where none of the right length are stored, and kept
    in ``.uns`` as scanpy keeps them, so that ``pl.umap`` and this plot agree.
    """
    categories = values.cat.categories
    key = f"{color}_colors"
    stored = adata.uns.get(key)
    if stored is None or len(stored) != len(categories):
        proxy = AnnData(
            obs=pd.DataFrame(
                {color: pd.Categorical(values)}, index=np.arange(len(values)).astype(str)
            )
        )
        # scanpy's own choice of default colours (its plot functions make it as they draw)
        _set_default_colors_for_categorical_obs(proxy, color)
        stored = list(proxy.uns[key])
        if color in adata.obs:
            adata.uns[key] = stored
    return dict(zip(categories, stored, strict=True))


def spatial(
    adata: AnnData,
    color: str = "scinfl_domain",
    library_key: str | None = AUTO,
    spatial_key: str = "spatial",
    ncols: int = 3,
    panel_size: float = 4.0,
    legend_loc: str = "right margin",
    show: bool = False,
    save: str | None = None,
    **kwargs: Any,
) -> Figure:
    """Spots on their tissue coordinates coloured by an ``.obs`` column, one panel per section.

    Each section is drawn on its own coordinates (:func:`scanpy.pl.embedding` with
    ``basis=spatial_key``), with the same colour for a category in every panel; the panels are
    spaced so that no legend runs into the next panel, and a saved figure holds every legend.

    Parameters
    ----------
    adata
        AnnData with coordinates in ``.obsm[spatial_key]``.
    color
        ``.obs`` column to colour by (e.g. :func:`scinfl.tl.domains`' ``"scinfl_domain"``), or a
        feature of ``.var_names`` (its values in ``.X``, or in ``layer=``). A categorical
        column uses the colours scanpy keeps in ``.uns[f"{color}_colors"]`` when set.
    library_key
        ``.obs`` column naming the section of each spot (one panel each); ``None`` for one
        panel. ``"auto"``: the sections :func:`scinfl.pp.spatial_neighbors` built its graph
        over (its ``library_key``, else its ``site_key``), else ``"site"`` when present, else
        one panel.
    spatial_key
        ``.obsm`` key of the coordinates.
    ncols
        Panels per row.
    panel_size
        Width and height of a panel, in inches.
    legend_loc
        Where each panel's legend sits: ``"right margin"`` (beside the panel), a
        :meth:`matplotlib.axes.Axes.legend` location inside it (``"best"``), or ``"none"``.
    show
        Show the figure.
    save
        Write the figure to this path (png, pdf, ...).
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``size``, ``palette``, ...).

    Returns
    -------
    The matplotlib figure.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_spatial(n_sections=2, n_side=8, n_vars=20)
    >>> fig = scinfl.pl.spatial(adata, color="domain", library_key="section")  # save=... writes
    >>> [ax.get_title() for ax in fig.axes]
    ['section0', 'section1']
    >>> plt.close(fig)
    """
    if spatial_key not in adata.obsm:
        raise ValueError(f"adata.obsm[{spatial_key!r}] (spot coordinates) not found.")
    check_not_empty(adata.n_obs, "spots")
    check_value("ncols", ncols, int, "an integer >= 1", lambda v: v >= 1)
    if "ax" in kwargs:
        raise TypeError(
            "pl.spatial draws one panel per section on its own axes and takes no ax=; "
            "use the figure it returns (fig.axes), or scanpy.pl.embedding for one panel."
        )
    if not isinstance(color, str):
        raise TypeError(
            f"pl.spatial colours by one key (a figure of one panel per section); got "
            f"{color!r}: call it once per key."
        )
    check_save_path(save)
    kwargs.pop("return_fig", None)  # the figure is what it returns
    title = kwargs.pop("title", None)
    values = _values(adata, color, kwargs.pop("layer", None))
    if isinstance(values.dtype, pd.CategoricalDtype) and "palette" not in kwargs:
        kwargs["palette"] = _palette(adata, color, values)  # the same colours in every panel
    elif not isinstance(values.dtype, pd.CategoricalDtype):
        # one colour scale for every panel: a colour means the same value in each section
        kwargs.setdefault("vmin", float(np.nanmin(values)))
        kwargs.setdefault("vmax", float(np.nanmax(values)))
    sections, named = _sections(adata, library_key)
    names = list(pd.unique(sections))
    ncols = min(ncols, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False
    )
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    for ax, name in zip(axes.ravel(), names, strict=False):
        mask = (sections == name).to_numpy()
        part = AnnData(obs=pd.DataFrame({color: values[mask]}, index=adata.obs_names[mask]))
        part.obsm[spatial_key] = coords[mask]
        sc.pl.embedding(
            part, basis=spatial_key, color=color, ax=ax, show=False, legend_loc=legend_loc, **kwargs
        )
        ax.set_title(name if named else (title or color))
        ax.set_aspect("equal")
        ax.invert_yaxis()  # image convention: row 0 at the top
        ax.set_xlabel("")
        ax.set_ylabel("")
    for ax in axes.ravel()[len(names) :]:
        ax.remove()
    if named and title:
        fig.suptitle(title)
    _make_room_for_legends(fig, list(axes.ravel()[: len(names)]))
    return finish_figure(fig, save, show)
