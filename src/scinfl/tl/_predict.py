"""Write a model's label predictions into an AnnData."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData


def predict(
    adata: AnnData,
    model,
    key_added: str = "scinfl_prediction",
    proba_key: str = "scinfl_proba",
    copy: bool = False,
) -> AnnData | None:
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
    copy
        Return a copy of ``adata`` holding the result instead of writing into ``adata``.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData. Sets ``.obs[key_added]`` and
    ``.obsm[proba_key]``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> _ = model.train_federated(max_rounds=1, batch_size=16, progress_bar=False, seed=0)
    >>> scinfl.tl.predict(adata, model)
    >>> sorted(adata.obsm["scinfl_proba"].columns)
    ['type0', 'type1', 'type2']
    >>> result = scinfl.tl.predict(adata, model, key_added="pred", copy=True)
    >>> "pred" in result.obs, "pred" in adata.obs
    (True, False)
    """
    proba = model.predict(adata, soft=True)
    proba.index = adata.obs_names
    if copy:
        adata = adata.copy()
    adata.obsm[proba_key] = proba
    adata.obs[key_added] = pd.Categorical(proba.idxmax(axis=1), categories=list(proba.columns))
    return adata if copy else None
