"""A mosaic of a multi-modal data set: some sites without some modalities."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from mudata import MuData

from scinfl._mudata import mudata_of


def make_mosaic(mdata: MuData, site_key: str, absent: Mapping[str, str]) -> MuData:
    """Remove a modality from the samples of some sites, as a consortium's mosaic holds it.

    Parameters
    ----------
    mdata
        MuData whose modalities hold every sample.
    site_key
        ``mdata.obs`` column of sites.
    absent
        Modality each named site lacks, e.g. ``{"site0": "prot", "site1": "rna"}``.

    Returns
    -------
    A new MuData whose modalities lack those sites' samples (pad it with
    :func:`scinfl.pp.pad_modalities` for :class:`~scinfl.model.MultiOmicsINFL`).

    Examples
    --------
    >>> import scinfl
    >>> mdata = scinfl.data.synthetic_multiome(n_obs=60, n_sites=3)
    >>> mosaic = make_mosaic(mdata, "site", {"site0": "prot"})
    >>> mosaic.mod["prot"].n_obs < 60 == mosaic.mod["rna"].n_obs
    True
    """
    if site_key not in mdata.obs:
        raise ValueError(
            f"site_key={site_key!r} is not a column of mdata.obs (columns: "
            f"{list(mdata.obs.columns)[:20]})."
        )
    unknown_modalities = sorted(set(absent.values()) - set(mdata.mod))
    if unknown_modalities:
        raise ValueError(
            f"absent= names modalities {unknown_modalities} that the MuData does not have; "
            f"its modalities: {list(mdata.mod)}."
        )
    sites = mdata.obs[site_key].astype(str).to_numpy()
    # sites coded as numbers (1, 2, 3) are named as their text, as everywhere else
    absent = {str(site): modality for site, modality in absent.items()}
    unknown = sorted(set(absent) - set(sites))
    if unknown:
        raise ValueError(f"No samples of sites {unknown} in mdata.obs[{site_key!r}].")
    mods = {}
    for name, mod in mdata.mod.items():
        drop = [site for site, modality in absent.items() if modality == name]
        keep = ~np.isin(sites[mdata.obs_names.get_indexer(mod.obs_names)], drop)
        mods[name] = mod[keep].copy()
    out = mudata_of(mods)
    out.obs = mdata.obs.loc[out.obs_names].copy()
    return out
