"""Execute the tutorial notebooks end to end (with few federated rounds)."""

import pytest

from ._notebooks import execute, outputs_text, stored_run


def test_quickstart_is_stored_with_the_outputs_of_a_full_run():
    """The docs render the notebook as stored: every cell ran, in order, without an error."""
    nb, outputs = stored_run("quickstart.ipynb")
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # loss curve, UMAP
    assert "30 rounds" in outputs_text(nb)  # the full run, not the test suite's short one


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    text = execute("quickstart.ipynb", tmp_path, monkeypatch, {"SCINFL_TUTORIAL_ROUNDS": "3"})
    assert "3 rounds" in text
    assert "X_scinfl (700, 10)" in text
    assert "scinfl_leiden" in text and "clusters" in text
    assert "KeyMismatchError:" in text
    assert "reloaded model gives the same latent space: True" in text


def test_multiomics_tutorial_is_stored_with_the_outputs_of_a_full_run():
    nb, outputs = stored_run("multiomics.ipynb")
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert "trained 40 rounds" in outputs_text(nb)


@pytest.mark.slow
def test_multiomics_tutorial_runs(tmp_path, monkeypatch):
    env = {"SCINFL_TUTORIAL_ROUNDS": "3"}
    text = execute("multiomics.ipynb", tmp_path, monkeypatch, env, timeout=300)
    assert "trained 3 rounds" in text
    assert "X_scinfl (600, 10)" in text
    assert "rna only: median shift" in text and "prot only: median shift" in text


def test_spatial_tutorial_is_stored_with_the_outputs_of_a_full_run():
    nb, outputs = stored_run("spatial_domains.ipynb")
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # truth, domains
    text = outputs_text(nb)
    assert "trained 50 rounds" in text and "0 across sites" in text


@pytest.mark.slow
def test_spatial_tutorial_runs(tmp_path, monkeypatch):
    env = {"SCINFL_TUTORIAL_ROUNDS": "3"}
    text = execute("spatial_domains.ipynb", tmp_path, monkeypatch, env, timeout=300)
    assert "trained 3 rounds" in text and "0 across sites" in text
    assert "scinfl_domain: ARI against the truth" in text
    assert "'n_layers': 3" in text
