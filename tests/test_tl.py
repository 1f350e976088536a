import subprocess
import sys
import warnings

import anndata
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import scinfl


@pytest.fixture
def embedded(counts_adata):
    counts_adata.obsm["X_scinfl"] = np.log1p(counts_adata.X.toarray())
    return counts_adata


def _keys(adata) -> dict:
    return {a: set(getattr(adata, a).keys()) for a in ("obs", "obsm", "obsp", "uns")}


def test_cluster_writes_under_its_keys_and_keeps_the_users(embedded):
    own_umap = np.arange(2.0 * embedded.n_obs).reshape(-1, 2)
    embedded.obsm["X_umap"] = own_umap
    embedded.uns["umap"] = {"params": {"mine": True}}
    result = scinfl.tl.cluster(embedded, n_neighbors=5, key_added="clusters", neighbors_key="g")
    assert result is None
    assert embedded.obs["clusters"].dtype == "category"
    params = embedded.uns["clusters"]["params"]
    assert params["neighbors_key"] == "g" and params["umap_key"] == "X_umap_g"
    assert params["n_neighbors"] == 5 and params["use_rep"] == "X_scinfl"
    assert {"g_connectivities", "g_distances"} <= set(embedded.obsp)
    assert "clusters" not in embedded.uns["g"]  # the graph's dict holds only scanpy's own
    assert embedded.obsm["X_umap_g"].shape == (embedded.n_obs, 2)
    np.testing.assert_array_equal(embedded.obsm["X_umap"], own_umap)
    assert embedded.uns["umap"] == {"params": {"mine": True}}


def test_cluster_copy_leaves_the_input_untouched(embedded):
    before = _keys(embedded)
    result = scinfl.tl.cluster(embedded, n_neighbors=5, umap=False, copy=True)
    assert _keys(embedded) == before
    assert "scinfl_leiden" in result.obs and "scinfl_connectivities" in result.obsp
    assert "umap_key" not in result.uns["scinfl_leiden"]["params"]
    assert "X_umap_scinfl" not in result.obsm


def test_embed_and_predict_copy(counts_adata, key):
    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site", labels_key="label")
    model = scinfl.model.INFL(counts_adata, key=key, n_latent=4)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    before = _keys(counts_adata)
    embedded = scinfl.tl.embed(counts_adata, model, copy=True)
    predicted = scinfl.tl.predict(counts_adata, model, copy=True)
    assert _keys(counts_adata) == before
    assert embedded.obsm["X_scinfl"].shape == (counts_adata.n_obs, 4)
    assert predicted.obsm["scinfl_proba"].shape == (counts_adata.n_obs, 3)
    assert scinfl.tl.embed(counts_adata, model, key_added="X_z", batch_size=7) is None
    assert scinfl.tl.predict(counts_adata, model, key_added="pred", batch_size=7) is None
    # another batch size: the same latent up to float32 rounding
    np.testing.assert_allclose(counts_adata.obsm["X_z"], embedded.obsm["X_scinfl"], atol=1e-6)
    assert counts_adata.obs["pred"].tolist() == predicted.obs["scinfl_prediction"].tolist()


def test_embed_records_the_model_settings_but_no_key_material():
    adata = scinfl.data.synthetic_counts(n_obs=90, n_vars=10, n_sites=3, seed=4)
    scinfl.model.INFL.setup_anndata(adata, site_key="site")
    seed = bytes(range(40, 72))
    model = scinfl.model.INFL(adata, key=scinfl.Key(seed), n_hidden=8)
    model.train_federated(max_rounds=1, progress_bar=False)
    scinfl.tl.embed(adata, model)
    params = adata.uns["X_scinfl"]["params"]
    assert params["model"] == "INFL" and params["n_hidden"] == 8
    text = repr(adata.uns)
    assert seed.hex() not in text and repr(seed) not in text and "Key(" not in text


KEEPS_THREADS = """
import numpy as np, torch, anndata as ad, scinfl
torch.set_num_threads(1)
x = torch.randn(500, 500)
(x @ x).sum()  # torch's OpenMP runtime has run
adata = ad.AnnData(np.random.default_rng(0).normal(size=(700, 10)).astype("float32"))
adata.obsm["X_scinfl"] = adata.X
scinfl.tl.cluster(adata, umap=False)
print(torch.get_num_threads())
"""


def test_cluster_keeps_the_users_torch_threads():
    """The first neighbour graph of a process resets OpenMP's thread count; ours puts it back.

    In a fresh interpreter: later graphs of a process do not reset it.
    """
    env = {"PATH": "", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", KEEPS_THREADS], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "1"


def test_results_of_labels_with_slashes_write_to_h5ad_and_zarr(counts_adata, key, tmp_path):
    """Labels are data: one with a '/' must not become a key of the written file."""
    labels = counts_adata.obs["label"].astype(str).str.replace("type0", "CD4+/CD25 T Reg")
    counts_adata.obs["label"] = labels.astype("category")
    scinfl.model.INFL.setup_anndata(counts_adata, site_key="site", labels_key="label")
    model = scinfl.model.INFL(counts_adata, key=key, n_latent=4)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    scinfl.tl.embed(counts_adata, model)
    scinfl.tl.predict(counts_adata, model)
    scinfl.tl.cluster(counts_adata, n_neighbors=5, umap=False)
    labels = counts_adata.uns["scinfl_prediction"]["params"]["labels"]
    assert labels == list(counts_adata.obs["scinfl_prediction"].cat.categories)
    assert "CD4+/CD25 T Reg" in labels
    proba = counts_adata.obsm["scinfl_proba"]
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    best = np.asarray(labels)[proba.argmax(1)]
    assert best.tolist() == counts_adata.obs["scinfl_prediction"].astype(str).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        counts_adata.write_h5ad(tmp_path / "a.h5ad")
    counts_adata.write_zarr(tmp_path / "a.zarr")
    back = anndata.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_allclose(back.obsm["scinfl_proba"], proba)
    assert list(back.uns["scinfl_prediction"]["params"]["labels"]) == labels


def test_cluster_takes_an_atlas_sized_embedding():
    """From 8,192 cells on scanpy's neighbour graph goes through pynndescent (here it failed
    on every such data set until pynndescent was kept below 0.7: 'csr_array' object has no
    attribute 'getnnz')."""
    n = 8192
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 3, n)
    adata = anndata.AnnData(obs={"group": groups.astype(str)})
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.obsm["X_scinfl"] = (rng.normal(size=(n, 10)) + 6 * groups[:, None]).astype(np.float32)
    scinfl.tl.cluster(adata, umap=False, resolution=0.1)
    codes = adata.obs["scinfl_leiden"].cat.codes.to_numpy()
    assert adjusted_rand_score(groups, codes) > 0.99


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda a, m: scinfl.tl.predict(a, m, key_added="p2", proba_key="X_scinfl"),
            "obsm\\['X_scinfl'\\] holds the result of scinfl.tl.embed",
        ),
        (
            lambda a, m: scinfl.tl.embed(a, m, key_added="X_umap_scinfl"),
            "holds the result of scinfl.tl.cluster",
        ),
        (
            lambda a, m: scinfl.tl.embed(a, m, key_added="scinfl_leiden"),
            "uns\\['scinfl_leiden'\\] holds the result of scinfl.tl.cluster",
        ),
        (
            lambda a, m: scinfl.tl.cluster(a, key_added="c2", neighbors_key="scinfl_prediction"),
            "holds the result of scinfl.tl.predict",
        ),
    ],
)
def test_a_tool_never_writes_over_another_tools_result(call, match):
    adata = scinfl.data.synthetic_counts(n_obs=90, n_vars=12, n_sites=2)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=8)
    model.train_federated(max_rounds=1, batch_size=32, progress_bar=False)
    scinfl.tl.embed(adata, model)
    scinfl.tl.cluster(adata)
    scinfl.tl.predict(adata, model)
    before = {key: np.array(adata.obsm[key]) for key in adata.obsm}
    with pytest.raises(ValueError, match=match):
        call(adata, model)
    assert all(np.array_equal(adata.obsm[key], value) for key, value in before.items())
    scinfl.tl.embed(adata, model)  # rerunning a tool on its own result is fine
    scinfl.tl.cluster(adata)
    scinfl.tl.predict(adata, model)
