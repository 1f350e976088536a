"""Write a model's latent space into an AnnData."""

from __future__ import annotations

from anndata import AnnData
from mudata import MuData

from scinfl._copies import in_memory_copy


def embed(
    adata: AnnData | MuData, model, key_added: str = "X_scinfl", copy: bool = False
) -> AnnData | MuData | None:
    """Store the model's latent means in ``adata.obsm[key_added]``.

    Parameters
    ----------
    adata
        AnnData (or, for :class:`~scinfl.model.MultiOmicsINFL`, MuData) set up like the
        model's training data (rows are matched by position).
    model
        A trained :class:`~scinfl.model.INFL` or :class:`~scinfl.model.MultiOmicsINFL` with
        its key set.
    key_added
        ``.obsm`` key.
    copy
        Return a copy of ``adata`` holding the result instead of writing into ``adata``.

    Returns
    -------
    ``None``, or with ``copy=True`` a new AnnData (MuData). Sets ``.obsm[key_added]`` (cells x
    latent dimensions) and ``.uns[key_added]["params"]`` (the model's class and settings).

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_latent=4)
    >>> _ = model.train_federated(max_rounds=1, batch_size=16, progress_bar=False, seed=0)
    >>> scinfl.tl.embed(adata, model)
    >>> adata.obsm["X_scinfl"].shape
    (60, 4)
    """
    latent = model.get_latent(adata)
    if copy:
        adata = in_memory_copy(adata)
    adata.obsm[key_added] = latent
    settings = model.init_params_.get("non_kwargs", {})
    params = {k: v for k, v in settings.items() if isinstance(v, int | float | str | bool)}
    adata.uns[key_added] = {"params": {"model": type(model).__name__, **params}}
    return adata if copy else None
