"""Write a model's latent space into an AnnData."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from sklearn.neighbors import NearestNeighbors

from scinfl._copies import in_memory_copy
from scinfl.module import observed_rows

from ._results import check_entries_free

if TYPE_CHECKING:
    from scinfl.model import INFL, MultiOmicsINFL

logger = logging.getLogger(__name__)

#: a latent "separates the sites" when this share of each sample's neighbours is its own site's
SEPARATED = 0.95


def embed(
    adata: AnnData | MuData,
    model: INFL | MultiOmicsINFL,
    key_added: str = "X_scinfl",
    copy: bool = False,
    batch_size: int | None = None,
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
    batch_size
        Rows per forward pass (default: scvi-tools' setting, 128); larger is faster on large
        data, a GPU especially.

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
    check_entries_free(adata, [("obsm", key_added), ("uns", key_added)], "scinfl.tl.embed")
    latent = model.get_latent(adata, batch_size=batch_size)
    setup = model.adata_manager.registry["setup_args"]
    site_key = setup.get("site_key")
    if site_key is not None and site_key in adata.obs:
        sites = adata.obs[site_key].to_numpy()
        if isinstance(adata, MuData):
            # sites of a mosaic hold other modalities, whose latents differ by design: compare
            # the samples that hold them all
            every = _holding_every_modality(adata, setup)
            latent_checked, sites = latent[every], sites[every]
        else:
            latent_checked = latent
        warn_if_sites_separate(latent_checked, sites)
    if copy:
        adata = in_memory_copy(adata)
    adata.obsm[key_added] = latent
    settings = model.init_params_.get("non_kwargs", {})
    params = {k: v for k, v in settings.items() if isinstance(v, int | float | str | bool)}
    adata.uns[key_added] = {"params": {"model": type(model).__name__, **params}}
    return adata if copy else None


def warn_if_sites_separate(latent: np.ndarray, sites: np.ndarray, n_neighbors: int = 15) -> None:
    """Warn when nearly every sample's neighbours in the latent come from its own site.

    Clusters of such a latent follow the sites. Either the sites hold different kinds of
    samples (a partition by cell type), or site effects (another instrument, normalisation or
    batch) outweigh the biology, which the model does not remove. Measured on up to 5,000
    samples (a fixed draw), against the share the sites' sizes alone would give.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> apart = np.r_[rng.normal(0, 1, (50, 2)), rng.normal(20, 1, (50, 2))]
    >>> warn_if_sites_separate(apart, np.repeat(["a", "b"], 50))  # logs a warning
    """
    codes = pd.factorize(pd.Series(sites))[0]
    rows = np.flatnonzero((codes >= 0) & ~np.isnan(latent).any(axis=1))
    if len(rows) > 5000:
        rows = np.sort(np.random.default_rng(0).choice(rows, 5000, replace=False))
    share = np.bincount(codes[rows]) / max(len(rows), 1)
    expected = float((share**2).sum())
    if len(rows) < 30 or (share > 0).sum() < 2 or expected > 0.6:
        return
    k = min(n_neighbors, len(rows) - 1)
    found = NearestNeighbors(n_neighbors=k + 1).fit(latent[rows]).kneighbors(latent[rows])[1]
    own = codes[rows]
    same = float((own[found[:, 1:]] == own[:, None]).mean())
    if same >= SEPARATED:
        logger.warning(
            "The latent space separates the sites: %.0f%% of each sample's %d nearest "
            "neighbours come from its own site (%.0f%% if the sites mixed), so clusters will "
            "follow the sites. Either the sites hold different kinds of samples, or site "
            "effects (instrument, normalisation, batch) outweigh the biology; the model does "
            "not remove them. For continuous data of the same kinds of samples, standardise "
            "each site's features at the site before training (it removes real differences "
            "between sites too).",
            100 * same,
            k,
            100 * expected,
        )


def _holding_every_modality(mdata: MuData, setup: dict) -> np.ndarray:
    """Which samples of ``mdata`` hold every modality the model reads."""
    every = np.ones(mdata.n_obs, dtype=bool)
    layers = setup.get("layers") or {}
    for name in setup.get("modalities") or []:
        if name not in mdata.mod:
            return np.zeros(mdata.n_obs, dtype=bool)
        mod = mdata.mod[name]
        matrix = mod.X if layers.get(name) is None else mod.layers[layers[name]]
        every &= mdata.obs_names.isin(mod.obs_names[observed_rows(matrix)])
    return every
