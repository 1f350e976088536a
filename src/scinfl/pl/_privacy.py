"""Plot of a privacy audit table (:func:`scinfl.privacy.audit`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from scinfl._checks import check_value

from ._embedding import check_save_path, finish_figure


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def privacy(
    df: pd.DataFrame,
    metrics: str | Sequence[str] | None = None,
    x: str | Sequence[str] = ("attack", "key_guess"),
    hue: str = "defence",
    upload: str | Sequence[str] | None = None,
    ncols: int = 3,
    panel_size: tuple[float, float] = (4.5, 3.2),
    show: bool = False,
    save: str | None = None,
) -> Figure:
    """Bar chart of a privacy audit: one panel per metric, one bar per ``hue`` x ``x`` group.

    Error bars show the ``sd`` column (spread over victims) where there is one; a dashed
    segment marks the ``chance`` column over each group (the score of an attacker that
    guesses).

    Parameters
    ----------
    df
        Table of :func:`scinfl.privacy.audit` (columns ``metric``, ``value`` and those named
        by ``x`` and ``hue``; ``sd`` and ``chance`` are optional). Tables of several defences
        can be concatenated.
    metrics
        Metrics to draw, in this order (default: all, in order of appearance).
    x
        Column(s) whose combinations form the groups along the x axis. ``upload`` is added
        when the table has several uploads for a metric and ``upload`` is not selected; rows
        that fall in the same group and bar (e.g. several key guesses with ``x="attack"``)
        are averaged.
    hue
        Column whose values are the bars of a group.
    upload
        Keep only these uploads (e.g. ``"one-sample"``); rows of the global model
        (membership inference, inference utility) are kept.
    ncols
        Panels per row.
    panel_size
        Width and height of one panel, in inches.
    show
        Show the figure.
    save
        Write the figure to this path (png, pdf, ...).

    Returns
    -------
    The matplotlib figure (its axes in ``fig.axes``).

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"defence": ["plain", "feature"], "attack": ["analytic"] * 2,
    ...                    "key_guess": ["none"] * 2, "metric": ["partial_corr"] * 2,
    ...                    "value": [1.0, 0.02], "chance": [0.0, 0.0]})
    >>> fig = privacy(df)
    >>> len(fig.axes)
    1
    """
    check_value("ncols", ncols, int, "an integer >= 1", lambda v: v >= 1)
    x_cols = _as_list(x)
    missing = {"metric", "value", hue, *x_cols} - set(df.columns)
    if missing:
        raise ValueError(f"The table lacks columns {sorted(missing)}.")
    if hue in x_cols:
        raise ValueError(
            f"hue={hue!r} is also one of x={x_cols}: the bars of a group are the values of hue; "
            "pass another hue (e.g. hue='key_guess') or leave it out of x."
        )
    table = df
    if upload is not None:
        if "upload" not in table.columns:
            raise ValueError("upload= selects rows by the table's 'upload' column, which it lacks.")
        table = table[table["upload"].isin([*_as_list(upload), "global-model"])]
    metric_names = list(dict.fromkeys(table["metric"])) if metrics is None else _as_list(metrics)
    if not metric_names or table.empty:
        raise ValueError("Nothing to draw: no rows for the metrics and uploads selected.")
    absent = [metric for metric in metric_names if not (table["metric"] == metric).any()]
    if absent:
        raise ValueError(f"No rows for metric {absent[0]!r}.")
    hues = list(dict.fromkeys(table[hue]))
    check_save_path(save)
    n_rows = math.ceil(len(metric_names) / ncols)
    n_cols = min(ncols, len(metric_names))
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows),
        squeeze=False,
    )
    for ax, metric in zip(axes.flat, metric_names, strict=False):
        _metric_panel(ax, table[table["metric"] == metric], x_cols, hue, hues)
        ax.set_title(metric)
    for ax in axes.flat[len(metric_names) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, title=hue, loc="upper right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return finish_figure(fig, save, show)


def _metric_panel(ax, sub: pd.DataFrame, x_cols: list, hue: str, hues: list) -> None:
    """Bars of one metric's rows: groups of ``x_cols`` on the axis, one bar per ``hue``.

    Error bars from an ``sd`` column, a dashed line at each group's ``chance``.
    """
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / max(len(hues), 1)
    group_cols = list(x_cols)
    if "upload" in sub and "upload" not in group_cols and sub["upload"].nunique() > 1:
        group_cols.append("upload")
    columns = {"value": "mean", **{extra: "mean" for extra in ("sd", "chance") if extra in sub}}
    summary = sub.groupby([*group_cols, hue], sort=False, dropna=False).agg(columns)
    groups = list(dict.fromkeys(summary.index.droplevel(hue)))
    positions = np.arange(len(groups))
    for h, name in enumerate(hues):
        values, errors = [], []
        for group in groups:
            index = (*group, name) if isinstance(group, tuple) else (group, name)
            row = summary.loc[index] if index in summary.index else None
            values.append(np.nan if row is None else row["value"])
            errors.append(np.nan if row is None or "sd" not in row else row["sd"])
        errors = np.asarray(errors, dtype=float)
        ax.bar(
            positions + (h - (len(hues) - 1) / 2) * width,
            values,
            width,
            yerr=None if np.isnan(errors).all() else np.nan_to_num(errors),
            color=colors[h % len(colors)],
            label=str(name),
            capsize=2,
        )
    if "chance" in summary:
        chance = summary["chance"].groupby(level=list(range(len(group_cols))), sort=False)
        for pos, level in zip(positions, chance.mean().reindex(groups).to_numpy(), strict=True):
            if np.isfinite(level):
                ax.hlines(level, pos - 0.45, pos + 0.45, colors="k", linestyles="--", lw=1)
    rotate = len(groups) > 4
    sep = " / " if rotate else "\n"
    labels = [sep.join(map(str, g)) if isinstance(g, tuple) else str(g) for g in groups]
    ax.set_xticks(positions, labels, rotation=90 if rotate else 0, fontsize=8)
