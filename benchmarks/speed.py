"""Seconds per federated epoch against scvi-tools' SCVI, where the time goes, and peak memory.

Every row runs in its own process (so that its peak resident memory is its own), and within a
row every method runs in the same process, on the same data, twice (``--passes``), in mirrored
order (A B C D, then D C B A: the machine's drift during a row biases no method):

- ``INFL defaults``: ``train_federated`` at the library defaults (key, secret frames), local
  engine, one local epoch per round (a round is then one federated epoch over all sites);
- ``no frames``: the same with ``secret_frames=False``; ``no key``: ``key_mode=None`` (no key,
  so no frames either);
- ``SCVI``: scvi-tools' SCVI with the same layer sizes (128 hidden, 10 latent, one layer),
  likelihood, batch size (128) and training fraction (0.9), ``model.train``.

Seconds per epoch exclude set-up on both sides: for INFL the round loop (train, aggregate,
validate, select) divided by its rounds, for SCVI the time between epoch starts (training and
validation) measured by a Lightning callback; the first epoch is a warm-up on both sides and is
not counted (from 200,000 cells on there is no warm-up epoch). Both wall and CPU seconds are recorded; CPU seconds of a one-thread process are
the work done, so ratios of them hold on a machine that other jobs share. The breakdown of the
defaults run splits its round loop into training steps, validation, parameter copies, secret
frames (drawing the maps and applying them), hashing (frame names and message checks),
aggregation and the rest (exclusive times).

Rows: pbmc68k (700 x 765 counts, 3 sites), Kang (13,999 x 2,000 counts, 3 sites), CPTAC
proteomics (normal likelihood, 4 sites by TMT plex; SCVI sees missing values as 0), and a
synthetic 1,000,000 x 2,000 sparse count matrix over 10 sites (``--big``). ``--scaling`` adds
time per epoch (defaults) against cells, features and sites; ``--flower`` the start-up and
per-round overhead of Flower's simulation engine against the local engine.

Usage::

    uv run python benchmarks/speed.py                    # the three real rows
    uv run python benchmarks/speed.py --big --scaling --flower --plot

Each measurement is kept in ``benchmarks/results/speed/`` (with the machine's load around it),
and ``benchmarks/results/speed.md`` and ``speed.csv`` (and ``speed.png`` with ``--plot``) are
written from every kept measurement: ``--rows`` with no name rewrites the page from them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import Callback
from scipy import sparse

import scinfl

RESULTS = Path(__file__).parent / "results"
N_HIDDEN, N_LATENT, BATCH_SIZE = 128, 10, 128
#: from this many cells on, no warm-up epoch (it would cost minutes and change nothing)
BIG = 200_000


# -- data ----------------------------------------------------------------------------------
def synthetic_sparse(n_obs: int, n_vars: int, n_sites: int, seed: int = 0) -> AnnData:
    """Sparse NB counts of 10 cell types over ``n_sites`` sites, built in chunks (never dense).

    About 10% of entries are non-zero (a 10x data set on 2,000 variable genes holds 10-25%).
    """
    rng = np.random.default_rng(seed)
    n_types = 10
    base = rng.gamma(0.6, 0.12, n_vars)
    programme = np.exp(rng.normal(0.0, 1.0, (n_types, n_vars)))
    types = rng.integers(0, n_types, n_obs)
    chunks = []
    for start in range(0, n_obs, 50_000):
        rows = types[start : start + 50_000]
        library = rng.lognormal(0.0, 0.4, len(rows))[:, None]
        mean = base * programme[rows] * library
        counts = rng.poisson(rng.gamma(4.0, mean / 4.0)).astype(np.float32)
        chunks.append(sparse.csr_matrix(counts))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in types]),
            "site": pd.Categorical([f"site{s}" for s in rng.integers(0, n_sites, n_obs)]),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    return AnnData(sparse.vstack(chunks, format="csr"), obs=obs, var=var)


def load_size(name: str) -> int:
    """Number of cells of a synthetic row (0 for the real ones, which are small)."""
    return int(name.split(":")[1]) if name.startswith("synthetic") else 0


def load_row(name: str) -> tuple[AnnData, dict]:
    """The data of a row and its setup arguments."""
    if name == "pbmc68k":
        adata = scinfl.data.pbmc68k(n_sites=3)
        return adata, {"layer": "counts", "site_key": "site"}
    if name == "kang":
        adata = scinfl.data.kang2018(n_top_genes=2000)
        scinfl.federated.partition(adata, n_sites=3, seed=0)
        return adata, {"layer": "counts", "site_key": "site"}
    if name == "cptac":
        adata = scinfl.data.cptac_ucec()
        from proteomics import plex_site  # the proteomics benchmark's sites by TMT plex

        adata.obs["site"] = pd.Categorical(adata.obs["Proteomics_TMT_plex"].map(plex_site))
        return adata, {"site_key": "site"}
    if name.startswith("synthetic"):
        n_obs, n_vars, n_sites = (int(x) for x in name.split(":")[1:])
        return synthetic_sparse(n_obs, n_vars, n_sites), {"site_key": "site"}
    raise ValueError(f"Unknown row {name!r}.")


# -- timers --------------------------------------------------------------------------------
class Breakdown:
    """Exclusive seconds per category of functions wrapped while a run lasts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    def wrap(self, owner, attribute: str, category: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                start, inner = self._stack.pop()
                elapsed = time.perf_counter() - start
                self.seconds[category] += elapsed - inner
                if self._stack:
                    self._stack[-1][1] += elapsed

        setattr(owner, attribute, timed)
        self._restore.append((owner, attribute, original))

    @contextmanager
    def instrumented(self):
        from scinfl.federated import _client, _local_engine, _secret_frames, _server
        from scinfl.federated import _site_runtime as runtime

        self._restore = []
        self.wrap(_local_engine, "run_rounds", "round loop, other")
        self.wrap(runtime, "client_update", "training steps")
        self.wrap(runtime, "client_evaluate", "validation")
        self.wrap(_client, "set_shared_parameters", "parameter copies")
        self.wrap(_client, "get_shared_parameters", "parameter copies")
        self.wrap(_secret_frames.SecretFrames, "_map", "secret frames: apply")
        self.wrap(_secret_frames.SecretFrames, "_maps", "secret frames: draw")
        self.wrap(_secret_frames, "parameters_digest", "hashing")
        self.wrap(runtime, "parameters_digest", "hashing")
        self.wrap(_server.FederatedServer, "aggregate", "aggregation")
        try:
            yield self
        finally:
            for owner, attribute, original in reversed(self._restore):
                setattr(owner, attribute, original)


@contextmanager
def clocks():
    """Wall and CPU seconds of the block: ``{"wall": ..., "cpu": ...}`` once it ends."""
    out = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    out["wall"], out["cpu"] = time.perf_counter() - wall, time.process_time() - cpu


# -- methods -------------------------------------------------------------------------------
def likelihood_of(adata: AnnData, setup: dict) -> str:
    """Counts (a layer, or a sparse X) get the negative binomial, the rest the normal."""
    return "nb" if "layer" in setup or sparse.issparse(adata.X) else "normal"


def infl_epoch(adata, setup, rounds, breakdown=None, key_mode="pooled", **settings) -> dict:
    """Seconds per federated epoch (round loop / rounds), after one warm-up round."""
    likelihood = likelihood_of(adata, setup)
    adata = adata.copy() if adata.n_obs < BIG else adata
    scinfl.model.INFL.setup_anndata(adata, **setup)
    torch.manual_seed(0)
    model = scinfl.model.INFL(
        adata,
        key=None if key_mode is None else scinfl.Key(bytes(range(32))),
        key_mode=key_mode,
        gene_likelihood=likelihood,
        n_hidden=N_HIDDEN,
        n_latent=N_LATENT,
    )
    settings = {"local_epochs": 1, "batch_size": BATCH_SIZE, "progress_bar": False, **settings}
    if adata.n_obs < BIG:
        model.train_federated(max_rounds=1, **settings)  # warm-up (allocator, frames cache)
    from scinfl.federated import _local_engine

    loop = {}
    original = _local_engine.run_rounds

    def timed(*args, **kw):
        with clocks() as measured:
            server = original(*args, **kw)
        loop.update(measured)
        return server

    _local_engine.run_rounds = timed
    try:
        if breakdown is not None:
            with breakdown.instrumented():
                model.train_federated(max_rounds=rounds, **settings)
        else:
            model.train_federated(max_rounds=rounds, **settings)
    finally:
        _local_engine.run_rounds = original
    return {"wall": loop["wall"] / rounds, "cpu": loop["cpu"] / rounds}


class EpochClock(Callback):
    """Lightning callback: wall and CPU time at every training epoch's start and at the end."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_train_end(self, trainer, module) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))


def scvi_epoch(adata, setup, epochs, likelihood) -> dict:
    """Seconds per SCVI epoch (epoch starts apart), the first epoch a warm-up."""
    import scvi

    adata = adata.copy() if adata.n_obs < BIG else adata
    layer = setup.get("layer")
    if likelihood == "normal":  # SCVI takes no missing values
        adata.X = np.nan_to_num(np.asarray(adata.X))
    scvi.model.SCVI.setup_anndata(adata, layer=layer)
    scvi.settings.seed = 0
    model = scvi.model.SCVI(
        adata,
        n_hidden=N_HIDDEN,
        n_latent=N_LATENT,
        n_layers=1,
        gene_likelihood=likelihood,
        log_variational=likelihood != "normal",  # log1p of log ratios would be NaN
    )
    clock = EpochClock()
    warm_up = int(adata.n_obs < BIG)
    model.train(
        max_epochs=epochs + warm_up,
        train_size=0.9,
        batch_size=BATCH_SIZE,
        accelerator="cpu",
        enable_progress_bar=False,
        callbacks=[clock],
        check_val_every_n_epoch=1,
    )
    marks = np.array(clock.marks[warm_up:])
    return {"wall": np.diff(marks[:, 0]).mean(), "cpu": np.diff(marks[:, 1]).mean()}


def run_row(name: str, rounds: int, passes: int = 2) -> dict:
    """Every method on one row; its own process, so ``peak_rss_gb`` is the row's.

    The methods run ``passes`` times, in mirrored order (defaults, no frames, no key, SCVI,
    then SCVI, no key, ...): a machine that speeds up or slows down during the row (this one
    drifts by 20-50% within minutes) then biases no method, as it would if each ran once in
    a fixed order. Seconds are the mean over passes; each pass's seconds are kept.
    """
    adata, setup = load_row(name)
    likelihood = likelihood_of(adata, setup)
    breakdown = Breakdown()
    methods = {
        "defaults": lambda: infl_epoch(adata, setup, rounds, breakdown),
        "no frames": lambda: infl_epoch(adata, setup, rounds, secret_frames=False),
        "no key": lambda: infl_epoch(adata, setup, rounds, key_mode=None),
        "SCVI": lambda: scvi_or_nan(adata, setup, rounds, likelihood),
    }
    measured = defaultdict(list)
    for index in range(passes):
        for method in list(methods)[:: 1 if index % 2 == 0 else -1]:
            measured[method].append(methods[method]())
    out = {"row": name, "cells": adata.n_obs, "features": adata.n_vars}
    out["sites"] = adata.obs[setup["site_key"]].nunique()
    for method, seconds in measured.items():
        out[method] = {
            clock: float(np.mean([s[clock] for s in seconds])) for clock in ("wall", "cpu")
        }
        out[method]["cpu per pass"] = [s["cpu"] for s in seconds]
    out["breakdown"] = {k: v / passes for k, v in breakdown.seconds.items()}
    out["rounds"] = rounds
    out["passes"] = passes
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def scvi_or_nan(adata, setup, epochs, likelihood) -> dict:
    """:func:`scvi_epoch`, or NaN seconds where SCVI fails on the row."""
    try:
        return scvi_epoch(adata, setup, epochs, likelihood)
    except ValueError as err:  # e.g. SCVI's normal likelihood diverging on raw log ratios
        return {"wall": float("nan"), "cpu": float("nan"), "error": str(err)[:200]}


def run_scaling(name: str, rounds: int) -> dict:
    """INFL at the defaults only (for the scaling curves)."""
    adata, setup = load_row(name)
    epoch = infl_epoch(adata, setup, rounds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "row": name,
        "cells": adata.n_obs,
        "features": adata.n_vars,
        "sites": adata.obs["site"].nunique(),
        "defaults": epoch,
        "peak_rss_gb": peak,
    }


def run_flower(name: str, rounds: int) -> dict:
    """Flower simulation against the local engine: start-up and seconds per round.

    One run of ``1 + rounds`` rounds per engine; the end of every round is timed (when the
    server records the round's evaluation). Per round: the median time between round ends;
    start-up: the time to the end of the first round less one round (Ray, the virtual nodes,
    the sites' set-up). Two runs of different lengths, differenced, confound the two: on a
    loaded machine the start-up varies by more than a few rounds take.
    """
    from scinfl.federated import _server

    adata, setup = load_row(name)
    scinfl.model.INFL.setup_anndata(adata, **setup)
    out = {"row": name, "rounds": 1 + rounds}
    original = _server.FederatedServer.record_evaluation
    for engine in ("local", "flower"):
        ends = []

        def timed(self, *args, _ends=ends, **kwargs):
            result = original(self, *args, **kwargs)
            _ends.append(time.perf_counter())
            return result

        torch.manual_seed(0)
        model = scinfl.model.INFL(adata, key=scinfl.Key(bytes(range(32))))
        _server.FederatedServer.record_evaluation = timed
        try:
            start = time.perf_counter()
            model.train_federated(max_rounds=1 + rounds, engine=engine, progress_bar=False)
            total = time.perf_counter() - start
        finally:
            _server.FederatedServer.record_evaluation = original
        per_round = float(np.median(np.diff(ends)))
        out[engine] = {
            "start-up": ends[0] - start - per_round,
            "per round": per_round,
            f"total ({1 + rounds} rounds)": total,
        }
    return out


# -- driver --------------------------------------------------------------------------------
def in_subprocess(kind: str, name: str, rounds: int, threads: int, passes: int = 1) -> dict:
    """Run one measurement in a fresh process (its own peak memory, no shared caches)."""
    command = [sys.executable, __file__, "--one", kind, name, "--rounds", str(rounds)]
    command += ["--threads", str(threads), "--passes", str(passes)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> pd.DataFrame:
    """One line per row: seconds per epoch (CPU, wall) and the ratios of the issue."""
    lines = []
    for r in rows:
        cpu = {m: r[m]["cpu"] for m in ("defaults", "no frames", "no key", "SCVI")}
        lines.append(
            {
                "data": f"{r['row']} ({r['cells']:,} x {r['features']:,}, {r['sites']} sites)",
                "INFL defaults s/epoch (CPU; wall)": f"{cpu['defaults']:.3g}; {r['defaults']['wall']:.3g}",
                "no frames": f"{cpu['no frames']:.3g}",
                "no key": f"{cpu['no key']:.3g}",
                "SCVI s/epoch (CPU; wall)": f"{cpu['SCVI']:.3g}; {r['SCVI']['wall']:.3g}",
                "SCVI / INFL defaults (>= 3)": round(cpu["SCVI"] / cpu["defaults"], 2),
                "frames / no frames (<= 1.2)": round(cpu["defaults"] / cpu["no frames"], 2),
                "keyed / unkeyed (<= 1.10)": round(cpu["no frames"] / cpu["no key"], 2),
                "peak memory GB": round(r["peak_rss_gb"], 2),
            }
        )
    return pd.DataFrame(lines)


def breakdown_table(rows: list[dict]) -> pd.DataFrame:
    """Share of the defaults' round loop per category (wall, exclusive)."""
    shares = {}
    for r in rows:
        total = sum(r["breakdown"].values())
        shares[r["row"]] = {k: f"{v / total:.0%}" for k, v in sorted(r["breakdown"].items())}
    return pd.DataFrame(shares).fillna("0%")


def _short(n: int) -> str:
    """``n`` for an axis label: 700, 14k, 1M."""
    for size, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def plot(rows: list[dict], scaling: list[dict], path: Path) -> None:
    """Seconds per epoch by method and row; scaling curves when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + bool(scaling) * 3
    widths = [0.75 * len(rows)] + [4.5] * (panels - 1)  # the bar panel widens with its rows
    fig, axes = plt.subplots(
        1, panels, figsize=(sum(widths), 3.6), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    ax = axes[0, 0]
    methods = ("defaults", "no frames", "no key", "SCVI")
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [r[method]["cpu"] for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, values, width, label=method)
    labels = [
        f"{r['row'].split(':')[0]}\n{_short(r['cells'])} x {_short(r['features'])}" for r in rows
    ]
    ax.set_xticks(np.arange(len(rows)) + 0.3, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("CPU seconds per epoch")
    ax.legend(frameon=False, fontsize=8)
    for ax, axis in zip(axes[0, 1:], ("cells", "features", "sites"), strict=False):
        curve = [r for r in on_curves(scaling) if r["curve"] == axis]
        seconds = [r["defaults"]["cpu"] for r in curve]
        ax.plot([r[axis] for r in curve], seconds, "o-")
        if axis == "sites":  # the same cells over more sites: a flat line is the target
            ax.set_ylim(0, 1.2 * max(seconds, default=1.0))
        else:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_title(f"INFL defaults: epoch vs {axis}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


BIG_ROW = "synthetic:1000000:2000:10"
SCALING = {
    "cells": [f"synthetic:{n}:2000:10" for n in (10_000, 100_000, 1_000_000)],
    "features": [f"synthetic:20000:{g}:10" for g in (1_000, 5_000, 20_000)],
    "sites": [f"synthetic:100000:2000:{s}" for s in (2, 5, 10, 20)],
}


def on_curves(scaling: list[dict]) -> list[dict]:
    """Each scaling measurement once per curve it lies on (a row may serve two curves)."""
    return [
        r | {"curve": curve}
        for curve, names in SCALING.items()
        for name in names
        for r in scaling
        if r["row"] == name
    ]


def saved_path(kind: str, name: str) -> Path:
    """Where one measurement's JSON is kept (``results/speed/``)."""
    return RESULTS / "speed" / f"{kind}-{name.replace(':', '-')}.json"


def measure(kind: str, name: str, rounds: int, threads: int, passes: int = 1) -> dict:
    """One measurement in its own process, saved with the machine's load around it."""
    load = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = in_subprocess(kind, name, rounds, threads, passes)
    result |= {"kind": kind, "threads": threads, "started": started}
    result["load average (start, end)"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    path = saved_path(kind, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    return result


def saved(kind: str) -> list[dict]:
    """Every saved measurement of ``kind``, in a fixed order (real rows, then synthetic)."""
    found = [json.loads(p.read_text()) for p in sorted((RESULTS / "speed").glob(f"{kind}-*.json"))]
    order = ["pbmc68k", "kang", "cptac"]
    return sorted(
        found,
        key=lambda r: (
            order.index(r["row"]) if r["row"] in order else 9,
            r["cells"] if "cells" in r else 0,
        ),
    )


def report() -> str:
    """The results page, from every saved measurement (each row ran in its own process)."""
    rows, scaling, flower = saved("row"), saved("scaling"), saved("flower")
    lines = [
        "# Speed: a federated epoch against scvi-tools' SCVI\n",
        "Each row ran in its own process (`benchmarks/speed.py`; see its docstring), every "
        "method of a row in the same process, on the same data, in mirrored order over the "
        "passes listed (seconds: the mean over passes): the ratios are within a row. CPU seconds of a one-thread process are the work done; wall "
        "seconds depend on what else the machine ran (its load average is listed).\n",
        table(rows).to_markdown(index=False),
        "\n",
        pd.DataFrame(
            [
                {
                    "row": r["row"],
                    "measured": r["started"],
                    "torch threads": r["threads"],
                    "timed epochs": r["rounds"],
                    "passes": r.get("passes", 1),
                    "load average (start, end)": r["load average (start, end)"],
                }
                for r in rows
            ]
        ).to_markdown(index=False),
        "\n## Where the time of a federated epoch goes (INFL defaults, exclusive wall time)\n",
        breakdown_table(rows).to_markdown(),
    ]
    if scaling:
        frame = pd.DataFrame(
            [
                {
                    "curve": r["curve"],
                    "cells": r["cells"],
                    "features": r["features"],
                    "sites": r["sites"],
                    "CPU s/epoch": round(r["defaults"]["cpu"], 3),
                    "wall s/epoch": round(r["defaults"]["wall"], 3),
                    "peak memory GB": round(r["peak_rss_gb"], 2),
                }
                for r in on_curves(scaling)
            ]
        )
        lines += ["\n## Scaling (INFL defaults)\n", frame.to_markdown(index=False)]
    for r in flower:
        seconds = pd.DataFrame(
            {e: {k: round(v, 2) for k, v in r[e].items()} for e in ("local", "flower")}
        ).T
        lines += [f"\n## Flower simulation against the local engine ({r['row']}, wall s)\n"]
        lines += ["Start-up: to the end of the first round, less one round; per round: the"]
        lines += ["median time between the ends of consecutive rounds.\n"]
        lines += [seconds.to_markdown()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=["pbmc68k", "kang", "cptac"])
    parser.add_argument("--big", action="store_true", help="add the 1M x 2k, 10-site row")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--flower", action="store_true")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--passes", type=int, default=2, help="passes over a row's methods, in mirrored order"
    )
    parser.add_argument("--one", nargs=2, metavar=("KIND", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        torch.set_num_threads(args.threads)
        sys.path.insert(0, str(Path(__file__).parent))
        kind, name = args.one
        if kind == "row":
            result = run_row(name, args.rounds, args.passes)
        else:
            result = {"scaling": run_scaling, "flower": run_flower}[kind](name, args.rounds)
        print(json.dumps(result, default=float))
        return
    for name in args.rows + ([BIG_ROW] * args.big):
        big = load_size(name) >= BIG  # one epoch, one pass of 1M cells is enough
        measure("row", name, 1 if big else args.rounds, args.threads, 1 if big else args.passes)
    if args.scaling:
        for axis, names in SCALING.items():
            for name in names:
                result = measure("scaling", name, 1 if name == BIG_ROW else 2, args.threads)
                saved_path("scaling", name).write_text(json.dumps(result | {"curve": axis}))
    if args.flower:
        measure("flower", "pbmc68k", 5, args.threads)
    text = report()
    (RESULTS / "speed.md").write_text(text)
    pd.json_normalize(saved("row") + saved("scaling")).to_csv(RESULTS / "speed.csv", index=False)
    if args.plot:
        plot(saved("row"), saved("scaling"), RESULTS / "speed.png")
    print(text)


if __name__ == "__main__":
    main()
