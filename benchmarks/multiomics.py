"""Multi-omics clustering across sites, full and mosaic: MultiOmicsINFL against its peers.

Protocol (docs/multiomics.md):

- data: CPTAC UCEC tumours with proteomics, transcriptomics and a ``Genomics_subtype`` (101;
  4 subtypes), sites by TMT plex (the 4 blocks of ``benchmarks/proteomics.py``); proteins
  observed in >= 50% of the samples of every site, then the 1,000 most variable proteins and
  genes (pooled variance: the same inputs for every method). Synthetic CITE-seq-like RNA +
  protein counts (``scinfl.data.synthetic_multiome``, 400 cells, 6 types, 3 sites) where each
  modality alone tells part of the type.
- variants: ``full`` (every site every modality) and ``mosaic`` (the first site without its
  second modality, the second without its first, the others both).
- metrics: ARI and NMI of k-means (k = number of classes) of the latent against the truth;
  5-NN leave-one-out accuracy of the latent. WNN has no embedding: Leiden clusters of its
  graph (resolution chosen to give k clusters where possible) and its 5 nearest neighbours.
  Mosaic rows are scored on all samples (those of one-modality sites from that modality only)
  and, in brackets in the notes, on the samples with every modality.
- 3 seeds (model initialisation, key, k-means, MOFA+, Leiden); mean and standard deviation.

Usage (peers need the ``benchmarks`` dependency group: muon, mofapy2)::

    uv run --group benchmarks python benchmarks/multiomics.py
    uv run --group benchmarks python benchmarks/multiomics.py --quick   # 1 seed, few rounds
    uv run python benchmarks/multiomics.py --no-peers --data cptac --seeds 0  # keeps the peers' rows
    uv run --group benchmarks python benchmarks/multiomics.py --peers-only mofa --seeds 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

import scinfl
from scinfl.federated import agree_features
from scinfl.model import INFL, MultiOmicsINFL

logger = logging.getLogger("multiomics")
RESULTS = Path(__file__).parent / "results" / "multiomics.md"
PLEX_BLOCKS = {"A": range(1, 5), "B": range(5, 9), "C": range(9, 13), "D": range(13, 18)}
N_FEATURES = 1000
K_NEIGHBOURS = 5


# -- data ------------------------------------------------------------------------------------
def _plex_site(plex) -> str:
    return next(name for name, block in PLEX_BLOCKS.items() if int(plex) in block)


def _top_variable(adata: AnnData, n: int) -> AnnData:
    variance = np.nanvar(np.asarray(adata.X, dtype=np.float64), axis=0)
    keep = np.sort(np.argsort(-np.nan_to_num(variance))[:n])
    return adata[:, keep].copy()


def load_cptac() -> tuple[MuData, str, list[str]]:
    """Tumours with both omics and a subtype; sites by TMT plex; 1,000 features per omics."""
    mdata = scinfl.data.cptac_ucec(omics=("proteomics", "transcriptomics"))
    obs = mdata.obs
    both = mdata.obs_names[
        mdata.obs_names.isin(mdata.mod["proteomics"].obs_names)
        & mdata.obs_names.isin(mdata.mod["transcriptomics"].obs_names)
        & obs["Genomics_subtype"].notna().to_numpy()
    ]
    site = obs.loc[both, "Proteomics_TMT_plex"].map(_plex_site).astype(str)
    mods = {}
    for name in ("proteomics", "transcriptomics"):
        mod = mdata.mod[name][both].copy()
        mod.obs["site"] = site.to_numpy()
        if name == "proteomics":
            mod = mod[:, agree_features(mod, "site", max_missing=0.5)].copy()
        mods[name] = _top_variable(mod, N_FEATURES)
        mods[name].obs = pd.DataFrame(index=mods[name].obs_names)
    out = MuData(mods)
    out.obs["truth"] = pd.Categorical(obs.loc[out.obs_names, "Genomics_subtype"].astype(str))
    out.obs["site"] = pd.Categorical(site.loc[out.obs_names].to_numpy())
    return out, "truth", ["proteomics", "transcriptomics"]


def load_synthetic(seed: int = 0) -> tuple[MuData, str, list[str]]:
    """CITE-seq-like counts, 400 cells, 6 cell types, 3 sites."""
    mdata = scinfl.data.synthetic_multiome(n_obs=400, n_sites=3, seed=seed)
    mdata.obs["truth"] = mdata.obs["cell_type"]
    return mdata, "truth", ["rna", "prot"]


def mosaic(mdata: MuData, modalities: list[str]) -> MuData:
    """First site without the second modality, second site without the first; padded."""
    sites = list(mdata.obs["site"].cat.categories)
    absent = {sites[0]: modalities[1], sites[1]: modalities[0]}
    padded = scinfl.pp.pad_modalities(scinfl.data.make_mosaic(mdata, "site", absent))
    padded.obs["site"] = pd.Categorical(padded.obs["site"], categories=sites)
    return padded


# -- metrics ---------------------------------------------------------------------------------
def knn_accuracy(neighbours: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of the majority label among each sample's neighbours."""
    votes = [np.bincount(y[row], minlength=y.max() + 1).argmax() for row in neighbours]
    return float(np.mean(np.asarray(votes) == y))


def score_latent(z: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    k = len(np.unique(y))
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(z)
    _, idx = NearestNeighbors(n_neighbors=K_NEIGHBOURS + 1).fit(z).kneighbors(z)
    return {
        "ARI": adjusted_rand_score(y, labels),
        "NMI": normalized_mutual_info_score(y, labels),
        "kNN acc": knn_accuracy(idx[:, 1:], y),
    }


def latent_shift(z_all: np.ndarray, z_one: np.ndarray) -> float:
    """Median distance of a sample's latent from all modalities and from one, relative to the
    median distance between two samples' latents (from all modalities)."""
    rng = np.random.default_rng(0)
    pairs = rng.integers(len(z_all), size=(2000, 2))
    spread = np.median(np.linalg.norm(z_all[pairs[:, 0]] - z_all[pairs[:, 1]], axis=1))
    return float(np.median(np.linalg.norm(z_all - z_one, axis=1)) / spread)


# -- methods ---------------------------------------------------------------------------------
def seed_key(seed: int) -> scinfl.Key:
    """The key of seed ``seed``: the same in every run, so rows and reruns compare pairwise
    (with or without the key, full or mosaic) rather than across keys."""
    return scinfl.Key(hashlib.sha256(f"benchmarks/multiomics seed {seed}".encode()).digest())


def _multiomics(mdata, modalities, key_mode, seed, rounds, centralized=False):
    torch.manual_seed(seed)
    MultiOmicsINFL.setup_mudata(mdata, modalities, site_key="site")
    key = seed_key(seed) if key_mode else None
    model = MultiOmicsINFL(mdata, key=key, key_mode=key_mode)
    if centralized:
        model.train_centralized(max_epochs=rounds, progress_bar=False, seed=seed)
    else:
        model.train_federated(max_rounds=rounds, progress_bar=False, seed=seed)
    return model


def _single(mdata, name, seed, rounds):
    mod = mdata.mod[name].copy()
    mod.obs["site"] = mdata.obs["site"].to_numpy()
    likelihood = "nb" if name in ("rna", "prot") else "normal"
    torch.manual_seed(seed)
    INFL.setup_anndata(mod, site_key="site")
    model = INFL(mod, key=seed_key(seed), gene_likelihood=likelihood)
    model.train_federated(max_rounds=rounds, progress_bar=False, seed=seed)
    return model.get_latent()


def _log_normalised(mod: AnnData) -> np.ndarray:
    X = np.asarray(mod.X.toarray() if hasattr(mod.X, "toarray") else mod.X, dtype=np.float64)
    if np.nanmin(X) >= 0 and np.allclose(np.nan_to_num(X), np.round(np.nan_to_num(X))):
        X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    return X


def _pca(mod: AnnData, seed: int, n: int = 15) -> np.ndarray:
    X = _log_normalised(mod)
    X = (X - np.nanmean(X, 0)) / (np.nanstd(X, 0) + 1e-8)
    return PCA(n, random_state=seed).fit_transform(np.nan_to_num(X))


def _mofa(mdata, modalities, seed):
    import muon as mu

    data = MuData({name: AnnData(_log_normalised(mdata.mod[name])) for name in modalities})
    for name in modalities:
        data.mod[name].obs_names = mdata.obs_names
    data.update()
    mu.tl.mofa(data, n_factors=15, seed=seed, quiet=True, verbose=False, outfile=None)
    return np.asarray(data.obsm["X_mofa"])


def _wnn(mdata, modalities, seed, k):
    import muon as mu
    import scanpy as sc

    data = MuData({name: AnnData(_pca(mdata.mod[name], seed)) for name in modalities})
    for name in modalities:
        data.mod[name].obs_names = mdata.obs_names
        data.mod[name].obsm["X_pca"] = data.mod[name].X
        sc.pp.neighbors(data.mod[name], use_rep="X_pca", random_state=seed)
    data.update()
    mu.pp.neighbors(data, n_multineighbors=min(200, data.n_obs - 1), random_state=seed)
    labels = None
    for resolution in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0):
        sc.tl.leiden(
            data,
            resolution=resolution,
            random_state=seed,
            flavor="igraph",
            n_iterations=2,
            directed=False,
        )
        labels = data.obs["leiden"].cat.codes.to_numpy()
        if len(np.unique(labels)) >= k:
            break
    distances = data.obsp["distances"].tocsr()
    neighbours = np.stack([row.indices[np.argsort(row.data)][:K_NEIGHBOURS] for row in distances])
    return labels, neighbours


def _totalvi(mdata, seed):
    import scvi

    scvi.settings.seed = seed
    data = mdata.copy()
    scvi.model.TOTALVI.setup_mudata(
        data,
        rna_layer=None,
        protein_layer=None,
        modalities={"rna_layer": "rna", "protein_layer": "prot"},
    )
    model = scvi.model.TOTALVI(data)
    model.train(max_epochs=50, enable_progress_bar=False)
    return model.get_latent_representation()


# -- the run ---------------------------------------------------------------------------------
def run_dataset(name, loader, seeds, rounds, peers, stem):
    rows, shifts = [], []
    csv = RESULTS.with_name(f"multiomics_{stem}.csv")
    # without the peers (minutes each), their rows already in the CSV are kept
    kept = pd.DataFrame()
    if not peers and csv.exists():
        kept = pd.read_csv(csv)
        kept = kept[kept["method"].str.startswith(PEERS)]
    mdata, truth, modalities = loader()
    y = mdata.obs[truth].cat.codes.to_numpy()
    mos = mosaic(mdata, modalities)
    y_mos = mos.obs[truth].cat.codes.to_numpy()
    sites = list(mdata.obs["site"].cat.categories)
    paired = ~mos.obs["site"].isin(sites[:2]).to_numpy()

    def record(variant, method, scores, seconds, note=""):
        rows.append(
            {
                "data": name,
                "variant": variant,
                "method": method,
                "seed": seed,
                **scores,
                "time_s": seconds,
                "note": note,
            }
        )
        logger.info("%s %s %s seed %d: %s", name, variant, method, seed, scores)
        # written as they come: a run cut short still leaves its rows
        pd.concat([pd.DataFrame(rows), kept]).to_csv(csv, index=False)
        if shifts:
            path = RESULTS.with_name(f"multiomics_shift_{stem}.csv")
            pd.DataFrame(shifts).to_csv(path, index=False)

    for seed in seeds:
        # cheap peers first: a run cut short by time still has them
        for m in modalities[::-1][:1]:
            start = time.perf_counter()
            record(
                "full",
                f"PCA of {m} (centralized)",
                score_latent(_pca(mdata.mod[m], seed), y, seed),
                time.perf_counter() - start,
            )
        if peers:
            record(*_peer("wnn", mdata, modalities, y, seed))
        for label, key_mode, central in (
            ("MultiOmicsINFL federated (key)", "pooled", False),
            ("federated, no key", None, False),
            ("centralized (same model)", "pooled", True),
        ):
            start = time.perf_counter()
            model = _multiomics(mdata.copy(), modalities, key_mode, seed, rounds, central)
            z = model.get_latent()
            record("full", label, score_latent(z, y, seed), time.perf_counter() - start)
            if label.startswith("MultiOmicsINFL"):
                for m in modalities:
                    z_one = model.get_latent(modalities=[m])
                    shifts.append(
                        {
                            "data": name,
                            "modality": m,
                            "seed": seed,
                            "shift": latent_shift(z, z_one),
                            **{
                                f"{k_} ({m} only)": v
                                for k_, v in score_latent(z_one, y, seed).items()
                            },
                        }
                    )
                # the full-data model given the mosaic's inputs
                z_mos = _mosaic_inputs(model, mdata, modalities, sites)
                record(
                    "mosaic", "full-data model, mosaic inputs", score_latent(z_mos, y, seed), np.nan
                )
            if not label.startswith("MultiOmicsINFL"):
                continue
            start = time.perf_counter()
            model = _multiomics(mos.copy(), modalities, key_mode, seed, rounds, central)
            z = model.get_latent()
            both = score_latent(z[paired], y_mos[paired], seed)
            record(
                "mosaic",
                label,
                score_latent(z, y_mos, seed),
                time.perf_counter() - start,
                f"samples with both: ARI {both['ARI']:.3f}",
            )
        for m in modalities:
            start = time.perf_counter()
            record(
                "full",
                f"single-modality INFL ({m})",
                score_latent(_single(mdata, m, seed, rounds), y, seed),
                time.perf_counter() - start,
            )
        if peers and seed == 0:  # MOFA+ takes minutes a run here: once (--peers-only: more)
            record(*_peer("mofa", mdata, modalities, y, seed))
        if peers and seed == 0 and "prot" in modalities:  # totalVI: minutes a run here
            record(*_peer("totalvi", mdata, modalities, y, seed))
    return rows, shifts


def _peer(which, mdata, modalities, y, seed) -> tuple:
    """``record``'s arguments for peer ``which`` (``wnn``, ``mofa``, ``totalvi``) on one seed."""
    start = time.perf_counter()
    if which == "wnn":
        labels, neighbours = _wnn(mdata, modalities, seed, len(np.unique(y)))
        scores = {
            "ARI": adjusted_rand_score(y, labels),
            "NMI": normalized_mutual_info_score(y, labels),
            "kNN acc": knn_accuracy(neighbours, y),
        }
        note = f"{len(np.unique(labels))} clusters"
        return "full", PEER_METHODS[which], scores, time.perf_counter() - start, note
    latent = _mofa(mdata, modalities, seed) if which == "mofa" else _totalvi(mdata, seed)
    return "full", PEER_METHODS[which], score_latent(latent, y, seed), time.perf_counter() - start


def run_peers_only(name, loader, seeds, which) -> None:
    """Peers ``which`` on each seed, into that seed's CSV (rows of the same peer replaced).

    The peers are centralized and take minutes a run, so the full benchmark runs MOFA+ and
    totalVI on seed 0 only; this adds the other seeds, so that every row can have as many.
    """
    mdata, truth, modalities = loader()
    y = mdata.obs[truth].cat.codes.to_numpy()
    stem = name.split()[0].lower()
    for seed in seeds:
        csv = RESULTS.with_name(f"multiomics_{stem}_seeds{seed}.csv")
        for peer in which:
            if peer == "totalvi" and "prot" not in modalities:
                continue
            variant, method, scores, seconds, *note = _peer(peer, mdata, modalities, y, seed)
            logger.info("%s %s seed %d: %s", name, method, seed, scores)
            row = {"data": name, "variant": variant, "method": method, "seed": seed}
            row |= {**scores, "time_s": seconds, "note": note[0] if note else ""}
            old = (
                pd.read_csv(csv, float_precision="round_trip")
                if csv.exists()
                else pd.DataFrame(columns=list(row))
            )
            old = old[(old["method"] != method) | (old["seed"] != seed)]
            pd.concat([old, pd.DataFrame([row])]).to_csv(csv, index=False)


def _mosaic_inputs(model, mdata, modalities, sites):
    z = model.get_latent()
    site = mdata.obs["site"].to_numpy()
    for s, keep in ((sites[0], modalities[0]), (sites[1], modalities[1])):
        rows = np.flatnonzero(site == s)
        z[rows] = model.get_latent(indices=rows, modalities=[keep])
    return z


def table(rows: pd.DataFrame) -> str:
    metrics = ["ARI", "NMI", "kNN acc"]
    # full-data rows before the mosaic's, each data set's methods in the order they ran
    rows = rows.assign(full_first=rows["variant"] != "full").sort_values(
        ["data", "full_first"], kind="stable"
    )
    grouped = rows.groupby(["data", "variant", "method"], sort=False)
    out = grouped[metrics].agg(["mean", "std"])
    lines = [
        "| data | variant | method | ARI | NMI | kNN acc | seeds | time (s) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (data, variant, method), r in out.iterrows():
        cells = [
            f"{r[(m, 'mean')]:.3f} ± {0 if np.isnan(r[(m, 'std')]) else r[(m, 'std')]:.3f}"
            for m in metrics
        ]
        g = grouped.get_group((data, variant, method))
        note = _note(g["note"])
        lines.append(
            f"| {data} | {variant} | {method} | {' | '.join(cells)} | {len(g)} "
            f"| {g['time_s'].mean():.1f} | {note} |"
        )
    return "\n".join(lines)


def _note(notes: pd.Series) -> str:
    """One note for a row's seeds: the number of notes that differ only in it summarised."""
    notes = [n for n in notes if n]
    templates = {NUMBER.sub("{}", n) for n in notes}
    if len(notes) < 2 or len(templates) != 1 or next(iter(templates)).count("{}") != 1:
        return "; ".join(sorted(set(notes)))
    template = templates.pop()
    numbers = [NUMBER.search(n).group() for n in notes]
    values = [float(v) for v in numbers]
    if not any("." in v for v in numbers):
        low, high = int(min(values)), int(max(values))
        return template.format(str(low) if low == high else f"{low}-{high}")
    return template.format(f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}")


#: a number in a note
NUMBER = re.compile(r"\d+(\.\d+)?")
#: methods ``--no-peers`` skips (their rows already written are kept)
PEERS = ("muon WNN", "MOFA+", "totalVI")
PEER_METHODS = {
    "wnn": "muon WNN + Leiden (centralized)",
    "mofa": "MOFA+ (centralized, 15 factors)",
    "totalvi": "totalVI (centralized)",
}
ROUNDS = {"CPTAC UCEC": 60, "synthetic RNA+protein": 30}
LOADERS = {"CPTAC UCEC": load_cptac, "synthetic RNA+protein": load_synthetic}


def _markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 rounds")
    parser.add_argument("--data", nargs="+", default=["cptac", "synthetic"])
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--table", action="store_true", help="only write the table")
    parser.add_argument(
        "--peers-only",
        nargs="+",
        choices=sorted(PEER_METHODS),
        help="run only these peers on --seeds (into each seed's CSV), then write the table",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("scvi", "scinfl", "lightning", "mofapy2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    seeds = [0] if args.quick else args.seeds
    if args.table:
        write_table()
        return
    loaders = {name: (LOADERS[name], rounds) for name, rounds in ROUNDS.items()}
    chosen = {n: v for n, v in loaders.items() if n.split()[0].lower() in args.data}
    for name, (loader, rounds) in chosen.items():
        if args.peers_only:
            run_peers_only(name, loader, seeds, args.peers_only)
            continue
        stem = name.split()[0].lower() + "_seeds" + "-".join(map(str, seeds))
        run_dataset(name, loader, seeds, 20 if args.quick else rounds, not args.no_peers, stem)
    write_table(seeds if args.quick else None)


def write_table(quick_seeds=None) -> None:
    """``results/multiomics.md`` from the rows of every data set and seed written so far."""
    # the table holds every data set and seed run so far (one process each can run at once)
    rows = pd.concat(
        [
            pd.read_csv(p).fillna({"note": ""})
            for p in sorted(RESULTS.parent.glob("multiomics_*.csv"))
            if not p.stem.startswith("multiomics_shift_")
        ]
    )
    shifts = pd.concat(
        [pd.read_csv(p) for p in sorted(RESULTS.parent.glob("multiomics_shift_*.csv"))]
    )
    # one column per score, whichever modality the latent came from
    shifts.columns = [re.sub(r" \(.* only\)$", "", c) for c in shifts.columns]
    shifts = shifts.T.groupby(level=0, sort=False).first().T.infer_objects()
    shift_table = (
        shifts.groupby(["data", "modality"]).mean(numeric_only=True).drop(columns="seed").round(3)
    )
    text = (
        "# Multi-omics clustering across sites (benchmarks/multiomics.py)\n\n"
        f"Seeds {sorted(rows['seed'].unique().tolist())} (the seeds column: how many each row "
        "ran; the peers, minutes a run, fewer); "
        "rounds (epochs for centralized): "
        + ", ".join(f"{n}: {20 if quick_seeds else r}" for n, r in ROUNDS.items())
        + "; 1,000 most variable features per omics; every other setting at the library's "
        "defaults (key, secret frames, product of experts); one process per data set and "
        "seed, 1 CPU thread each (time is wall time, on a machine that ran other jobs: not a "
        "cost figure). Mosaic: the first site has only the first modality, the second only "
        "the second, the others both; scored on all samples (note: on the samples with "
        "both). `full-data model, mosaic inputs`: the model trained on full data, given "
        "each sample's mosaic modalities. Rerun: `python benchmarks/multiomics.py`.\n\n"
        + table(rows)
        + "\n\nLatent of the federated model from one modality against all (shift: median "
        "distance relative to the median distance between samples; scores of the "
        "one-modality latent):\n\n" + _markdown(shift_table.reset_index()) + "\n"
    )
    RESULTS.write_text(text)
    logger.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
