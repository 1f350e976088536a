"""Cost of the key, and of a federated epoch against scvi-tools' SCVI, measured in one run.

Reports ratios (never asserts timings):

- keyed / unkeyed wall time of the same federated training (docs/targets.md: <= 1.10x), without
  secret frames (their cost: ``benchmarks/secret_frames_cost.py``);
- share of key parameters in the model (<= 5%);
- scvi-tools SCVI epoch time / scinfl federated epoch time, same layer sizes, same data (>= 3x).

Usage::

    uv run python benchmarks/cost.py                 # pbmc68k (700 x 765) and synthetic 14k x 2k
    uv run python benchmarks/cost.py --quick         # pbmc68k only
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import scvi
import torch

import scinfl


def _fed_seconds_per_epoch(adata, key_mode, rounds):
    scvi.settings.seed = 0
    scinfl.model.INFL.setup_anndata(adata, layer="counts", site_key="site")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), key_mode=key_mode)
    start = time.perf_counter()
    # the key mode's own cost; secret frames (on by default with a key) are measured apart,
    # in benchmarks/secret_frames_cost.py
    model.train_federated(
        max_rounds=rounds, local_epochs=1, progress_bar=False, secret_frames=False
    )
    return (time.perf_counter() - start) / rounds, model


def _scvi_seconds_per_epoch(adata, epochs):
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, layer="counts")
    model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="nb")
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        train_size=0.9,
        batch_size=128,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    return (time.perf_counter() - start) / epochs


def measure(name, adata, rounds):
    """Time keyed, unkeyed and scvi-tools training on ``adata``; return one row of ratios."""
    plain, _ = _fed_seconds_per_epoch(adata.copy(), None, rounds)
    keyed, model = _fed_seconds_per_epoch(adata.copy(), "pooled", rounds)
    reference = _scvi_seconds_per_epoch(adata.copy(), rounds)
    params = dict(model.module.named_parameters())
    key_share = sum(params[n].numel() for n in model.module.key_parameter_names()) / sum(
        p.numel() for p in params.values()
    )
    return {
        "data": name,
        "cells x genes": f"{adata.n_obs} x {adata.n_vars}",
        "s/epoch federated keyed": keyed,
        "s/epoch federated plain": plain,
        "s/epoch scvi SCVI": reference,
        "keyed / plain (<= 1.10)": keyed / plain,
        "key parameter share (<= 0.05)": key_share,
        "SCVI / federated keyed (>= 3)": reference / keyed,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1 on a machine shared with other jobs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure("pbmc68k", scinfl.data.pbmc68k(), args.rounds)]
    if not args.quick:
        big = scinfl.data.synthetic_counts(
            n_obs=14_000, n_vars=2_000, n_labels=8, n_sites=3, seed=0
        )
        rows.append(measure("synthetic", big, args.rounds))
    table = pd.DataFrame(rows).set_index("data").T
    with pd.option_context("display.float_format", "{:.3f}".format):
        print(table.to_string())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
