"""Write a model's latent space into an AnnData."""

from __future__ import annotations

from anndata import AnnData


def embed(adata: AnnData, model, key_added: str = "X_scinfl") -> AnnData:
    """Store the model's latent means in ``adata.obsm[key_added]``.

    Parameters
    ----------
    adata
        AnnData set up like the model's training data (rows are matched by position).
    model
        A trained :class:`~scinfl.model.INFL` with its key set.
    key_added
        ``.obsm`` key.

    Returns
    -------
    ``adata`` (modified in place).

    Examples
    --------
    >>> scinfl.tl.embed(adata, model)  # doctest: +SKIP
    >>> adata.obsm["X_scinfl"].shape  # doctest: +SKIP
    (700, 10)
    """
    adata.obsm[key_added] = model.get_latent(adata)
    return adata
