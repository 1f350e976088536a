"""Utility of sample-level DP at the sites (``sample_dp_epsilon``) on CPTAC and pbmc68k.

Each site runs DP-SGD on its own rows (per-row clipping, Gaussian noise, Poisson sampling) with
the noise that keeps the whole run within epsilon at ``delta = 1e-5``; rows: no DP, then
epsilon 8, 3 and 1. Everything else is the library's defaults (key, secret frames, batch size,
learning rate, classification weight), ``--rounds`` rounds of one local epoch.

Data:

- ``cptac``: CPTAC UCEC proteomics, tumour / normal (``benchmarks/proteomics.py``'s task and
  TMT-plex sites), proteins agreed by name on the training rows, normal likelihood;
- ``pbmc68k``: scanpy's 700 PBMCs (counts recovered by ``scinfl.data.pbmc68k``), 10
  ``bulk_labels``, 3 iid sites, NB likelihood.

Protocol: per seed, a stratified quarter of the rows is held out (never trained on); the
model's classifier predicts it (accuracy, macro F1), and a 15-nearest-neighbour classifier on
the training rows' latent predicts it from the held-out latent (kNN accuracy: the latent's
quality, whatever the classifier head does).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sample_dp.py                # the docs' table
    OMP_NUM_THREADS=1 python benchmarks/sample_dp.py --quick        # one seed, few rounds

Writes ``<out>.csv`` (one row per data set, epsilon and seed) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import proteomics  # benchmarks/proteomics.py: a script's folder is on sys.path
import scvi
import torch
from anndata import AnnData
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.neighbors import KNeighborsClassifier

import scinfl
from scinfl.federated import agree_features

logger = logging.getLogger("sample_dp")
HERE = Path(__file__).parent


def load(name: str) -> tuple[AnnData, dict]:
    """The data set with ``obs["label"]`` and ``obs["site"]``, and the model's likelihood."""
    if name == "cptac":
        data = proteomics.prepare(scinfl.data.cptac_ucec(), "tumor", "plex")
        return data, {"gene_likelihood": "normal"}
    adata = scinfl.data.pbmc68k(n_sites=3)
    adata.obs["label"] = adata.obs["bulk_labels"].astype("category")
    return adata, {"gene_likelihood": "nb"}


def run_one(data: AnnData, likelihood: dict, epsilon: float | None, seed: int, rounds: int) -> dict:
    """Train at one epsilon on one held-out split; the held-out metrics."""
    y = data.obs["label"].to_numpy()
    train_idx, test_idx = next(
        StratifiedShuffleSplit(n_splits=1, test_size=0.25, random_state=seed).split(y, y)
    )
    train, test = data[train_idx].copy(), data[test_idx].copy()
    if likelihood["gene_likelihood"] == "normal":
        features = agree_features(train, "site")
        train, test = train[:, features].copy(), test[:, features].copy()
    scinfl.model.INFL.setup_anndata(train, site_key="site", labels_key="label")
    scvi.settings.seed = seed
    model = scinfl.model.INFL(train, key=scinfl.Key.generate(), **likelihood)
    start = time.process_time()
    history = model.train_federated(
        max_rounds=rounds, sample_dp_epsilon=epsilon, progress_bar=False, seed=seed
    )
    seconds = time.process_time() - start
    pred = np.asarray(model.predict(test))
    truth = test.obs["label"].astype(str).to_numpy()
    knn = KNeighborsClassifier(15).fit(
        model.get_latent_representation(), train.obs["label"].astype(str)
    )
    spent = history["dp_epsilon"].max() if "dp_epsilon" in history else np.nan
    return {
        "epsilon": "none" if epsilon is None else epsilon,
        "seed": seed,
        "accuracy": accuracy_score(truth, pred),
        "macro_f1": f1_score(truth, pred, average="macro", zero_division=0),
        "knn_accuracy": accuracy_score(truth, knn.predict(model.get_latent_representation(test))),
        "majority": pd.Series(truth).value_counts(normalize=True).iloc[0],
        "epsilon_spent": spent,
        "noise_multiplier": history.get("dp_noise_multiplier", pd.Series([np.nan])).max(),
        "n_train": len(train_idx),
        "n_features": train.n_vars,
        "cpu_s": seconds,
    }


def markdown(table: pd.DataFrame, args) -> str:
    """Mean (sd) over seeds of every metric, per data set and epsilon."""
    lines = [
        "# Sample-level DP at the sites: utility",
        "",
        f"Command: `python benchmarks/sample_dp.py --rounds {args.rounds} --seeds "
        f"{' '.join(map(str, args.seeds))}` (OMP_NUM_THREADS=1). Held-out quarter of the rows; "
        "library defaults (key, secret frames, batch size 128); delta 1e-5. `epsilon spent`: the "
        "largest over the sites (each site's own accountant); `noise`: the largest noise "
        "multiplier (the smallest site's).",
        "",
    ]
    metrics = ["accuracy", "macro_f1", "knn_accuracy"]
    for dataset, part in table.groupby("dataset", sort=False):
        rows = []
        for epsilon, group in part.groupby("epsilon", sort=False):
            row = {"epsilon": epsilon}
            for m in metrics:
                row[m] = f"{group[m].mean():.3f} ({group[m].std(ddof=0):.3f})"
            row["epsilon spent"] = f"{group['epsilon_spent'].max():.2f}"
            row["noise"] = f"{group['noise_multiplier'].max():.2f}"
            row["CPU s"] = f"{group['cpu_s'].mean():.0f}"
            rows.append(row)
        first = part.iloc[0]
        lines += [
            f"## {dataset} ({first['n_train']} training rows x {first['n_features']} features, "
            f"majority class {part['majority'].mean():.3f})",
            "",
            pd.DataFrame(rows).to_markdown(index=False),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc68k", "cptac"])
    parser.add_argument("--epsilons", nargs="+", default=["none", "8", "3", "1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="seed 0, 5 rounds")
    parser.add_argument("--out", default=str(HERE / "results" / "sample_dp"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds = [0], 5
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("scvi", "absl", "scinfl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    for dataset in args.datasets:
        data, likelihood = load(dataset)
        for epsilon in args.epsilons:
            for seed in args.seeds:
                value = None if epsilon == "none" else float(epsilon)
                row = {"dataset": dataset, **run_one(data, likelihood, value, seed, args.rounds)}
                logger.info("%s", row)
                rows.append(row)
                table = pd.DataFrame(rows)
                table.to_csv(f"{args.out}.csv", index=False)
                Path(f"{args.out}.md").write_text(markdown(table, args))


if __name__ == "__main__":
    main()
