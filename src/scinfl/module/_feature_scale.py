"""Per-feature location and scale of continuous data, from sums that add up across sites.

A site computes :func:`feature_moments` on its own rows; the sites' moments add up to those
of the pooled rows, and :func:`scale_from_moments` turns the sum into the location and scale
that :meth:`scinfl.module.KeyedVAE.set_feature_scale` standardises with. No row leaves a site.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

#: Rows read at a time by :func:`feature_moments` (bounds the float64 copy it makes), fewer
#: for wide matrices: at most :data:`CHUNK_VALUES` values a chunk
CHUNK_ROWS = 4096
CHUNK_VALUES = 1 << 21
#: A feature whose standard deviation is at most this fraction of its ``|location|`` (float32's
#: resolution), or exactly 0, is taken as constant: :func:`scale_from_moments` gives it scale 1
#: (it is centred only). Relative, so that features in small units (1e-7) keep their spread.
CONSTANT_TOLERANCE = 1e-6
#: A feature observed fewer times than this over all sites has no scale: the model ignores it.
MIN_OBSERVED = 2
#: A feature observed fewer times than this has a scale of at least the features' median.
MIN_SPREAD_ROWS = 10


def feature_moments(
    X: np.ndarray | sparse.spmatrix, chunk_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed count, sum and sum of squares of every feature, missing values left out.

    ``NaN`` entries are missing; the implicit zeros of a sparse matrix are observed zeros.
    Rows are read ``chunk_rows`` at a time and accumulated in float64, so that the moments of
    several sites add up to those of their pooled rows.

    Parameters
    ----------
    X
        Observations x features: a numpy array or a scipy sparse matrix.
    chunk_rows
        Rows per chunk; default :data:`CHUNK_ROWS`, fewer where that would be more than
        :data:`CHUNK_VALUES` values (a wide matrix: 4,096 rows of 20,000 proteins in float64
        are 655 MB, and the chunk's temporaries as much again).

    Returns
    -------
    ``(count, sum, sumsq)``: float64 arrays of shape ``(n_features,)``.

    Examples
    --------
    >>> X = np.array([[1.0, np.nan], [3.0, 2.0]])
    >>> count, total, sumsq = feature_moments(X)
    >>> count.tolist(), total.tolist(), sumsq.tolist()
    ([2.0, 1.0], [4.0, 2.0], [10.0, 4.0])
    """
    if X.ndim != 2:
        raise ValueError(f"X must be 2-dimensional (observations x features), got shape {X.shape}.")
    n_obs, n_features = X.shape
    if chunk_rows is None:
        chunk_rows = max(1, min(CHUNK_ROWS, CHUNK_VALUES // max(1, n_features)))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}.")
    count = np.zeros(n_features)
    total = np.zeros(n_features)
    sumsq = np.zeros(n_features)
    is_sparse = sparse.issparse(X)
    if is_sparse:
        X = sparse.csr_matrix(X)
    for start in range(0, n_obs, chunk_rows):
        chunk = X[start : start + chunk_rows]
        if is_sparse:
            chunk = chunk.tocoo()
            values = chunk.data.astype(np.float64)
            missing = np.isnan(values)
            np.add.at(count, chunk.col[missing], -1.0)
            values[missing] = 0.0
            count += chunk.shape[0]
            total += np.bincount(chunk.col, weights=values, minlength=n_features)
            sumsq += np.bincount(chunk.col, weights=values * values, minlength=n_features)
        else:
            values = np.asarray(chunk, dtype=np.float64)
            observed = ~np.isnan(values)
            values = np.where(observed, values, 0.0)
            count += observed.sum(0)
            total += values.sum(0)
            sumsq += (values * values).sum(0)
    return count, total, sumsq


def scale_from_moments(
    count: np.ndarray, total: np.ndarray, sumsq: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of every feature from its moments.

    Equal to ``np.nanmean`` and ``np.nanstd`` (``ddof=0``) of the rows the moments were summed
    over, except that the result is never ``NaN``: a constant feature (standard deviation at
    most ``1e-6 * |mean|``, the resolution of float32 data, or 0) gets scale 1, so that it
    is centred but not blown up; a feature observed fewer than :data:`MIN_OBSERVED` times
    (nowhere, or once: no spread to scale by) gets scale 0, which
    :meth:`~scinfl.module.KeyedVAE.set_feature_scale` reads as "treat as missing", and
    location 0 if observed nowhere; one observed fewer than :data:`MIN_SPREAD_ROWS` times
    gets at least the median scale of the better-observed features (two close values would
    otherwise give a scale that puts every new sample far out).

    Parameters
    ----------
    count, total, sumsq
        Per-feature observed count, sum and sum of squares (:func:`feature_moments`, summed
        over sites).

    Returns
    -------
    ``(loc, scale)``: float64 arrays, for :meth:`scinfl.module.KeyedVAE.set_feature_scale`.

    Examples
    --------
    >>> loc, scale = scale_from_moments(*feature_moments(np.array([[1.0, 5.0], [3.0, 5.0]])))
    >>> loc.tolist(), scale.tolist()
    ([2.0, 5.0], [1.0, 1.0])
    >>> scale_from_moments(*feature_moments(np.array([[1.0, np.nan], [3.0, 4.0]])))[1].tolist()
    [1.0, 0.0]
    """
    count, total, sumsq = (np.asarray(a, dtype=np.float64) for a in (count, total, sumsq))
    if not count.shape == total.shape == sumsq.shape or count.ndim != 1:
        raise ValueError(
            "count, sum and sumsq must be 1-dimensional arrays of one shape, got "
            f"{count.shape}, {total.shape} and {sumsq.shape}."
        )
    observed = count > 0
    n = np.where(observed, count, 1.0)
    loc = np.where(observed, total / n, 0.0)
    variance = np.maximum(np.where(observed, sumsq / n - loc * loc, 0.0), 0.0)
    scale = np.sqrt(variance)
    # float32's resolution at the feature's own magnitude: a feature in small units (1e-7,
    # beside log intensities of 25) keeps its spread
    constant = scale <= CONSTANT_TOLERANCE * np.abs(loc)
    scale = np.where(constant, 1.0, scale)
    # a spread from a handful of values can be tiny by chance (two close values): such a
    # feature would put new samples many scales away; it is floored at the typical scale
    few = observed & (count < MIN_SPREAD_ROWS)
    reliable = observed & ~few & ~constant
    if few.any() and reliable.any():
        scale = np.where(few, np.maximum(scale, np.median(scale[reliable])), scale)
    return loc, np.where(count >= MIN_OBSERVED, scale, 0.0)
