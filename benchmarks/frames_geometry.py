"""How much of the principal axes of many rows one secret frame keeps (no training involved).

The spectral alignment attack (:func:`scinfl.privacy.spectral_alignment_attack`) needs many
one-sample uploads in one linear frame. This measures what it gets through one axis frame of
the model's feature axis, against an orthogonal map and the identity: log1p counts of
``--victims`` Kang cells (the 1,000 genes of most counts) pass through each map, and the attack
reconstructs them from ``--public`` other cells. Score: the mean partial correlation of each
reconstruction with its cell given the public mean profile
(:func:`scinfl.privacy.partial_correlation`, as in the privacy benchmark; 0 is chance).

The protocol never puts two uploads of one site in one frame; the privacy benchmark
(``benchmarks/privacy.py --spectral``) measures that case on trained models.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/frames_geometry.py
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

import scinfl
from scinfl.federated._secret_frames import AxisFrame  # one axis, as the feature axis travels
from scinfl.privacy import partial_correlation, spectral_alignment_attack


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=500)
    parser.add_argument("--public", type=int, default=1000)
    parser.add_argument("--components", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    adata = scinfl.data.kang2018(n_top_genes=1000)
    rng = np.random.default_rng(0)
    rows = rng.choice(adata.n_obs, args.victims + args.public, replace=False)
    x = np.log1p(np.asarray(adata.layers["counts"][rows].todense(), dtype=np.float64))
    victims, public = x[: args.victims], x[args.victims :]
    mean = public.mean(0)
    maps = {"identity": lambda v, seed: v}
    maps["orthogonal"] = lambda v, seed: (
        v @ np.linalg.qr(np.random.default_rng(seed).normal(size=(v.shape[1],) * 2))[0]
    )
    maps["secret frame"] = lambda v, seed: AxisFrame(v.shape[1], np.random.default_rng(seed)).apply(
        v, "forward"
    )
    results = []
    for name, apply in maps.items():
        for seed in range(args.seeds):
            seen = apply(victims, seed)
            for k in args.components:
                attacked = spectral_alignment_attack(seen, public, n_components=k)
                score = float(partial_correlation(attacked, victims, mean).mean())
                results.append({"map": name, "seed": seed, "components": k, "partial corr": score})
    table = (
        pd.DataFrame(results)
        .groupby(["map", "components"])["partial corr"]
        .agg(["mean", "min", "max"])
    )
    print(table.round(3).to_markdown())


if __name__ == "__main__":
    main()
