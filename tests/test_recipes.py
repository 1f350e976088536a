"""The recipe pages' code runs: docs/recipes/protein_matrix.md on synthetic tables."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "recipes" / "protein_matrix.md"
SITES, LABELS = ("A", "B", "C"), ("tumor", "normal", "other")


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", RECIPE.read_text(), flags=re.DOTALL)


def _samples(rng):
    """A sample sheet (3 sites x 12 samples, balanced labels) and log2 intensities."""
    names = [f"S{i:02d}" for i in range(36)]
    sheet = pd.DataFrame(
        {"sample": names, "site": np.repeat(SITES, 12), "label": np.tile(LABELS, 12)}
    )
    n_proteins = 60
    effect = rng.normal(0, 1.5, size=(len(LABELS), n_proteins))
    codes = pd.Categorical(sheet["label"], categories=LABELS).codes
    log2 = 25 + rng.normal(0, 2, n_proteins) + effect[codes] + rng.normal(0, 0.5, (36, n_proteins))
    intensity = 2.0**log2
    intensity[rng.random(intensity.shape) < 0.1] = np.nan  # missing at random
    intensity[:12, 0] = np.nan  # protein 0 is not quantified at site A
    return sheet, names, intensity


def _proteins(n):
    return [f"P{i:05d};P{i:05d}-2" for i in range(n)]


def _maxquant(path: Path, rng) -> pd.DataFrame:
    sheet, names, intensity = _samples(rng)
    n = intensity.shape[1]
    table = pd.DataFrame(
        np.nan_to_num(intensity.T, nan=0.0),  # MaxQuant writes 0 for not quantified
        columns=[f"LFQ intensity {s}" for s in names],
    )
    table.insert(0, "Protein IDs", _proteins(n))
    table.insert(1, "Gene names", [f"G{i}" for i in range(n)])
    table.insert(2, "Intensity", table.iloc[:, 2:].sum(axis=1))
    for column in ("Reverse", "Potential contaminant", "Only identified by site"):
        table[column] = ""
    # decoys and contaminants: strong label signal that the recipe must drop
    table.loc[:2, "Reverse"] = "+"
    table.loc[3:4, "Potential contaminant"] = "+"
    table.loc[5, "Only identified by site"] = "+"
    table.to_csv(path / "proteinGroups.txt", sep="\t", index=False)
    return sheet


def _diann(path: Path, rng) -> pd.DataFrame:
    sheet, names, intensity = _samples(rng)
    n = intensity.shape[1]
    runs = [rf"D:\runs\{s}.raw" if i % 2 else f"/data/runs/{s}.d" for i, s in enumerate(names)]
    table = pd.DataFrame(intensity.T, columns=runs)
    table.insert(0, "Protein.Group", _proteins(n))
    table.insert(1, "Protein.Ids", _proteins(n))
    table.insert(2, "Protein.Names", [f"N{i}_HUMAN" for i in range(n)])
    table.insert(3, "Genes", [f"G{i}" for i in range(n)])
    table.insert(4, "First.Protein.Description", "a protein")
    # newer DIA-NN versions add these annotation columns
    table.insert(5, "N.Sequences", 3)
    table.insert(6, "N.Proteotypic.Sequences", 2)
    table.to_csv(path / "report.pg_matrix.tsv", sep="\t", index=False)
    return sheet


@pytest.mark.parametrize(("reader", "write"), [(0, _maxquant), (1, _diann)])
def test_protein_matrix_recipe_runs(reader, write, tmp_path, monkeypatch, capsys):
    blocks = _blocks()
    assert len(blocks) == 3  # MaxQuant, DIA-NN, then the shared steps
    sheet = write(tmp_path, np.random.default_rng(reader))
    sheet.to_csv(tmp_path / "samples.csv", index=False)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(blocks[reader], namespace)  # the documented code itself
    lfq = namespace["lfq"]
    assert list(lfq.columns) == sheet["sample"].tolist()
    assert lfq.shape == ((60, 36) if reader else (54, 36))  # 6 groups flagged by MaxQuant
    assert not (lfq == 0).any().any() and lfq.isna().any().any()
    exec(blocks[2], namespace)
    test, matrix, keep = namespace["test"], namespace["matrix"], namespace["keep"]
    assert matrix.shape == (3, 3) and matrix.sum() == test.n_obs == 9
    assert "P00000;P00000-2" not in keep  # not quantified at site A
    assert len(keep) >= 40  # most proteins are kept (at worst 50 here, whatever the split)
    assert "tumor" in capsys.readouterr().out
