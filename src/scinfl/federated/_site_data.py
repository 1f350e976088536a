"""One site's rows, held as they are (sparse stays sparse) and served in minibatches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS
from sklearn.model_selection import train_test_split


@dataclass
class SiteData:
    """The data of one site: features, batch and label codes, and its train/validation split.

    Minibatches are gathered straight from the matrix (a CSR matrix is densified one
    minibatch at a time). scvi-tools' ``AnnDataLoader`` + Lightning cost more per minibatch
    than the small models trained here do, so the federated loop uses this lean path.

    Parameters
    ----------
    name
        Site name.
    X
        ``(n, p)`` matrix, dense or CSR.
    batch
        ``(n,)`` integer batch codes (global categories).
    labels
        ``(n,)`` integer label codes (global categories).
    train_idx, val_idx
        Row positions (into ``X``) of the training and validation rows.

    Examples
    --------
    >>> import numpy as np
    >>> site = SiteData.from_arrays("a", np.ones((10, 4)), validation_size=0.2, seed=0)
    >>> site.n_train, site.n_val
    (8, 2)
    """

    name: str
    X: np.ndarray | sparse.csr_matrix
    batch: np.ndarray
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    _labels_t: torch.Tensor = field(init=False, repr=False)
    _batch_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if sparse.issparse(self.X):
            self.X = sparse.csr_matrix(self.X, dtype=np.float32)
        else:
            self.X = np.asarray(self.X, dtype=np.float32)
        self._batch_t = torch.as_tensor(np.asarray(self.batch, dtype=np.int64)).view(-1, 1)
        self._labels_t = torch.as_tensor(np.asarray(self.labels, dtype=np.int64)).view(-1, 1)

    @staticmethod
    def n_validation(n: int, validation_size: float) -> int:
        """Number of validation rows :meth:`from_arrays` holds out of a site's ``n`` rows.

        ``round(validation_size * n)``, and at least one row for a site of 10 rows or more
        (with ``validation_size > 0``). It depends on ``n`` only (not on the labels or the
        seed), so the training size of every site is known before any split is drawn, e.g.
        to choose a batch size that every site can fill.

        Examples
        --------
        >>> SiteData.n_validation(12, 0.1), SiteData.n_validation(4, 0.1), SiteData.n_validation(25, 0.1)
        (1, 0, 2)
        """
        n_val = int(round(validation_size * n)) if n > 1 else 0
        if validation_size > 0 and n >= 10:
            n_val = max(n_val, 1)
        return n_val

    @classmethod
    def from_arrays(
        cls,
        name: str,
        X,
        batch: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        validation_size: float = 0.1,
        seed: int = 0,
    ) -> SiteData:
        """Build a site from arrays with a seeded train/validation split.

        :meth:`n_validation` rows are held out. With ``labels`` of two or more classes the
        split is stratified by label (:func:`~sklearn.model_selection.train_test_split`) when
        every class has at least two rows and both parts can hold every class; otherwise one
        row of every class is kept for training and the validation rows are drawn at random
        from the others, so that a small site still trains on each of its classes. Without
        labels (or with a single class) the rows are split at random.

        Examples
        --------
        >>> labels = np.array([0] * 8 + [1] * 2)
        >>> site = SiteData.from_arrays("a", np.ones((10, 3)), labels=labels, validation_size=0.1)
        >>> sorted(set(labels[site.train_idx].tolist()))
        [0, 1]
        """
        n = X.shape[0]
        val_idx = _validation_rows(n, cls.n_validation(n, validation_size), labels, seed)
        zeros = np.zeros(n, dtype=np.int64)
        return cls(
            name=name,
            X=X,
            batch=zeros if batch is None else batch,
            labels=zeros if labels is None else labels,
            train_idx=np.setdiff1d(np.arange(n), val_idx),
            val_idx=np.sort(val_idx),
        )

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return len(self.train_idx)

    @property
    def n_val(self) -> int:
        """Number of validation rows."""
        return len(self.val_idx)

    def class_weights(self, n_labels: int) -> torch.Tensor:
        """Inverse-frequency weights of the labels among the training rows (0 for absent ones).

        Examples
        --------
        >>> site = SiteData.from_arrays("a", np.ones((4, 1)), labels=np.array([0, 0, 0, 1]), validation_size=0)
        >>> site.class_weights(3).tolist()
        [0.6666666865348816, 2.0, 0.0]
        """
        counts = np.bincount(self.labels[self.train_idx], minlength=n_labels).astype(np.float64)
        present = counts > 0
        weights = np.zeros(n_labels)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return torch.as_tensor(weights, dtype=torch.float32)

    def tensors(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The registry tensors for the given row positions."""
        x = self.X[rows]
        x = x.toarray() if sparse.issparse(x) else x
        rows_t = torch.as_tensor(rows)
        return {
            REGISTRY_KEYS.X_KEY: torch.from_numpy(np.ascontiguousarray(x)),
            REGISTRY_KEYS.BATCH_KEY: self._batch_t[rows_t],
            REGISTRY_KEYS.LABELS_KEY: self._labels_t[rows_t],
        }

    def minibatches(
        self,
        split: str = "train",
        batch_size: int = 128,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate over minibatches of a split, shuffled when a ``generator`` is given.

        A trailing minibatch of a single row is merged into the previous one (LayerNorm and
        the KL term are fine with it, but one-row steps are needlessly noisy).
        """
        idx = self.train_idx if split == "train" else self.val_idx
        if generator is not None:
            idx = idx[torch.randperm(len(idx), generator=generator).numpy()]
        starts = list(range(0, len(idx), batch_size))
        if len(starts) > 1 and len(idx) - starts[-1] == 1:
            starts.pop()
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(idx)
            yield self.tensors(idx[start:stop])


def _validation_rows(n: int, n_val: int, labels: np.ndarray | None, seed: int) -> np.ndarray:
    """Positions of the ``n_val`` validation rows among ``n`` (see :meth:`SiteData.from_arrays`)."""
    rng = np.random.default_rng(seed)
    counts = np.array([n]) if labels is None else np.unique(labels, return_counts=True)[1]
    if len(counts) < 2 or n_val == 0:
        return rng.permutation(n)[:n_val]
    if counts.min() >= 2 and len(counts) <= min(n_val, n - n_val):
        _, val_idx = train_test_split(
            np.arange(n), test_size=n_val, stratify=labels, random_state=int(rng.integers(2**32))
        )
        return val_idx
    # one row of every class (the first in a random order) goes to validation last
    perm = rng.permutation(n)
    _, first = np.unique(np.asarray(labels)[perm], return_index=True)
    return np.concatenate([np.delete(perm, first), perm[first]])[:n_val]
