"""Privacy audit and utility of the key modes on pbmc68k (one-sample uploads, section 4 of DESIGN.md).

Attack table (attack x defence x key guess x metric)::

    OMP_NUM_THREADS=1 python benchmarks/privacy.py attacks --rounds 30 --victims 10 --dlg-iters 300 --adaptive

Utility (ARI of Leiden on the latent space vs ``bulk_labels``, unsupervised federated training)::

    OMP_NUM_THREADS=1 python benchmarks/privacy.py utility --rounds 100 --seeds 0,1,2

The server's view: the global parameters of round ``--rounds`` and, for every victim, the
gradient of the victim's one-sample loss (deterministic forward: the worst case for the
defender). Public data: the cells of ``site2`` (its mean log1p profile is the reference of the
partial correlation). Victims: the first cells of ``site0``. Candidates for re-identification:
the victim and 99 other cells of the data set.

Attacks: ``analytic`` (encoder first layer), ``decoder-inversion`` (decoder gradients only:
latent from the decoder's first layer, then counts from the output-bias and dispersion
gradients), ``decoder-bias`` (negated output-bias gradient), ``inverting-gradients`` (cosine
gradient matching with Adam, iDLG labels) - each with no key (zeros), a wrong key and the correct
key; ``spectral-alignment-k`` (``--adaptive``, no key: every cell of site0 uploads once, the
server aligns the principal axes of what it recovered with those of the public data).
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
    analytic_inversion,
    attacker_module,
    decoder_bias_attack,
    decoder_inversion,
    dlg,
    infer_label,
    input_layer,
    label_recovery,
    make_tensors,
    output_layer,
    partial_correlation,
    reidentification_rate,
    spectral_alignment_attack,
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


def _score(rows, defence, attack, guess, recs, victims, logx, reference, found_labels, labels):
    recs = np.stack(recs)
    pc = [partial_correlation(r, logx[v], reference) for r, v in zip(recs, victims, strict=True)]
    top = [top_k_overlap(r, logx[v], 50, reference) for r, v in zip(recs, victims, strict=True)]
    rows.append(
        {
            "defence": defence,
            "attack": attack,
            "key_guess": guess,
            "reidentification": reidentification_rate(recs, victims, logx, reference),
            "partial_corr": float(np.mean(pc)),
            "partial_corr_sd": float(np.std(pc)),
            "top50_overlap": float(np.mean(top)),
            "label_recovery": (
                label_recovery(found_labels, labels[victims])
                if found_labels is not None
                else np.nan
            ),
            "n_victims": len(victims),
        }
    )


def attacks(args) -> pd.DataFrame:
    adata = scinfl.data.pbmc68k()
    counts = adata.layers["counts"].toarray()
    logx = np.log1p(counts)
    site = adata.obs["site"].astype(str).to_numpy()
    public = logx[site == "site2"]
    reference = public.mean(0)
    site0 = np.flatnonzero(site == "site0")
    victims = site0[: args.victims]
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy()
    attack_names = ["analytic", "decoder-inversion", "decoder-bias"]
    if args.dlg_iters:
        attack_names.append("inverting-gradients")
    rows = []
    for mode in args.modes.split(","):
        key = scinfl.Key.generate()
        model, _ = _model(adata, mode, key, labels_key="bulk_labels", seed=args.seed)
        start = time.perf_counter()
        model.train_federated(max_rounds=args.rounds, progress_bar=False, seed=args.seed)
        logging.info(
            "%s: trained %d rounds in %.0f s", mode, args.rounds, time.perf_counter() - start
        )
        module = model.module
        guesses = GUESSES if MODES[mode] else ("none",)
        attackers = {
            g: attacker_module(module, key if g == "correct" else g, seed=7) for g in guesses
        }
        recs = {(a, g): [] for a in attack_names for g in guesses}
        found_labels = []
        for i, victim in enumerate(victims):
            grads = upload_gradient(module, make_tensors(counts[victim], labels=[labels[victim]]))
            found_labels.append(infer_label(grads, output_layer(module, "classifier")[0]))
            for g, attacker in attackers.items():
                recs[("analytic", g)].append(analytic_attack(attacker, grads))
                recs[("decoder-inversion", g)].append(decoder_inversion(attacker, grads))
                recs[("decoder-bias", g)].append(decoder_bias_attack(attacker, grads))
                if args.dlg_iters:
                    rec = dlg(attacker, grads, n_iter=args.dlg_iters, lr=0.1, seed=i)
                    recs[("inverting-gradients", g)].append(rec.x[0])
            logging.info("%s: victim %d/%d done", mode, i + 1, len(victims))
        for (attack, g), rs in recs.items():
            for guess in (g,) if MODES[mode] else GUESSES:  # unkeyed: every guess is the same
                _score(
                    rows, mode, attack, guess, rs, victims, logx, reference, found_labels, labels
                )
        if args.adaptive and MODES[mode] and MODES[mode].startswith("feature"):
            # the server collects one-sample uploads of every cell of site0 over many rounds
            name, layer = input_layer(module)
            weight = getattr(layer, "projected_weight_name", "weight")
            projections = np.stack(
                [
                    analytic_inversion(
                        upload_gradient(module, make_tensors(counts[v], labels=[labels[v]])),
                        name,
                        weight,
                    )
                    for v in site0
                ]
            )
            for k in (5, 10, 20):
                recs_k = spectral_alignment_attack(projections, public, n_components=k)
                _score(
                    rows,
                    mode,
                    f"spectral-alignment-{k}",
                    "none",
                    list(recs_k),
                    site0,
                    logx,
                    reference,
                    None,
                    labels,
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
            if MODES[mode]:  # what a holder of the weights without the key gets
                wrong = attacker_module(model.module, "wrong", seed=seed).eval()
                with torch.no_grad():
                    tensors = make_tensors(adata.layers["counts"].toarray())
                    qz = wrong.inference(**wrong._get_inference_input(tensors))["qz"]
                adata.obsm["X_wrong_key"] = qz.loc.numpy()

            def ari(rep, resolution, adata=adata):
                sc.pp.neighbors(adata, use_rep=rep, random_state=0)
                sc.tl.leiden(
                    adata,
                    resolution=resolution,
                    flavor="igraph",
                    n_iterations=2,
                    directed=False,
                    random_state=0,
                )
                return adjusted_rand_score(adata.obs["bulk_labels"], adata.obs["leiden"])

            for resolution in (0.5, 1.0):
                rows.append(
                    {
                        "defence": mode,
                        "seed": seed,
                        "resolution": resolution,
                        "ari": ari("X_scinfl", resolution),
                        "ari_wrong_key": ari("X_wrong_key", resolution) if MODES[mode] else np.nan,
                        "val_loss": float(
                            model.federated_history_.groupby("round")["val_loss"].mean().min()
                        ),
                        "train_s": seconds,
                    }
                )
            logging.info("%s seed %d: %s", mode, seed, rows[-2:])
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=["attacks", "utility"])
    parser.add_argument("--modes", default="plain,pooled,feature")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--victims", type=int, default=10)
    parser.add_argument("--dlg-iters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adaptive", action="store_true", help="also run the spectral alignment attack"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    table = attacks(args) if args.task == "attacks" else utility(args)
    if args.task == "utility":
        columns = ["ari", "ari_wrong_key", "val_loss", "train_s"]
        summary = table.groupby(["defence", "resolution"])[columns].agg(["mean", "std"])
        print(summary.round(3).to_string())
    else:
        print(table.round(3).to_markdown(index=False))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
