"""Spatial domains across sites: INFL's latent aggregated over per-site graphs, and baselines.

Data (packaged, nothing is downloaded):

- ``synthetic``: ``scinfl.data.synthetic_spatial`` (3 sections of 20 x 20 spots, 100 genes,
  4 domains: three wavy layers and a blob; NB counts; one site per section); truth = the
  simulated domains; graph: grid, 4 neighbours; ``gene_likelihood="nb"`` on the counts.
- ``cscc``: ``scinfl.data.cscc_spatial`` (legacy ST cSCC section, 621 spots; 3 column bands as
  sites); the 2,000 genes of highest variance of ``log1p`` of the authors' normalised values,
  ``gene_likelihood="normal"`` on that ``log1p`` (the values are not counts); truth = the
  authors' 10 groups; graph: grid, 4 (diagonal) neighbours.

Rows: INFL trained federated (the local engine; secret frames on) or centralized, or federated
without a key (``key_mode=None``), then ``scinfl.tl.domains`` (latent averaged over 1..3 hop
rings of the per-site graph, Gaussian mixture with the true number of domains; ``n_layers=0``
is the latent alone; ``leiden`` is Leiden on the same features at the resolution giving the
true number of domains, searched over a grid); PCA (30 components of log1p) + Leiden (no
spatial context, resolution searched the same way); k-means on the coordinates alone. Scores:
ARI and NMI against the truth, and spatial coherence (mean over spots of the share of its graph
neighbours in its own domain; the truth's own coherence is the last row). Every row is the
mean (sd) over ``--seeds`` (training seeds and keys; the data are fixed). The domain maps of
the first seed (truth, INFL federated, non-spatial, PCA) are written beside the table, one
file per data set and method (``spatial_<data>_<method>.png``, one panel per section).
CellCharter's rows come from ``benchmarks/spatial_cellcharter.py`` (the ``benchmarks`` group), read
from ``results/spatial_cellcharter.csv`` when it exists.

Usage::

    python benchmarks/spatial.py                       # writes benchmarks/results/spatial.md
    python benchmarks/spatial.py --data synthetic --rounds 5 --seeds 0
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scvi
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import scinfl

RESULTS = Path(__file__).parent / "results"
N_LAYERS = 3
RESOLUTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)


def load(name: str):
    """AnnData with its graph, truth column, layer, likelihood and number of domains."""
    if name == "synthetic":
        adata = scinfl.data.synthetic_spatial(n_sections=3, n_side=20, n_vars=100, seed=0)
        truth, layer, likelihood = "domain", "counts", "nb"
        adata.layers["log1p"] = np.log1p(adata.X.toarray())
    else:
        adata = scinfl.data.cscc_spatial()
        variance = adata.layers["log1p"].var(axis=0)
        keep = np.sort(np.argsort(-variance, kind="stable")[:2000])
        adata = adata[:, keep].copy()
        truth, layer, likelihood = "cluster", "log1p", "normal"
    scinfl.pp.spatial_neighbors(adata, site_key="site", coord_type="grid", n_neighs=4)
    return adata, truth, layer, likelihood, adata.obs[truth].nunique()


def coherence(adata, labels) -> float:
    """Mean over spots of the share of its graph neighbours in its own domain."""
    graph = (adata.obsp["spatial_connectivities"] > 0).tocsr()
    codes = pd.Categorical(labels).codes
    rows, cols = graph.nonzero()
    same = np.bincount(rows, weights=codes[rows] == codes[cols], minlength=adata.n_obs)
    degree = np.bincount(rows, minlength=adata.n_obs)
    has = degree > 0
    return float(np.mean(same[has] / degree[has]))


def scores(adata, truth: str, labels) -> dict:
    """Domains found, ARI and NMI against ``adata.obs[truth]``, and spatial coherence."""
    return {
        "domains": pd.Series(np.asarray(labels)).nunique(),
        "ARI": adjusted_rand_score(adata.obs[truth], labels),
        "NMI": normalized_mutual_info_score(adata.obs[truth], labels),
        "coherence": coherence(adata, labels),
    }


def leiden_at_k(adata, use_rep: str, n_layers: int, k: int, key: str) -> None:
    """``tl.domains`` with Leiden, at the resolution whose number of domains is closest to k."""
    best = None
    for resolution in RESOLUTIONS:
        scinfl.tl.domains(
            adata,
            use_rep=use_rep,
            n_layers=n_layers,
            method="leiden",
            resolution=resolution,
            key_added=key,
        )
        gap = abs(adata.obs[key].nunique() - k)
        if best is None or gap < best[0]:
            best = (gap, resolution)
    scinfl.tl.domains(
        adata,
        use_rep=use_rep,
        n_layers=n_layers,
        method="leiden",
        resolution=best[1],
        key_added=key,
    )


def train(adata, layer, likelihood, how: str, rounds: int, seed: int):
    """INFL trained federated or centralized, with a key or without."""
    scinfl.model.INFL.setup_anndata(adata, layer=layer, site_key="site")
    torch.manual_seed(seed)
    keyed = how != "federated-nokey"
    model = scinfl.model.INFL(
        adata,
        key=scinfl.Key.generate() if keyed else None,
        key_mode="pooled" if keyed else None,
        gene_likelihood=likelihood,
        n_latent=10,
    )
    if how == "centralized":
        model.train_centralized(max_epochs=rounds, batch_size=128, progress_bar=False, seed=seed)
    else:
        model.train_federated(max_rounds=rounds, batch_size=128, progress_bar=False, seed=seed)
    return model


def draw_maps(adata, name: str, truth: str, results: dict, path: Path) -> None:
    """The truth and three methods' domains on the tissue, one row of panels per method."""
    shown = {
        "truth": adata.obs[truth].astype(str),
        "INFL federated": results[f"INFL federated + domains (L={N_LAYERS}, GMM)"],
        "INFL non-spatial": results["INFL federated, non-spatial (L=0, GMM)"],
        "PCA + Leiden": results["PCA + Leiden (non-spatial)"],
    }
    for label, labels in shown.items():
        adata.obs[label] = pd.Categorical(np.asarray(labels).astype(str))
        figure = scinfl.pl.spatial(adata, color=label, library_key="site", panel_size=3.0)
        figure.suptitle(f"{name}: {label}", y=1.08)
        slug = label.replace(" + ", "_").replace(" ", "_")
        figure.savefig(path.with_name(f"{path.stem}_{slug}.png"), dpi=80, bbox_inches="tight")
        plt.close(figure)


def run(name: str, rounds: int, seed: int, maps: Path | None = None) -> pd.DataFrame:
    adata, truth, layer, likelihood, k = load(name)
    results = {}
    for how in ("federated", "centralized", "federated-nokey"):
        start = time.time()
        model = train(adata, layer, likelihood, how, rounds, seed)
        rep = f"latent_{how}"  # not X_{how}: tl.domains writes its features there
        scinfl.tl.embed(adata, model, key_added=rep)
        logging.info("%s %s trained in %.0f s", name, how, time.time() - start)
        scinfl.tl.domains(adata, use_rep=rep, n_layers=N_LAYERS, n_domains=k, key_added=how)
        results[f"INFL {how} + domains (L={N_LAYERS}, GMM)"] = adata.obs[how]
        if how == "federated":
            leiden_at_k(adata, rep, N_LAYERS, k, "leiden")
            results[f"INFL federated + domains (L={N_LAYERS}, Leiden)"] = adata.obs["leiden"]
            scinfl.tl.domains(adata, use_rep=rep, n_layers=0, n_domains=k, key_added="flat")
            results["INFL federated, non-spatial (L=0, GMM)"] = adata.obs["flat"]
    sc.pp.pca(adata, n_comps=30, layer="log1p", random_state=seed)
    leiden_at_k(adata, "X_pca", 0, k, "pca_leiden")
    results["PCA + Leiden (non-spatial)"] = adata.obs["pca_leiden"]
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(adata.obsm["spatial"])
    results["coordinates only, k-means"] = kmeans.labels_.astype(str)
    if maps is not None:
        draw_maps(adata, name, truth, results, maps)
    results["truth"] = adata.obs[truth]
    rows = [
        {"data": name, "seed": seed, "method": method, **scores(adata, truth, labels)}
        for method, labels in results.items()
    ]
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (sd) over seeds of every score, per data set and method (in the order run)."""
    groups = table.groupby(["data", "method"], sort=False)
    out = groups[["domains"]].agg(lambda v: f"{v.mean():.3g}")
    for score in ("ARI", "NMI", "coherence"):
        mean, sd = groups[score].mean(), groups[score].std(ddof=0)
        out[score] = [f"{m:.3f} ({d:.3f})" for m, d in zip(mean, sd, strict=True)]
    return out.reset_index()


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (without the optional ``tabulate`` dependency of ``to_markdown``)."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.values]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["synthetic", "cscc"])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS / "spatial.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    parts = []
    for name in args.data:
        for seed in args.seeds:
            scvi.settings.seed = seed
            maps = args.out.with_name(f"{args.out.stem}_{name}") if seed == args.seeds[0] else None
            parts.append(run(name, args.rounds, seed, maps))
            table = pd.concat(parts)
            table.to_csv(args.out.with_suffix(".csv"), index=False)
    peer = args.out.with_name(f"{args.out.stem}_cellcharter.csv")
    if peer.is_file():  # CellCharter's rows, from benchmarks/spatial_cellcharter.py
        peer_rows = pd.read_csv(peer)
        table = pd.concat([table, peer_rows[peer_rows["data"].isin(args.data)]])
        order = {name: i for i, name in enumerate(args.data)}
        table = table.sort_values("data", key=lambda c: c.map(order), kind="stable")
    text = (
        "# Spatial domains across sites\n\n"
        f"`python benchmarks/spatial.py --rounds {args.rounds} --seeds "
        f"{' '.join(map(str, args.seeds))}` (data: {', '.join(args.data)}; {args.rounds} rounds "
        "/ epochs; mean (sd) over the seeds; every seed's scores in the .csv beside this file; "
        f"domain maps of seed {args.seeds[0]}: `{args.out.stem}_<data>_<method>.png`). See the "
        "module docstring for the data, rows and scores.\n\n" + markdown(summarise(table)) + "\n"
    )
    args.out.write_text(text)
    logging.info("\n%s", text)


if __name__ == "__main__":
    main()
