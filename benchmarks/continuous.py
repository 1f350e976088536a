"""Clustering continuous data: INFL's normal likelihood against PCA + Leiden.

Data (packaged, nothing is downloaded):

- ``cptac-subtype`` / ``cptac-tumor``: CPTAC UCEC proteomics (log2 TMT ratios, NaN =
  missing); truth = the genomic subtype of the tumours (4 classes, 101 samples) or the sample
  type (tumour and three kinds of normal tissue, 153 samples), as the ``subtype`` and ``tumor``
  tasks of benchmarks/proteomics.py; sites = groups of TMT plexes; proteins observed in >= 50%
  of every site's rows. PCA sees missing values as the protein's mean.
- ``kang``: Kang 2018 PBMC, ``--cells`` cells drawn at random, log-normalised
  (``log1p(1e4 * counts / total)``), the ``--genes`` most variable genes (scanpy, seurat
  flavour); truth = the loader's ``cell_type`` (cells "unassigned" dropped); sites = the
  stimulation condition. The truth is derived from PCA neighbours of log-normalised data
  (``scinfl.data.kang2018``), which favours PCA.

Every embedding is clustered by ``scinfl.tl.cluster`` (15 neighbours, Leiden) at resolution 1
and at the resolution giving the true number of clusters (bisection; the same rule for every
method and data set); the ARI against the truth is reported for both.

``defaults`` is INFL and its training exactly at the library's defaults (which standardise the
features over the sites' sums, with secret frames on). Other INFL variants are written as
``+``-joined tokens: ``base`` (the library's model defaults), ``std``
(feature location and scale from the data's moments, ``KeyedVAE.set_feature_scale``),
``learnvar`` (a standard deviation learned per feature, ``normal_variance="feature"``, the
default before this benchmark; the default is ``"unit"``: 1 for every standardised feature),
``nl<N>`` (n_latent), ``nh<N>`` (n_hidden), ``ep<N>`` (epochs / rounds), ``do<X>`` (dropout),
``kl<X>`` (weight of the KL term after warm-up), ``wu<X>`` (KL warm-up as a fraction of the
epochs), ``le<N>`` (local epochs per round, federated).

Usage::

    python benchmarks/continuous.py                                   # the recorded table
    python benchmarks/continuous.py --data kang --variants learnvar std --affine --federated
    python benchmarks/continuous.py --variants defaults --affine defaults --federated defaults \
        --out benchmarks/results/continuous_defaults.md
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import scvi
import torch
from anndata import AnnData
from sklearn.metrics import adjusted_rand_score

import scinfl
from scinfl.federated import SiteData, agree_features
from scinfl.model import INFL
from scinfl.module import feature_moments, scale_from_moments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proteomics import prepare

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Variant:
    """Settings of one INFL run (see the module docstring for the tokens)."""

    std: bool = False
    variance: str = "unit"
    n_latent: int = 10
    n_hidden: int = 128
    epochs: int = 50
    dropout: float = 0.1
    kl: float = 1.0
    warmup: float = 0.5
    local_epochs: int = 1


def parse_variant(name: str) -> Variant:
    """``"std+learnvar+nl30"`` -> :class:`Variant`."""
    v = Variant()
    for token in name.split("+"):
        if token == "base":
            continue
        if token == "std":
            v = replace(v, std=True)
            continue
        if token == "learnvar":
            v = replace(v, variance="feature")
            continue
        for prefix, field, cast in (
            ("nl", "n_latent", int),
            ("nh", "n_hidden", int),
            ("ep", "epochs", int),
            ("do", "dropout", float),
            ("kl", "kl", float),
            ("wu", "warmup", float),
            ("le", "local_epochs", int),
        ):
            if token.startswith(prefix):
                v = replace(v, **{field: cast(token[len(prefix) :])})
                break
        else:
            raise ValueError(f"Unknown variant token {token!r} in {name!r}.")
    return v


def load_cptac(task: str) -> AnnData:
    data = prepare(scinfl.data.cptac_ucec(), task=task, split="plex")
    features = agree_features(data, "site", max_missing=0.5)
    data = data[:, features].copy()
    data.obs["truth"] = data.obs["label"]
    return data


def load_kang(n_cells: int, n_genes: int, seed: int) -> AnnData:
    adata = scinfl.data.kang2018()
    adata = adata[adata.obs["cell_type"] != "unassigned"]
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False))
    adata = adata[rows].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_genes, flavor="seurat")
    adata = adata[:, adata.var["highly_variable"]].copy()
    data = AnnData(
        np.asarray(adata.X.toarray(), dtype=np.float32),
        obs=pd.DataFrame(
            {
                "truth": adata.obs["cell_type"].cat.remove_unused_categories(),
                "site": adata.obs["condition"].astype(str).astype("category"),
            },
            index=adata.obs_names,
        ),
        var=pd.DataFrame(index=adata.var_names),
    )
    return data


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (without the optional ``tabulate`` dependency of ``to_markdown``)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * table.shape[1])
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def leiden_scores(adata: AnnData, rep: str) -> dict[str, float]:
    """ARI at resolution 1 and at the resolution giving the true number of clusters."""
    truth = adata.obs["truth"].to_numpy()
    k = len(set(truth))
    scinfl.tl.cluster(adata, use_rep=rep, resolution=1.0, umap=False)
    out = {
        "ARI (res 1)": adjusted_rand_score(truth, adata.obs["scinfl_leiden"]),
        "k (res 1)": adata.obs["scinfl_leiden"].nunique(),
    }
    lo, hi, best = 0.01, 5.0, None
    for _ in range(14):
        res = math.sqrt(lo * hi)
        scinfl.tl.cluster(adata, use_rep=rep, resolution=res, umap=False)
        labels = adata.obs["scinfl_leiden"].to_numpy()
        n = len(set(labels))
        if best is None or abs(n - k) < abs(best[0] - k):
            best = (n, res, adjusted_rand_score(truth, labels))
        if n == k:
            break
        lo, hi = (res, hi) if n < k else (lo, res)
    out.update({"ARI (true k)": best[2], "k found": best[0], "res (true k)": round(best[1], 3)})
    return out


def pca_rows(data: AnnData) -> list[dict]:
    rows = []
    x = np.asarray(data.X, dtype=np.float64)
    x = np.where(np.isnan(x), np.nanmean(x, 0), x)
    for name, values in (("PCA", x), ("PCA on z-scores", (x - x.mean(0)) / (x.std(0) + 1e-12))):
        adata = AnnData(values.astype(np.float32), obs=data.obs[["truth"]].copy())
        n_comps = min(50, data.n_obs - 1, data.n_vars - 1)
        sc.pp.pca(adata, n_comps=n_comps, random_state=0)
        rows.append(
            {"method": name, "variant": f"{n_comps} comps", **leiden_scores(adata, "X_pca")}
        )
    return rows


def _scaled_kl_loss(loss, kl):
    @functools.wraps(loss)
    def wrapped(tensors, inference_outputs, generative_outputs, kl_weight=1.0):
        return loss(tensors, inference_outputs, generative_outputs, kl_weight=kl * kl_weight)

    return wrapped


def defaults_row(data: AnnData, federated: bool, seed: int) -> float:
    """INFL and its training at the library's defaults (secret frames on); the seconds taken."""
    model = INFL(data, key=scinfl.Key.generate(), gene_likelihood="normal")
    start = time.perf_counter()
    if federated:
        model.train_federated(seed=seed, progress_bar=False)
    else:
        model.train_centralized(seed=seed, progress_bar=False)
    seconds = time.perf_counter() - start
    scinfl.tl.embed(data, model)
    return seconds


def infl_row(data: AnnData, name: str, affine: bool, federated: bool, seed: int) -> dict:
    data = data.copy()
    if affine:
        data.X = 3.0 * data.X + 25.0
    INFL.setup_anndata(data, site_key="site")
    scvi.settings.seed = seed
    if name == "defaults":
        seconds = defaults_row(data, federated, seed)
        return {
            "method": "INFL " + ("federated" if federated else "centralized"),
            "variant": name,
            "input": "3x+25" if affine else "x",
            **leiden_scores(data, "X_scinfl"),
            "train s": round(seconds, 1),
        }
    v = parse_variant(name)
    model = INFL(
        data,
        key=scinfl.Key.generate(),
        gene_likelihood="normal",
        n_latent=v.n_latent,
        n_hidden=v.n_hidden,
        dropout_rate=v.dropout,
        normal_variance=v.variance,
    )
    module = model.module
    if v.std:
        module.set_feature_scale(*scale_from_moments(*feature_moments(data.X)))
    if v.kl != 1.0:
        module.loss = _scaled_kl_loss(module.loss, v.kl)
    warmup = max(1, round(v.warmup * v.epochs)) if v.warmup > 0 else 0
    sizes = data.obs["site"].value_counts()
    smallest = min(int(n) - SiteData.n_validation(int(n), 0.1) for n in sizes)
    start = time.perf_counter()
    common = {"seed": seed, "progress_bar": False, "batch_size": min(128, smallest)}
    if federated:
        model.train_federated(
            max_rounds=v.epochs,
            local_epochs=v.local_epochs,
            kl_warmup_rounds=warmup,
            secret_frames=False,
            **common,
        )
    else:
        model.train_centralized(max_epochs=v.epochs, kl_warmup_epochs=warmup, **common)
    seconds = time.perf_counter() - start
    scinfl.tl.embed(data, model)
    return {
        "method": "INFL " + ("federated" if federated else "centralized"),
        "variant": name,
        "input": "3x+25" if affine else "x",
        **leiden_scores(data, "X_scinfl"),
        "train s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        nargs="+",
        default=["cptac-tumor", "cptac-subtype", "kang"],
        choices=["cptac-tumor", "cptac-subtype", "kang"],
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["learnvar", "std+learnvar", "base", "std", "std+nl30", "std+ep100"],
    )
    parser.add_argument(
        "--federated", nargs="*", default=["learnvar", "std"], help="variants also federated"
    )
    parser.add_argument(
        "--affine", nargs="*", default=["learnvar", "std"], help="variants also on 3x+25"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=RESULTS / "continuous.md")
    args = parser.parse_args()

    logging.getLogger("scvi").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    sections = [f"Command: `python benchmarks/continuous.py {' '.join(sys.argv[1:])}`\n"]
    for dataset in args.data:
        if dataset == "kang":
            data = load_kang(args.cells, args.genes, 0)
        else:
            data = load_cptac(dataset.split("-")[1])
        print(f"{dataset}: {data.n_obs} x {data.n_vars}, {data.obs['truth'].nunique()} classes")
        rows = [{"seed": "-", "input": "x", **r} for r in pca_rows(data)]
        print(pd.DataFrame(rows).to_string())
        runs = [(v, False, False) for v in args.variants]
        runs += [(v, True, False) for v in args.affine]
        runs += [(v, False, True) for v in args.federated]
        title = (
            f"## {dataset} ({data.n_obs} x {data.n_vars}, {data.obs['truth'].nunique()} classes)"
        )
        done = list(sections)
        for seed in args.seeds:
            for variant, affine, federated in runs:
                row = {"seed": seed, **infl_row(data, variant, affine, federated, seed)}
                rows.append(row)
                print(pd.DataFrame([row]).to_string(header=False), flush=True)
                # rewritten after every run, so that an interrupted run keeps its rows
                table = pd.DataFrame(rows)
                for column in ("ARI (res 1)", "ARI (true k)"):
                    table[column] = table[column].astype(float).round(3)
                sections = [*done, f"{title}\n\n{markdown(table)}\n"]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text("# Continuous data: Leiden ARI\n\n" + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
