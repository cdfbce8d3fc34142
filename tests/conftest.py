"""Shared fixtures: the folder of real corpora that some tests read."""

import os
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
