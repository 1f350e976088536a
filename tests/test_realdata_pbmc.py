"""Utility of the federated model on real packaged data (scanpy's pbmc68k_reduced)."""

import numpy as np
import pytest
import scvi
from sklearn.metrics import adjusted_rand_score

import scinfl

ROUNDS = 30  # the README's setting: 30 rounds x 2 local epochs against 30 centralized epochs
LOCAL_EPOCHS = 2
SEEDS = (0, 1, 2)


def _ari(federated: bool, seed: int, key) -> tuple[float, float]:
    adata = scinfl.data.pbmc68k(seed=seed)
    scvi.settings.seed = seed
    scinfl.model.INFL.setup_anndata(
        adata, layer="counts", site_key="site", labels_key="bulk_labels"
    )
    model = scinfl.model.INFL(adata, key=key)
    if federated:
        model.train_federated(max_rounds=ROUNDS, local_epochs=LOCAL_EPOCHS, progress_bar=False)
    else:
        model.train_centralized(max_epochs=ROUNDS, progress_bar=False)
    scinfl.tl.embed(adata, model)
    scinfl.tl.cluster(adata, umap=False)
    accuracy = float(np.mean(model.predict() == adata.obs["bulk_labels"].to_numpy()))
    return adjusted_rand_score(adata.obs["bulk_labels"], adata.obs["scinfl_leiden"]), accuracy


@pytest.mark.realdata
def test_pbmc68k_pipeline_shapes():
    adata = scinfl.data.pbmc68k()
    counts = adata.layers["counts"]
    assert adata.shape == (700, 765)
    assert np.allclose(counts.data, np.round(counts.data)) and counts.data.min() >= 1
    assert adata.obs["site"].nunique() == 3
    assert adata.obs["bulk_labels"].nunique() == 10


@pytest.mark.realdata
@pytest.mark.slow
def test_federated_ari_close_to_centralized(key):
    """Leiden ARI on the federated latent at most 0.1 below the same model trained centrally.

    Averaged over three seeds, with a fresh key per run. Leiden ARI on 700 cells moves by
    0.05-0.08 from seed to seed on either side (centralized 0.65-0.81 in one run), so the mean
    difference of three seeds has a standard error of about 0.05: a bound of 0.05 failed one
    fresh-clone CI in four (0.684 against 0.754) with no change to the model; 0.1 is two
    standard errors, and still far from an untrained or broken federation.
    One-sided: the federated model often scores above the centralized one. With one local
    epoch per round a site of ~200 cells takes only two optimiser steps per round, and after
    30 rounds the federated model still underfits (measured over 4 seeds: ARI 0.596 against
    0.647 centralized); two local epochs close the gap (0.651 against 0.647).
    """
    fed = np.array([_ari(True, s, key) for s in SEEDS])
    central = np.array([_ari(False, s, key) for s in SEEDS])
    print(f"federated ARI/acc {fed.mean(0)}, centralized ARI/acc {central.mean(0)}")
    assert central[:, 0].mean() > 0.4  # the model learns the cell types at all
    assert fed[:, 0].mean() >= central[:, 0].mean() - 0.1
