"""The notebooks run top to bottom on small settings, so they never rot."""

import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name, out, monkeypatch, **env):
  """Executes notebooks/`name` in smoke mode, its figures going to `out`."""
  # The kernel inherits this process's environment.
  monkeypatch.setenv("TBPTT_JAX_SMOKE", "1")
  monkeypatch.setenv("TBPTT_JAX_NOTEBOOK_OUT", str(out))
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
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


def assert_figures(out, *names):
  for name in names:
    png = out / name
    assert png.is_file(), f"the notebook did not write {name}"
    assert png.stat().st_size > 0, f"{name} is empty"


def test_quickstart_runs_and_writes_its_figures(tmp_path, monkeypatch):
  run_notebook("quickstart.ipynb", tmp_path, monkeypatch)
  assert_figures(tmp_path, "quickstart_loss.png", "truncations.png")


@pytest.mark.parametrize(
  "name,figures",
  [
    ("language_model.ipynb", ["lm_perplexity.png"]),
    ("truncation_styles.ipynb", ["styles_diagram.png", "synthetic_styles.png"]),
    ("vanishing_exploding.ipynb", ["lag_norms.png", "clipping.png", "truncation_bias.png"]),
    ("choosing_truncation.ipynb", ["bias_vs_k2.png", "adaptive_k2.png", "influence_balancing.png"]),
  ],
)
def test_notebook_on_real_text_runs_and_writes_its_figures(
  name, figures, tmp_path, monkeypatch, shared_data
):
  run_notebook(name, tmp_path, monkeypatch, TBPTT_JAX_DATA=str(shared_data))
  assert_figures(tmp_path, *figures)


def test_other_libraries_runs_and_writes_its_figure(tmp_path, monkeypatch):
  """NNX, Equinox and Haiku cells train the r2rt task (the test extra installs both)."""
  run_notebook("other_libraries.ipynb", tmp_path, monkeypatch)
  assert_figures(tmp_path, "other_libraries.png")


def test_beyond_truncation_runs_and_writes_its_figure(tmp_path, monkeypatch):
  """RTRL against full BPTT, the LRU's parallel scan, and RTRL against TBPTT(1, k2) on r2rt."""
  run_notebook("beyond_truncation.ipynb", tmp_path, monkeypatch)
  assert_figures(tmp_path, "online_r2rt.png")
