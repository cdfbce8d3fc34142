"""The package's annotations hold: mypy finds no error in tbptt_jax (configured in pyproject)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_package_type_checks(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
    cwd=ROOT,  # where pyproject.toml's [tool.mypy] is
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert (ROOT / "tbptt_jax" / "py.typed").is_file()  # PEP 561: checkers read the annotations
