"""The GPU suite, `benchmarks/gpu.py`, run end to end in its `--smoke` mode.

The suite is meant for a GPU (`bash benchmarks/gpu.sh`); `--smoke` runs the same code at the
tiniest shapes on whatever device JAX has, so a session that is lent a GPU finds a script that
works. Its cost is compilation, three programs per workload and precision (about 5 s each on a
2-core CPU), so the run takes the fewest that reach every line of the suite: r2rt (the Elman
cell's own scan, its one-hot `embed`, Adam) and medium (the LSTM language model, dropout keys
in its inputs, SGD with clipping), in bfloat16, whose path is float32's with the model wrapped
(`mixed_precision`) and PyTorch under autocast. PyTorch is optional: with it, the baseline runs
on the CPU; without it, the baseline must be reported missing.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("r2rt", "medium")
PRECISIONS = ("bfloat16",)
PIECES = ("forward", "backward", "optimizer_other")


def run_suite(*args: str) -> subprocess.CompletedProcess:
  """`python benchmarks/gpu.py ARGS`, the environment (and so the session's compilation
  cache, see conftest.py) inherited."""
  command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def check_profile(profile: dict) -> None:
  """Per-window times of the update's pieces: finite, adding up to the update."""
  pieces = [profile[f"{name}_ms"] for name in PIECES]
  assert all(map(math.isfinite, pieces)) and profile["update_ms"] > 0
  assert math.isclose(sum(pieces), profile["update_ms"], rel_tol=1e-9)
  assert math.isclose(sum(profile["fractions"].values()), 1.0, rel_tol=1e-9)


def test_smoke_run_writes_every_workload_and_precision(tmp_path):
  out = tmp_path / "gpu.json"
  args = ["--presets", *WORKLOADS, "--precisions", *PRECISIONS, "--out", str(out)]
  result = run_suite("--smoke", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record["benchmark"] == "gpu" and record["settings"]["smoke"] is True
  rows = {(r["workload"], r["precision"]): r for r in record["results"]}
  assert sorted(rows) == sorted((w, p) for w in WORKLOADS for p in PRECISIONS)
  has_torch = importlib.util.find_spec("torch") is not None
  for r in rows.values():
    rate = r["tbptt_jax"]["tokens_per_s"]
    assert math.isfinite(rate) and rate > 0, r
    check_profile(r["tbptt_jax"]["profile"])
    if has_torch:
      assert r["baseline"].startswith("pytorch ") and r["pytorch"]["tokens_per_s"] > 0
      check_profile(r["pytorch"]["profile"])
      assert r["ratio"] > 0
    else:
      assert r["baseline"] is None and r["pytorch"] is None and r["ratio"] is None
  lines = result.stdout.splitlines()
  assert lines[0].split()[:3] == ["workload", "precision", "tbptt_jax"]
  for workload, precision in rows:
    assert any(line.split()[:2] == [workload, precision] for line in lines[1:])
  assert ("missing" in result.stdout) is not has_torch


def test_bad_arguments_exit_2():
  result = run_suite("--smoke", "--presets", "huge")
  assert result.returncode == 2
  assert "--presets: invalid choice: 'huge'" in result.stderr
