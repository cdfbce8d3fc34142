"""Tests of the `tbptt-jax` command line."""

import csv
import json
import os
import subprocess
import sys

import flax.serialization
import jax
import numpy as np
import pytest

from tbptt_jax import cli

SUMMARY_KEYS = {
  "task",
  "cell",
  "k1",
  "k2",
  "style",
  "steps",
  "tokens",
  "seconds",
  "tokens_per_s",
  "final_loss",
}


def run(argv, capsys):
  """Runs the CLI in-process; returns (exit status, stdout, stderr)."""
  try:
    status = cli.main(argv)
  except SystemExit as e:
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


def test_default_run_reaches_both_dependencies():
  """The README's main job: `tbptt-jax train --json`, as a user runs it."""
  result = subprocess.run(
    [sys.executable, "-m", "tbptt_jax.cli", "train", "--json"],
    capture_output=True,
    text=True,
    timeout=600,
    check=True,
  )
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert SUMMARY_KEYS <= summary.keys()
  assert (summary["task"], summary["cell"], summary["k1"], summary["k2"]) == (
    "r2rt",
    "elman",
    10,
    10,
  )
  assert summary["tokens"] == 2000 * 10 * 200
  assert summary["final_loss"] <= 0.47
  assert "0.6616" in result.stdout and "0.5192" in result.stdout and "0.4545" in result.stdout
  assert "update" in result.stderr  # the progress bar goes to stderr


def test_json_summary_and_outputs(tmp_path, capsys):
  out = tmp_path / "run"
  status, stdout, _ = run(
    [
      "train",
      "--steps",
      "30",
      "--updates-per-call",
      "7",
      "--k1",
      "4",
      "--k2",
      "6",
      "--style",
      "per_loss",
      "--cell",
      "gru",
      "--hidden",
      "3",
      "--batch-size",
      "8",
      "--clip",
      "1.0",
      "--optimizer",
      "sgd",
      "--lr",
      "0.1",
      "--out",
      str(out),
      "--json",
    ],
    capsys,
  )
  assert status == 0
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert SUMMARY_KEYS <= summary.keys()
  assert summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 8
  assert (summary["k1"], summary["k2"], summary["style"]) == (4, 6, "per_loss")
  assert np.isfinite(summary["final_loss"]) and summary["tokens_per_s"] > 0
  assert json.loads((out / "summary.json").read_text()) == summary
  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 30 and rows[0].keys() == {"update", "loss", "grad_norm"}
  # The last 10% of updates' losses give final_loss.
  tail = [float(r["loss"]) for r in rows[-3:]]
  np.testing.assert_allclose(summary["final_loss"], np.mean(tail), atol=1e-5)
  params = flax.serialization.msgpack_restore((out / "params.msgpack").read_bytes())
  assert jax.tree.leaves(params)
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.parametrize(
  "argv,message",
  [
    ([], "a command is required: train"),
    (["train", "--k1", "0"], "argument --k1: expected a positive int, got '0'"),
    (["train", "--lr", "abc"], "argument --lr: expected a positive float, got 'abc'"),
    (["train", "--k1", "5", "--k2", "3"], "window style needs k2 >= k1"),
    (["train", "--cell", "transformer"], "argument --cell: invalid choice: 'transformer'"),
    (["train", "--style", "tf"], "argument --style: invalid choice: 'tf'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
  ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
  status, stdout, stderr = run(argv, capsys)
  assert status == 2
  assert stdout == ""
  assert stderr.count("\n") == 1 and stderr.startswith("tbptt-jax: error: ")
  assert message in stderr
  assert "Traceback" not in stderr


def test_out_must_be_a_folder(tmp_path, capsys):
  taken = tmp_path / "file"
  taken.write_text("not a folder")
  status, _, stderr = run(["train", "--steps", "1", "--out", str(taken)], capsys)
  assert status == 2
  assert (
    stderr == f"tbptt-jax: error: --out must be a folder, got the existing file {str(taken)!r}\n"
  )
