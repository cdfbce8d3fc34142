"""Shared fixtures: the folder of real corpora that some tests read; the compiler's settings."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Beside the repository, never inside it: the corpora are not ours to ship.
_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """The folder of corpora (ptb/, wikitext-2/, tinyshakespeare/).

  `$TBPTT_JAX_DATA` overrides the default, `../shared/data` beside the
  repository. Without the folder the tests that need it skip, except in CI
  (`CI=true`), where they must run and so fail.
  """
  path = Path(os.environ.get("TBPTT_JAX_DATA") or _DEFAULT_DATA)
  if not path.is_dir():
    message = f"shared data folder not found at {path}; set TBPTT_JAX_DATA"
    if os.environ.get("CI") == "true":
      pytest.fail(message + " (CI=true: tests that need the data must run)")
    pytest.skip(message)
  return path


def pytest_configure(config):
  """XLA compilation is the suite's cost (tiny shapes, many programs). The session's processes
  (xdist workers, the CLI runs and notebook kernels they start, which inherit the environment)
  share a compilation cache, new and empty for each session: a program one of them compiled (the
  CLI's default run, a model built again to restore a checkpoint) is read back by the next
  instead of compiled again. The cache holds XLA's executables as compiled, so what runs is
  unchanged. A cache folder set beforehand in the environment is used instead.

  The same processes compile with JAX's `jax_disable_most_optimizations`: XLA still fuses and
  simplifies the program as it does for users, but LLVM skips its expensive passes on the
  machine code, a large part of a compile at the suite's tiny shapes (compile-bound test files
  take 0.84-0.93x the time, benchmarks/RESULTS.md section 15). The arithmetic is the same IEEE
  operations; only their rounding order can differ, within float32's last bits. Speed is
  measured in `benchmarks/`, which runs at XLA's default. `JAX_DISABLE_MOST_OPTIMIZATIONS=0` in
  the environment runs the suite at the default too.
  """
  del config
  controller = os.environ.get("PYTEST_XDIST_WORKER") is None
  if controller and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    folder = tempfile.mkdtemp(prefix="tbptt_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["TBPTT_JAX_TEST_CACHE_MADE"] = folder  # removed at the end of the session
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def pytest_unconfigure(config):
  del config
  made = os.environ.get("TBPTT_JAX_TEST_CACHE_MADE")
  if made and os.environ.get("PYTEST_XDIST_WORKER") is None:
    shutil.rmtree(made, ignore_errors=True)
