"""Perturbation response across sites: Kang 2018 IFN-beta PBMC, one cell type left out.

Protocol (issue #14). Data: ``scinfl.data.kang2018()`` (its derived ``cell_type``), the 1,000
genes of highest dispersion of the log-normalised data (scanpy, ``flavor="seurat"``), their
counts log-normalised over themselves (``normalize_total(1e4)``, ``log1p``). For
each held-out type and seed: the type's stimulated cells are removed from the training data
(no site sees them); the rest is split into 3 simulated sites by
``scinfl.federated.partition(method="dirichlet", label_key="cell_type", alpha=0.5)``, i.e.
each cell type's cells spread over the sites in Dirichlet(0.5) proportions, both conditions
together (every site holds both conditions of the types it has). The held-out type's stimulated
cells are predicted from its control cells.

Rows (the same splits):

- ``INFL federated``: :class:`scinfl.model.PerturbationINFL` (key ``pooled``, secret frames
  on, the library's defaults: 128 hidden units, 10 latent dimensions), ``train_federated``
  over the 3 sites (local engine), ``--rounds`` rounds of one local epoch; prediction by
  ``method="decoder"`` (encode the control cells, decode as stimulated); ``(latent)`` and
  ``(both)`` rows are scGen's latent shift and both, from the same trained model;
- ``INFL federated, no key``: the same with ``key_mode=None``;
- ``INFL centralized``: the same model, ``train_centralized`` for ``--rounds`` epochs;
- ``INFL local-only``: the same model trained on one site (the one holding most of the
  held-out type's control cells), predicting from that site's control cells of the type;
- ``mean shift``: the held-out type's control cells plus the mean over the other types of
  their (stim - ctrl) mean change (log-normalised);
- ``scGen (pertpy)``: pertpy's ``Scgen`` on all training cells (centralized), log-normalised,
  its default architecture, ``--scgen-epochs`` epochs at batch size 128, one seed (``--scgen-seeds``).

Model predictions (``output="log_change"``, the default): each observed control cell,
log-normalised (``normalize_total(1e4)``, ``log1p``), plus the change the model predicts for
it; ``decoded cells`` rows are counts drawn from the decoder at each control cell's library
size, log-normalised the same way. Scores (``scinfl.tl.perturbation_scores``)
against the held-out stimulated cells, response genes (``scinfl.tl.response_genes``, Wilcoxon
stim vs ctrl of the held-out type, on the observed cells: the same for every method).

Every run appends to ``results/perturbation.csv`` (already present rows are skipped, so an
interrupted run resumes); the table is written from the CSV. scGen needs pertpy (the
``benchmarks`` dependency group); it can run in its own process::

    python benchmarks/perturbation.py --methods infl meanshift      # models + mean shift
    python benchmarks/perturbation.py --methods scgen               # pertpy scGen
    python benchmarks/perturbation.py --table                       # only rewrite the table
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scvi
import torch

import scinfl

RESULTS = Path(__file__).parent / "results"
CSV = RESULTS / "perturbation.csv"
HELD_OUT = ("B", "CD14 Mono", "CD4 T", "NK")
ALPHA = 0.5
N_SITES = 3
N_GENES = 1000
BATCH_SIZE = 256
METRIC = "delta_pearson_top100"
SHOWN = (
    "r2_mean_all",
    "pearson_mean_all",
    "r2_mean_top100",
    "pearson_mean_top100",
    "delta_pearson_top20",
    "delta_pearson_top100",
    "e_distance",
)


def load() -> ad.AnnData:
    """Kang 2018 counts on the most dispersed genes, log-normalised over them in ``X``.

    The genes are chosen on the log-normalised data; the counts of those genes are then
    normalised over themselves: the model sees only these genes, so its predictions (and the
    observed cells they are scored against) are normalised over the same genes.
    """
    adata = scinfl.data.kang2018()
    chosen = adata.copy()
    sc.pp.normalize_total(chosen, target_sum=1e4)
    sc.pp.log1p(chosen)
    sc.pp.highly_variable_genes(chosen, n_top_genes=N_GENES, flavor="seurat")
    adata = adata[:, chosen.var["highly_variable"]].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def lognorm(counts) -> np.ndarray:
    """log1p of counts scaled to 10,000 per cell (dense)."""
    counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts)
    total = counts.sum(1, keepdims=True)
    return np.log1p(1e4 * counts / np.maximum(total, 1))


class Split:
    """One held-out type and seed: training cells with sites, truth and response genes."""

    def __init__(self, adata: ad.AnnData, held_out: str, seed: int) -> None:
        adata = adata.copy()
        scinfl.federated.partition(
            adata, N_SITES, method="dirichlet", label_key="cell_type", alpha=ALPHA, seed=seed
        )
        mine = (adata.obs["cell_type"] == held_out).to_numpy()
        stim = (adata.obs["condition"] == "stim").to_numpy()
        self.held_out, self.seed = held_out, seed
        self.train = adata[~(mine & stim)].copy()
        self.observed = adata[mine & stim].copy()
        self.control = adata[mine & ~stim].copy()
        self.genes = scinfl.tl.response_genes(
            adata[mine].copy(), "condition", "ctrl", "stim", n_genes=100
        )

    def score(self, predicted: ad.AnnData) -> pd.Series:
        return scinfl.tl.perturbation_scores(
            predicted, self.observed, self.control, self.genes, seed=self.seed
        )


def infl_rows(split: Split, rounds: int) -> list[dict]:
    """The model federated (with and without key), centralized and local-only."""
    rows = []
    for name, key_mode, how in (
        ("INFL federated", "pooled", "federated"),
        ("INFL federated, no key", None, "federated"),
        ("INFL centralized", "pooled", "centralized"),
        ("INFL local-only", "pooled", "local"),
    ):
        train = split.train
        if how == "local":
            ctrl_sites = split.control.obs["site"].value_counts()
            train = train[train.obs["site"] == ctrl_sites.idxmax()].copy()
        scinfl.model.PerturbationINFL.setup_anndata(
            train, condition_key="condition", layer="counts", site_key="site"
        )
        torch.manual_seed(split.seed)
        key = scinfl.Key.generate() if key_mode else None
        model = scinfl.model.PerturbationINFL(train, key=key, key_mode=key_mode)
        start = time.perf_counter()
        settings = {"batch_size": BATCH_SIZE, "seed": split.seed, "progress_bar": False}
        if how == "federated":
            model.train_federated(max_rounds=rounds, **settings)
        else:
            model.train_centralized(max_epochs=rounds, **settings)
        seconds = time.perf_counter() - start
        variants = [("decoder", "log_change"), ("both", "log_change")]
        if how == "federated":
            variants += [("latent", "log_change"), ("decoder", "counts"), ("both", "counts")]
        for method, output in variants:
            predicted = scinfl.tl.predict_perturbation(
                train,
                model,
                cell_types=[split.held_out],
                method=method,
                output=output,
                seed=split.seed,
            )
            if output == "counts":
                predicted.X = lognorm(predicted.X)
            label = f"{name} [{method}]" + (", decoded cells" if output == "counts" else "")
            rows.append({"method": label, "seconds": seconds, **split.score(predicted)})
    return rows


def mean_shift_rows(split: Split) -> list[dict]:
    """Control cells plus the mean (over the other types) stim - ctrl change."""
    train = split.train
    shifts = []
    for name in train.obs["cell_type"].cat.categories:
        if name == split.held_out:
            continue
        mine = train.obs["cell_type"] == name
        ctrl = train[mine & (train.obs["condition"] == "ctrl")].X
        stim = train[mine & (train.obs["condition"] == "stim")].X
        if ctrl.shape[0] and stim.shape[0]:
            shifts.append(np.asarray(stim.mean(0) - ctrl.mean(0)).ravel())
    predicted = split.control.copy()
    predicted.X = np.asarray(predicted.X.toarray()) + np.mean(shifts, axis=0)
    return [{"method": "mean shift", "seconds": 0.0, **split.score(predicted)}]


def scgen_rows(split: Split, epochs: int) -> list[dict]:
    """pertpy's scGen, centralized on the log-normalised training cells."""
    import pertpy as pt

    train = split.train.copy()
    pt.tl.Scgen.setup_anndata(train, batch_key="condition", labels_key="cell_type")
    model = pt.tl.Scgen(train)
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, early_stopping=True, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    predicted, _ = model.predict(
        ctrl_key="ctrl", stim_key="stim", celltype_to_predict=split.held_out
    )
    predicted = ad.AnnData(np.asarray(predicted.X), var=split.control.var[[]])
    return [{"method": "scGen (pertpy, centralized)", "seconds": seconds, **split.score(predicted)}]


def done(csv: Path, held_out: str, seed: int, method_group: str) -> bool:
    if not csv.exists():
        return False
    table = pd.read_csv(csv)
    rows = table[(table["held_out"] == held_out) & (table["seed"] == seed)]
    prefix = {"infl": "INFL", "meanshift": "mean shift", "scgen": "scGen"}[method_group]
    return rows["method"].str.startswith(prefix).any()


def run(csv, held_outs, methods, seeds, scgen_seeds, rounds, scgen_epochs) -> None:
    adata = load()
    for seed in seeds:
        for held_out in held_outs:
            todo = [
                m
                for m in methods
                if not done(csv, held_out, seed, m) and (m != "scgen" or seed in scgen_seeds)
            ]
            if not todo:
                continue
            split = Split(adata, held_out, seed)
            rows = []
            if "meanshift" in todo:
                rows += mean_shift_rows(split)
            if "infl" in todo:
                rows += infl_rows(split, rounds)
            if "scgen" in todo:
                rows += scgen_rows(split, scgen_epochs)
            table = pd.DataFrame(rows).assign(held_out=held_out, seed=seed)
            table.to_csv(csv, mode="a", header=not csv.exists(), index=False)
            logging.info("%s seed %d: %s", held_out, seed, table[["method", METRIC]].values)


def fmt(values: pd.Series) -> str:
    if len(values) > 1:
        return f"{values.mean():.3f} ± {values.std():.3f}"
    return f"{values.mean():.3f}"


def write_table(csv: Path, command: str) -> None:
    # two processes on one file may both run a split: keep its first result
    table = pd.read_csv(csv).drop_duplicates(["method", "held_out", "seed"])
    order = list(dict.fromkeys(table["method"]))
    held_outs = list(dict.fromkeys(table["held_out"]))
    lines = [
        "# Perturbation response across sites (Kang 2018 IFN-beta PBMC)",
        "",
        f"`{command}`. Protocol, rows and scores: the docstring of `benchmarks/perturbation.py`.",
        f"{N_GENES} genes; {N_SITES} sites, Dirichlet alpha {ALPHA} over cell types; mean ± sd "
        "over seeds (n = number of seeds).",
        "",
        "## Delta Pearson on the top-100 response genes (R^2 of mean expression on them)",
        "",
        "| method | " + " | ".join(held_outs) + " | mean | n |",
        "|---" * (len(held_outs) + 3) + "|",
    ]
    for method in order:
        rows = table[table["method"] == method]
        cells = []
        for held_out in held_outs:
            mine = rows[rows["held_out"] == held_out]
            cells.append(f"{fmt(mine[METRIC])} ({mine['r2_mean_top100'].mean():.2f})")
        per_seed = rows.groupby("seed")[METRIC].mean()
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {fmt(per_seed)} | {rows['seed'].nunique()} |"
        )
    lines += ["", "## Every score, mean over held-out types and seeds", ""]
    lines += ["| method | " + " | ".join(SHOWN) + " | seconds |", "|---" * (len(SHOWN) + 2) + "|"]
    for method in order:
        rows = table[table["method"] == method]
        values = " | ".join(f"{rows[c].mean():.3f}" for c in SHOWN)
        lines.append(f"| {method} | {values} | {rows['seconds'].mean():.0f} |")
    csv.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["meanshift", "infl", "scgen"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scgen-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--scgen-epochs", type=int, default=10)
    parser.add_argument("--held-out", nargs="+", default=list(HELD_OUT))
    parser.add_argument("--csv", type=Path, default=CSV, help="results (the table beside it)")
    parser.add_argument("--table", action="store_true", help="only rewrite the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    scvi.settings.verbosity = logging.WARNING
    torch.set_num_threads(1)
    if not args.table:
        run(
            args.csv,
            args.held_out,
            args.methods,
            args.seeds,
            args.scgen_seeds,
            args.rounds,
            args.scgen_epochs,
        )
    write_table(
        args.csv,
        f"python benchmarks/perturbation.py --rounds {args.rounds} --seeds "
        f"{' '.join(map(str, args.seeds))} --scgen-epochs {args.scgen_epochs} --scgen-seeds "
        f"{' '.join(map(str, args.scgen_seeds))}",
    )


if __name__ == "__main__":
    main()
