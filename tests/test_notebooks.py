"""The notebooks run top to bottom on small settings, so they never rot."""

import pathlib
import sys

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def test_quickstart_runs_and_writes_its_figures(tmp_path, monkeypatch):
  # The kernel inherits this process's environment.
  monkeypatch.setenv("TBPTT_JAX_SMOKE", "1")
  monkeypatch.setenv("TBPTT_JAX_NOTEBOOK_OUT", str(tmp_path))
  nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
  # A last cell reports the kernel's interpreter: it must be the one running the tests, or the
  # notebook would be tested against another installation of tbptt_jax.
  nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
  client = NotebookClient(
    nb,
    kernel_name="python3",
    timeout=600,
    resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  client.execute()  # raises CellExecutionError if any cell fails

  outputs = nb.cells[-1].outputs
  assert [o.get("text", "").strip() for o in outputs] == [sys.prefix]
  for name in ("quickstart_loss.png", "truncations.png"):
    png = tmp_path / name
    assert png.is_file(), f"the notebook did not write {name}"
    assert png.stat().st_size > 0, f"{name} is empty"


def test_language_model_runs_and_writes_its_figure(tmp_path, monkeypatch, shared_data):
  # The kernel inherits this process's environment.
  monkeypatch.setenv("TBPTT_JAX_SMOKE", "1")
  monkeypatch.setenv("TBPTT_JAX_NOTEBOOK_OUT", str(tmp_path))
  monkeypatch.setenv("TBPTT_JAX_DATA", str(shared_data))
  nb = nbformat.read(NOTEBOOKS / "language_model.ipynb", as_version=4)
  # As in the quickstart test: the kernel must run the interpreter that runs the tests.
  nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
  client = NotebookClient(
    nb,
    kernel_name="python3",
    timeout=600,
    resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  client.execute()  # raises CellExecutionError if any cell fails

  outputs = nb.cells[-1].outputs
  assert [o.get("text", "").strip() for o in outputs] == [sys.prefix]
  png = tmp_path / "lm_perplexity.png"
  assert png.is_file(), "the notebook did not write lm_perplexity.png"
  assert png.stat().st_size > 0, "lm_perplexity.png is empty"


def test_truncation_styles_runs_and_writes_its_figures(tmp_path, monkeypatch, shared_data):
  # The kernel inherits this process's environment.
  monkeypatch.setenv("TBPTT_JAX_SMOKE", "1")
  monkeypatch.setenv("TBPTT_JAX_NOTEBOOK_OUT", str(tmp_path))
  monkeypatch.setenv("TBPTT_JAX_DATA", str(shared_data))
  nb = nbformat.read(NOTEBOOKS / "truncation_styles.ipynb", as_version=4)
  # As in the quickstart test: the kernel must run the interpreter that runs the tests.
  nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
  client = NotebookClient(
    nb,
    kernel_name="python3",
    timeout=600,
    resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  client.execute()  # raises CellExecutionError if any cell fails

  outputs = nb.cells[-1].outputs
  assert [o.get("text", "").strip() for o in outputs] == [sys.prefix]
  for name in ("styles_diagram.png", "synthetic_styles.png"):
    png = tmp_path / name
    assert png.is_file(), f"the notebook did not write {name}"
    assert png.stat().st_size > 0, f"{name} is empty"
