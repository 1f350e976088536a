"""The multi-omics tutorial: stored with the outputs of a full run, and runs on a reduced one."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "multiomics.ipynb"


def _outputs_text(nb) -> str:
    chunks = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                chunks.append(output.get("text", ""))
            elif "data" in output:
                chunks.append(output["data"].get("text/plain", ""))
    return "\n".join(chunks)


def test_the_tutorial_is_stored_with_the_outputs_of_a_full_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert "trained 40 rounds" in _outputs_text(nb)


@pytest.mark.slow
def test_the_tutorial_runs(tmp_path, monkeypatch):
    if "python3" not in kernelspec.KernelSpecManager().find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel (install ipykernel)")
    monkeypatch.setenv("SCINFL_TUTORIAL_ROUNDS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = _outputs_text(nb)
    assert "trained 3 rounds" in text
    assert "X_scinfl (600, 10)" in text
    assert "rna only: median shift" in text and "prot only: median shift" in text
