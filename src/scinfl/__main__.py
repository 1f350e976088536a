"""Command-line interface: ``scinfl quickstart``."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("scinfl")


def quickstart(
    rounds: int = 30, out: str | Path = "scinfl_quickstart", seed: int = 0, central: bool = True
) -> dict:
    """Federate an INFL model over 3 simulated sites of packaged PBMC data and report.

    Writes ``<out>/pbmc68k_scinfl.h5ad`` (``.obsm["X_scinfl"]``, ``.obs["scinfl_leiden"]``,
    predictions), ``<out>/umap.png``, the saved model ``<out>/model/`` and the site key
    ``<out>/site.key`` (mode 0600; the model directory never contains it).

    The ARI of the Leiden clusters is computed on all cells (clustering uses no labels). The
    classifier's accuracy is computed on the held-out validation cells only
    (``model.validation_indices_``): the model never trained on them, though they chose the
    best round.

    Parameters
    ----------
    rounds
        Federated rounds (and epochs of the centralized reference).
    out
        Output directory (created; existing files inside are replaced).
    seed
        Seed of the run.
    central
        Also train the same model centrally, for reference.

    Returns
    -------
    The summary as a dict.

    Examples
    --------
    >>> summary = quickstart(rounds=2, out="/tmp/qs", central=False)  # doctest: +SKIP
    """
    import scinfl
    from scinfl.federated import FederationConfig

    FederationConfig(max_rounds=rounds, seed=seed)  # bad settings stop before anything is written
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory.")
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / "site.key"
    key = scinfl.Key.generate()
    key.save(key_path, overwrite=True)

    adata = scinfl.data.pbmc68k(n_sites=3, seed=seed)
    summary: dict = {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "sites": adata.obs["site"].nunique(),
    }

    model, fed, summary["federated"] = _fit_quickstart(adata, key, rounds, seed, federated=True)
    if central:
        summary["centralized"] = _fit_quickstart(adata, key, rounds, seed, federated=False)[2]

    fed.write_h5ad(out / "pbmc68k_scinfl.h5ad")
    scinfl.pl.umap(fed, color=["scinfl_leiden", "bulk_labels", "site"], save=out / "umap.png")
    model.save(out / "model", overwrite=True)
    summary["outputs"] = [
        str(p) for p in (out / "pbmc68k_scinfl.h5ad", out / "umap.png", out / "model", key_path)
    ]
    _print_summary(summary, rounds)
    return summary


def _fit_quickstart(adata, key, rounds: int, seed: int, federated: bool) -> tuple:
    """Train the quickstart's model (federated or centralized); the model, its data, scores."""
    import numpy as np
    import scvi
    from sklearn.metrics import adjusted_rand_score

    import scinfl

    data = adata.copy()
    scvi.settings.seed = seed
    scinfl.model.INFL.setup_anndata(data, layer="counts", site_key="site", labels_key="bulk_labels")
    model = scinfl.model.INFL(data, key=key)
    start = time.perf_counter()
    if federated:
        history = model.train_federated(max_rounds=rounds, local_epochs=2)
    else:
        history = model.train_centralized(max_epochs=rounds)
    elapsed = time.perf_counter() - start
    scinfl.tl.embed(data, model)
    scinfl.tl.cluster(data)
    scinfl.tl.predict(data, model)
    # the classifier is scored on the validation rows only: the model never trained on them
    held_out = data.obs.iloc[model.validation_indices_]
    correct = held_out["scinfl_prediction"].to_numpy() == held_out["bulk_labels"].to_numpy()
    scores = {
        "ARI (Leiden vs bulk_labels, all cells)": adjusted_rand_score(
            data.obs["bulk_labels"], data.obs["scinfl_leiden"]
        ),
        "accuracy (classifier, held-out cells)": float(np.mean(correct)),
        "held-out cells (validation split)": len(held_out),
        "best round": history.attrs["best_round"],
        "seconds per round": elapsed / rounds,
    }
    return model, data, scores


def _print_summary(summary: dict, rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"scinfl quickstart: {summary['sites']} sites, {summary['cells']} cells x {summary['genes']} genes, {rounds} rounds"
    )
    columns = [c for c in ("federated", "centralized") if c in summary]
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    for metric in summary["federated"]:
        cells = []
        for column in columns:
            value = summary[column][metric]
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        table.add_row(metric, *cells)
    console = Console()
    console.print(table)
    for path in summary["outputs"]:
        console.print(f"wrote {path}")


def new_identity(site: str, out: str | Path, overwrite: bool = False) -> str:
    """Draw ``site``'s identity into ``out`` (private); returns its public key for the roster.

    Examples
    --------
    >>> import tempfile
    >>> len(new_identity("a", tempfile.mkdtemp() + "/a.identity"))
    64
    """
    from scinfl.federated import SiteIdentity

    if not site.strip() or "=" in site:
        raise ValueError(
            f"Site name {site!r}: give a non-empty name without '=' (the roster reads "
            "SITE=PUBLIC_KEY lines)."
        )
    if Path(out).is_dir():
        raise ValueError(f"--out {out} is a directory: give the identity file's path.")
    if Path(out).exists() and not overwrite:
        raise ValueError(f"{out} exists: pass --force to replace that identity, or another --out.")
    identity = SiteIdentity.generate(site)
    identity.save(out, overwrite=overwrite)
    return identity.public_key


def write_roster(entries: Sequence[str], out: str | Path, overwrite: bool = False) -> Path:
    """Write the roster of ``SITE=PUBLIC_KEY`` entries (the public keys sites sent) to ``out``.

    Examples
    --------
    >>> import tempfile
    >>> path = write_roster(["a=" + "ab" * 32], tempfile.mkdtemp() + "/roster.json")
    >>> path.name
    'roster.json'
    """
    from scinfl.federated import Roster

    if Path(out).exists() and not overwrite:
        raise ValueError(f"{out} exists: pass --force to replace that roster, or another --out.")
    keys = {}
    for entry in entries:
        site, sep, public_key = entry.partition("=")
        if not sep or not site:
            raise ValueError(
                f"Roster entry {entry!r} is not SITE=PUBLIC_KEY (the line that "
                "`scinfl identity` printed at that site)."
            )
        if site in keys:
            raise ValueError(f"Site {site!r} is named twice in the roster: give one line a site.")
        keys[site] = public_key
    return Roster(keys).save(out)


def _version() -> str:
    from importlib.metadata import version

    return version("scinfl")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scinfl`` command."""
    parser = argparse.ArgumentParser(
        prog="scinfl", description="Federated omics models with a secret key (INFL)."
    )
    parser.add_argument("--version", action="version", version=f"scinfl {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    qs = commands.add_parser(
        "quickstart", help="3-site federation on packaged PBMC data; prints a summary"
    )
    qs.add_argument("--rounds", type=int, default=30, help="federated rounds (default 30)")
    qs.add_argument(
        "--out", default="scinfl_quickstart", help="output directory (default scinfl_quickstart)"
    )
    qs.add_argument("--seed", type=int, default=0, help="seed of the sites' split and training")
    qs.add_argument("--no-central", action="store_true", help="skip the centralized reference")
    identity = commands.add_parser(
        "identity", help="draw a site's identity for secure aggregation (kept at the site)"
    )
    identity.add_argument("site", help="the site's name in the federation")
    identity.add_argument("--out", required=True, help="identity file to write (private)")
    identity.add_argument("--force", action="store_true", help="replace an existing file")
    roster = commands.add_parser(
        "roster", help="write the federation's roster from the sites' public keys"
    )
    roster.add_argument("entries", nargs="+", metavar="SITE=PUBLIC_KEY")
    roster.add_argument("--out", required=True, help="roster file to write (public)")
    roster.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    try:
        if args.command == "quickstart":
            quickstart(
                rounds=args.rounds, out=args.out, seed=args.seed, central=not args.no_central
            )
        elif args.command == "identity":
            public_key = new_identity(args.site, args.out, overwrite=args.force)
            console.print(f"wrote {args.out}; send the coordinator this line for the roster:")
            console.print(f"{args.site}={public_key}", soft_wrap=True)
        else:
            console.print(f"wrote {write_roster(args.entries, args.out, overwrite=args.force)}")
    except (ValueError, OSError) as error:
        # a user's mistake (a setting, a path): one line, as argparse reports its own
        commands.choices[args.command].error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
