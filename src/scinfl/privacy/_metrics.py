"""Scores of a reconstruction: partial correlation, re-identification, top-k overlap, labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_rows(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[None] if a.ndim == 1 else a


def _residualise(a: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Residuals of each row of ``a`` after least squares on ``[1, reference]``."""
    design = np.stack([np.ones_like(reference), reference], axis=1)
    coef, *_ = np.linalg.lstsq(design, a.T, rcond=None)
    resid = a - (design @ coef).T
    # a row that is an affine function of the reference has nothing left: make that exact
    tiny = np.linalg.norm(resid, axis=1) <= 1e-9 * np.maximum(np.linalg.norm(a, axis=1), 1e-300)
    resid[tiny] = 0.0
    return resid


def _row_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of ``a`` with every row of ``b``: ``(len(a), len(b))``."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a / na) @ (b / nb).T
    return np.nan_to_num(r, nan=0.0)


def partial_correlation(
    reconstruction: np.ndarray, truth: np.ndarray, reference: np.ndarray | None = None
) -> float | np.ndarray:
    """Partial correlation of a reconstruction and the truth given a public reference profile.

    Both are residualised on ``[1, reference]`` (least squares), then correlated. It is free of
    scale and offset, and does not reward reproducing what every sample shares with the public
    mean (raw Pearson does). With ``reference=None`` it is Pearson's correlation.

    Parameters
    ----------
    reconstruction, truth
        ``(p,)`` vectors, or ``(n, p)`` arrays compared row by row.
    reference
        ``(p,)`` public profile (e.g. the mean log expression of public data).

    Returns
    -------
    A float, or an ``(n,)`` array for 2-D input.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> mean = rng.normal(size=50)
    >>> x = mean + rng.normal(size=50)
    >>> round(partial_correlation(3 * x + 1, x, mean), 6)
    1.0
    >>> abs(partial_correlation(mean + rng.normal(size=50), x, mean)) < 0.5
    True
    """
    rec, tru = _as_rows(reconstruction), _as_rows(truth)
    if rec.shape != tru.shape:
        raise ValueError(f"Shapes differ: {rec.shape} and {tru.shape}.")
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        rec, tru = _residualise(rec, ref), _residualise(tru, ref)
    r = np.array([_row_corr(a[None], b[None])[0, 0] for a, b in zip(rec, tru, strict=True)])
    return float(r[0]) if np.ndim(reconstruction) == 1 else r


def candidate_scores(
    reconstruction: np.ndarray, candidates: np.ndarray, reference: np.ndarray | None = None
) -> np.ndarray:
    """Partial correlation of a reconstruction with every candidate row.

    Parameters
    ----------
    reconstruction
        ``(p,)`` reconstruction, or ``(n, p)`` reconstructions.
    candidates
        ``(m, p)`` candidate rows, in the same space.
    reference
        ``(p,)`` public profile removed before correlating (``None``: Pearson).

    Returns
    -------
    ``(m,)`` scores, or ``(n, m)`` for 2-D ``reconstruction``.

    Examples
    --------
    >>> import numpy as np
    >>> cands = np.eye(4)
    >>> int(candidate_scores(cands[2] * 5, cands).argmax())
    2
    """
    rec, cands = _as_rows(reconstruction), _as_rows(candidates)
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        rec, cands = _residualise(rec, ref), _residualise(cands, ref)
    scores = _row_corr(rec, cands)
    return scores[0] if np.ndim(reconstruction) == 1 else scores


def reidentify(
    reconstruction: np.ndarray, candidates: np.ndarray, reference: np.ndarray | None = None
) -> int | np.ndarray:
    """Index of the candidate the reconstruction is matched to (highest partial correlation).

    Parameters
    ----------
    reconstruction
        ``(p,)`` reconstruction, or ``(n, p)`` reconstructions.
    candidates
        ``(m, p)`` candidate rows, in the same space.
    reference
        ``(p,)`` public profile removed before matching.

    Returns
    -------
    The index of the best candidate, or ``(n,)`` indices for 2-D ``reconstruction``.

    Examples
    --------
    >>> import numpy as np
    >>> reidentify(np.array([0.0, 1.0, 0.1]), np.eye(3))
    1
    """
    scores = candidate_scores(reconstruction, candidates, reference)
    best = np.asarray(scores).argmax(-1)
    return int(best) if np.ndim(best) == 0 else best


def candidate_set(n: int, victim: int, n_candidates: int = 100, seed: int = 0) -> np.ndarray:
    """Rows of a candidate set: ``victim`` and ``n_candidates - 1`` others, drawn without replacement.

    The victim is at position 0. Chance re-identification is ``1 / n_candidates``.

    Parameters
    ----------
    n
        Number of rows to draw from.
    victim
        The victim's row.
    n_candidates
        Size of the set, the victim included (at most ``n``).
    seed
        Seed of the draw (with ``victim``).

    Returns
    -------
    ``(n_candidates,)`` row indices, the victim first.

    Examples
    --------
    >>> rows = candidate_set(500, victim=7, n_candidates=100)
    >>> int(rows[0]), len(set(rows.tolist()))
    (7, 100)
    """
    if n_candidates > n:
        raise ValueError(f"Cannot draw {n_candidates} candidates from {n} samples.")
    rng = np.random.default_rng([seed, victim])
    others = rng.choice(np.setdiff1d(np.arange(n), [victim]), size=n_candidates - 1, replace=False)
    return np.concatenate([[victim], others])


def reidentification_rate(
    reconstructions: np.ndarray,
    victims: np.ndarray | Sequence[int],
    data: np.ndarray,
    reference: np.ndarray | None = None,
    n_candidates: int = 100,
    seed: int = 0,
) -> float:
    """Fraction of reconstructions matched to their own sample among ``n_candidates`` candidates.

    Each victim is compared with itself and ``n_candidates - 1`` other rows of ``data`` (see
    :func:`candidate_set`); it is re-identified when its own row scores strictly higher than
    every other candidate. Chance level is ``1 / n_candidates``.

    Parameters
    ----------
    reconstructions
        ``(n_attacks, p)`` reconstructions.
    victims
        Row of ``data`` each reconstruction came from.
    data
        ``(n, p)`` samples in the same space as the reconstructions (e.g. ``log1p`` counts).
    reference
        Public profile removed before matching.
    n_candidates
        Size of each candidate set.
    seed
        Seed of the candidate draws.

    Returns
    -------
    The re-identification rate, in ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> data = np.random.default_rng(0).normal(size=(200, 30))
    >>> reidentification_rate(data[:5] * 2, range(5), data)
    1.0
    """
    data = _as_rows(data)
    recs = _as_rows(reconstructions)
    hits = []
    for rec, victim in zip(recs, victims, strict=True):
        rows = candidate_set(len(data), int(victim), n_candidates, seed)
        scores = candidate_scores(rec, data[rows], reference)
        # strictly better than every other candidate: a tie (e.g. a constant reconstruction) is a miss
        hits.append(bool(scores[0] > scores[1:].max()))
    return float(np.mean(hits))


def top_k_overlap(
    reconstruction: np.ndarray, truth: np.ndarray, k: int = 50, reference: np.ndarray | None = None
) -> float:
    """Fraction of the truth's top-``k`` features that are also top-``k`` in the reconstruction.

    With a ``reference``, features are ranked by their residual after removing it (what sets
    this sample apart), otherwise by value. Chance level is about ``k / p``.

    Parameters
    ----------
    reconstruction, truth
        ``(p,)`` vectors (of a 2-D input, the first row is used).
    k
        Number of top features compared.
    reference
        ``(p,)`` public profile removed before ranking.

    Returns
    -------
    The overlap, in ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(100.0)
    >>> top_k_overlap(x, x, k=10)
    1.0
    """
    rec, tru = _as_rows(reconstruction), _as_rows(truth)
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        rec, tru = _residualise(rec, ref), _residualise(tru, ref)
    top_r = np.argsort(-rec[0])[:k]
    top_t = np.argsort(-tru[0])[:k]
    return len(np.intersect1d(top_r, top_t)) / k


def label_recovery(
    predicted: np.ndarray | Sequence[int], true: np.ndarray | Sequence[int]
) -> float:
    """Fraction of uploads whose label the attacker recovered.

    Parameters
    ----------
    predicted, true
        Recovered and true label of each upload (same length).

    Returns
    -------
    The accuracy, in ``[0, 1]``.

    Examples
    --------
    >>> label_recovery([1, 2, 3], [1, 2, 0])
    0.6666666666666666
    """
    predicted, true = np.asarray(predicted).ravel(), np.asarray(true).ravel()
    return float(np.mean(predicted == true))
