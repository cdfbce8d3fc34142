"""The API reference builds with warnings as errors, and the notebooks it renders are complete."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_documentation_builds_strictly(tmp_path):
  """`mkdocs build --strict`: any docstring griffe cannot parse, any broken link fails it."""
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  result = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
    cwd=ROOT,  # the README's snippet and the package are found from the repository root
    capture_output=True,
    text=True,
    env=env,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  page = (tmp_path / "site" / "api" / "truncation" / "index.html").read_text()
  assert "cell_gradients" in page and "Truncation" in page
  assert (tmp_path / "site" / "notebooks" / "quickstart" / "index.html").is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_notebook_is_committed_with_its_outputs(path):
  """A reader sees results without running anything: every code cell ran, in order."""
  cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
  counts = [c.get("execution_count") for c in cells]
  assert all(isinstance(n, int) for n in counts), f"{path.name}: cells not executed: {counts}"
  assert counts == sorted(counts), f"{path.name}: cells executed out of order: {counts}"
  assert any(c.get("outputs") for c in cells), f"{path.name} has no outputs"
