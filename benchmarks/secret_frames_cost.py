"""Wall time of federated training with and without secret frames, measured in one run.

For each data shape, the same keyed model is trained twice from the same seed on 3 simulated
sites (local engine), once plain and once with ``secret_frames=True``, alternating the order
over ``--repeats``; the table reports the median wall times and their ratio, the round each
run selected (lowest validation loss) and the largest difference between the two selected
models' latent spaces (the frames change the model only by float rounding; a different
selected round shows as a larger difference). As a reference, the plain model trained from
initial weights jittered by a relative 1e-7: training itself amplifies float-rounding-sized
differences over rounds, so the two columns should be of the same size.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/secret_frames_cost.py
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import pandas as pd
import torch

import scinfl

SHAPES = {
    # rows x features: bulk proteomics (CPTAC-sized), a Kang-sized single-cell subset, pbmc68k
    "bulk 150 x 9,367": (150, 9367),
    "cells 3,000 x 1,000": (3000, 1000),
    "cells 700 x 765": (700, 765),
}


def _train(adata, frames: bool, rounds: int, jitter: float = 0.0) -> tuple[float, np.ndarray, int]:
    torch.manual_seed(0)
    model = scinfl.model.INFL(adata, key=scinfl.Key(bytes(range(32))), n_hidden=128)
    if jitter:
        # the reference for "float rounding": relative noise of this size on the initial weights
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.module.parameters():
                noise = torch.randn(p.shape, generator=generator)
                p.add_(jitter * noise * p.abs().clamp(min=1e-3))
    start = time.perf_counter()
    model.train_federated(
        max_rounds=rounds, batch_size=32, seed=0, progress_bar=False, secret_frames=frames
    )
    seconds = time.perf_counter() - start
    return seconds, model.get_latent(), model.federated_history_.attrs["best_round"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("scvi").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    for name, (n_obs, n_vars) in SHAPES.items():
        adata = scinfl.data.synthetic_counts(n_obs=n_obs, n_vars=n_vars, n_sites=3, seed=0)
        scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
        times: dict[bool, list[float]] = {False: [], True: []}
        latents, best = {}, {}
        for repeat in range(args.repeats):
            for frames in (False, True) if repeat % 2 == 0 else (True, False):
                seconds, latents[frames], best[frames] = _train(adata, frames, args.rounds)
                times[frames].append(seconds)
        plain, framed = np.median(times[False]), np.median(times[True])
        _, jittered, _ = _train(adata, False, args.rounds, jitter=1e-7)
        rows.append(
            {
                "data": name,
                "rounds": args.rounds,
                "plain s": round(plain, 1),
                "secret frames s": round(framed, 1),
                "ratio": round(framed / plain, 2),
                "selected round (plain, frames)": f"{best[False]}, {best[True]}",
                "max |latent difference|": float(np.abs(latents[True] - latents[False]).max()),
                "same, plain with 1e-7 jitter": float(np.abs(jittered - latents[False]).max()),
            }
        )
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
