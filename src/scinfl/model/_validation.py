"""Checks of user data, each failing with a message that names the fix."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scipy import sparse

logger = logging.getLogger(__name__)

#: rows of a sparse chunk, and values of a dense one (rows times columns): what one check
#: holds at a time
_CHUNK = 16384
_CHUNK_VALUES = 1 << 22


def _values(matrix) -> np.ndarray:
    """The stored values of a (possibly sparse) matrix chunk."""
    if sparse.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def _iter_chunks(matrix):
    """Row blocks of ``matrix``: :data:`_CHUNK` rows if sparse, :data:`_CHUNK_VALUES` values if dense.

    A dense chunk's size follows its width: the checks make temporaries of a chunk's size,
    and 16,384 rows of 20,000 proteins are 1.3 GB of float32.
    """
    rows = _CHUNK if sparse.issparse(matrix) else max(1, _CHUNK_VALUES // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        yield matrix[start : start + rows]


#: Counts may carry float rounding (e.g. ``(counts / size) * size`` in float32): a value this
#: close to an integer (relative to its size, at least ``1e-6``) counts as one, and one this
#: far below zero as zero.
COUNT_TOLERANCE = 1e-5
#: Continuous data whose typical magnitude exceeds this look like linear intensities.
_LINEAR_SCALE = 1e3
#: Exact zeros among values of typical magnitude above this look like missing values.
_ZEROS_AMONG = 8.0
#: ... and whose smallest measured values (1st percentile) exceed this fraction of it
_GAP = 0.25
_SAMPLE = 100_000


def validate_matrix(
    matrix,
    likelihood: str,
    where: str,
    advice: str = "Point `layer=` at the raw counts, or use gene_likelihood='normal'.",
) -> None:
    """Check that ``matrix`` suits ``likelihood``; chunked, never densifying the whole matrix.

    Counts (``nb``, ``zinb``) must be finite, non-negative integers, up to float rounding
    (:data:`COUNT_TOLERANCE`). Continuous data (``normal``) may hold NaN (missing, masked out
    of the loss) but no infinities; values that look like linear intensities, or exact zeros
    among log intensities (zeros that mark missing values), get a warning. ``advice`` ends the
    messages about counts: how to fix it where the caller stands.

    Examples
    --------
    >>> import numpy as np
    >>> validate_matrix(np.array([[1.0, 2.0]]), "nb", "adata.X")
    >>> validate_matrix(np.array([[1.0000001, -1e-8]], dtype=np.float32), "nb", "adata.X")
    """
    n_nan = n_inf = n_neg = n_frac = n_zero = n_finite = 0
    sample = []
    size = max(1, matrix.shape[0] * matrix.shape[1])
    for chunk in _iter_chunks(matrix):
        values = _values(chunk)
        nan = np.isnan(values)
        n_nan += int(nan.sum())
        n_inf += int(np.isinf(values).sum())
        finite = values[np.isfinite(values)]
        if likelihood in ("nb", "zinb"):
            n_neg += int((finite < -1e-6).sum())
            tolerance = np.maximum(1e-6, COUNT_TOLERANCE * np.abs(finite))
            n_frac += int((np.abs(finite - np.round(finite)) > tolerance).sum())
        else:
            n_finite += finite.size + (chunk.shape[0] * chunk.shape[1] - values.size)
            n_zero += int((finite == 0).sum()) + (chunk.shape[0] * chunk.shape[1] - values.size)
            sample.append(_spread_sample(np.abs(finite[finite != 0]), chunk.shape, size))
    if n_inf:
        hint = (
            " (the log of 0? If zeros marked missing values, replace them by NaN before the "
            "log: adata.X[adata.X == 0] = np.nan)"
            if likelihood == "normal"
            else ""
        )
        raise ValueError(
            f"{where} holds {n_inf} infinite values{hint}; remove or clip them before setup."
        )
    if likelihood in ("nb", "zinb"):
        _check_counts(where, likelihood, n_nan, n_neg, n_frac, advice)
    elif sample:
        _warn_unlogged_or_zero_filled(where, np.concatenate(sample), n_zero, n_finite)


def _spread_sample(magnitudes: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """Evenly spaced values of a chunk, its share of :data:`_SAMPLE`: every chunk is heard.

    The magnitude checks judge the whole matrix, not its first rows (linear intensities in
    all but the first rows were judged by those first rows).
    """
    quota = max(1, -(-_SAMPLE * shape[0] * shape[1] // size))
    step = max(1, len(magnitudes) // quota)
    return magnitudes[::step][:quota]


def rows_without_values(matrix) -> int:
    """How many rows of ``matrix`` are ``NaN`` in every column (chunked; sparse zeros count).

    Examples
    --------
    >>> import numpy as np
    >>> rows_without_values(np.array([[np.nan, np.nan], [1.0, np.nan]]))
    1
    """
    n = 0
    for chunk in _iter_chunks(matrix):
        dense = chunk.toarray() if sparse.issparse(chunk) else np.asarray(chunk)
        n += int(np.isnan(dense).all(axis=1).sum()) if dense.dtype.kind == "f" else 0
    return n


def _check_counts(where, likelihood, n_nan, n_neg, n_frac, advice) -> None:
    if n_nan:
        raise ValueError(
            f"{where} holds {n_nan} NaN values, which a count likelihood ({likelihood!r}) "
            "cannot model (raw counts have no missing values): for continuous data with "
            "missing values use gene_likelihood='normal'; for counts, fill the NaN (0 where "
            "nothing was detected) or drop those rows."
        )
    if n_neg:
        raise ValueError(
            f"{where} holds {n_neg} negative values: it is not raw counts (scaled or "
            f"log-ratio data?). {advice}"
        )
    if n_frac:
        raise ValueError(
            f"{where} holds {n_frac} non-integer values: it looks normalised or "
            f"log-transformed. {advice}"
        )


def _warn_unlogged_or_zero_filled(where, magnitudes, n_zero: int, n_finite: int) -> None:
    """Warn of linear intensities, and of zeros standing for missing log intensities."""
    typical = float(np.median(magnitudes))
    if typical > _LINEAR_SCALE:
        logger.warning(
            "%s holds values of typical size %.3g: linear intensities? The normal likelihood "
            "models log-scale values: take the log first (e.g. np.log2, zeros as NaN).",
            where,
            typical,
        )
    elif (
        typical > _ZEROS_AMONG
        and n_zero > 0.01 * n_finite
        # a gap between 0 and the smallest measured values: zeros are not low measurements
        # (log2 intensities of 15-35 with zeros for missing; log RNA-seq has values near 0)
        and float(np.percentile(magnitudes, 1)) > _GAP * typical
    ):
        logger.warning(
            "%s holds %d exact zeros among values of typical size %.3g: if 0 marks a missing "
            "value (as in MaxQuant or DIA-NN tables), replace zeros by NaN "
            "(adata.X[adata.X == 0] = np.nan); as zeros they are modelled as measured.",
            where,
            n_zero,
            typical,
        )


def validate_layer(adata: AnnData, layer: str | None) -> None:
    """Check that ``layer`` exists in ``adata.layers``.

    Examples
    --------
    >>> import numpy as np, anndata
    >>> validate_layer(anndata.AnnData(np.ones((2, 2))), None)
    """
    if layer is not None and layer not in adata.layers:
        available = list(adata.layers.keys()) or "none"
        raise ValueError(
            f"Layer {layer!r} not found in adata.layers (available: {available}). Pass one of "
            "them, or layer=None to use adata.X."
        )


def check_not_a_view(data: AnnData | MuData) -> None:
    """Refuse a view (``data[mask]``), which scvi-tools' registration cannot write into.

    Parameters
    ----------
    data
        An AnnData or a MuData.

    Raises
    ------
    ValueError
        For a view, with the copy to make (``.to_memory()`` for a view of a backed AnnData,
        whose ``.copy()`` needs a file).

    Examples
    --------
    >>> import numpy as np, anndata
    >>> check_not_a_view(anndata.AnnData(np.ones((2, 2)))[:1])
    Traceback (most recent call last):
    ...
    ValueError: adata is a view of another AnnData (e.g. adata[mask]), which setup cannot register into: make it a copy first, adata = adata[mask].copy().
    """
    if not data.is_view:
        return
    kind = type(data).__name__
    name = "mdata" if isinstance(data, MuData) else "adata"
    fix = (
        f"read it into memory first, {name} = {name}[mask].to_memory()"
        if getattr(data, "isbacked", False)
        else f"make it a copy first, {name} = {name}[mask].copy()"
    )
    raise ValueError(
        f"{name} is a view of another {kind} (e.g. {name}[mask]), which setup cannot register "
        f"into: {fix}."
    )


def validate_anndata_object(adata: AnnData) -> None:
    """Refuse what scvi-tools' registration cannot take: a view, duplicate feature names.

    Parameters
    ----------
    adata
        The AnnData to set up.

    Raises
    ------
    ValueError
        For a view (:func:`check_not_a_view`) or repeated ``var_names``.

    Examples
    --------
    >>> import numpy as np, anndata
    >>> validate_anndata_object(anndata.AnnData(np.ones((2, 2))))
    """
    check_not_a_view(adata)
    if not adata.var_names.is_unique:
        duplicated = adata.var_names[adata.var_names.duplicated()].unique()
        raise ValueError(
            f"adata.var_names are not unique ({len(duplicated)} repeated, e.g. "
            f"{list(duplicated[:5])}): features are matched by name, so call "
            "adata.var_names_make_unique() (or drop the duplicates) before setup."
        )


def drop_unused_categories(adata: AnnData, key: str | None, argument: str) -> None:
    """Drop the categories of ``adata.obs[key]`` that no row holds, with an info line.

    A category without rows (left from subsetting) would become a class or condition that
    the model never sees trained. Agreed categories (``categories=`` at setup) are kept:
    call this only for columns without them.

    Examples
    --------
    >>> import numpy as np, anndata, pandas as pd
    >>> obs = pd.DataFrame({"c": pd.Categorical(["a"], categories=["a", "z"])})
    >>> adata = anndata.AnnData(np.ones((1, 1)), obs=obs)
    >>> drop_unused_categories(adata, "c", "labels_key")
    >>> list(adata.obs["c"].cat.categories)
    ['a']
    """
    if key is None or not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        return
    column = adata.obs[key]
    unused = [c for c in column.cat.categories if c not in set(column.unique())]
    if unused:
        logger.info(
            "%s=%r: dropped %d categories that no row holds (%s); pass categories= to keep "
            "agreed ones.",
            argument,
            key,
            len(unused),
            unused[:5],
        )
        adata.obs[key] = column.cat.remove_unused_categories()


def validate_obs_column(adata: AnnData, key: str | None, argument: str) -> None:
    """Check that an ``.obs`` column exists and has no missing values.

    Examples
    --------
    >>> import numpy as np, anndata
    >>> validate_obs_column(anndata.AnnData(np.ones((2, 2))), None, "site_key")
    """
    if key is None:
        return
    if key not in adata.obs:
        raise ValueError(
            f"{argument}={key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)[:20]})."
        )
    n_missing = int(adata.obs[key].isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{key!r}] has {n_missing} missing values; fill them (e.g. 'unknown') or "
            "subset the AnnData before setup."
        )
    check_one_kind_of_name(adata.obs[key], key)


def check_one_kind_of_name(column: pd.Series, key: str) -> None:
    """Refuse a column mixing text and numbers: ``"1"`` and ``1`` are one name once written.

    Such columns come from merging ``.obs`` tables; their categories cannot be sorted, and
    wherever names are compared as text (a site's name, agreed categories, a saved model) two
    categories would become one.

    Examples
    --------
    >>> import pandas as pd
    >>> check_one_kind_of_name(pd.Series(["1", 1, "2"], dtype=object), "site")
    Traceback (most recent call last):
    ...
    ValueError: adata.obs['site'] mixes text and numbers (e.g. '1' and 1), ...
    """
    values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    values = pd.unique(pd.Series(values).dropna())
    text = [value for value in values if isinstance(value, str)]
    other = [value for value in values if not isinstance(value, str)]
    if text and other:
        raise ValueError(
            f"adata.obs[{key!r}] mixes text and numbers (e.g. {text[0]!r} and {other[0]}), "
            "as merged tables do; they cannot be ordered, and '1' and 1 would name one "
            f"category. Make them one kind: adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)."
        )


def apply_agreed_categories(
    adata: AnnData, key: str | None, categories: Sequence[str] | None
) -> None:
    """Cast ``adata.obs[key]`` to the categories agreed by all sites, refusing unknown values.

    Category codes must mean the same thing at every site; agreeing on the list up front (by
    name) makes them global without pooling any data. Values and categories are compared, and
    kept, as strings (as a run configuration carries them): sites coded ``0, 1, 2`` agree on
    ``[0, 1, 2]`` or ``["0", "1", "2"]`` alike, and so do codes a merge turned into
    ``0.0, 1.0, 2.0``.

    Examples
    --------
    >>> import numpy as np, anndata, pandas as pd
    >>> adata = anndata.AnnData(np.ones((2, 1)), obs=pd.DataFrame({"c": ["b", "a"]}))
    >>> apply_agreed_categories(adata, "c", ["a", "b", "z"])
    >>> list(adata.obs["c"].cat.categories)
    ['a', 'b', 'z']
    """
    if key is None or categories is None:
        return
    categories = [_category_text(category) for category in categories]
    if len(set(categories)) != len(categories):
        raise ValueError(f"The agreed categories of {key!r} repeat a name: {categories[:10]}.")
    values = pd.Series(
        [_category_text(value) for value in adata.obs[key].astype(object)], index=adata.obs.index
    )
    unknown = sorted(set(values) - set(categories))
    if unknown:
        raise ValueError(
            f"adata.obs[{key!r}] holds categories {unknown[:10]} that are not in the agreed list "
            f"{categories[:10]}{'...' if len(categories) > 10 else ''}. Every site must use the same "
            "categories: add them to the agreed list (`categories=` of the setup at every site; "
            "in a deployment, `categories` of the run config's setup-args), or drop those rows."
        )
    adata.obs[key] = pd.Categorical(values, categories=categories)


def _category_text(value) -> str:
    """A category as text; a whole float reads as the integer (``1.0``: ``"1"``).

    Integer codes become floats in pandas wherever a column gains a missing value (a merge):
    the same site, label or condition must keep its name.
    """
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def validate_sites(
    site_sizes: Mapping[str, int],
    train_sizes: Mapping[str, int],
    batch_size: int,
    min_cells: int,
) -> None:
    """Check that every site can train; say so when a site is smaller than a minibatch.

    A site needs ``min_cells`` rows (at least 2) and one training row; a site with fewer
    training rows than ``batch_size`` trains on all of them in one minibatch (logged).

    Examples
    --------
    >>> validate_sites({"a": 6}, {"a": 5}, batch_size=128, min_cells=2)
    >>> validate_sites({"a": 6}, {"a": 0}, batch_size=128, min_cells=2)
    Traceback (most recent call last):
    ...
    ValueError: Site 'a' keeps no training row of its 6 once its validation rows are held out: lower validation_size.
    """
    for site, n in site_sizes.items():
        if n >= max(min_cells, 2) and train_sizes[site] < 1:
            raise ValueError(
                f"Site {site!r} keeps no training row of its {n} once its validation rows are "
                "held out: lower validation_size."
            )
        if n < max(min_cells, 2):
            raise ValueError(
                f"Site {site!r} has {n} rows; a site needs at least {max(min_cells, 2)} "
                "(min_cells_per_site) so that its update is not one sample's gradient and it keeps "
                "a training row after validation. Merge it into another site, drop it, or lower "
                "min_cells_per_site (2 at the least)."
            )
    small = {site: n for site, n in train_sizes.items() if n < batch_size}
    if small:
        logger.info(
            "Sites %s have fewer training rows than batch_size=%d: each trains on all its rows "
            "in one minibatch.",
            ", ".join(f"{site!r} ({n})" for site, n in small.items()),
            batch_size,
        )
