import anndata as ad
import pytest

from scinfl.__main__ import main


@pytest.mark.realdata
def test_quickstart_writes_outputs_without_key_material(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--rounds", "2", "--no-central", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ARI" in printed and "federated" in printed
    assert "accuracy (classifier, held-out cells)" in printed
    adata = ad.read_h5ad(out / "pbmc68k_scinfl.h5ad")
    assert adata.obsm["X_scinfl"].shape == (700, 10)
    assert "scinfl_leiden" in adata.obs and "scinfl_prediction" in adata.obs
    assert adata.uns["scinfl_leiden"]["params"]["neighbors_key"] == "scinfl"
    assert "cluster" not in adata.uns["scinfl"]  # the neighbours' dict holds only theirs
    assert "scinfl_proba" in adata.obsm
    assert (out / "umap.png").stat().st_size > 10_000
    seed_hex = (out / "site.key").read_text().split('"seed": "')[1].split('"')[0]
    for path in [out / "pbmc68k_scinfl.h5ad", *(out / "model").iterdir()]:
        assert seed_hex.encode() not in path.read_bytes()
        assert bytes.fromhex(seed_hex) not in path.read_bytes()
