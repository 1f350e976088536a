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


def align_features(adata: AnnData, features: Sequence[str] | str) -> AnnData:
    """A new AnnData with exactly ``features``, in that order, matched to ``var_names`` by name.

    What a site does with the features its federation agreed on
    (:func:`scinfl.federated.agree_features_from_reports`): extra features are dropped, and,
    under ``how="union"``, the agreed features the site never measured become columns of
    ``NaN`` in ``.X`` and in every layer (missing values, which ``gene_likelihood="normal"``
    masks; a count likelihood refuses them). ``.obs``, ``.obsm`` and ``.uns`` are kept;
    ``var_names`` are compared as strings.

    Parameters
    ----------
    adata
        The site's data (not modified; backed data are read into memory).
    features
        The agreed feature names, in the agreed order (one name may be a string).

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
    names = pd.Index([features] if isinstance(features, str) else [str(f) for f in features])
    if len(names) == 0:
        raise ValueError("features names no feature.")
    if not names.is_unique:
        raise ValueError(f"features repeat names (e.g. {list(names[names.duplicated()][:5])}).")
    held = adata.var_names.astype(str)
    if not held.is_unique:
        raise ValueError(
            f"adata names several features alike (e.g. {list(held[held.duplicated()][:5])}): "
            "make them unique (adata.var_names_make_unique()) or aggregate them first."
        )
    where = held.get_indexer(names)
    present = where >= 0
    if not present.any():
        raise ValueError(
            f"adata shares none of the {len(names)} features (features: {list(names[:3])}, "
            f"data: {list(held[:3])}): are they named the same way, and is the matrix samples "
            "x features (not transposed)?"
        )
    if present.all():
        # positions, on string names: anndata cannot index numbered var_names by position
        source = adata if held.equals(adata.var_names) else _with_string_names(adata, held)
        aligned = in_memory_copy(source[:, where])
        aligned.var_names = names
        return aligned
    logger.info(
        "%d of the %d features are absent from the data: columns of NaN (missing values).",
        int((~present).sum()),
        len(names),
    )
    out = AnnData(
        _padded(adata.X, where, present),
        obs=adata.obs.copy(),
        var=adata.var.set_axis(held).reindex(names),
        obsm=dict(adata.obsm),
        uns=dict(adata.uns),
    )
    for name, layer in adata.layers.items():
        out.layers[name] = _padded(layer, where, present)
    return out


def _with_string_names(adata: AnnData, names: pd.Index) -> AnnData:
    copied = in_memory_copy(adata)
    copied.var_names = names
    return copied


def _padded(matrix, where: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``matrix``'s columns ``where``, ``NaN`` where absent (float32, dense)."""
    kept = matrix[:, where[present]]
    kept = kept.toarray() if sparse.issparse(kept) else np.asarray(kept)
    values = np.full((matrix.shape[0], len(where)), np.nan, dtype=np.float32)
    values[:, present] = kept
    return values
