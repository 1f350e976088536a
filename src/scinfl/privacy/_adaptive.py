"""Adaptive attack on a secret linear feature map: align the spectra of uploads and public data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _skew(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    return (a**3).mean(0) / np.maximum((a**2).mean(0), 1e-300) ** 1.5


def spectral_alignment_attack(
    projections: np.ndarray,
    public: np.ndarray,
    n_components: int = 10,
) -> np.ndarray:
    """Undo an unknown orthogonal feature map from many uploads and public data (no key needed).

    A per-feature key that acts linearly and stays fixed over rounds shows the server
    ``y_i = T x_i`` for every one-sample upload (:func:`analytic_inversion` of the shared
    first-layer weight). If the ``x_i`` are distributed like public data, the principal axes of
    the ``y_i`` are those of the public data mapped by ``T``: ``Cov(y) = T Cov(x) T^T``. Matching
    the top ``n_components`` axes (the sign of each axis fixed by the mean, which ``T`` maps too:
    ``u_j . mean_y = s_j v_j . mean_x``, with the public mean for ``mean_x``) recovers
    ``T`` on that subspace, hence a low-rank reconstruction of every ``x_i``:
    ``x_i ~ mean_pub + V S U^T (y_i - mean_y)``.

    Parameters
    ----------
    projections
        ``(n_uploads, m)``: what the server recovered from each upload (e.g. ``T`` applied to
        the zero-padded input, or any other linear image of it).
    public
        ``(n_public, n_features)`` public samples in the same space as the inputs (``log1p``
        counts for count models).
    n_components
        Number of principal axes matched.

    Returns
    -------
    ``(n_uploads, n_features)`` reconstructions.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scores = rng.gamma(1.0, 1.0, (400, 3)) * [6.0, 3.0, 1.5]
    >>> data = scores @ rng.normal(size=(3, 16)) + 0.01 * rng.normal(size=(400, 16))
    >>> q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    >>> rec = spectral_alignment_attack(data[:200] @ q.T, data[200:], n_components=3)
    >>> bool(np.corrcoef(rec[0], data[0])[0, 1] > 0.9)
    True
    """
    y = np.asarray(projections, dtype=np.float64)
    pub = np.asarray(public, dtype=np.float64)
    k = min(n_components, len(y) - 1, len(pub) - 1, y.shape[1])
    y_mean, pub_mean = y.mean(0), pub.mean(0)
    _, _, u = np.linalg.svd(y - y_mean, full_matrices=False)
    _, _, v = np.linalg.svd(pub - pub_mean, full_matrices=False)
    y_scores = (y - y_mean) @ u[:k].T
    pub_scores = (pub - pub_mean) @ v[:k].T
    # T maps the mean too: u_j . mean_y = s_j v_j . mean_x, and the public mean stands in for mean_x
    signs = np.sign((u[:k] @ y_mean) * (v[:k] @ pub_mean))
    undecided = signs == 0
    signs[undecided] = np.sign(_skew(y_scores) * _skew(pub_scores))[undecided]
    signs[signs == 0] = 1.0
    # an orthogonal map keeps the scale of every axis; any other linear map is rescaled here
    scale = pub_scores.std(0) / np.maximum(y_scores.std(0), 1e-300)
    return pub_mean + (y_scores * signs * scale) @ v[:k]


def class_order_from_prevalence(
    units: np.ndarray | Sequence[int], prevalence: np.ndarray | Sequence[float]
) -> np.ndarray:
    """Guess a keyed model's secret class order from many uploads and public label counts.

    The keyed class order (:meth:`~scinfl.module.KeyedVAE.set_class_order`) hides which output
    unit carries which class, but not how often each unit is the label of an upload. A server
    that reads the unit of many one-sample uploads (:func:`~scinfl.privacy.infer_label`) and
    knows the class prevalence (public data, or the cohort's published description) matches
    them by rank: the most frequent unit is the most prevalent class, and so on. Classes of
    equal prevalence stay hidden; the rest of the order is found once enough uploads are seen.

    Parameters
    ----------
    units
        Output unit of each observed upload.
    prevalence
        Count or frequency of each class in the attacker's public data.

    Returns
    -------
    The guessed order (``order[c]`` = unit of class ``c``), for
    :meth:`~scinfl.module.KeyedVAE.set_class_order` or
    :func:`~scinfl.privacy.class_of_unit`.

    Examples
    --------
    >>> class_order_from_prevalence([2, 2, 2, 0, 0, 1], prevalence=[30, 50, 20]).tolist()
    [0, 2, 1]
    """
    prevalence = np.asarray(prevalence, dtype=float)
    counts = np.bincount(np.asarray(units, dtype=np.int64), minlength=len(prevalence))
    if len(counts) != len(prevalence):
        raise ValueError(f"Units must be below the number of classes ({len(prevalence)}).")
    order = np.empty(len(prevalence), dtype=np.int64)
    order[np.argsort(-prevalence, kind="stable")] = np.argsort(-counts, kind="stable")
    return order
