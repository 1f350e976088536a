import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import scinfl


def test_umap_legends_stay_clear_of_the_next_panel():
    adata = scinfl.data.synthetic_counts(n_obs=80, n_vars=20, seed=0)
    adata.obsm["X_scinfl"] = np.log1p(adata.X.toarray())
    scinfl.tl.cluster(adata, n_neighbors=5)
    long = {c: f"a rather long cell type name {c}" for c in adata.obs["label"].cat.categories}
    adata.obs["long"] = adata.obs["label"].map(long).astype("category")
    fig = scinfl.pl.umap(adata, color=["long", "label", "site"])
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(panels) == 3
    for left, right in zip(panels, panels[1:], strict=False):
        legend = left.get_legend().get_window_extent(renderer)
        assert legend.x1 < right.get_window_extent(renderer).x0
    assert panels[0].get_xlabel() == "UMAP1"
    plt.close(fig)


def test_umap_of_a_mudata_colours_by_a_modalitys_feature():
    mdata = scinfl.data.synthetic_multiome(n_obs=40, n_genes=8, n_proteins=3, n_sites=2)
    mdata.obsm["X_umap_scinfl"] = np.random.default_rng(0).normal(size=(mdata.n_obs, 2))
    fig = scinfl.pl.umap(mdata, color=["cell_type", "prot:protein0", "gene1"])
    assert len([ax for ax in fig.axes if ax.get_title()]) == 3
    plt.close(fig)
    with pytest.raises(ValueError, match="modality:feature"):
        scinfl.pl.umap(mdata, color="nothing")
    mdata.mod["prot"].var_names = ["gene1", *mdata.mod["prot"].var_names[1:]]
    with pytest.raises(ValueError, match="several modalities"):
        scinfl.pl.umap(mdata, color="gene1")


def test_umap_of_a_mudata_reads_its_colours_and_layers():
    mdata = scinfl.data.synthetic_multiome(n_obs=40, n_genes=8, n_proteins=3, n_sites=2)
    mdata.obsm["X_umap_scinfl"] = np.random.default_rng(0).normal(size=(mdata.n_obs, 2))
    n_types = mdata.obs["cell_type"].nunique()
    mdata.uns["cell_type_colors"] = ["#000000"] * n_types  # were ignored
    fig = scinfl.pl.umap(mdata, color="cell_type")
    colours = fig.axes[0].collections[0].get_facecolors()
    assert np.allclose(colours[:, :3], 0.0)
    plt.close(fig)
    prot = mdata.mod["prot"]
    prot.layers["seven"] = np.full(prot.shape, 7.0, dtype=np.float32)  # .X was drawn instead
    fig = scinfl.pl.umap(mdata, color="prot:protein0", layer="seven")
    values = fig.axes[0].collections[0].get_array()
    assert np.allclose(values.compressed(), 7.0)
    plt.close(fig)
    with pytest.raises(ValueError, match="layer='nope' is not a layer of modality 'prot'"):
        scinfl.pl.umap(mdata, color="prot:protein0", layer="nope")


def test_plots_take_scanpys_arguments_or_refuse_them_by_name(tmp_path):
    adata = scinfl.data.synthetic_spatial(n_sections=2, n_side=8, n_vars=20)
    fig = scinfl.pl.spatial(adata, color="domain", library_key="section", return_fig=True)
    plt.close(fig)
    with pytest.raises(TypeError, match="colours by one key"):
        scinfl.pl.spatial(adata, color=["domain", "section"])
    for draw in (
        lambda: scinfl.pl.spatial(adata, color="domain", save=True),
        lambda: scinfl.pl.privacy(_audit_table(), save=True),
    ):
        with pytest.raises(TypeError, match="save= takes a file path"):
            draw()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scinfl.pl.spatial(adata, color="domain", save=tmp_path / "nowhere" / "x.png")
    fig = scinfl.pl.spatial(adata, color="domain", library_key=None, title="Domains")
    assert fig.axes[0].get_title() == "Domains"
    plt.close("all")


def _audit_table():
    import pandas as pd

    return pd.DataFrame(
        {
            "defence": ["plain", "key"],
            "metric": ["a", "a"],
            "value": [0.9, 0.1],
            "attack": "x",
            "key_guess": "none",
        }
    )
