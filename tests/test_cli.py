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


def test_identity_and_roster_commands_make_files_a_site_loads(tmp_path, capsys):
    from scinfl.federated import Roster, SiteIdentity

    lines = []
    for site in ("a", "b"):
        assert main(["identity", site, "--out", str(tmp_path / f"{site}.identity")]) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["roster", *lines, "--out", str(tmp_path / "roster.json")]) == 0
    roster = Roster.load(tmp_path / "roster.json")
    identity = SiteIdentity.load(tmp_path / "a.identity")
    assert roster.public_keys["a"] == identity.public_key and set(roster.public_keys) == {"a", "b"}
    assert (tmp_path / "a.identity").stat().st_mode & 0o077 == 0  # private to its owner
    refused = {
        "SITE=PUBLIC_KEY": ["roster", "a:123"],
        "for site 'a' is not 64 hex digits": ["roster", "a=" + "zz" * 32],
        "'a' is named twice": ["roster", lines[0], lines[0].replace("a=", "a=")],
        "have the same public key": ["roster", lines[0], "c=" + lines[0].split("=")[1]],
    }
    for message, argv in refused.items():
        _refused(capsys, [*argv, "--out", str(tmp_path / "bad.json")], message)
    assert not (tmp_path / "bad.json").exists()
    _refused(capsys, ["identity", "a", "--out", str(tmp_path / "a.identity")], "pass --force")
    assert main(["identity", "a", "--out", str(tmp_path / "a.identity"), "--force"]) == 0
    _refused(capsys, ["identity", "x=y", "--out", str(tmp_path / "x.identity")], "without '='")
    roster_again = ["roster", *lines, "--out", str(tmp_path / "roster.json")]
    _refused(capsys, roster_again, "pass --force")
    assert main([*roster_again, "--force"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("scinfl ")


def _refused(capsys, argv, message):
    """The command stops with one line naming the problem (argparse's exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_quickstart_refuses_bad_settings_before_writing(tmp_path, capsys):
    out = tmp_path / "qs"
    _refused(capsys, ["quickstart", "--rounds", "0", "--out", str(out)], "max_rounds must be")
    _refused(capsys, ["quickstart", "--seed", "-1", "--out", str(out)], "seed must be")
    assert not out.exists()
