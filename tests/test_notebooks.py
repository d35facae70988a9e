"""Run the notebooks under notebooks/ and check their committed outputs.

Set UEAJ_UPDATE_NOTEBOOKS=1 to write the fresh outputs back into the files.
"""

import os
import pathlib
import time

import pytest

nbclient = pytest.importorskip("nbclient", reason="install the test extra: pip install -e '.[test]'")
nbformat = pytest.importorskip("nbformat", reason="install the test extra: pip install -e '.[test]'")
traitlets_config = pytest.importorskip("traitlets.config")

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Stops a hung kernel. A cell normally takes seconds: the slowest, the first
# jitted training step, compiles in about 8 s of CPU time (measured here).
CELL_TIMEOUT_S = 120


def code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_notebooks_exist():
  assert [path.name for path in NOTEBOOKS] == ["layer_decay.ipynb", "quickstart.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  cells = code_cells(notebook)
  counts = [cell.execution_count for cell in cells]
  assert counts == list(range(1, len(cells) + 1)), (
    f"{path.name} was not run top to bottom before the commit: execution counts {counts}"
  )
  assert sum(len(cell.outputs) for cell in cells) >= len(cells) // 2, (
    f"{path.name} has almost no committed outputs"
  )
  for number, cell in enumerate(cells):
    errors = [output for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"{path.name}: code cell {number} has a committed error"
    streams = [output for output in cell.outputs if output.output_type == "stream"]
    assert all(output.name == "stdout" for output in streams), (
      f"{path.name}: code cell {number} wrote to stderr"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(path, as_version=4)
  # The kernel talks over Unix domain sockets in tmp_path, not TCP ports.
  config = traitlets_config.Config()
  config.KernelManager.transport = "ipc"
  config.KernelManager.ip = str(tmp_path / "kernel")
  client = nbclient.NotebookClient(
    notebook,
    kernel_name="python3",
    timeout=CELL_TIMEOUT_S,
    resources={"metadata": {"path": str(ROOT)}},
    config=config,
  )
  start = time.perf_counter()
  client.execute()  # Raises CellExecutionError, naming the cell, on an error.
  elapsed = time.perf_counter() - start

  for number, cell in enumerate(code_cells(notebook)):
    streams = [output for output in cell.outputs if output.output_type == "stream"]
    stderr = "".join(output.text for output in streams if output.name == "stderr")
    assert not stderr, f"{path.name}: code cell {number} wrote to stderr:\n{stderr}"
  if os.environ.get("UEAJ_UPDATE_NOTEBOOKS"):
    nbformat.write(notebook, path)
  print(f"{path.name}: {elapsed:.1f} s")
