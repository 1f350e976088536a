"""Default classification weight on single-cell counts: held-out accuracy on pbmc68k.

INFL's default ``classification_ratio`` grows with the number of features (see
``INFL.__init__``). This checks, on scanpy's pbmc68k_reduced (700 cells x 765 genes, counts,
10 ``bulk_labels``, 3 IID sites), that the weight the rule gives is no worse than scANVI's 50:
for each seed a stratified 20% of the cells is held out, INFL is trained federated at the
library's defaults (key, secret frames off for speed) on the other 80%, and the held-out
cells are predicted; the latent space of all cells is clustered (Leiden, resolution 1) and
compared with the labels (ARI).

Usage::

    python benchmarks/classification_weight.py --ratio 50 rule 765 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import pandas as pd
import scvi
import torch
from sklearn.metrics import accuracy_score, adjusted_rand_score, f1_score
from sklearn.model_selection import train_test_split

import scinfl


def run(ratio: float | None, seed: int) -> dict:
    """Held-out accuracy, macro F1 and latent ARI of one model (``ratio=None``: the rule)."""
    adata = scinfl.data.pbmc68k(seed=seed)
    labels = adata.obs["bulk_labels"].to_numpy()
    train_idx, test_idx = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=labels, random_state=seed
    )
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    scvi.settings.seed = seed
    scinfl.model.INFL.setup_anndata(
        train, layer="counts", site_key="site", labels_key="bulk_labels"
    )
    model = scinfl.model.INFL(train, key=scinfl.Key.generate(), classification_ratio=ratio)
    start = time.perf_counter()
    model.train_federated(progress_bar=False, secret_frames=False)
    seconds = time.perf_counter() - start
    pred = model.predict(test)
    truth = test.obs["bulk_labels"].astype(str).to_numpy()
    adata.obsm["X_scinfl"] = model.get_latent(adata)
    scinfl.tl.cluster(adata, umap=False)
    return {
        "ratio": model.module.classification_ratio,
        "seed": seed,
        "accuracy": accuracy_score(truth, pred),
        "macro_f1": f1_score(truth, pred, average="macro"),
        "latent_ari": adjusted_rand_score(labels, adata.obs["scinfl_leiden"]),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", nargs="+", default=["50", "rule"], help="weights, or 'rule'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    logging.getLogger("scvi").setLevel(logging.WARNING)
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for ratio in args.ratio:
        for seed in args.seeds:
            rows.append(run(None if ratio == "rule" else float(ratio), seed))
            rows[-1]["setting"] = ratio
            print(rows[-1], flush=True)
    results = pd.DataFrame(rows)
    table = results.groupby("setting", sort=False)[
        ["ratio", "accuracy", "macro_f1", "latent_ari", "seconds"]
    ].mean()
    print(table.round(3).to_markdown())
    return results


if __name__ == "__main__":
    main()
