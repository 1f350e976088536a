"""Write a model's label predictions into an AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from scinfl._checks import check_obs_column_free
from scinfl._copies import in_memory_copy

from ._results import check_entries_free, result_tool

if TYPE_CHECKING:
    from scinfl.model import INFL


def predict(
    adata: AnnData,
    model: INFL,
    key_added: str = "scinfl_prediction",
    proba_key: str = "scinfl_proba",
    copy: bool = False,
    batch_size: int | None = None,
) -> AnnData | None:
    """Store predicted labels in ``.obs[key_added]`` and class probabilities in ``.obsm[proba_key]``.

    The probabilities are an array, one column per label in the order of
    ``.obs[key_added].cat.categories`` (also in ``.uns[key_added]["params"]["labels"]``):
    labels are data, and a label with a ``/`` (``"CD4+/CD25 T Reg"``) cannot be a column name
    in a zarr store (nor, from anndata 0.13, in an ``.h5ad`` file).

    Parameters
    ----------
    adata
        AnnData set up like the model's training data.
    model
        A trained :class:`~scinfl.model.INFL` registered with ``labels_key``, its key set.
    key_added
        ``.obs`` column for the predicted label (categorical, in the model's label order).
    proba_key
        ``.obsm`` key for the probabilities (cells x labels).
    copy
        Return a copy of ``adata`` holding the result instead of writing into ``adata``.
    batch_size
        Rows per forward pass (default: scvi-tools' setting, 128); larger is faster on large
        data, a GPU especially.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData. Sets ``.obs[key_added]``,
    ``.obsm[proba_key]`` and ``.uns[key_added]``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> _ = model.train_federated(max_rounds=1, batch_size=16, progress_bar=False, seed=0)
    >>> scinfl.tl.predict(adata, model)
    >>> adata.obsm["scinfl_proba"].shape
    (60, 3)
    >>> adata.uns["scinfl_prediction"]["params"]["labels"]
    ['type0', 'type1', 'type2']
    >>> result = scinfl.tl.predict(adata, model, key_added="pred", copy=True)
    >>> "pred" in result.obs, "pred" in adata.obs
    (True, False)
    """
    if not callable(getattr(model, "predict", None)):
        raise TypeError(
            f"{type(model).__name__} trains no classifier, so it has no predictions to write: "
            "use scinfl.model.INFL set up with labels_key= (tl.embed and tl.cluster read this "
            "model)."
        )
    tool = "scinfl.tl.predict"
    check_obs_column_free(adata, key_added, lambda entry: result_tool(entry) == tool, tool)
    check_entries_free(adata, [("obsm", proba_key), ("uns", key_added), ("obs", key_added)], tool)
    proba = model.predict(adata, soft=True, batch_size=batch_size)
    if copy:
        adata = in_memory_copy(adata)
    labels = proba.columns.tolist()  # as .obs[key_added] names them (numbers stay numbers)
    adata.obsm[proba_key] = proba.to_numpy(dtype=np.float32)
    adata.obs[key_added] = pd.Categorical(proba.idxmax(axis=1), categories=list(proba.columns))
    adata.uns[key_added] = {"params": {"proba_key": proba_key, "labels": labels}}
    return adata if copy else None
