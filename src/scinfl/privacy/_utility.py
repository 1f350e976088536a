"""Utility of a released model in the hands of someone without the key."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from ._attacks import attacker_module
from ._upload import make_tensors

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData
    from scvi.model.base import BaseModelClass

logger = logging.getLogger(__name__)

UTILITY_METRICS = ("accuracy", "agreement", "knn_accuracy", "ari")
#: metrics of the latent space (scored for each key guess and for the model-free reference)
LATENT_METRICS = ("knn_accuracy", "ari")
#: key guess of the model-free reference rows of :func:`wrong_key_utility`
NO_MODEL = "no model"


@dataclass
class ModelData:
    """An AnnData's registered data, as a model sees it (internal to the audit).

    Attributes
    ----------
    X
        ``(n, p)`` matrix (dense or CSR) of the registered layer.
    batch, labels, sites
        Integer codes of the registered batch and labels (zeros when not registered) and of the
        ``site_key`` column given at setup (zeros without one).
    label_names
        Category names of the label codes (``None`` without ``labels_key``).
    """

    X: np.ndarray | sparse.csr_matrix
    batch: np.ndarray
    labels: np.ndarray
    sites: np.ndarray
    label_names: np.ndarray | None

    @property
    def n_obs(self) -> int:
        """Number of rows."""
        return int(self.X.shape[0])

    def tensors(self, rows) -> dict[str, torch.Tensor]:
        """Registry tensors of the given rows (dense, one block)."""
        rows = np.asarray(rows)
        x = self.X[rows]
        x = x.toarray() if sparse.issparse(x) else np.asarray(x)
        return make_tensors(x, labels=self.labels[rows], batch=self.batch[rows])

    def encoder_input(self, rows, log_variational: bool) -> np.ndarray:
        """What the encoder reads: ``log1p`` counts, or values with NaN as 0."""
        x = self.X[np.asarray(rows)]
        x = np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)
        return np.log1p(x) if log_variational else np.nan_to_num(x, nan=0.0)


def model_data(model, adata=None) -> ModelData:
    """Registered data of ``adata`` (default: the model's own) as :class:`ModelData`.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> data = model_data(model)
    >>> data.n_obs, data.label_names.tolist(), sorted(set(data.sites.tolist()))
    (60, ['type0', 'type1', 'type2'], [0, 1])
    """
    adata = model._validate_anndata(adata)
    manager = model.get_anndata_manager(adata, required=True)
    fields = manager.data_registry

    def codes(name):
        if name not in fields:
            return np.zeros(adata.n_obs, dtype=np.int64)
        return np.asarray(manager.get_from_registry(name)).ravel().astype(np.int64)

    label_names = None
    if manager.registry["setup_args"].get("labels_key") is not None:
        mapping = manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        label_names = np.asarray(mapping)
    # the site partitions training only and is no registered field: read the setup's column
    site_key = manager.registry["setup_args"].get("site_key")
    if site_key is not None and site_key in adata.obs:
        sites = pd.Categorical(adata.obs[site_key]).codes.astype(np.int64)
    else:
        sites = np.zeros(adata.n_obs, dtype=np.int64)
    x = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    if sparse.issparse(x):
        x = sparse.csr_matrix(x)
    return ModelData(
        X=x,
        batch=codes(REGISTRY_KEYS.BATCH_KEY),
        labels=codes(REGISTRY_KEYS.LABELS_KEY),
        sites=sites,
        label_names=label_names,
    )


@torch.no_grad()
def _latent_and_predictions(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    module.eval()
    key_encoder = getattr(module, "key_encoder", None)
    reuse = key_encoder.reuse() if hasattr(key_encoder, "reuse") else contextlib.nullcontext()
    latent, predictions = [], []
    n = int(tensors[REGISTRY_KEYS.X_KEY].shape[0])
    with reuse:
        for start in range(0, n, batch_size):
            t = {k: v[start : start + batch_size] for k, v in tensors.items()}
            qz = module.inference(**module._get_inference_input(t))["qz"]
            latent.append(qz.loc.cpu())
            if getattr(module, "classifier", None) is not None:
                predictions.append(module.classification_logits(qz.loc).argmax(-1).cpu())
    z = torch.cat(latent).numpy()
    return z, (torch.cat(predictions).numpy() if predictions else None)


def _knn_accuracy(latent: np.ndarray, labels: np.ndarray, n_neighbors: int, seed: int) -> float:
    _, counts = np.unique(labels, return_counts=True)
    n_splits = int(min(5, counts.min()))
    if n_splits < 2 or len(counts) < 2:
        return float("nan")
    knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(labels) - len(labels) // n_splits))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return float(cross_val_score(knn, latent, labels, cv=cv).mean())


def _latent_score(metric: str, latent: np.ndarray, y: np.ndarray, n_neighbors: int, seed: int):
    """``knn_accuracy`` or ``ari`` (k-means with one cluster per label) of an embedding."""
    if metric == "knn_accuracy":
        return _knn_accuracy(latent, y, n_neighbors, seed)
    k = len(np.unique(y))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(latent)
    return float(adjusted_rand_score(y, clusters))


def wrong_key_utility(
    model: BaseModelClass | nn.Module,
    data: AnnData | MuData | Mapping[str, torch.Tensor] | None = None,
    labels: str | Sequence | np.ndarray | None = None,
    guesses: Sequence[str] = ("correct", "wrong", "none"),
    metrics: Sequence[str] = UTILITY_METRICS,
    n_neighbors: int = 15,
    batch_size: int = 1024,
    seed: int = 0,
    attackers: Mapping[str, nn.Module] | None = None,
    reference: bool = True,
) -> pd.DataFrame:
    """Utility of a trained model run with the correct key, a wrong key, and no key.

    A key should make the released weights useless without it: with a wrong key drawn from
    the same generator (:meth:`scinfl.Key.generate`) or no key (secret material at zero, see
    :func:`~scinfl.privacy.attacker_module`), the model's predictions and latent space should
    be no better than chance.

    Metrics (each on every row of the data):

    - ``accuracy``: accuracy of the classifier head (models trained with labels); chance is
      the frequency of the most common label;
    - ``agreement``: fraction of predictions equal to those made with the correct key;
    - ``knn_accuracy``: cross-validated ``n_neighbors``-nearest-neighbour label accuracy in
      the latent space (what an attacker with a few labelled samples of its own gets);
    - ``ari``: adjusted Rand index of k-means on the latent space (``k`` = number of labels)
      against the labels; chance is 0.

    Note that ``knn_accuracy`` and ``ari`` can stay high with a wrong key even when the
    classifier fails: any smooth encoder keeps some neighbourhoods of the input. So with
    ``reference=True`` they are also computed without any model (key guess ``"no model"``), on
    the principal components of the rows' encoder input (``log1p`` counts, or values with NaN
    as 0) as many as the latent space has dimensions: what the attacker gets from the same rows
    and labels without the model. A latent space below that reference gives the attacker
    nothing its own data does not.

    Parameters
    ----------
    model
        A trained :class:`~scinfl.model.INFL` (its key set), or a
        :class:`~scinfl.module.KeyedVAE` holding its key.
    data
        For a model: an AnnData set up like the training data (default: the model's own).
        For a module: registry tensors (:func:`~scinfl.privacy.make_tensors`).
    labels
        Labels of the rows: an ``.obs`` column (with a model) or an array. Default: the
        registered ``labels_key`` (model), ``data["labels"]`` (module).
    guesses
        Among ``"correct"``, ``"wrong"`` and ``"none"``.
    metrics
        Among ``"accuracy"``, ``"agreement"``, ``"knn_accuracy"`` and ``"ari"``; those that
        need a classifier are skipped without one.
    n_neighbors
        Neighbours of the kNN classifier.
    batch_size
        Rows per forward pass.
    seed
        Seed of the wrong key, the folds and k-means.
    attackers
        The attacker's module for some guesses (e.g. from
        :func:`~scinfl.privacy.framed_attackers`); the others come from
        :func:`~scinfl.privacy.attacker_module`.
    reference
        Add the model-free ``"no model"`` rows of ``knn_accuracy`` and ``ari`` (if requested).

    Returns
    -------
    Tidy DataFrame with columns ``key_guess``, ``metric``, ``value``, ``chance``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=120, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    >>> _ = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
    >>> df = wrong_key_utility(model, metrics=["accuracy", "knn_accuracy"])
    >>> df["key_guess"].unique().tolist()
    ['correct', 'wrong', 'none', 'no model']
    """
    unknown = set(metrics) - set(UTILITY_METRICS)
    if unknown:
        raise ValueError(f"Unknown metrics {sorted(unknown)}; choose from {UTILITY_METRICS}.")
    bad = set(guesses) - {"correct", "wrong", "none"}
    if bad:
        raise ValueError(f"Unknown key guesses {sorted(bad)}; use 'correct', 'wrong', 'none'.")
    module, tensors, y, names = _utility_inputs(model, data, labels)
    if not module.has_key:
        raise ValueError("The model has no key set: the 'correct' reference needs it.")
    if len(y) != int(tensors[REGISTRY_KEYS.X_KEY].shape[0]):
        raise ValueError("labels= must have one entry per row.")
    y = np.asarray(y)
    _, label_counts = np.unique(y, return_counts=True)
    majority = float(label_counts.max() / label_counts.sum())
    latent_chance = {"knn_accuracy": majority, "ari": 0.0}

    reference_predictions = None
    if "agreement" in metrics and getattr(module, "classifier", None) is not None:
        _, reference_predictions = _latent_and_predictions(
            attacker_module(module, "correct"), tensors, batch_size
        )
    rows = []
    for guess in guesses:
        if attackers is not None and guess in attackers:
            attacker = attackers[guess]
        else:
            attacker = attacker_module(module, guess, seed=seed)
        latent, predictions = _latent_and_predictions(attacker, tensors, batch_size)
        if predictions is not None and names is not None:
            predicted = names[predictions]
        else:
            predicted = predictions
        for metric in metrics:
            if metric == "accuracy" and predictions is not None:
                value, chance = float(np.mean(predicted == y)), majority
            elif metric == "agreement" and predictions is not None:
                value, chance = float(np.mean(predictions == reference_predictions)), np.nan
            elif metric in LATENT_METRICS:
                value, chance = (
                    _latent_score(metric, latent, y, n_neighbors, seed),
                    latent_chance[metric],
                )
            else:
                continue
            rows.append({"key_guess": guess, "metric": metric, "value": value, "chance": chance})
        logger.info("Utility with key guess %r computed.", guess)
    if reference:
        rows += _model_free_rows(module, tensors, y, metrics, n_neighbors, seed, latent_chance)
    return pd.DataFrame(rows, columns=["key_guess", "metric", "value", "chance"])


def _utility_inputs(model, data, labels) -> tuple[nn.Module, dict, np.ndarray, np.ndarray | None]:
    """The module, registry tensors, labels of the rows and label names (model's codes only)."""
    if isinstance(model, nn.Module):
        if data is None:
            raise ValueError("With a module, pass data= as registry tensors.")
        if labels is None:
            return model, data, data[REGISTRY_KEYS.LABELS_KEY].view(-1).cpu().numpy(), None
        return model, data, np.asarray(labels).ravel(), None
    registered = model_data(model, data)
    tensors = registered.tensors(np.arange(registered.n_obs))
    names = registered.label_names
    if labels is None:
        if names is None:
            raise ValueError("The model has no labels_key: pass labels=.")
        y = names[registered.labels]
    elif isinstance(labels, str):
        y = model._validate_anndata(data).obs[labels].astype(str).to_numpy()
    else:
        y = np.asarray(labels).ravel()
    return model.module, tensors, y, names


def _model_free_rows(module, tensors, y, metrics, n_neighbors, seed, chance) -> list[dict]:
    """The ``"no model"`` rows: latent metrics on principal components of the encoder input."""
    wanted = [m for m in LATENT_METRICS if m in metrics]
    if not wanted:
        return []
    x = tensors[REGISTRY_KEYS.X_KEY].cpu().double().numpy()
    x = np.log1p(x) if getattr(module, "log_variational", True) else np.nan_to_num(x, nan=0.0)
    n_components = min(int(module.n_latent), *x.shape)
    embedded = PCA(n_components, random_state=seed).fit_transform(x)
    return [
        {
            "key_guess": NO_MODEL,
            "metric": metric,
            "value": _latent_score(metric, embedded, y, n_neighbors, seed),
            "chance": chance[metric],
        }
        for metric in wanted
    ]
