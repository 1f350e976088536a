"""Federated cancer subtyping on CPTAC UCEC proteomics: INFL against its baselines.

Protocol (docs/proteomics.md):

- sites: ``--split plex`` groups the 17 TMT plexes into 4 sites of consecutive plexes
  (1-4, 5-8, 9-12, 13-17); ``--split country`` uses the patient's country: a sample without a
  country takes the country of the same participant's other samples, Ukraine and Poland form
  one "Eastern Europe" site (Poland alone has 6-8 samples), and "Other_specify" plus the
  samples still without a country form an "Other/unknown" site (3 sites);
- tasks: ``tumor`` (Proteomics_Tumor_Normal, 4 classes) and ``subtype`` (Genomics_subtype
  among tumours, 4 classes, samples without a subtype dropped);
- stratified repeated K-fold over samples; every method sees the same folds; the test fold
  is used only for the reported metrics. Features are agreed by name on the training rows
  (each site keeps the proteins it observes in >= 50% of its training samples, intersection);
  model selection (best round) uses each site's validation rows inside the training folds.

Usage::

    uv run python benchmarks/proteomics.py --split plex --task tumor subtype
    uv run python benchmarks/proteomics.py --split country --task tumor subtype --repeats 1
    uv run python benchmarks/proteomics.py --quick      # 2 folds x 1 repeat, few rounds
    # the data as users have it, every setting at the library's defaults
    uv run python benchmarks/proteomics.py --defaults --transform none raw-scale \
        --methods "INFL default" centralized "logistic regression (pooled)"

``--defaults`` creates and trains the neural rows with the library's defaults: only the
data-dependent arguments (sites, labels, likelihood, key, seed) are given, and ``--set NAME=...``
adds a setting back. ``--transform raw-scale`` gives every protein as ``3 * x + 25`` (the scale
of raw log2 intensities) instead of the published log2 ratios. Each fold's key is derived from
the fold's seed (:func:`fold_key`), so runs and inputs are compared with the same keys.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import logging
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedShuffleSplit
from sklearn.preprocessing import StandardScaler

import scinfl
from scinfl.federated import SiteData, agree_features
from scinfl.model import INFL

TASKS = {
    "tumor": (
        "Proteomics_Tumor_Normal",
        ["Tumor", "Adjacent_normal", "Enriched_normal", "Myometrium_normal"],
    ),
    "subtype": ("Genomics_subtype", ["CNV_low", "CNV_high", "MSI-H", "POLE"]),
}
PLEX_SITES = {"A (plex 1-4)": range(1, 5), "B (plex 5-8)": range(5, 9)}
PLEX_SITES |= {"C (plex 9-12)": range(9, 13), "D (plex 13-17)": range(13, 18)}

# seed of the split whose training folds are used to choose the settings (``--inner``)
TUNING_SEED = 123

METHODS = [
    "centralized",
    "federated, no key",
    "INFL pooled (paper)",
    "INFL default",
    "local only (mean over sites)",
    "DP-FedAvg",
    "logistic regression (pooled)",
]

#: ``--transform``: the input as published, or on the scale of raw log2 intensities
TRANSFORMS = {"none": lambda x: x, "raw-scale": lambda x: 3 * x + 25}

#: settings passed to ``INFL`` and to training; with ``Settings.only`` just those named there
MODEL_SETTINGS = ("n_hidden", "n_latent", "dropout_rate", "classification_ratio")
TRAIN_SETTINGS = ("batch_size", "lr", "balance_classes", "validation_size", "min_cells_per_site")


@dataclass
class Settings:
    """Hyperparameters shared by every neural row (chosen on validation splits only).

    ``classification_ratio`` was chosen with ``--inner 3`` (docs/proteomics.md: the mean
    accuracy of the two federated rows over both tasks, among 9 settings); the others on one
    inner split of the tumor task.
    """

    n_latent: int = 10
    n_hidden: int = 64
    dropout_rate: float = 0.1
    classification_ratio: float = 2000.0
    rounds: int = 20
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 3e-3
    validation_size: float = 0.1
    max_missing: float = 0.5
    balance_classes: bool = True
    # every site of the protocol takes part in every fold, however few its training rows
    # (with the library default of 10, a fold that leaves a site 9 rows would stop the run)
    min_cells_per_site: int = 2
    # DP-FedAvg: client-level DP with Flower's fixed clipping; z = 1 is Flower's advice for
    # strong privacy (epsilon reported per fold); not tuned for accuracy
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    # the tables were made without secret frames (on by default with a key; they change the
    # model by float rounding only, at about 4x the time here)
    secret_frames: bool = False
    # ``--defaults``: the neural rows get only the settings named here (and the data-dependent
    # arguments), the rest at the library's defaults; ``None`` gives them every setting above
    only: tuple[str, ...] | None = None

    def given(self, names: tuple[str, ...]) -> dict:
        """The settings among ``names`` that are passed to the library."""
        return {n: getattr(self, n) for n in names if self.only is None or n in self.only}

    def epochs(self) -> dict:
        """``max_rounds`` and ``local_epochs`` passed to ``train_federated``."""
        return {
            library: getattr(self, name)
            for name, library in (("rounds", "max_rounds"), ("local_epochs", "local_epochs"))
            if self.only is None or name in self.only
        }

    def centralized_epochs(self) -> dict:
        """``max_epochs`` of the centralized rows: as many as rounds x local epochs.

        A value not given is the library's default of ``train_federated``.
        """
        given = self.epochs()
        if not given:
            return {}
        defaults = inspect.signature(INFL.train_federated).parameters
        rounds = given.get("max_rounds", defaults["max_rounds"].default)
        return {"max_epochs": rounds * given.get("local_epochs", defaults["local_epochs"].default)}


def default_key_mode() -> str | None:
    """INFL's default ``key_mode`` at run time."""
    return inspect.signature(INFL.__init__).parameters["key_mode"].default


def plex_site(plex) -> str:
    """Deterministic site of a TMT plex: consecutive blocks of plexes."""
    for name, plexes in PLEX_SITES.items():
        if int(plex) in plexes:
            return name
    raise ValueError(f"Unknown TMT plex {plex!r}.")


def country_sites(obs: pd.DataFrame) -> pd.Series:
    """Site by country (see the module docstring for how missing countries are handled)."""
    country = obs["Country"].astype(object)
    by_participant = country.groupby(obs["Proteomics_Participant_ID"].astype(str)).agg(
        lambda s: s.dropna().iloc[0] if s.notna().any() else np.nan
    )
    filled = country.fillna(obs["Proteomics_Participant_ID"].astype(str).map(by_participant))
    mapping = {
        "United States": "United States",
        "Ukraine": "Eastern Europe",
        "Poland": "Eastern Europe",
        "Other_specify": "Other/unknown",
    }
    return filled.map(mapping).fillna("Other/unknown")


def prepare(adata: AnnData, task: str, split: str) -> AnnData:
    """Rows of the task with ``.obs["label"]`` and ``.obs["site"]`` (fixed categories)."""
    column, classes = TASKS[task]
    keep = adata.obs[column].notna().to_numpy()
    if task == "subtype":
        keep &= (adata.obs["Proteomics_Tumor_Normal"] == "Tumor").to_numpy()
    data = adata[keep].copy()
    data.obs["label"] = pd.Categorical(data.obs[column].astype(str), categories=classes)
    if split == "plex":
        site = data.obs["Proteomics_TMT_plex"].map(plex_site)
    elif split == "country":
        site = country_sites(data.obs)
    else:
        raise ValueError(f"Unknown split {split!r}.")
    data.obs["site"] = pd.Categorical(site.astype(str), categories=sorted(set(site)))
    data.obs = data.obs[["label", "site"]]
    return data


def weighted_ovr_auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    """One-vs-rest AUC per class present in ``y``, weighted by its prevalence."""
    aucs, weights = [], []
    for c in range(n_classes):
        positive = y == c
        if positive.any() and not positive.all():
            aucs.append(roc_auc_score(positive, proba[:, c]))
            weights.append(positive.sum())
    return float(np.average(aucs, weights=weights)) if aucs else float("nan")


def metrics(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, macro F1 (over all classes of the task) and weighted OvR AUC."""
    pred = proba.argmax(1)
    return {
        "accuracy": accuracy_score(y, pred),
        "macro_f1": f1_score(
            y, pred, labels=list(range(n_classes)), average="macro", zero_division=0
        ),
        "auc": weighted_ovr_auc(y, proba, n_classes),
    }


def _setup(data: AnnData, classes: list[str], site_key: str | None) -> None:
    INFL.setup_anndata(
        data,
        site_key=site_key,
        labels_key="label",
        categories={"labels_key": classes},
    )


def _model(data: AnnData, key_mode, key, s: Settings) -> INFL:
    return INFL(
        data,
        key=key,
        key_mode=key_mode,
        gene_likelihood="normal",
        **s.given(MODEL_SETTINGS),
    )


def _proba(model: INFL, test: AnnData, classes: list[str]) -> np.ndarray:
    return model.predict(test, soft=True)[classes].to_numpy()


def _train_kwargs(s: Settings, seed: int) -> dict:
    return {**s.given(TRAIN_SETTINGS), "seed": seed, "progress_bar": False}


def fold_batch_size(train: AnnData, s: Settings) -> int:
    """``s.batch_size``, capped at the smallest site's number of training rows.

    ``train_federated`` refuses a site with fewer training rows than the batch size, and a
    fold of a small cohort can leave a site with fewer rows than ``s.batch_size``. Each
    site's training rows are counted with the library's own rule
    (:meth:`SiteData.n_validation`, which depends only on the site's size), so the cap holds
    for whatever split the library draws. Every method of the fold uses this value. With
    ``--defaults`` (batch size not given) the library's own rule applies: a site with fewer
    training rows than the batch size trains on all of them in one minibatch.
    """
    sizes = train.obs["site"].value_counts()
    n_train = [int(n) - SiteData.n_validation(int(n), s.validation_size) for n in sizes if n > 0]
    return min(s.batch_size, *n_train)


def fold_key(seed: int) -> scinfl.Key:
    """The key of the fold with seed ``seed``: the same in every run and for every input.

    Two inputs (``--transform``) or two runs are then compared with the same keys fold by
    fold, so that their difference is not the spread across keys.
    """
    return scinfl.Key(hashlib.sha256(f"benchmarks/proteomics fold {seed}".encode()).digest())


def run_fold(
    data: AnnData,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    s: Settings,
    seed: int = 0,
    methods: list[str] | None = None,
) -> list[dict]:
    """Train every method on ``train_idx`` and evaluate it on ``test_idx``."""
    methods = METHODS if methods is None else methods
    classes = list(data.obs["label"].cat.categories)
    n_classes = len(classes)
    train = data[train_idx].copy()
    features = agree_features(train, "site", max_missing=s.max_missing)
    train = train[:, features].copy()
    test = data[test_idx, features].copy()
    y = test.obs["label"].cat.codes.to_numpy()
    key = fold_key(seed)
    if "batch_size" in s.given(("batch_size",)):
        s = replace(s, batch_size=fold_batch_size(train, s))
    rows = []

    def record(method, proba, seconds, note=""):
        rows.append(
            {"method": method, **metrics(y, proba, n_classes), "seconds": seconds, "note": note}
        )

    for method in methods:
        start = time.perf_counter()
        scvi.settings.seed = seed
        done = {r["method"]: r for r in rows}
        if (
            method == "INFL default"
            and default_key_mode() == "pooled"
            and "INFL pooled (paper)" in done
        ):
            # same model, same settings, same seed: the paper's row is this row's run
            rows.append({**done["INFL pooled (paper)"], "method": method})
            rows[-1]["note"] = "key_mode='pooled' (default): same run as the row above"
        elif method in ("federated, no key", "INFL pooled (paper)", "INFL default", "DP-FedAvg"):
            key_mode = {
                "federated, no key": None,
                "INFL pooled (paper)": "pooled",
                "INFL default": default_key_mode(),
                "DP-FedAvg": None,
            }[method]
            dp = {}
            if method == "DP-FedAvg":
                dp = {
                    "privacy": "dp",
                    "dp_noise_multiplier": s.dp_noise_multiplier,
                    "dp_clipping_norm": s.dp_clipping_norm,
                }
            fed = train.copy()
            _setup(fed, classes, "site")
            model = _model(fed, key_mode, key, s)
            model.train_federated(
                **s.epochs(), secret_frames=s.secret_frames, **dp, **_train_kwargs(s, seed)
            )
            note = f"key_mode={key_mode}"
            if dp:
                note = (
                    f"z={s.dp_noise_multiplier}, C={s.dp_clipping_norm}, "
                    f"epsilon={model.dp_epsilon_:.3g} at delta=1e-5"
                )
            record(method, _proba(model, test, classes), time.perf_counter() - start, note)
        elif method == "centralized":
            pooled = train.copy()
            _setup(pooled, classes, None)
            model = _model(pooled, default_key_mode(), key, s)
            model.train_centralized(**s.centralized_epochs(), **_train_kwargs(s, seed))
            record(method, _proba(model, test, classes), time.perf_counter() - start)
        elif method == "local only (mean over sites)":
            per_site = []
            for site in train.obs["site"].cat.categories:
                local = train[(train.obs["site"] == site).to_numpy()].copy()
                if local.n_obs == 0:
                    continue
                _setup(local, classes, None)
                model = _model(local, default_key_mode(), key, s)
                model.train_centralized(**s.centralized_epochs(), **_train_kwargs(s, seed))
                per_site.append(metrics(y, _proba(model, test, classes), n_classes))
            mean = pd.DataFrame(per_site).mean().to_dict()
            rows.append(
                {
                    "method": method,
                    **mean,
                    "seconds": time.perf_counter() - start,
                    "note": f"{len(per_site)} sites",
                }
            )
        elif method == "logistic regression (pooled)":
            X_train = np.asarray(train.X, dtype=float)
            means = np.nanmean(X_train, axis=0)
            X_train = np.where(np.isnan(X_train), means, X_train)
            X_test = np.asarray(test.X, dtype=float)
            X_test = np.where(np.isnan(X_test), means, X_test)
            scaler = StandardScaler().fit(X_train)
            clf = LogisticRegression(max_iter=2000, class_weight="balanced")
            clf.fit(scaler.transform(X_train), train.obs["label"].cat.codes.to_numpy())
            proba = np.zeros((len(y), n_classes))
            proba[:, clf.classes_] = clf.predict_proba(scaler.transform(X_test))
            record(method, proba, time.perf_counter() - start)
        else:
            raise ValueError(f"Unknown method {method!r}.")
    for row in rows:
        row["n_features"] = len(features)
        row["batch_size"] = s.given(("batch_size",)).get("batch_size", "default")
    return rows


def tuning_splits(y: np.ndarray, folds: int, inner: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, evaluate) rows for choosing settings: inside the training folds of another split.

    The first ``inner`` folds of a stratified ``folds``-fold split with seed ``TUNING_SEED``;
    a stratified 25% of each training fold is held out for evaluation, the fold's test rows
    are left out altogether.
    """
    outer = RepeatedStratifiedKFold(n_splits=folds, n_repeats=1, random_state=TUNING_SEED)
    splits = []
    for train_idx, _ in list(outer.split(np.zeros(len(y)), y))[:inner]:
        holdout = StratifiedShuffleSplit(n_splits=1, test_size=0.25, random_state=TUNING_SEED)
        fit, evaluate = next(holdout.split(train_idx, y[train_idx]))
        splits.append((train_idx[fit], train_idx[evaluate]))
    return splits


def run(
    adata: AnnData,
    task: str = "tumor",
    split: str = "plex",
    folds: int = 5,
    repeats: int = 3,
    settings: Settings | None = None,
    methods: list[str] | None = None,
    seed: int = 0,
    verbose: bool = True,
    inner: int = 0,
) -> pd.DataFrame:
    """Per-fold results of every method (one row per method and fold).

    With ``inner > 0`` the test folds are never touched: the first ``inner`` folds of a
    *different* stratified split (seed ``TUNING_SEED``) are taken, and each of their training
    folds is split again, a stratified 25% held out as the evaluation rows. This is how the
    settings are chosen.
    """
    s = Settings() if settings is None else settings
    data = prepare(adata, task, split)
    y = data.obs["label"].cat.codes.to_numpy()
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    splits = list(splitter.split(np.zeros(len(y)), y))
    if inner:
        splits = tuning_splits(y, folds, inner)
    results = []
    for i, (train_idx, test_idx) in enumerate(splits):
        fold_rows = run_fold(data, train_idx, test_idx, s, seed=seed + i, methods=methods)
        for row in fold_rows:
            row.update(fold=i % folds, repeat=i // folds)
        results.extend(fold_rows)
        if verbose:
            acc = {r["method"]: round(r["accuracy"], 3) for r in fold_rows}
            print(f"fold {i + 1}/{len(splits)}: {acc}", flush=True)
    return pd.DataFrame(results)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean +- sd over folds of every metric, one row per method (in ``METHODS`` order)."""
    order = [m for m in METHODS if m in set(results["method"])]
    table = {}
    for method in order:
        r = results[results["method"] == method]
        row = {}
        for metric in ("accuracy", "macro_f1", "auc"):
            values = r[metric].dropna()
            row[metric] = (
                f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
                if len(values) > 1
                else (f"{values.mean():.3f}" if len(values) else "n/a")
            )
        row["s/fold"] = f"{r['seconds'].mean():.1f}"
        row["note"] = r["note"].iloc[0]
        table[method] = row
    return pd.DataFrame(table).T


def paired_differences(results: pd.DataFrame, method: str = "INFL default") -> str:
    """``method``'s accuracy against every other neural row, fold by fold (the same folds).

    Mean difference in points, its standard error (sd of the differences / sqrt(folds)) and in
    how many folds ``method`` is ahead, behind or tied.
    """
    accuracy = results.pivot_table(
        index=["repeat", "fold"], columns="method", values="accuracy", aggfunc="first"
    )
    if method not in accuracy:
        return ""
    parts = []
    for other in ("centralized", "federated, no key", "local only (mean over sites)"):
        if other not in accuracy:
            continue
        diff = (accuracy[method] - accuracy[other]).dropna() * 100
        ahead, behind = int((diff > 1e-9).sum()), int((diff < -1e-9).sum())
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        parts.append(
            f"- {other}: {diff.mean():+.1f} points (paired SE {se:.1f}; ahead in {ahead} folds, "
            f"behind in {behind}, tied in {len(diff) - ahead - behind})"
        )
    return f"{method} " + "; ".join(parts) + "." if parts else ""


def main(argv: list[str] | None = None) -> list[pd.DataFrame]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), nargs="+", default=["tumor"])
    parser.add_argument("--split", choices=["plex", "country"], nargs="+", default=["plex"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, help=f"rounds (default {Settings.rounds})")
    parser.add_argument("--quick", action="store_true", help="2 folds x 1 repeat, 5 rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="run only these rows (default: all)"
    )
    parser.add_argument("--csv", help="write the per-fold results to this file prefix")
    parser.add_argument(
        "--inner",
        type=int,
        default=0,
        metavar="N",
        help="tuning mode: evaluate on held-out rows of N training folds of another split",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="override a setting, e.g. --set classification_ratio=500 rounds=40",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="neural rows at the library's defaults (only --rounds and --set settings given)",
    )
    parser.add_argument(
        "--transform",
        choices=list(TRANSFORMS),
        nargs="+",
        default=["none"],
        help="input values: as published, or 3 * x + 25 (the scale of raw log2 intensities)",
    )
    parser.add_argument(
        "--proteins", type=int, metavar="N", help="keep N proteins drawn at random (seed 0)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.folds, args.repeats, args.rounds = 2, 1, 5
    given = ["rounds"] if args.rounds is not None else []
    logging.getLogger("scvi").setLevel(logging.WARNING)
    logging.getLogger("scinfl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    settings = Settings() if args.rounds is None else Settings(rounds=args.rounds)
    for item in args.set:
        name, _, value = item.partition("=")
        if not hasattr(settings, name) or name == "only":
            parser.error(f"--set {item}: no setting {name!r}; choose from {list(asdict(settings))}")
        kind = type(getattr(settings, name))
        settings = replace(settings, **{name: kind(value) if kind is not bool else value == "True"})
        given.append(name)
    if args.defaults:
        settings = replace(settings, only=tuple(given))
    published = scinfl.data.cptac_ucec()
    if args.proteins:
        rng = np.random.default_rng(0)
        keep = np.sort(rng.choice(published.n_vars, args.proteins, replace=False))
        published = published[:, keep].copy()
    tables = []
    for split, task, transform in itertools.product(args.split, args.task, args.transform):
        adata = published.copy()
        adata.X = TRANSFORMS[transform](np.asarray(adata.X))
        results = run(
            adata,
            task,
            split,
            args.folds,
            args.repeats,
            settings,
            seed=args.seed,
            methods=args.methods,
            inner=args.inner,
        )
        if args.csv:
            results.to_csv(f"{args.csv}_{split}_{task}_{transform}.csv", index=False)
        table = summarize(results)
        print(
            f"\ntask={task} split={split} transform={transform} folds={args.folds} "
            f"repeats={args.repeats} "
            f"features/fold={results['n_features'].median():.0f} (median), "
            f"batch_size={sorted(set(map(str, results['batch_size'])))}"
        )
        if args.defaults:
            print(
                f"settings: library defaults, given: { {n: getattr(settings, n) for n in given} }"
            )
        else:
            print(f"settings: {asdict(settings)}")
        print(table.to_markdown())
        print(f"\n{paired_differences(results)}", flush=True)
        tables.append(table)
    return tables


if __name__ == "__main__":
    main()
