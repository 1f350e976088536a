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
