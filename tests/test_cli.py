"""Tests of the `tbptt-jax` command line."""

import csv
import json
import os
import signal
import subprocess
import sys

import flax.serialization
import jax
import numpy as np
import pytest

from tbptt_jax import checkpoint, cli

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
  assert len(rows) == 30 and list(rows[0]) == [
    "update", "loss", "grad_norm", "clipped_grad_norm", "clipped", "nonfinite", "k2",
  ]  # fmt: skip
  assert {r["k2"] for r in rows} == {"6"} and summary["k2_mean"] == 6
  clipped = [float(r["grad_norm"]) > 1.0 for r in rows]
  assert [r["clipped"] == "True" for r in rows] == clipped
  assert summary["clipped_fraction"] == pytest.approx(np.mean(clipped))
  assert summary["nonfinite_updates"] == 0
  # The last 10% of updates' losses give final_loss.
  tail = [float(r["loss"]) for r in rows[-3:]]
  np.testing.assert_allclose(summary["final_loss"], np.mean(tail), atol=1e-5)
  params = flax.serialization.msgpack_restore((out / "params.msgpack").read_bytes())
  assert jax.tree.leaves(params)
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.parametrize(
  "argv,message",
  [
    ([], "a command is required: train or eval"),
    (["train", "--task", "lm"], "--task lm needs --data DIR"),
    (["train", "--epochs", "2"], "--epochs applies to --task lm, got --task r2rt"),
    (["train", "--task", "lm", "--data", "x", "--steps", "5"], "--steps applies to --task r2rt"),
    (["train", "--task", "lm", "--data", "/nonexistent"], "read_corpus: "),
    (["train", "--dropout", "1.5"], "argument --dropout: expected a number in [0, 1), got '1.5'"),
    (["eval", "--data", "x"], "the following arguments are required: --checkpoint"),
    (["eval", "--data", "x", "--checkpoint", "/nonexistent"], "cannot read model file"),
    (["train", "--k1", "0"], "argument --k1: expected a positive int, got '0'"),
    (["train", "--lr", "abc"], "argument --lr: expected a positive float, got 'abc'"),
    (["train", "--k1", "5", "--k2", "3"], "window style needs k2 >= k1"),
    (["train", "--cell", "transformer"], "argument --cell: invalid choice: 'transformer'"),
    (["train", "--style", "tf"], "argument --style: invalid choice: 'tf'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--k2", "10,20"], "--k2 10,20 is a list: it needs --delta (adaptive k2) or --artbp"),
    (["train", "--delta", "0.1"], "--delta needs --k2 to list the k2s to choose from"),
    (["train", "--k2", "10,0", "--delta", "0.1"], "argument --k2: expected a positive int or"),
    (["train", "--k2", "10,20", "--delta", "0.1", "--artbp", "4"], "--artbp and --delta are two"),
    (["train", "--artbp", "4"], "artbp needs segments of >= 2 steps"),
    (["train", "--artbp", "4", "--k2", "20", "--artbp-alpha", "2"], "alpha must be > 2"),
    (["train", "--artbp-alpha", "6"], "--artbp-alpha applies with --artbp, which is not given"),
    (["train", "--adapt-every", "3"], "--adapt-every applies with --delta, which is not given"),
    (
      ["train", "--k2", "10,60", "--delta", "0.1", "--updates-per-call", "5"],
      "--delta measures on the first 2 * max(k2) = 120 steps of a call, but a call has",
    ),
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


def test_adaptive_k2_and_artbp_runs_log_their_truncation_and_resume_exactly(
  tmp_path, capsys, monkeypatch
):
  """--delta re-chooses k2 from the --k2 list and logs every choice (truncation.jsonl) and every
  update's k2 (metrics.csv); a run stopped and resumed makes the same choices. --artbp trains."""
  argv = ["train", "--steps", "24", "--updates-per-call", "4", "--k1", "4", "--k2", "4,8"]
  argv += ["--delta", "0.1", "--adapt-every", "2", "--hidden", "3", "--batch-size", "8"]
  out = tmp_path / "adaptive"
  status, stdout, stderr = run([*argv, "--out", str(out), "--json"], capsys)
  assert status == 0, stderr
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert (summary["k2"], summary["delta"], summary["k2_choices"]) == ([4, 8], 0.1, 3)
  assert "adaptive TBPTT(k1=4, k2 in [4, 8], delta=0.1, window)" in stdout
  choices = [json.loads(line) for line in (out / "truncation.jsonl").read_text().splitlines()]
  assert [c["update"] for c in choices] == [1, 9, 17]  # before every second call of 4 updates
  with open(out / "metrics.csv") as f:
    k2s = [int(r["k2"]) for r in csv.DictReader(f)]
  assert k2s == [c["k2"] for c in choices for _ in range(8)]
  assert summary["k2_final"] == choices[-1]["k2"] and all(0 < c["beta"] for c in choices)

  stopped = tmp_path / "stopped"
  save = checkpoint.save_checkpoint

  def save_then_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return save(*args, **kwargs)

  monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_signal)
  status, _, stderr = run([*argv, "--out", str(stopped), "--save-every", "12"], capsys)
  assert status == 143, stderr
  monkeypatch.setattr(checkpoint, "save_checkpoint", save)
  status, _, stderr = run(["train", "--out", str(stopped), "--resume"], capsys)
  assert status == 0, stderr
  for name in ("truncation.jsonl", "metrics.csv", "params.msgpack"):
    assert (stopped / name).read_bytes() == (out / name).read_bytes(), name

  argv = ["train", "--steps", "8", "--updates-per-call", "4", "--k1", "4", "--k2", "12"]
  argv += ["--artbp", "3", "--hidden", "3", "--batch-size", "8", "--json"]
  status, stdout, stderr = run(argv, capsys)
  assert status == 0, stderr
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["artbp"] == {"mean_length": 3.0, "alpha": 4.0} and np.isfinite(
    summary["final_loss"]
  )
  assert "ARTBP(k1=4, k2=12, L0=3, alpha=4, window)" in stdout


LM_SUMMARY_KEYS = SUMMARY_KEYS | {"valid_ppl", "test_ppl", "epochs"}


def test_language_model_train_then_eval_and_resume(shared_data, tmp_path, capsys, monkeypatch):
  """`train --task lm` on a PTB subset writes a model file that `eval` scores identically, and
  the run stopped mid-epoch and resumed ends bit-identical."""
  out = tmp_path / "lm"
  argv = ["train", "--task", "lm", "--data", str(shared_data / "ptb"), "--train-tokens", "3000"]
  argv += ["--epochs", "2", "--hidden", "8", "--layers", "1", "--k1", "10", "--batch-size", "4"]
  # 75 updates per call: one call per epoch, one shape to compile; the first 20,000 tokens of
  # valid and test.
  argv += ["--updates-per-call", "75", "--dropout", "0.1", "--eval-tokens", "20000"]
  argv += ["--out", str(out), "--json"]
  status, stdout, stderr = run(argv, capsys)
  assert status == 0, stderr
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert LM_SUMMARY_KEYS <= summary.keys()
  assert (summary["task"], summary["vocab_size"], summary["epochs"]) == ("lm", 10_000, 2)
  assert summary["tokens"] == 2 * 4 * (3000 // 4 - 1)
  # 749 steps per stream: 75 updates per epoch, the last of 9 steps.
  assert summary["steps"] == 2 * 75
  assert 1 < summary["test_ppl"] < 10_000 and 1 < summary["valid_ppl"] < 10_000
  assert summary["reference"] == {"valid_ppl": 120.7, "test_ppl": 114.5}  # PTB: Zaremba's
  lines = (out / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [r["epoch"] for r in records] == [1, 2]
  for r in records:  # the gradient's story per epoch, clipped at Zaremba's 5 / k1 on the mean loss
    assert r["grad_norm_median"] > 0 and 0 <= r["clipped_fraction"] <= 1
    assert r["nonfinite_updates"] == 0
  assert min(r["valid_ppl"] for r in records) == pytest.approx(summary["valid_ppl"], rel=1e-4)
  assert json.loads((out / "summary.json").read_text()) == summary
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

  status, stdout, stderr = run(
    ["eval", "--data", str(shared_data / "ptb"), "--checkpoint", str(out), "--json"]
    + ["--eval-tokens", "20000"],
    capsys,
  )
  assert status == 0, stderr
  result = json.loads(stdout.strip().splitlines()[-1])
  assert (result["split"], result["tokens"]) == ("test", 10 * (20_000 // 10 - 1))
  assert result["ppl"] == pytest.approx(summary["test_ppl"], rel=1e-4)

  # The same run stopped by SIGTERM in epoch 1 (during its first checkpoint, after its training
  # call, before its validation), then resumed: the same model file and logs, bit for bit.
  stopped = tmp_path / "stopped"
  argv[argv.index(str(out))] = str(stopped)
  save = checkpoint.save_checkpoint

  def save_then_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # handled by the run: it saves, then stops
    return save(*args, **kwargs)

  monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_signal)
  status, _, stderr = run([*argv, "--save-every", "30"], capsys)
  assert status == 143 and "SIGTERM: stopped after update 75" in stderr, stderr
  monkeypatch.setattr(checkpoint, "save_checkpoint", save)
  status, _, stderr = run(["train", "--out", str(stopped), "--resume"], capsys)
  assert status == 0, stderr
  for name in ("model.msgpack", "updates.csv"):
    assert (stopped / name).read_bytes() == (out / name).read_bytes(), name
  resumed = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
  timing = ("train_seconds", "seconds", "tokens_per_s")
  assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
    {k: v for k, v in r.items() if k not in timing} for r in records
  ]


def test_character_level_run_reports_bits_per_character(shared_data, capsys):
  argv = [
    "train",
    "--task",
    "lm",
    "--level",
    "char",
    "--data",
    str(shared_data / "tinyshakespeare"),
  ]
  argv += ["--train-tokens", "2000", "--epochs", "1", "--hidden", "8", "--layers", "1"]
  argv += ["--batch-size", "4", "--k1", "10", "--eval-batch-size", "50", "--json"]
  status, stdout, stderr = run(argv, capsys)
  assert status == 0, stderr
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert (summary["level"], summary["vocab_size"]) == ("char", 65)
  assert 0 < summary["test_bits_per_token"] < np.log2(65) + 1
  assert summary["reference"] is None  # Zaremba's perplexities are for PTB words only


def test_eval_rejects_a_model_of_another_vocabulary(shared_data, tmp_path, capsys):
  from tbptt_jax import lm

  path = tmp_path / "model.msgpack"
  config = lm.LMConfig(vocab_size=3, hidden=2, layers=1)
  params = lm.language_model(config).init(
    jax.random.key(0), (jax.numpy.zeros((1,), jax.numpy.int32), None)
  )
  lm.save_model(
    str(path), config, params, {"vocabulary": {"tokens": ["a", "b"], "level": "word", "unk": None}}
  )
  status, _, stderr = run(
    ["eval", "--data", str(shared_data / "ptb"), "--checkpoint", str(path)], capsys
  )
  assert status == 2
  assert "vocabulary of 2 tokens does not match the model's 3" in stderr
