"""Synthetic spatial sections with known domains (layers and a blob), for tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._sizes import check_sizes

_N_TYPES = 5
_THETA = 5.0


def _domains(rng: np.random.Generator, n_side: int, n_domains: int) -> np.ndarray:
    """Domain of each grid position: wavy layers, the last domain a blob across them."""
    col, row = np.meshgrid(np.arange(n_side), np.arange(n_side))
    phase, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.3)
    depth = row + tilt * col + 0.12 * n_side * np.sin(2 * np.pi * col / n_side + phase)
    n_layers = n_domains - 1
    edges = np.quantile(depth, np.linspace(0, 1, n_layers + 1)[1:-1])
    domain = np.digitize(depth, edges)
    centre = rng.uniform(0.3, 0.7, 2) * n_side
    radius = rng.uniform(0.15, 0.2) * n_side
    blob = (col - centre[0]) ** 2 + ((row - centre[1]) / 1.3) ** 2 < radius**2
    domain[blob] = n_layers
    return np.stack([col.ravel(), row.ravel()], axis=1), domain.ravel()


def synthetic_spatial(
    n_sections: int = 3,
    n_side: int = 20,
    n_vars: int = 100,
    n_domains: int = 4,
    seed: int = 0,
) -> AnnData:
    """Spatial sections (square grids of spots) with known domains; one site per section.

    Each section has ``n_domains`` domains of realistic shapes: ``n_domains - 1`` wavy layers
    (a tilted, sinusoidal depth axis cut at its quantiles, different in every section) and one
    blob (an ellipse across the layers). A spot mixes five cell types; its proportions are drawn
    around its domain's composition (Dirichlet), and neighbouring domains share most types, so a
    spot alone tells its domain only roughly and its neighbourhood helps. Each cell type and
    each domain up-regulates its own block of genes (the domain programme is weaker), every
    section scales the genes by its own factor (a batch effect), and counts are negative
    binomial (inverse dispersion 5) around those means.

    Parameters
    ----------
    n_sections
        Number of sections; section ``i`` is site ``f"site{i}"`` (``.obs["site"]``) and
        section ``f"section{i}"`` (``.obs["section"]``).
    n_side
        Spots per side of each section's square grid (``n_side**2`` spots per section).
    n_vars
        Number of genes.
    n_domains
        Number of domains (at least 2): ``.obs["domain"]``, ``"domain0"``...
    seed
        Random seed.

    Returns
    -------
    AnnData
        Counts in ``.X`` and ``.layers["counts"]`` (CSR); grid coordinates ``[col, row]`` in
        ``.obsm["spatial"]`` (4 nearest neighbours at distance 1); ``.obs["domain"]``,
        ``.obs["site"]``, ``.obs["section"]`` (categorical) and the cell-type proportions in
        ``.obsm["proportions"]``.

    Raises
    ------
    ValueError
        If ``n_domains < 2`` or the grid is too small to hold the domains.

    Examples
    --------
    >>> from scinfl.data import synthetic_spatial
    >>> adata = synthetic_spatial(n_sections=2, n_side=10, n_vars=30)
    >>> adata.shape, adata.obsm["spatial"].shape
    ((200, 30), (200, 2))
    >>> sorted(adata.obs["site"].unique()), adata.obs["domain"].nunique()
    (['site0', 'site1'], 4)
    """
    check_sizes(n_sections=n_sections, n_side=n_side, n_vars=n_vars, n_domains=n_domains)
    if n_domains < 2:
        raise ValueError(f"`n_domains` must be at least 2; got {n_domains}.")
    if n_side < 2 * n_domains:
        raise ValueError(f"`n_side` must be at least 2 * n_domains = {2 * n_domains}.")
    rng = np.random.default_rng(seed)
    # compositions: domain k is dominated by types k and k + 1 (neighbours share a type)
    composition = np.full((n_domains, _N_TYPES), 0.3)
    for k in range(n_domains):
        composition[k, k % _N_TYPES] += 3.0
        composition[k, (k + 1) % _N_TYPES] += 2.0
    base = rng.gamma(2.0, 0.5, n_vars)
    block = max(1, n_vars // (2 * (_N_TYPES + n_domains)))
    type_programme = np.ones((_N_TYPES, n_vars))
    for t in range(_N_TYPES):
        type_programme[t, t * block : (t + 1) * block] = 8.0
    domain_programme = np.ones((n_domains, n_vars))
    for k in range(n_domains):
        start = (_N_TYPES + k) * block
        domain_programme[k, start : start + block] = 1.6

    counts, coords, obs, proportions = [], [], [], []
    for i in range(n_sections):
        xy, domain = _domains(rng, n_side, n_domains)
        props = np.stack([rng.dirichlet(composition[k]) for k in domain])
        scale = rng.lognormal(0.0, 0.2, n_vars)
        library = rng.lognormal(0.0, 0.3, len(domain))[:, None]
        mean = base * scale * (props @ type_programme) * domain_programme[domain] * library
        counts.append(rng.poisson(rng.gamma(_THETA, mean / _THETA)).astype(np.float32))
        coords.append(xy.astype(np.float64))
        proportions.append(props)
        obs.append(
            pd.DataFrame(
                {
                    "domain": [f"domain{k}" for k in domain],
                    "site": f"site{i}",
                    "section": f"section{i}",
                },
                index=[f"section{i}_spot{j}" for j in range(len(domain))],
            )
        )
    obs = pd.concat(obs)
    for column in obs:
        obs[column] = pd.Categorical(obs[column])
    X = sparse.csr_matrix(np.concatenate(counts))
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)]))
    adata.obsm["spatial"] = np.concatenate(coords)
    adata.obsm["proportions"] = np.concatenate(proportions)
    adata.layers["counts"] = X.copy()
    return adata
