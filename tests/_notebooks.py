"""Tutorial notebooks in the tests: the run stored for the docs, and a reduced re-execution."""

from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"


def outputs_text(nb) -> str:
    """Streams and plain-text results of every cell, joined."""
    chunks = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                chunks.append(output.get("text", ""))
            elif "data" in output:
                chunks.append(output["data"].get("text/plain", ""))
    return "\n".join(chunks)


def stored_run(name: str):
    """The stored notebook and its outputs; every code cell ran, in order, without an error."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return nb, outputs


def execute(name: str, tmp_path, monkeypatch, env: dict[str, str], timeout: int = 600) -> str:
    """Run the notebook in a fresh kernel (one thread, files under ``tmp_path``); its text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    if "python3" not in kernelspec.KernelSpecManager().find_kernel_specs():
        pytest.skip("no 'python3' Jupyter kernel (install ipykernel)")
    # the kernel inherits this environment
    defaults = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path)}
    for variable, value in {**defaults, **env}.items():
        monkeypatch.setenv(variable, value)
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return outputs_text(nb)
