"""One site's rows, every registered field, held as they are (sparse stays sparse)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data._utils import registry_key_to_default_dtype
from sklearn.model_selection import train_test_split

from scinfl.module import NONZERO_KEY

if TYPE_CHECKING:
    from scvi.data import AnnDataManager

#: Field arrays: ``(n, ...)`` rows of one registered field (dense, or CSR for a matrix).
FieldArray = np.ndarray | sparse.csr_matrix


@dataclass
class SiteData:
    """The data of one site: every registered field of its rows, and its train/validation split.

    A site carries the fields of the model's data registry by registry key (``"X"``,
    ``"batch"``, ``"labels"``, and whatever else a model registers: continuous or categorical
    covariates, ``.obsm`` arrays, MuData modalities), so that a model that registers a field
    trains federated with it without any change to the federated code. Minibatches are
    gathered straight from the arrays (a CSR matrix is densified one minibatch at a time):
    scvi-tools' ``AnnDataLoader`` + Lightning cost more per minibatch than the small models
    trained here do, so the federated loop uses this lean path.

    Parameters
    ----------
    name
        Site name.
    fields
        ``(n, ...)`` array of every field by registry key; ``"X"`` is required. Categorical
        fields (``batch``, ``labels``, ...) hold integer codes of the agreed categories.
    train_idx, val_idx
        Row positions of the training and validation rows.

    Examples
    --------
    >>> import numpy as np
    >>> site = SiteData.from_arrays("a", np.ones((10, 4)), validation_size=0.2, seed=0)
    >>> site.n_train, site.n_val, sorted(site.fields)
    (8, 2, ['X', 'batch', 'labels'])
    """

    name: str
    fields: dict[str, FieldArray]
    train_idx: np.ndarray
    val_idx: np.ndarray
    _dense: dict[str, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if REGISTRY_KEYS.X_KEY not in self.fields:
            raise ValueError(f"Site {self.name!r} has no {REGISTRY_KEYS.X_KEY!r} field.")
        n = self.fields[REGISTRY_KEYS.X_KEY].shape[0]
        self.fields = {
            key: _as_field(key, value, n, self.name) for key, value in self.fields.items()
        }
        # dense fields are held as torch tensors: a minibatch is gathered by index_select into
        # torch's own (64-byte aligned) memory, so the kernels that consume it sum in the same
        # order whatever the allocator did (numpy's buffers are only 16-byte aligned)
        self._dense = {
            key: torch.from_numpy(value)
            for key, value in self.fields.items()
            if not sparse.issparse(value)
        }

    @staticmethod
    def n_validation(n: int, validation_size: float) -> int:
        """Number of validation rows a site of ``n`` rows holds out.

        ``round(validation_size * n)``, and at least one row for a site of 10 rows or more
        (with ``validation_size > 0``). It depends on ``n`` only (not on the labels or the
        seed), so the training size of every site is known before any split is drawn, e.g.
        to choose a batch size that every site can fill.

        Parameters
        ----------
        n
            The site's number of rows.
        validation_size
            Fraction of rows held out.

        Returns
        -------
        The number of validation rows.

        Examples
        --------
        >>> SiteData.n_validation(12, 0.1), SiteData.n_validation(4, 0.1), SiteData.n_validation(25, 0.1)
        (1, 0, 2)
        """
        n_val = int(round(validation_size * n)) if n > 1 else 0
        if validation_size > 0 and n >= 10:
            n_val = max(n_val, 1)
        return n_val

    @staticmethod
    def split_seed(seed: int, name: str) -> int:
        """Seed of a site's train/validation split: the federation's seed and the site's name.

        Every engine (in-process, Flower simulation, a deployed SuperNode) derives the split
        from these two alone, so the same seed gives the same split everywhere.

        Parameters
        ----------
        seed
            The federation's seed.
        name
            The site's name.

        Returns
        -------
        A 32-bit seed.

        Examples
        --------
        >>> SiteData.split_seed(0, "a") == SiteData.split_seed(0, "a") != SiteData.split_seed(0, "b")
        True
        """
        digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
        return int(np.random.SeedSequence([int(seed), digest]).generate_state(1)[0])

    @classmethod
    def from_arrays(
        cls,
        name: str,
        X: np.ndarray | sparse.spmatrix,
        batch: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        validation_size: float = 0.1,
        seed: int = 0,
        **fields: FieldArray,
    ) -> SiteData:
        """Build a site from arrays with a seeded train/validation split.

        :meth:`n_validation` rows are held out. With ``labels`` of two or more classes the
        split is stratified by label (:func:`~sklearn.model_selection.train_test_split`) when
        every class has at least two rows and both parts can hold every class; otherwise one
        row of every class is kept for training and the validation rows are drawn at random
        from the others, so that a small site still trains on each of its classes. Without
        labels (or with a single class) the rows are split at random.

        Parameters
        ----------
        name
            Site name.
        X
            ``(n, p)`` matrix, dense or sparse.
        batch, labels
            ``(n,)`` integer codes (default: all 0).
        validation_size
            Fraction of rows held out.
        seed
            Seed of the split (used as given; see :meth:`split_seed`).
        **fields
            Further registered fields by registry key, ``(n, ...)`` each.

        Returns
        -------
        The site.

        Examples
        --------
        >>> labels = np.array([0] * 8 + [1] * 2)
        >>> site = SiteData.from_arrays("a", np.ones((10, 3)), labels=labels, validation_size=0.1)
        >>> sorted(set(labels[site.train_idx].tolist()))
        [0, 1]
        """
        n = X.shape[0]
        zeros = np.zeros(n, dtype=np.int64)
        fields = {
            REGISTRY_KEYS.X_KEY: X,
            REGISTRY_KEYS.BATCH_KEY: zeros if batch is None else batch,
            REGISTRY_KEYS.LABELS_KEY: zeros if labels is None else labels,
            **fields,
        }
        val_idx = _validation_rows(n, cls.n_validation(n, validation_size), labels, seed)
        return cls(
            name=name,
            fields=fields,
            train_idx=np.setdiff1d(np.arange(n), val_idx),
            val_idx=np.sort(val_idx),
        )

    @classmethod
    def from_registry(
        cls,
        adata_manager: AnnDataManager,
        name: str,
        rows: np.ndarray | None = None,
        validation_size: float = 0.1,
        seed: int = 0,
        exclude: tuple[str, ...] = (),
    ) -> SiteData:
        """Build a site from every field of a model's data registry (``AnnDataManager``).

        Parameters
        ----------
        adata_manager
            The model's :class:`~scvi.data.AnnDataManager` (AnnData or MuData).
        name
            Site name.
        rows
            Row positions of the site's observations (default: all rows).
        validation_size
            Fraction of rows held out.
        seed
            The federation's seed; the split is drawn from :meth:`split_seed` of it and
            ``name``.
        exclude
            Registry keys not to carry (e.g. the site column, which partitions the data and is
            no input of the model).

        Returns
        -------
        The site, its fields as the registry holds them (sparse stays sparse).

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=8, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        >>> manager = scinfl.model.INFL._get_most_recent_anndata_manager(adata)
        >>> site = SiteData.from_registry(manager, "all", exclude=("site",))
        >>> sorted(site.fields), site.n_train + site.n_val
        (['X', 'batch', 'labels'], 60)
        """
        fields = {}
        for key in adata_manager.data_registry:
            if key in exclude:
                continue
            value = adata_manager.get_from_registry(key)
            if isinstance(value, pd.DataFrame | pd.Series):
                value = value.to_numpy()
            fields[key] = value if rows is None else value[rows]
        n = fields[REGISTRY_KEYS.X_KEY].shape[0]
        labels = fields.get(REGISTRY_KEYS.LABELS_KEY)
        if labels is not None:
            labels = np.asarray(labels).ravel()
        val_idx = _validation_rows(
            n, cls.n_validation(n, validation_size), labels, cls.split_seed(seed, name)
        )
        return cls(
            name=name,
            fields=fields,
            train_idx=np.setdiff1d(np.arange(n), val_idx),
            val_idx=np.sort(val_idx),
        )

    @property
    def X(self) -> FieldArray:
        """The data matrix."""
        return self.fields[REGISTRY_KEYS.X_KEY]

    def feature_matrix(
        self, module: torch.nn.Module | None = None, split: str = "train"
    ) -> FieldArray:
        """The rows of a split in the fields a module's feature scale covers, side by side.

        The fields are the module's ``feature_scale_keys`` (default: ``("X",)``, the data
        matrix); what :func:`~scinfl.module.feature_moments` of every site sums over.

        Parameters
        ----------
        module
            The model's module (``None``: the data matrix alone).
        split
            ``"train"`` or ``"val"``.

        Returns
        -------
        ``(n_rows, n_features)``: the fields' columns side by side (CSR if any is sparse).

        Examples
        --------
        >>> site = SiteData.from_arrays("a", np.ones((4, 2)), validation_size=0, X_b=np.zeros((4, 1)))
        >>> site.feature_matrix().shape
        (4, 2)
        """
        keys = getattr(module, "feature_scale_keys", (REGISTRY_KEYS.X_KEY,))
        rows = self.train_idx if split == "train" else self.val_idx
        parts = [self.fields[key][rows] for key in keys]
        if len(parts) == 1:
            return parts[0]
        if any(sparse.issparse(part) for part in parts):
            return sparse.hstack(parts, format="csr")
        return np.hstack(parts)

    @property
    def batch(self) -> np.ndarray:
        """Batch codes, ``(n,)`` (all 0 when no batch is registered)."""
        return self._codes(REGISTRY_KEYS.BATCH_KEY)

    @property
    def labels(self) -> np.ndarray:
        """Label codes, ``(n,)`` (all 0 when no labels are registered)."""
        return self._codes(REGISTRY_KEYS.LABELS_KEY)

    def _codes(self, key: str) -> np.ndarray:
        if key not in self.fields:
            return np.zeros(self.X.shape[0], dtype=np.int64)
        return self.fields[key].ravel()

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

        Parameters
        ----------
        n_labels
            Number of classes; label code ``n_labels`` (unlabelled) and above count for none.

        Returns
        -------
        ``(n_labels,)`` float32 weights, ``n / (n_present_classes * count)`` for a present class.

        Examples
        --------
        >>> site = SiteData.from_arrays("a", np.ones((4, 1)), labels=np.array([0, 0, 0, 1]), validation_size=0)
        >>> site.class_weights(3).tolist()
        [0.6666666865348816, 2.0, 0.0]
        """
        labels = self.labels[self.train_idx]
        labels = labels[labels < n_labels]  # unlabelled rows (code n_labels) weigh nothing
        counts = np.bincount(labels, minlength=n_labels).astype(np.float64)
        present = counts > 0
        weights = np.zeros(n_labels)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return torch.as_tensor(weights, dtype=torch.float32)

    def tensors(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Every field's tensor for the given row positions, keyed by registry key.

        Parameters
        ----------
        rows
            Row positions (integers into the site's rows).

        Returns
        -------
        Registry key to a ``(len(rows), ...)`` tensor (sparse fields densified; for a sparse
        data matrix, also the flat positions of its non-zero entries).

        Examples
        --------
        >>> site = SiteData.from_arrays("a", np.ones((4, 2)))
        >>> {k: tuple(v.shape) for k, v in site.tensors(np.array([0, 2])).items()}
        {'X': (2, 2), 'batch': (2, 1), 'labels': (2, 1)}
        """
        out = {}
        rows_t = torch.as_tensor(rows, dtype=torch.int64)
        for key, value in self.fields.items():
            if key in self._dense:
                out[key] = self._dense[key].index_select(0, rows_t)
            else:
                chosen = value[rows]
                out[key] = torch.empty(len(rows), value.shape[1], dtype=torch.float32)
                chosen.toarray(out=out[key].numpy())
                if key == REGISTRY_KEYS.X_KEY:
                    # where the counts are non-zero: the likelihood spends its costly terms there
                    # only, and finding them in the dense minibatch would cost more than this
                    starts = np.repeat(
                        np.arange(len(rows)) * value.shape[1], np.diff(chosen.indptr)
                    )
                    out[NONZERO_KEY] = torch.from_numpy(starts + chosen.indices)
        return out

    def minibatches(
        self,
        split: str = "train",
        batch_size: int = 128,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate over minibatches of a split, shuffled when a ``generator`` is given.

        A trailing minibatch of a single row is merged into the previous one (LayerNorm and
        the KL term are fine with it, but one-row steps are needlessly noisy).

        Parameters
        ----------
        split
            ``"train"`` or ``"val"``.
        batch_size
            Rows per minibatch.
        generator
            Shuffles the rows (``None``: in order).

        Returns
        -------
        An iterator of minibatches, as :meth:`tensors` gives them.

        Examples
        --------
        >>> site = SiteData.from_arrays("a", np.ones((10, 2)), validation_size=0)
        >>> [len(b["X"]) for b in site.minibatches(batch_size=3)]
        [3, 3, 4]
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


def _as_field(key: str, value, n: int, site: str) -> FieldArray:
    """A field's rows as a site stores them: 2-D, int64 codes or float32, CSR when sparse.

    Categorical fields hold codes (int64, as scvi-tools' loader gives the ones it knows);
    everything else is float32, the data matrix included whatever its dtype.
    """
    if sparse.issparse(value):
        value = sparse.csr_matrix(value, dtype=np.float32)
    else:
        value = np.asarray(value)
        codes = registry_key_to_default_dtype(key) is np.int64 or (
            key != REGISTRY_KEYS.X_KEY and np.issubdtype(value.dtype, np.integer)
        )
        value = np.ascontiguousarray(value, dtype=np.int64 if codes else np.float32)
        if value.ndim == 1:
            value = value.reshape(-1, 1)
    if value.shape[0] != n:
        raise ValueError(
            f"Site {site!r}: field {key!r} has {value.shape[0]} rows, but the data has {n}."
        )
    return value


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
