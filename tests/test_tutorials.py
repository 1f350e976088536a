"""Execute the tutorial notebooks end to end (with few federated rounds)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "quickstart.ipynb"


def _outputs_text(nb) -> str:
    chunks = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                chunks.append(output.get("text", ""))
            elif "data" in output:
                chunks.append(output["data"].get("text/plain", ""))
    return "\n".join(chunks)


def test_quickstart_is_stored_with_the_outputs_of_a_full_run():
    """The docs render the notebook as stored: every cell ran, in order, without an error."""
    nb = nbformat.read(QUICKSTART, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # loss curve, UMAP
    assert "30 rounds" in _outputs_text(nb)  # the full run, not the test suite's short one


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    if "python3" not in kernelspec.KernelSpecManager().find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel (install ipykernel)")
    # the kernel inherits this environment: few rounds, one thread, files under tmp_path
    monkeypatch.setenv("SCINFL_TUTORIAL_ROUNDS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))

    nb = nbformat.read(QUICKSTART, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError if any cell fails

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = _outputs_text(nb)
    assert "3 rounds" in text
    assert "X_scinfl (700, 10)" in text
    assert "scinfl_leiden" in text and "clusters" in text
    assert "KeyMismatchError:" in text
    assert "reloaded model gives the same latent space: True" in text
