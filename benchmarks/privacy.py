"""Privacy audit and utility of the key modes on pbmc68k (one-sample uploads, section 4 of DESIGN.md).

Attack table (attack x defence x key guess x metric)::

    OMP_NUM_THREADS=1 python benchmarks/privacy.py attacks --rounds 30 --victims 10 --dlg-iters 300

Utility (ARI of Leiden on the latent space vs ``bulk_labels``, unsupervised federated training)::

    OMP_NUM_THREADS=1 python benchmarks/privacy.py utility --rounds 100 --seeds 0,1,2

The server's view: the global parameters of round ``--rounds`` and, for every victim, the
gradient of the victim's one-sample loss (deterministic forward: the worst case for the
defender). Public data: the cells of ``site2`` (its mean log1p profile is the reference of the
partial correlation). Victims: the first cells of ``site0``. Candidates for re-identification:
the victim and 99 other cells of the data set.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import scinfl
from scinfl.privacy import (
    analytic_attack,
    attacker_module,
    dlg,
    infer_label,
    label_recovery,
    make_tensors,
    output_layer,
    partial_correlation,
    reidentification_rate,
    top_k_overlap,
    upload_gradient,
)

MODES = {"plain": None, "pooled": "pooled", "feature": "feature", "feature-inr": "feature-inr"}
GUESSES = ("none", "wrong", "correct")


def _model(adata, mode, key, labels_key=None, seed=0):
    adata = adata.copy()
    scinfl.model.INFL.setup_anndata(adata, layer="counts", site_key="site", labels_key=labels_key)
    torch.manual_seed(seed)
    model = scinfl.model.INFL(adata, key=key, key_mode=MODES[mode])
    if MODES[mode] and MODES[mode].startswith("feature"):
        # KeyedVAE does not call install_model yet: key the decoder and dispersions here
        model.module._key_mode.install_model(model.module)
    return model, adata


def attacks(args) -> pd.DataFrame:
    adata = scinfl.data.pbmc68k()
    counts = adata.layers["counts"].toarray()
    logx = np.log1p(counts)
    site = adata.obs["site"].astype(str).to_numpy()
    reference = logx[site == "site2"].mean(0)
    victims = np.flatnonzero(site == "site0")[: args.victims]
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy()
    rows = []
    for mode in args.modes.split(","):
        key = scinfl.Key.generate()
        model, _ = _model(adata, mode, key, labels_key="bulk_labels", seed=args.seed)
        start = time.perf_counter()
        model.train_federated(max_rounds=args.rounds, progress_bar=False, seed=args.seed)
        logging.info("%s: trained %d rounds in %.0f s", mode, args.rounds, time.perf_counter() - start)
        module = model.module
        guesses = GUESSES if MODES[mode] else ("none",)
        attackers = {g: attacker_module(module, key if g == "correct" else g, seed=7) for g in guesses}
        recs = {(a, g): [] for a in ("analytic", "inverting-gradients") for g in guesses}
        found_labels = []
        for i, victim in enumerate(victims):
            grads = upload_gradient(module, make_tensors(counts[victim], labels=[labels[victim]]))
            found_labels.append(infer_label(grads, output_layer(module, "classifier")[0]))
            for g, attacker in attackers.items():
                recs[("analytic", g)].append(analytic_attack(attacker, grads))
                if args.dlg_iters:
                    rec = dlg(attacker, grads, n_iter=args.dlg_iters, lr=0.1, seed=i)
                    recs[("inverting-gradients", g)].append(rec.x[0])
            logging.info("%s: victim %d/%d done", mode, i + 1, len(victims))
        for (attack, g), rs in recs.items():
            if not rs:
                continue
            rs = np.stack(rs)
            pc = [partial_correlation(r, logx[v], reference) for r, v in zip(rs, victims, strict=True)]
            top = [top_k_overlap(r, logx[v], 50, reference) for r, v in zip(rs, victims, strict=True)]
            for guess in guesses if MODES[mode] else GUESSES:
                if MODES[mode] and guess != g:
                    continue
                rows.append(
                    {
                        "defence": mode,
                        "attack": attack,
                        "key_guess": guess,
                        "reidentification": reidentification_rate(rs, victims, logx, reference),
                        "partial_corr": float(np.mean(pc)),
                        "partial_corr_sd": float(np.std(pc)),
                        "top50_overlap": float(np.mean(top)),
                        "label_recovery": label_recovery(found_labels, labels[victims]),
                        "n_victims": len(victims),
                    }
                )
        logging.info("%s done", mode)
    return pd.DataFrame(rows)


def utility(args) -> pd.DataFrame:
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    adata0 = scinfl.data.pbmc68k()
    rows = []
    for mode in args.modes.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            model, adata = _model(adata0, mode, scinfl.Key.generate(), seed=seed)
            start = time.perf_counter()
            model.train_federated(max_rounds=args.rounds, progress_bar=False, seed=seed)
            seconds = time.perf_counter() - start
            adata.obsm["X_scinfl"] = model.get_latent()
            sc.pp.neighbors(adata, use_rep="X_scinfl", random_state=0)
            for resolution in (0.5, 1.0):
                sc.tl.leiden(
                    adata,
                    resolution=resolution,
                    flavor="igraph",
                    n_iterations=2,
                    directed=False,
                    random_state=0,
                )
                ari = adjusted_rand_score(adata.obs["bulk_labels"], adata.obs["leiden"])
                rows.append(
                    {
                        "defence": mode,
                        "seed": seed,
                        "resolution": resolution,
                        "ari": ari,
                        "val_loss": float(model.federated_history_.groupby("round")["val_loss"].mean().min()),
                        "train_s": seconds,
                    }
                )
            logging.info("%s seed %d: %s", mode, seed, rows[-2:])
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["attacks", "utility"])
    parser.add_argument("--modes", default="plain,pooled,feature")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--victims", type=int, default=10)
    parser.add_argument("--dlg-iters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    table = attacks(args) if args.task == "attacks" else utility(args)
    if args.task == "utility":
        summary = table.groupby(["defence", "resolution"])[["ari", "val_loss", "train_s"]].agg(["mean", "std"])
        print(summary.round(3).to_string())
    else:
        print(table.round(3).to_markdown(index=False))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
