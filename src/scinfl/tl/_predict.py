"""Write a model's label predictions into an AnnData."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData


def predict(
    adata: AnnData,
    model,
    key_added: str = "scinfl_prediction",
    proba_key: str = "scinfl_proba",
) -> AnnData:
    """Store predicted labels in ``.obs[key_added]`` and class probabilities in ``.obsm[proba_key]``.

    Parameters
    ----------
    adata
        AnnData set up like the model's training data.
    model
        A trained :class:`~scinfl.model.INFL` registered with ``labels_key``, its key set.
    key_added
        ``.obs`` column for the predicted label (categorical, in the model's label order).
    proba_key
        ``.obsm`` key for the probabilities (a DataFrame, one column per label).

    Returns
    -------
    ``adata`` (modified in place).

    Examples
    --------
    >>> scinfl.tl.predict(adata, model)  # doctest: +SKIP
    >>> adata.obsm["scinfl_proba"].columns.tolist()  # doctest: +SKIP
    ['CNV_high', 'CNV_low', 'MSI-H', 'POLE']
    """
    proba = model.predict(adata, soft=True)
    proba.index = adata.obs_names
    adata.obsm[proba_key] = proba
    adata.obs[key_added] = pd.Categorical(proba.idxmax(axis=1), categories=list(proba.columns))
    return adata
