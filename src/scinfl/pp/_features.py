"""An AnnData with exactly the agreed features, in the agreed order, matched by name."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from scinfl._copies import in_memory_copy

logger = logging.getLogger(__name__)


def align_features(adata: AnnData, features: Sequence[str], layer: str | None = None) -> AnnData:
    """A new AnnData with exactly ``features``, in that order, matched to ``var_names`` by name.

    What a site does with the features its federation agreed on
    (:func:`scinfl.federated.agree_features_from_reports`): extra features are dropped, and,
    under ``how="union"``, the agreed features the site never measured become columns of
    ``NaN`` (missing values, which ``gene_likelihood="normal"`` masks; a count likelihood
    refuses them). ``var_names`` are compared as strings.

    Parameters
    ----------
    adata
        The site's data (not modified; backed data are read into memory).
    features
        The agreed feature names, in the agreed order.
    layer
        Layer holding the values (``None``: ``.X``); with absent features, the new AnnData
        holds the padded values in ``.X`` and in this layer.

    Returns
    -------
    A new AnnData (its ``.var`` reindexed, rows of absent features empty).

    Examples
    --------
    >>> import numpy as np, anndata, pandas as pd, scinfl
    >>> adata = anndata.AnnData(np.ones((2, 2)), var=pd.DataFrame(index=["B", "A"]))
    >>> aligned = scinfl.pp.align_features(adata, ["A", "C"])
    >>> list(aligned.var_names), np.isnan(aligned.X[:, 1]).all()
    (['A', 'C'], np.True_)
    """
    names = pd.Index([str(name) for name in features])
    if not names.is_unique:
        raise ValueError(f"features repeat names (e.g. {list(names[names.duplicated()][:5])}).")
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"adata.layers[{layer!r}] not found (layers: {list(adata.layers)}).")
    where = adata.var_names.astype(str).get_indexer(names)
    present = where >= 0
    if present.all():
        aligned = in_memory_copy(adata[:, where])
        aligned.var_names = names
        return aligned
    logger.info(
        "%d of the %d features are absent from the data: columns of NaN (missing values).",
        int((~present).sum()),
        len(names),
    )
    source = adata.X if layer is None else adata.layers[layer]
    kept = source[:, where[present]]
    kept = kept.toarray() if sparse.issparse(kept) else np.asarray(kept)
    values = np.full((adata.n_obs, len(names)), np.nan, dtype=np.float32)
    values[:, present] = kept
    var = adata.var.set_axis(adata.var_names.astype(str)).reindex(names)
    out = AnnData(values, obs=adata.obs.copy(), var=var)
    if layer is not None:
        out.layers[layer] = values.copy()
    return out
