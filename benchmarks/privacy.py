"""Privacy comparison table: every defence against every attack, with the utility of each defence.

Regenerates the tables of ``docs/privacy.md`` with :func:`scinfl.privacy.audit`.

Defences (``--defences``):

- ``plain``: FedAvg, no key (``key_mode=None``);
- ``dp-<z>``: client-level DP-FedAvg on the plain model (``privacy="dp"``, noise multiplier
  ``z``, clipping norm ``--dp-clip``; server-side clipping and noise, Flower's mechanism and
  accountant): the server still sees every site's raw update;
- ``secagg``: the plain model with secure aggregation under the federation's key
  (``privacy="secagg"``): the server sees only the sum of all sites' uploads of a round, so
  every upload audited is that sum (``audit(aggregated_sites=<number of sites>)``);
- ``pooled``: the INFL paper's keyed design (``key_mode="pooled"``);
- ``feature`` / ``feature-inr``: scinfl's secret per-feature key modes (encoder input layer,
  decoder per-feature heads and dispersions keyed).

Data sets (``--datasets``):

- ``cptac``: CPTAC UCEC proteomics (log2 TMT ratios with NaN, ``gene_likelihood="normal"``),
  label ``Proteomics_Tumor_Normal`` (4 classes); 3 sites of consecutive TMT plexes (1-6, 7-12,
  13-17: 3 sites rather than the 4 of ``benchmarks/proteomics.py`` so that a site keeps >= 32
  training rows for the batch-of-32 uploads); features agreed by name on the training rows
  (observed in >= 50% of every site's rows);
- ``kang``: Kang et al. 2018 PBMC counts (``gene_likelihood="nb"``), ``--kang-cells`` cells drawn
  at random and the ``--kang-genes`` genes of highest total count, label = the loader's
  marker-derived ``cell_type`` (types with fewer than ``--kang-min-cells`` cells in the sample,
  and unassigned cells, left out); 3 simulated sites (Dirichlet(1) label skew).

Protocol: a stratified ``--holdout`` fraction of the rows is never trained on; half of it is the
attacker's public data (reference profile, RMIA population and reference models), the other half
the non-members of membership inference; all of it is the test set of the utility. Each
defence is trained with the same seed, rows and sites; the audit then attacks uploads of
training rows at the final global parameters (gradients, deterministic forward: the worst case
for the defender) with no key, a wrong key from the same generator and the correct key (upper
bound): ``--victims`` one-sample uploads with every attack, and ``--batch-uploads`` uploads of
``--batch-size`` rows of one site with ``--batch-attacks`` (by default the analytic attacks only:
gradient matching on 32 rows costs minutes per upload and key guess on CPU). Utility is
measured over ``--utility-seeds`` (other held-out splits and simulated sites, same protocol). Validation rows of ``train_federated`` are left out
of the audit (neither members nor non-members). ``--spectral`` also runs
:func:`scinfl.privacy.spectral_alignment_attack` (no key) on the feature modes: every training
row of the largest site uploads once, the server aligns the principal axes of what it recovered
with those of the public data.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/privacy.py --quick          # minutes: smoke test
    OMP_NUM_THREADS=1 python benchmarks/privacy.py --spectral       # the docs' tables

Writes ``<out>_audit.csv`` (tidy: dataset, defence, attack, key_guess, upload, metric, value,
sd, chance, n), ``<out>_utility.csv``, ``<out>_spectral.csv``, ``<out>_meta.json`` and
``<out>.md`` (the tables; ``--tables-only`` rewrites it from the CSV files).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData
from sklearn.cluster import KMeans
from sklearn.metrics import accuracy_score, adjusted_rand_score, f1_score
from sklearn.model_selection import train_test_split

import scinfl
from scinfl.federated import SiteData, agree_features
from scinfl.model import INFL
from scinfl.privacy import (
    analytic_inversion,
    audit,
    framed_attackers,
    input_layer,
    partial_correlation,
    reidentification_rate,
    spectral_alignment_attack,
    top_k_overlap,
    training_rows,
    upload_gradient,
)
from scinfl.privacy._utility import model_data

logger = logging.getLogger("privacy-benchmark")

CPTAC_CLASSES = ["Tumor", "Adjacent_normal", "Enriched_normal", "Myometrium_normal"]
CPTAC_SITES = {"plex 1-6": range(1, 7), "plex 7-12": range(7, 13), "plex 13-17": range(13, 18)}
RECONSTRUCTION = ["analytic", "decoder-inversion", "inverting-gradients", "adaptive-key"]
ATTACKS = [*RECONSTRUCTION, "label-prevalence", "loss", "rmia", "inference"]
#: the attacks that cost milliseconds per upload (``--analytic-victims`` of them)
ANALYTIC = ["analytic", "decoder-inversion"]
MEMBERSHIP = ["loss", "rmia"]


@dataclass
class Task:
    """One data set of the benchmark: all rows, the held-out mask and the training settings."""

    name: str
    adata: AnnData  # every row, .obs["label"] and .obs["site"] categorical
    holdout: np.ndarray  # rows never trained on
    public: np.ndarray  # rows of the attacker's public data (a subset of holdout)
    layer: str | None
    model_kwargs: dict = field(default_factory=dict)
    train_kwargs: dict = field(default_factory=dict)


def _split(labels: pd.Series, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out rows (stratified by label) and the public half of them."""
    idx = np.arange(len(labels))
    _, held = train_test_split(
        idx, test_size=holdout, stratify=labels.astype(str), random_state=seed
    )
    rng = np.random.default_rng([seed, 1])
    public = rng.choice(held, len(held) // 2, replace=False)
    mask = np.zeros(len(idx), dtype=bool)
    mask[held] = True
    public_mask = np.zeros(len(idx), dtype=bool)
    public_mask[public] = True
    return mask, public_mask


@functools.lru_cache(maxsize=1)
def _cptac() -> AnnData:
    return scinfl.data.cptac_ucec()


@functools.lru_cache(maxsize=1)
def _kang(n_top_genes: int) -> AnnData:
    return scinfl.data.kang2018(n_top_genes=n_top_genes)


def cptac_task(args, seed: int) -> Task:
    """CPTAC UCEC proteomics, tumour/normal label, 3 TMT-plex sites."""
    adata = _cptac().copy()
    obs = adata.obs
    adata.obs = pd.DataFrame(index=obs.index)
    adata.obs["label"] = pd.Categorical(
        obs["Proteomics_Tumor_Normal"].astype(str), categories=CPTAC_CLASSES
    )
    site = [
        next(name for name, plexes in CPTAC_SITES.items() if int(p) in plexes)
        for p in obs["Proteomics_TMT_plex"]
    ]
    adata.obs["site"] = pd.Categorical(site, categories=list(CPTAC_SITES))
    holdout, public = _split(adata.obs["label"], args.holdout, seed)
    # features agreed by name on the training rows only (no pooled statistic)
    features = agree_features(adata[~holdout].copy(), "site", max_missing=0.5)
    adata = adata[:, features].copy()
    logger.info("cptac: %d rows x %d proteins, %d held out", *adata.shape, holdout.sum())
    return Task(
        "cptac",
        adata,
        holdout,
        public,
        layer=None,
        model_kwargs={
            "gene_likelihood": "normal",
            "n_hidden": 64,
            "n_latent": 10,
            "dropout_rate": 0.1,
            "classification_ratio": 50.0,
        },
        train_kwargs={
            "max_rounds": args.rounds,
            "local_epochs": 2,
            "batch_size": 16,
            "lr": 3e-3,
            "balance_classes": True,
            "min_cells_per_site": 2,
        },
    )


def kang_task(args, seed: int) -> Task:
    """Kang 2018 PBMC counts: a random subsample of cells, top genes, 3 simulated sites."""
    full = _kang(args.kang_genes)
    rng = np.random.default_rng([seed, 2])
    rows = np.sort(rng.choice(full.n_obs, min(args.kang_cells, full.n_obs), replace=False))
    adata = full[rows].copy()
    # cell types with fewer than --kang-min-cells cells in the sample, and unassigned cells, out
    cell_type = adata.obs["cell_type"].astype(str)
    counts = cell_type.value_counts()
    keep = cell_type.map(counts).ge(args.kang_min_cells) & cell_type.ne("unassigned")
    adata = adata[keep.to_numpy()].copy()
    adata.X = adata.layers["counts"].copy()
    cell_type = adata.obs["cell_type"].astype(str)
    adata.obs = pd.DataFrame(index=adata.obs_names)
    adata.obs["label"] = pd.Categorical(cell_type)
    scinfl.federated.partition(
        adata, n_sites=3, method="dirichlet", label_key="label", alpha=1.0, seed=seed
    )
    adata.obs["site"] = adata.obs["site"].astype(str).astype("category")
    holdout, public = _split(adata.obs["label"], args.holdout, seed)
    logger.info("kang: %d cells x %d genes, %d held out", *adata.shape, holdout.sum())
    return Task(
        "kang",
        adata,
        holdout,
        public,
        layer="counts",
        model_kwargs={"gene_likelihood": "nb", "n_hidden": 128, "n_latent": 10},
        train_kwargs={
            "max_rounds": args.rounds,
            "local_epochs": 1,
            "batch_size": 128,
            "lr": 1e-3,
            "balance_classes": True,
        },
    )


def parse_defence(name: str) -> tuple[str | None, float | None]:
    """``(key_mode, dp noise multiplier)`` of a defence name (``+frames`` aside)."""
    name = name.removesuffix("+frames")
    if name in ("plain", "secagg"):
        return None, None
    if name.startswith("dp-"):
        return None, float(name[3:])
    if name in ("pooled", "feature", "feature-inr"):
        return name, None
    raise ValueError(f"Unknown defence {name!r}.")


def framed(name: str) -> bool:
    """Whether a defence trains under secret frames (``<defence>+frames``)."""
    return name.endswith("+frames")


def secure(name: str) -> bool:
    """Whether a defence aggregates securely (``secagg``, ``secagg+frames``)."""
    return name.removesuffix("+frames") == "secagg"


def guessed(name: str) -> bool:
    """Whether the attacker of a defence needs a key guess (a key mode or secret frames)."""
    return parse_defence(name)[0] is not None or framed(name)


def _setup(adata: AnnData, task: Task, classes: list[str]) -> None:
    INFL.setup_anndata(
        adata,
        layer=task.layer,
        site_key="site",
        labels_key="label",
        categories={"labels_key": classes},
    )


def train(task: Task, defence: str, args, seed: int) -> tuple[INFL, float]:
    """A federated model of ``defence`` on the task's training rows, and its training seconds."""
    key_mode, noise = parse_defence(defence)
    classes = list(task.adata.obs["label"].cat.categories)
    data = task.adata[~task.holdout].copy()
    _setup(data, task, classes)
    scvi.settings.seed = seed
    torch.manual_seed(seed)
    key = scinfl.Key(np.random.default_rng([seed, 3]).bytes(32))
    # the per-feature modes key the decoder's per-feature heads and dispersions too (KeyedVAE)
    model = INFL(data, key=key, key_mode=key_mode, **task.model_kwargs)
    dp = {}
    if noise is not None:
        dp = {"privacy": "dp", "dp_noise_multiplier": noise, "dp_clipping_norm": args.dp_clip}
    if secure(defence):
        dp = {"privacy": "secagg"}
    # every model holds a key (the attacker's guesses need one): frames only where named
    dp["secret_frames"] = framed(defence)
    kwargs = dict(task.train_kwargs)
    # a site needs at least one batch of training rows (the library's own split rule)
    sizes = data.obs["site"].value_counts()
    n_train = [n - SiteData.n_validation(n, args.validation_size) for n in sizes if n > 0]
    kwargs["batch_size"] = min(kwargs["batch_size"], *n_train)
    start = time.perf_counter()
    model.train_federated(
        validation_size=args.validation_size,
        seed=seed,
        progress_bar=False,
        **kwargs,
        **dp,
    )
    return model, time.perf_counter() - start


def audit_view(
    task: Task, model: INFL, args, seed: int | None = None
) -> tuple[AnnData, np.ndarray, np.ndarray]:
    """Rows the audit sees (all but the validation rows), its members and public masks.

    ``seed``: the training seed of ``model`` (default ``args.seed``), which drew its validation
    rows.
    """
    trained = training_rows(model, args.validation_size, args.seed if seed is None else seed)
    train_rows = np.flatnonzero(~task.holdout)
    keep = np.ones(task.adata.n_obs, dtype=bool)
    keep[train_rows[~trained]] = False
    view = task.adata[keep].copy()
    return view, (~task.holdout)[keep], task.public[keep]


def utility(task: Task, model: INFL, seed: int) -> dict:
    """Utility of the federated model (correct key) on the held-out rows."""
    test = task.adata[task.holdout].copy()
    classes = list(task.adata.obs["label"].cat.categories)
    y = test.obs["label"].astype(str).to_numpy()
    pred = model.predict(test).astype(str)
    pred = np.asarray(pred)
    latent = model.get_latent_representation(test)
    k = len(np.unique(y))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(latent)
    return {
        "accuracy": accuracy_score(y, pred),
        "macro_f1": f1_score(y, pred, labels=classes, average="macro", zero_division=0),
        "ari_kmeans": adjusted_rand_score(y, clusters),
        "majority": float(pd.Series(y).value_counts(normalize=True).iloc[0]),
        "n_test": len(y),
    }


def _framed_projections(gradients: list, weight: str) -> np.ndarray:
    """What a server gets of one-sample uploads from a first layer in a secret frame.

    A one-sample weight gradient is rank one, ``(A^-1 delta) (B^-1 x)^T``, in any frame: its top
    right singular vector is ``B^-1 x`` up to scale and sign. The scale is lost; the signs are
    aligned on the main axis of all the vectors (which sign flips do not change).
    """
    vectors = np.stack(
        [np.linalg.svd(g[weight].double().numpy(), full_matrices=False)[2][0] for g in gradients]
    )
    axis = np.linalg.svd(vectors, full_matrices=False)[2][0]
    signs = np.sign(vectors @ axis)
    signs[signs == 0] = 1.0
    return vectors * signs[:, None]


def spectral(
    task: Task, model: INFL, defence: str, view: AnnData, members, public, args
) -> list[dict]:
    """Spectral alignment attack (no key) on every one-sample upload of the largest site.

    Under secret frames the server reads each upload's first-layer gradient as a rank-one
    matrix (:func:`_framed_projections`), all uploads in the frame of the released model (the
    attacker's best case), and, as the protocol allows, in groups of one upload per site,
    each group in a frame of its own.
    """
    module = model.module
    name, layer = input_layer(module)
    weight = getattr(layer, "projected_weight_name", None)
    seen = None
    if model.secret_frame_ is not None:
        weight = weight or "weight"
        _, views = framed_attackers(module, model._key, model.secret_frame_, ["none"])
        seen = views["none"]
    if weight is None:
        return []
    data = model_data(model, view)
    log_var = bool(getattr(module, "log_variational", True))
    sites = data.sites[members]
    largest = np.bincount(sites).argmax()
    victims = np.flatnonzero(members & (data.sites == largest))
    if args.spectral_uploads:
        rng = np.random.default_rng([args.seed, 4])
        victims = np.sort(rng.choice(victims, min(args.spectral_uploads, len(victims)), False))
    public_rows = np.flatnonzero(public)
    public_x = data.encoder_input(public_rows, log_var)
    reference = public_x.mean(0)
    truths = data.encoder_input(victims, log_var)
    gradients = [upload_gradient(module, data.tensors([v])) for v in victims]
    if seen is None:
        projections = np.stack([analytic_inversion(g, name, weight) for g in gradients])
    else:
        projections = _framed_projections([seen(g) for g in gradients], f"{name}.{weight}")
    # under secret frames a frame holds at most one upload per site (frame_id): the protocol's
    # case, each group of n_sites uploads in a frame of its own, next to the one-frame case
    groups = [(len(victims), [projections])]
    if seen is not None:
        n_sites = int(task.adata.obs["site"].nunique())
        chunks = []
        for start in range(0, len(victims), n_sites):
            frame = f"audit-spectral-{start}"
            _, views = framed_attackers(module, model._key, frame, ["none"])
            chunk = [views["none"](g) for g in gradients[start : start + n_sites]]
            chunks.append(_framed_projections(chunk, f"{name}.{weight}"))
        groups.append((n_sites, chunks))
    all_x = data.encoder_input(np.arange(data.n_obs), log_var)
    n_cands = min(100, data.n_obs)
    k_top = max(1, min(50, module.n_input // 2))
    _, _, v = np.linalg.svd(public_x - reference, full_matrices=False)
    rows = []
    for per_frame, chunks in groups:
        for k in args.spectral_components:
            if k >= min(len(victims), len(public_rows)):
                continue
            recs = np.concatenate(
                [
                    spectral_alignment_attack(c, public_x, n_components=min(k, len(c) - 1))
                    if len(c) > 1
                    else np.broadcast_to(reference, c.shape[:1] + reference.shape)
                    for c in chunks
                ]
            )
            pc = partial_correlation(recs, truths, reference)
            if seen is not None and np.mean(pc) < 0:
                # the scale-free projections leave one global sign open: give it to the attacker
                recs = 2 * reference - recs
                pc = partial_correlation(recs, truths, reference)
            top = [top_k_overlap(r, t, k_top, reference) for r, t in zip(recs, truths, strict=True)]
            reid = reidentification_rate(recs, victims, all_x, reference, n_cands, seed=args.seed)
            # the best the attack could do: the public principal subspace applied to the truth
            oracle = reference + (truths - reference) @ v[:k].T @ v[:k]
            rows.append(
                {
                    "dataset": task.name,
                    "defence": defence,
                    "n_components": k,
                    "n_uploads": len(victims),
                    "uploads_per_frame": per_frame,
                    "n_public": len(public_rows),
                    "reidentification": reid,
                    "partial_corr": float(np.mean(pc)),
                    "partial_corr_sd": float(np.std(pc)),
                    "top_overlap": float(np.mean(top)),
                    "oracle_partial_corr": float(
                        np.mean(partial_correlation(oracle, truths, reference))
                    ),
                    "oracle_reidentification": reidentification_rate(
                        oracle, victims, all_x, reference, n_cands, seed=args.seed
                    ),
                }
            )
            logger.info("%s %s spectral k=%d: %s", task.name, defence, k, rows[-1])
    return rows


# -- tables ----------------------------------------------------------------------------------
def _fmt(value, pct=False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{100 * value:.0f}%" if pct else f"{value:.2f}"


def _guesses(table: pd.DataFrame, defence: str) -> list[str]:
    return ["none", "wrong", "correct"] if guessed(defence) else ["none"]


def reconstruction_table(audit_df: pd.DataFrame, uploads: list[str]) -> pd.DataFrame:
    """Rows defence x key guess; cells "re-identification / partial correlation"."""
    rows = []
    attacks = [a for a in RECONSTRUCTION if a in set(audit_df["attack"])]
    for defence in audit_df["defence"].unique():
        d = audit_df[audit_df["defence"] == defence]
        for guess in _guesses(d, defence):
            row = {"defence": defence, "key": guess if guessed(defence) else "n/a"}
            for upload in uploads:
                for attack in attacks:
                    if not ((audit_df.attack == attack) & (audit_df.upload == upload)).any():
                        continue  # not run on this upload size
                    cell = d[(d.attack == attack) & (d.key_guess == guess) & (d.upload == upload)]
                    values = cell.set_index("metric")["value"]
                    col = f"{attack} ({upload})"
                    if values.empty:
                        row[col] = "–"
                    else:
                        row[col] = (
                            f"{_fmt(values.get('reidentification'), pct=True)} / "
                            f"{_fmt(values.get('partial_corr'))}"
                        )
            ig = d[
                (d.attack == "inverting-gradients")
                & (d.key_guess == guess)
                & (d.upload == "one-sample")
                & (d.metric == "label_recovery")
            ]
            row["label recovery (IG, 1)"] = _fmt(ig["value"].iloc[0], pct=True) if len(ig) else "–"
            matched = d[(d.attack == "label-prevalence") & (d.key_guess == guess)]
            row["label recovery (prevalence-matched, 1)"] = (
                _fmt(matched["value"].iloc[0], pct=True) if len(matched) else "–"
            )
            rows.append(row)
    return pd.DataFrame(rows)


def model_table(audit_df: pd.DataFrame) -> pd.DataFrame:
    """Membership, wrong-key inference and utility: rows defence x key guess."""
    rows = []
    for defence in audit_df["defence"].unique():
        d = audit_df[audit_df["defence"] == defence]
        for guess in _guesses(d, defence):
            g = d[(d.key_guess == guess) & (d.upload == "global-model")]

            def get(attack, metric, g=g):
                # membership may be measured on the models of several seeds: their mean
                v = g[(g.attack == attack) & (g.metric == metric)]["value"]
                return float(v.mean()) if len(v) else np.nan

            def auc(attack, g=g):
                v = g[(g.attack == attack) & (g.metric == "auc")]["value"]
                if len(v) < 2:
                    return _fmt(get(attack, "auc"))
                return f"{v.mean():.2f} ± {v.std(ddof=1):.2f} ({len(v)})"

            acc = get("inference", "accuracy")
            chance = g[(g.attack == "inference") & (g.metric == "accuracy")]["chance"]
            rows.append(
                {
                    "defence": defence,
                    "key": guess if guessed(defence) else "n/a",
                    "LOSS AUC": auc("loss"),
                    "RMIA AUC": auc("rmia"),
                    "RMIA TPR@1%": _fmt(get("rmia", "tpr@1%fpr")),
                    "inference acc (chance)": (
                        f"{_fmt(acc)} ({_fmt(float(chance.iloc[0]))})" if len(chance) else "–"
                    ),
                    "inference kNN acc": _fmt(get("inference", "knn_accuracy")),
                    "inference ARI": _fmt(get("inference", "ari")),
                    # the same metrics on principal components of the input: no model at all
                    "kNN acc / ARI, no model": _no_model(d),
                }
            )
    return pd.DataFrame(rows)


UTILITY_METRICS = ("accuracy", "macro_f1", "ari_kmeans")


def _no_model(table: pd.DataFrame) -> str:
    """kNN accuracy / ARI of the inference utility's model-free reference ("no model")."""
    ref = table[(table.key_guess == "no model") & (table.attack == "inference")]
    if ref.empty:
        return "–"
    values = ref.groupby("metric")["value"].mean()
    return f"{_fmt(values.get('knn_accuracy'))} / {_fmt(values.get('ari'))}"


def utility_deltas(util: pd.DataFrame) -> pd.DataFrame:
    """Per seed: each defence's metrics minus plain FedAvg's on the same split (paired)."""
    plain = util[util["defence"] == "plain"].set_index("seed")[list(UTILITY_METRICS)]
    rows = []
    for _, row in util.iterrows():
        if row["seed"] in plain.index:
            base = plain.loc[row["seed"]]
            rows.append(
                {"defence": row["defence"], "seed": row["seed"]}
                | {m: row[m] - base[m] for m in UTILITY_METRICS}
            )
    return pd.DataFrame(rows, columns=["defence", "seed", *UTILITY_METRICS])


def utility_table(util: pd.DataFrame) -> pd.DataFrame:
    """Utility of each defence (correct key) on the held-out rows: mean ± sd over seeds, and
    the paired difference to plain FedAvg."""
    deltas = utility_deltas(util)
    rows = []
    for defence in util["defence"].unique():
        u = util[util["defence"] == defence]
        dd = deltas[deltas["defence"] == defence]
        row = {"defence": defence, "seeds": len(u), "n_test": int(u["n_test"].median())}
        for metric in UTILITY_METRICS:
            sd = f" ± {u[metric].std(ddof=1):.3f}" if len(u) > 1 else ""
            row[metric] = f"{u[metric].mean():.3f}{sd}"
        for metric in ("accuracy", "ari_kmeans"):
            if len(dd) and defence != "plain":
                sd = f" ± {100 * dd[metric].std(ddof=1):.1f}" if len(dd) > 1 else ""
                row[f"Δ{metric} vs plain"] = f"{100 * dd[metric].mean():+.1f}{sd} pt"
            else:
                row[f"Δ{metric} vs plain"] = "–"
        eps = u["epsilon"].dropna()
        row["epsilon (δ=1e-5)"] = f"{eps.mean():.3g}" if len(eps) else "–"
        row["train s"] = f"{u['train_s'].mean():.0f}"
        rows.append(row)
    return pd.DataFrame(rows)


def checks(audit_df: pd.DataFrame, util: pd.DataFrame, spectral_df: pd.DataFrame) -> pd.DataFrame:
    """targets (docs/targets.md), per keyed defence: met or not (attacks without the key)."""
    rows = []
    deltas = utility_deltas(util)
    for defence in audit_df["defence"].unique():
        d = audit_df[audit_df["defence"] == defence]
        no_key = d[d.key_guess.isin(["none", "wrong"])]
        one = no_key[(no_key.upload == "one-sample") & no_key.attack.isin(RECONSTRUCTION)]
        reid = one[one.metric == "reidentification"]["value"].max()
        pc = one[one.metric == "partial_corr"]["value"].max()
        if spectral_df is not None and len(spectral_df):
            s = spectral_df[spectral_df["defence"] == defence]
            if len(s) and "uploads_per_frame" in s and s["uploads_per_frame"].notna().any():
                # secret frames: the protocol's case (a frame holds one upload per site); the
                # one-frame case (the attacker's best) is in the spectral table
                s = s[s["uploads_per_frame"] == s["uploads_per_frame"].min()]
            if len(s):
                reid = max(reid, s["reidentification"].max())
                pc = max(pc, s["partial_corr"].max())
        inf = no_key[(no_key.attack == "inference") & (no_key.metric == "accuracy")]
        excess = (inf["value"] - inf["chance"]).max() if len(inf) else np.nan
        # the latent space without the key against what the rows give without any model
        ref = d[(d.key_guess == "no model") & (d.metric == "knn_accuracy")]["value"]
        knn = no_key[(no_key.attack == "inference") & (no_key.metric == "knn_accuracy")]
        gain = knn["value"].max() - ref.mean() if len(ref) and len(knn) else np.nan
        # an AUC below 0.5 is as informative as its mirror: an attacker flips its decision
        # (after the mean over seeds: a direction that changes from model to model is chance)
        aucs = no_key[no_key.metric == "auc"].groupby(["attack", "key_guess"])["value"].mean()
        auc = float(np.maximum(aucs, 1 - aucs).max()) if len(aucs) else np.nan
        dd = deltas[deltas["defence"] == defence]
        dacc = float(dd["accuracy"].mean()) if len(dd) else np.nan
        rows.append(
            {
                "defence": defence,
                "max re-id (1-sample, no key, incl. spectral)": (
                    f"{100 * reid:.0f}% {'✓' if reid <= 0.02 else '✗'}" if pd.notna(reid) else "–"
                ),
                "max partial corr": f"{pc:.2f} {'✓' if pc <= 0.1 else '✗'}"
                if pd.notna(pc)
                else "–",
                "wrong/no-key acc - chance": (
                    f"{excess:+.2f} {'✓' if excess <= 0.05 else '✗'}" if pd.notna(excess) else "–"
                ),
                "no-key latent kNN - no model": (
                    f"{gain:+.2f} {'✓' if gain <= 0 else '✗'}" if pd.notna(gain) else "–"
                ),
                "max membership AUC (or 1 - AUC)": (
                    f"{auc:.2f} {'✓' if auc <= 0.55 else '✗'}" if pd.notna(auc) else "–"
                ),
                "Δacc vs plain (mean)": (
                    f"{100 * dacc:+.1f} pt {'✓' if dacc >= -0.01 else '✗'}"
                    if pd.notna(dacc)
                    else "–"
                ),
            }
        )
    return pd.DataFrame(rows)


def markdown(audit_df, util, spectral_df, args, minutes: float) -> str:
    lines = [
        "<!-- generated by benchmarks/privacy.py; do not edit by hand -->",
        f"Command: `{args.command}` ({minutes:.0f} min on 2 CPU cores).",
        "",
    ]
    for dataset in audit_df["dataset"].unique():
        a = audit_df[audit_df["dataset"] == dataset].drop(columns="dataset")
        u = util[util["dataset"] == dataset]
        s = spectral_df[spectral_df["dataset"] == dataset] if len(spectral_df) else spectral_df
        uploads = [x for x in a["upload"].unique() if x != "global-model"]
        scored = a[a.upload.isin(uploads) & (a.attack != "label-prevalence")]
        n_scored = scored.groupby(["upload", "attack"], sort=False)["n"].max()
        n_scored = ", ".join(f"{n} ({a}, {u})" for (u, a), n in n_scored.items())
        lines += [
            f"### {dataset}: reconstruction",
            "",
            "Re-identification among 100 candidates (chance 1%) / partial correlation given the "
            f"public mean profile (chance 0), mean over the reconstructions scored: {n_scored}; "
            "a batch upload's reconstruction is scored against the row it matches best, so "
            "its re-identification chance is about batch size / 100, not 1%. Label recovery: "
            "iDLG (the classifier's output-bias gradient) on one-sample uploads, the output unit "
            "read through the key guess's class order (IG), or through the order that matches "
            "the units' frequencies over 100 uploads to the public label counts "
            "(prevalence-matched, no key).",
            "",
            reconstruction_table(a, uploads).to_markdown(index=False),
            "",
            f"### {dataset}: membership inference and the model without the key",
            "",
            "AUCs over several models (`--membership-seeds`): mean ± sd (number of models).",
            "",
            model_table(a).to_markdown(index=False),
            "",
            f"### {dataset}: utility (held-out rows, correct key)",
            "",
            utility_table(u).to_markdown(index=False),
            "",
        ]
        if len(s):
            lines += [
                f"### {dataset}: spectral alignment attack (no key)",
                "",
                s.drop(columns="dataset").round(3).to_markdown(index=False),
                "",
            ]
        lines += [
            f"### {dataset}: targets (docs/targets.md)",
            "",
            checks(a, u, s).to_markdown(index=False),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--datasets", nargs="+", default=["cptac", "kang"])
    parser.add_argument(
        "--defences",
        nargs="+",
        default=["plain", "dp-0.01", "dp-0.3", "pooled", "feature", "feature-inr"],
    )
    parser.add_argument("--dp-clip", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--validation-size", type=float, default=0.1)
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--kang-cells", type=int, default=3000)
    parser.add_argument("--kang-genes", type=int, default=1000)
    parser.add_argument("--kang-min-cells", type=int, default=30)
    parser.add_argument(
        "--attacks",
        nargs="+",
        default=ATTACKS,
        choices=ATTACKS,
        help="attacks of the one-sample audit (default: all)",
    )
    parser.add_argument("--victims", type=int, default=4, help="one-sample uploads attacked")
    parser.add_argument(
        "--analytic-victims",
        type=int,
        help="one-sample uploads attacked by the analytic attacks (default: --victims)",
    )
    parser.add_argument(
        "--membership-seeds",
        action="store_true",
        help="also run LOSS and RMIA on the model of every utility seed (mean AUC over seeds)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="rows of a batch upload (0: none)"
    )
    parser.add_argument("--batch-uploads", type=int, default=3, help="batch uploads attacked")
    parser.add_argument(
        "--batch-attacks",
        nargs="+",
        default=["analytic", "decoder-inversion"],
        help="attacks on batch uploads (add inverting-gradients if time allows)",
    )
    parser.add_argument("--dlg-iters", type=int, default=100)
    parser.add_argument("--references", type=int, default=4, help="RMIA reference models")
    parser.add_argument("--spectral", action="store_true", help="run the spectral attack")
    parser.add_argument("--spectral-components", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--spectral-uploads", type=int, default=500)
    parser.add_argument(
        "--spectral-only",
        action="store_true",
        help="train each defence and run the spectral attack only (no audit, no utility)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny settings")
    parser.add_argument(
        "--utility-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds (held-out splits) of the utility table; the audit uses --seed",
    )
    parser.add_argument("--out", default="benchmarks/results/privacy")
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite <out>.md from the CSV files"
    )
    args = parser.parse_args(argv)
    args.command = "python benchmarks/privacy.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.quick:
        args.rounds, args.victims, args.dlg_iters, args.references = 3, 2, 10, 2
        args.batch_uploads, args.batch_attacks = 1, RECONSTRUCTION
        args.kang_cells, args.kang_genes = 1000, 200
        args.spectral_uploads, args.spectral_components = 100, [5]
        args.utility_seeds = [args.seed]
        if args.out == parser.get_default("out"):
            args.out = "benchmarks/results/privacy_quick"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("scvi", "scinfl", "lightning", "flwr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("scinfl.privacy").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        audit_df, util = (pd.read_csv(f"{out}_{part}.csv") for part in ("audit", "utility"))
        try:
            spectral_df = pd.read_csv(f"{out}_spectral.csv")
        except pd.errors.EmptyDataError:
            spectral_df = pd.DataFrame()
        meta = json.loads(Path(f"{out}_meta.json").read_text())
        args.command, minutes = meta["command"], meta["minutes"]
        args.minutes = minutes
        write(out, audit_df, util, spectral_df, args, None)
        print(Path(f"{out}.md").read_text())
        return
    makers = {"cptac": cptac_task, "kang": kang_task}
    start = time.perf_counter()
    audits, utils, spectra = [], [], []
    for dataset in args.datasets:
        task = makers[dataset](args, args.seed)
        for defence in args.defences:
            model, seconds = train(task, defence, args, args.seed)
            logger.info("%s %s: trained in %.0f s", dataset, defence, seconds)
            view, members, public = audit_view(task, model, args)
            if args.spectral_only:
                spectra += spectral(task, model, defence, view, members, public, args)
                pd.DataFrame(spectra).to_csv(f"{out}_spectral.csv", index=False)
                continue
            t0 = time.perf_counter()
            common = {
                "members": members,
                "public": public,
                # under secure aggregation the server sees the sum of all sites' uploads
                "aggregated_sites": (task.adata.obs["site"].nunique() if secure(defence) else 1),
                "dlg_iters": args.dlg_iters,
                "n_references": args.references,
                "defence": defence,
                "seed": args.seed,
            }
            # one-sample uploads (the worst case) with every attack; batch uploads apart, with
            # their own number of uploads and attacks (gradient matching on 32 rows is costly)
            analytic_victims = args.analytic_victims or args.victims
            fast = [a for a in args.attacks if a in ANALYTIC]
            if analytic_victims == args.victims or not fast:
                table = audit(model, view, attacks=args.attacks, n_victims=args.victims, **common)
            else:
                slow = [a for a in args.attacks if a not in ANALYTIC]
                table = pd.concat(
                    [
                        audit(model, view, attacks=fast, n_victims=analytic_victims, **common),
                        audit(model, view, attacks=slow, n_victims=args.victims, **common),
                    ],
                    ignore_index=True,
                )
            if args.batch_size:
                batch = audit(
                    model,
                    view,
                    attacks=args.batch_attacks,
                    upload_sizes=[args.batch_size],
                    n_victims=args.batch_uploads,
                    **common,
                )
                table = pd.concat([table, batch], ignore_index=True)
            logger.info("%s %s: audited in %.0f s", dataset, defence, time.perf_counter() - t0)
            table.insert(0, "dataset", dataset)
            table["seed"] = args.seed
            audits.append(table)
            utils.append(_utility_row(task, model, defence, args.seed, seconds, args))
            if args.spectral and (
                framed(defence) or parse_defence(defence)[0] in ("feature", "feature-inr")
            ):
                spectra += spectral(task, model, defence, view, members, public, args)
            write(out, pd.concat(audits), pd.DataFrame(utils), pd.DataFrame(spectra), args, start)
        # utility over more seeds: other held-out splits (and simulated sites), no audit
        for seed in [] if args.spectral_only else args.utility_seeds:
            if seed == args.seed:
                continue
            other = makers[dataset](args, seed)
            for defence in args.defences:
                model, seconds = train(other, defence, args, seed)
                utils.append(_utility_row(other, model, defence, seed, seconds, args))
                if args.membership_seeds:
                    view, members, public = audit_view(other, model, args, seed)
                    table = audit(
                        model,
                        view,
                        attacks=MEMBERSHIP,
                        members=members,
                        public=public,
                        n_references=args.references,
                        defence=defence,
                        seed=seed,
                    )
                    table.insert(0, "dataset", dataset)
                    table["seed"] = seed
                    audits.append(table)
            write(out, pd.concat(audits), pd.DataFrame(utils), pd.DataFrame(spectra), args, start)
    if args.spectral_only:
        print(pd.DataFrame(spectra).to_string())
        return
    print(Path(f"{out}.md").read_text())


def _utility_row(task, model, defence, seed, seconds, args) -> dict:
    row = {
        "dataset": task.name,
        "defence": defence,
        "seed": seed,
        **utility(task, model, seed),
        "epsilon": model.dp_epsilon_,
        "train_s": seconds,
    }
    logger.info("%s %s seed %d: utility %s", task.name, defence, seed, row)
    return row


def write(out: Path, audit_df, util, spectral_df, args, start: float | None) -> None:
    """CSV files and the markdown tables (rewritten after every defence)."""
    audit_df.to_csv(f"{out}_audit.csv", index=False)
    util.to_csv(f"{out}_utility.csv", index=False)
    spectral_df.to_csv(f"{out}_spectral.csv", index=False)
    minutes = (time.perf_counter() - start) / 60 if start is not None else args.minutes
    Path(f"{out}_meta.json").write_text(
        json.dumps({"command": args.command, "minutes": minutes}) + "\n"
    )
    text = markdown(audit_df.reset_index(drop=True), util, spectral_df, args, minutes)
    Path(f"{out}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
