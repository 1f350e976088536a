import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

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
