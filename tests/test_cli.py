"""Tests of the `tbptt-jax` command line."""

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import signal
import subprocess
import sys
import types

import flax.serialization
import jax
import numpy as np
import pytest
from test_tensorboard import read_scalars

import tbptt_jax
from tbptt_jax import checkpoint, cli, data, lm
from tbptt_jax.cli import flags

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
  with open(out / "updates.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 30 and list(rows[0]) == [
    "update", "loss", "grad_norm", "clipped_grad_norm", "clipped", "nonfinite", "k2",
  ]  # fmt: skip
  assert {r["k2"] for r in rows} == {"6"} and summary["k2_mean"] == 6
  clipped = [float(r["grad_norm"]) > 1.0 for r in rows]
  assert [r["clipped"] == "True" for r in rows] == clipped
  assert summary["clipped_fraction"] == pytest.approx(np.mean(clipped))
  assert summary["nonfinite_updates"] == 0
  assert summary["diverged"] is False and summary["uniform_loss"] == round(np.log(2), 5)
  # The last 10% of updates' losses give final_loss.
  tail = [float(r["loss"]) for r in rows[-3:]]
  np.testing.assert_allclose(summary["final_loss"], np.mean(tail), atol=1e-5)
  params = flax.serialization.msgpack_restore((out / "params.msgpack").read_bytes())
  assert jax.tree.leaves(params)
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.parametrize(
  "argv,message",
  [
    ([], "a command is required: train, eval or generate"),
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
    (["train", "--seed", "-1"], "argument --seed: expected an integer in [0, 2**63), got '-1'"),
    (["train", "--tensorboard", "/proc/tbptt"], "--tensorboard: cannot create '/proc/tbptt'"),
    (["train", "--lr", "inf"], "argument --lr: expected a positive float, got 'inf'"),
    (["train", "--k1", "5", "--k2", "3"], "--k1 5, --k2 3, --style window: tbptt_trainer: "),
    (["train", "--gradient", "rtrl", "--k2", "3"], "--gradient rtrl reaches every past step"),
    (["train", "--gradient", "rtrl", "--style", "per_loss"], "so --style cannot be given with"),
    (["train", "--gradient", "rtrl", "--artbp", "4"], "so --artbp cannot be given with it"),
    (["train", "--task", "lm", "--data", "x", "--gradient", "rtrl"], "--gradient rtrl applies to"),
    (["train", "--gradient", "rtrl", "--hidden", "256"], "lower --hidden or --batch-size, or"),
    (["train", "--gradient", "bptt", "--cell", "lru", "--hidden", "0"], "argument --hidden: exp"),
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
  if argv:  # every error about an argument names its flag
    assert re.search(r"--[a-z]", stderr), stderr


@pytest.mark.parametrize("cell", ["elman", "lru"])
def test_rtrl_runs_record_their_gradient(cell, capsys):
  """`--gradient rtrl` trains with RTRL (an LRU with its diagonal online form): updates every
  step, the summary says so, and the loss is finite."""
  argv = ["train", "--gradient", "rtrl", "--cell", cell, "--hidden", "4", "--k1", "1"]
  status, stdout, _ = run([*argv, "--steps", "20", "--batch-size", "4", "--json"], capsys)
  assert status == 0
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert (summary["gradient"], summary["k1"], summary["k2"]) == ("rtrl", 1, None)
  assert "RTRL(k1=1, every past step)" in stdout
  assert np.isfinite(summary["final_loss"]) and summary["tokens"] == 20 * 4


def test_version_and_every_flags_default_in_help(capsys):
  status, stdout, _ = run(["--version"], capsys)
  assert (status, stdout) == (0, f"tbptt-jax {tbptt_jax.__version__}\n")
  module = subprocess.run(
    [sys.executable, "-m", "tbptt_jax", "--version"], capture_output=True, text=True, check=True
  )
  assert module.stdout == stdout  # `python -m tbptt_jax` is the same command
  commands = next(a for a in flags.parser()._actions if a.dest == "command").choices
  assert sorted(commands) == ["eval", "generate", "train"]
  for name, command in commands.items():
    for action in command._actions:
      if action.dest != "help":
        assert re.search(r"\((default: .+|required)\)$", action.help), (name, action.dest)
    status, stdout, _ = run([name, "--help"], capsys)
    assert status == 0 and "(default: " in stdout
  status, stdout, _ = run(["train", "--help"], capsys)
  for flag in ("--style", "--seed", "--unroll", "--preset", "--hidden", "--epochs", "--dropout"):
    start = re.search(rf"^  {flag} ", stdout, re.MULTILINE).start()
    help_text = " ".join(stdout[start:].split("\n  -")[0].split())
    assert "(default: " in help_text, flag
  words = " ".join(stdout.split())
  assert "state size of each layer (default: r2rt 16; lm --preset small 200, medium 650" in words


def test_r2rt_run_extended_with_resume_equals_the_longer_run(tmp_path, capsys):
  """A finished 6-update run, resumed with --steps 20, ends as a 20-update run does, bit for bit:
  its data are the longer run's first steps, and its calls the longer run's (the first of them
  the rest of the call the shorter run ended in). A smaller --steps is refused."""
  argv = ["train", "--updates-per-call", "8", "--k1", "4", "--k2", "6", "--hidden", "3"]
  argv += ["--batch-size", "8", "--seed", "5"]
  short, long = tmp_path / "short", tmp_path / "long"
  board = ["--tensorboard", str(tmp_path / "board")]
  status, stdout, stderr = run(
    [*argv, "--steps", "6", "--out", str(short), "--json", *board], capsys
  )
  assert status == 0, stderr
  # One call: nothing was timed after the first call.
  assert json.loads(stdout.strip().splitlines()[-1])["tokens_per_s_after_first_call"] is None
  status, stdout, stderr = run(
    ["train", "--out", str(short), "--resume", "--steps", "20", "--json", *board], capsys
  )
  assert status == 0, stderr
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert (summary["steps"], summary["tokens"]) == (20, 20 * 4 * 8)
  assert run([*argv, "--steps", "20", "--out", str(long)], capsys)[0] == 0
  for name in ("params.msgpack", "updates.csv"):
    assert (short / name).read_bytes() == (long / name).read_bytes(), name
  # --tensorboard: both sessions' updates, each once, as the update log has them (float32).
  scalars = read_scalars(tmp_path / "board")
  with open(short / "updates.csv") as f:
    losses = [float(r["loss"]) for r in csv.DictReader(f)]
  assert [step for step, _ in scalars["train/loss"]] == list(range(1, 21))
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-6)
  assert [step for step, _ in scalars["run/final_loss"]] == [6, 20]
  assert scalars["run/final_loss"][-1][1] == pytest.approx(summary["final_loss"], rel=1e-5)
  meta = checkpoint.read_meta(checkpoint.latest_checkpoint(short / "checkpoints"))
  assert (meta["updates"], meta["calls"], meta["args"]["steps"]) == (20, 3, 20)
  status, _, stderr = run(["train", "--out", str(short), "--resume", "--steps", "10"], capsys)
  assert status == 2 and stderr.count("\n") == 1
  assert "--resume: --steps 10 is below the run's 20" in stderr


def test_a_diverged_run_says_so_and_exits_3(tmp_path, capsys):
  """A run that ends above a uniform prediction's loss (log 2 nats here) finishes, writes its
  files, and says it diverged: in the summary, on stderr, and in its exit status."""
  argv = ["train", "--steps", "20", "--updates-per-call", "10", "--hidden", "3"]
  argv += ["--batch-size", "8", "--lr", "1e6", "--out", str(tmp_path), "--json"]
  status, stdout, stderr = run(argv, capsys)
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert status == 3, stderr
  assert summary["diverged"] is True and summary["final_loss"] > np.log(2)
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  warning = [line for line in stderr.splitlines() if "warning" in line]
  assert warning == [
    f"tbptt-jax: warning: the run diverged: its final loss, {summary['final_loss']} nats, is "
    f"above {summary['uniform_loss']} nats, a uniform prediction's; exit status 3"
  ]


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
  update's k2 (updates.csv); a run stopped and resumed makes the same choices. --artbp trains."""
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
  with open(out / "updates.csv") as f:
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
  for name in ("truncation.jsonl", "updates.csv", "params.msgpack"):
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
# Timing fields of an epoch's record, which differ from run to run.
TIMING = ("train_seconds", "seconds", "tokens_per_s")


def lm_argv(shared_data, out, epochs=2):
  """A language model on a PTB subset: 3,000 training tokens, 75 updates per epoch in one call
  (one shape to compile), valid and test cut to their first 20,000 tokens."""
  argv = ["train", "--task", "lm", "--data", str(shared_data / "ptb"), "--train-tokens", "3000"]
  argv += ["--epochs", str(epochs), "--hidden", "8", "--layers", "1", "--k1", "10"]
  argv += ["--batch-size", "4", "--updates-per-call", "75", "--dropout", "0.1"]
  argv += ["--tensorboard", str(out / "tensorboard")]
  return argv + ["--eval-tokens", "20000", "--out", str(out), "--json"]


def without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def epoch_records(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_run(shared_data, tmp_path_factory):
  """The 2-epoch language model the tests below share, trained once in the session (in process);
  its stdout and stderr go to one stream, in the order they were written.

  pytest-xdist's workers share the session's folder above their own: the first to take the lock
  trains, the others wait, then read what it wrote.
  """
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent
  out, record = shared / "lm_run", shared / "lm_run.json"
  with open(shared / "lm_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not record.exists():
      stream = io.StringIO()
      with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        status = cli.main(lm_argv(shared_data, out))
      record.write_text(json.dumps({"status": status, "output": stream.getvalue()}))
  run = json.loads(record.read_text())
  assert run["status"] == 0, run["output"][-3000:]
  summary = json.loads(run["output"].strip().splitlines()[-1])
  return types.SimpleNamespace(out=out, output=run["output"], summary=summary)


def test_language_model_train_then_eval(lm_run, shared_data, capsys):
  """`train --task lm` on a PTB subset writes a model file that `eval` scores identically."""
  out, summary = lm_run.out, lm_run.summary
  assert LM_SUMMARY_KEYS <= summary.keys()
  assert (summary["task"], summary["vocab_size"], summary["epochs"]) == ("lm", 10_000, 2)
  assert summary["tokens"] == 2 * 4 * (3000 // 4 - 1)
  # 749 steps per stream: 75 updates per epoch, the last of 9 steps.
  assert summary["steps"] == 2 * 75
  assert 1 < summary["test_ppl"] < 10_000 and 1 < summary["valid_ppl"] < 10_000
  assert summary["reference"] == {"valid_ppl": 120.7, "test_ppl": 114.5}  # PTB: Zaremba's
  assert summary["diverged"] is False and summary["uniform_loss"] == round(np.log(10_000), 5)
  # PTB's vocabulary covers its valid and test text: nothing unknown, no warning.
  assert summary["unknown_fraction"] == {"valid": 0.0, "test": 0.0}
  assert "valid: 0.00% of the tokens are not in the vocabulary (read as <unk>)" in lm_run.output
  assert "warning" not in lm_run.output
  records = epoch_records(out)
  assert [r["epoch"] for r in records] == [1, 2]
  for r in records:  # the gradient's story per epoch, clipped at Zaremba's 5 / k1 on the mean loss
    assert r["grad_norm_median"] > 0 and 0 <= r["clipped_fraction"] <= 1
    assert r["nonfinite_updates"] == 0
  assert min(r["valid_ppl"] for r in records) == pytest.approx(summary["valid_ppl"], rel=1e-4)
  scalars = read_scalars(out / "tensorboard")  # --tensorboard: every update, epoch and result
  assert len(scalars["train/loss"]) == 150 and len(scalars["train/grad_norm"]) == 150
  assert scalars["epoch/valid_ppl"] == [
    (75 * r["epoch"], pytest.approx(r["valid_ppl"], rel=1e-5)) for r in records
  ]
  assert [step for step, _ in scalars["epoch/tokens_per_s"]] == [75, 150]
  assert scalars["run/test_ppl"] == [(150, pytest.approx(summary["test_ppl"], rel=1e-5))]
  assert json.loads((out / "summary.json").read_text()) == summary
  with open(out / "updates.csv") as f:  # the same log as the r2rt task's
    rows = list(csv.DictReader(f))
  assert len(rows) == 150 and list(rows[0]) == [
    "update", "loss", "grad_norm", "clipped_grad_norm", "clipped", "nonfinite", "k2",
  ]  # fmt: skip
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
  assert result["unknown_fraction"] == {"test": 0.0} and "warning" not in stderr

  # On a corpus its vocabulary does not fit, the perplexity comes with a warning.
  status, stdout, stderr = run(
    ["eval", "--data", str(shared_data / "tinyshakespeare"), "--checkpoint", str(out), "--json"]
    + ["--eval-tokens", "20000"],
    capsys,
  )
  assert status == 0, stderr
  unknown = json.loads(stdout.strip().splitlines()[-1])["unknown_fraction"]["test"]
  assert unknown > 0.05
  assert (
    f"tbptt-jax: warning: {unknown:.1%} of the test split's tokens are not in the vocabulary "
    "(over 5%): its perplexity is not comparable with others'"
  ) in stderr


def test_language_model_progress_bar_is_gone_before_each_epoch_line(lm_run):
  """Each epoch has its own bar, cleared before the epoch's line: never drawn again after it."""
  output = lm_run.output
  assert "2 epochs of 75 updates" in output
  for epoch in (1, 2):
    line = output.index(f"epoch   {epoch}  lr ")
    assert f"epoch {epoch}/2: " in output[:line]  # the bar, while the epoch ran
    assert f"epoch {epoch}/2: " not in output[line:]


def test_language_model_stopped_resumed_and_extended(
  lm_run, shared_data, tmp_path, capsys, monkeypatch
):
  """A 1-epoch run stopped by SIGTERM (during its first checkpoint, after its training call,
  before its validation) and resumed ends as the uninterrupted run's first epoch; resumed with
  --epochs 2, it goes on to end as the uninterrupted 2-epoch run, bit for bit."""
  stopped = tmp_path / "stopped"
  save = checkpoint.save_checkpoint

  def save_then_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # handled by the run: it saves, then stops
    return save(*args, **kwargs)

  monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_signal)
  status, stdout, stderr = run([*lm_argv(shared_data, stopped, 1), "--save-every", "30"], capsys)
  assert status == 143 and "SIGTERM: stopped after update 75" in stderr, stderr
  assert "1 epoch of 75 updates" in stdout
  monkeypatch.setattr(checkpoint, "save_checkpoint", save)
  status, stdout, stderr = run(["train", "--out", str(stopped), "--resume", "--json"], capsys)
  assert status == 0, stderr
  assert json.loads(stdout.strip().splitlines()[-1])["epochs"] == 1
  reference = (lm_run.out / "updates.csv").read_text().splitlines()
  assert (stopped / "updates.csv").read_text().splitlines() == reference[:76]
  assert without_timing(epoch_records(stopped)) == without_timing(epoch_records(lm_run.out)[:1])

  # The finished run, extended: its second epoch is the uninterrupted run's (the learning rate
  # depends on the epoch only). A shorter run is refused.
  status, _, stderr = run(["train", "--out", str(stopped), "--resume", "--epochs", "2"], capsys)
  assert status == 0, stderr
  for name in ("model.msgpack", "updates.csv"):
    assert (stopped / name).read_bytes() == (lm_run.out / name).read_bytes(), name
  assert without_timing(epoch_records(stopped)) == without_timing(epoch_records(lm_run.out))
  status, _, stderr = run(["train", "--out", str(stopped), "--resume", "--epochs", "1"], capsys)
  assert status == 2 and stderr.count("\n") == 1
  assert "--resume: --epochs 1 is below the run's 2" in stderr


def test_generate_continues_the_prompt_with_the_saved_model(lm_run, capsys):
  """`generate` prints the prompt and `lm.sample`'s tokens after it, reproducibly by --seed."""
  argv = ["generate", "--checkpoint", str(lm_run.out), "--words", "30", "--seed", "3"]
  argv += ["--prompt", "the company", "--temperature", "0.8"]
  status, stdout, stderr = run(argv, capsys)
  assert status == 0, stderr
  config, params, extra = lm.load_model(str(lm_run.out / "model.msgpack"))
  vocab = data.Vocabulary(**extra["vocabulary"])
  prompt = vocab.encode(["the", "company"])
  ids = lm.sample(lm.language_model(config), params, prompt, 30, jax.random.key(3), temperature=0.8)
  words = ["the", "company", *vocab.decode(ids)]
  # Words joined by spaces, each <eos> a line's end.
  assert stdout.split() == [w for w in words if w != "<eos>"]
  assert stdout.count("\n") == words.count("<eos>") + 1
  assert run(argv, capsys)[1] == stdout
  status, default, _ = run(["generate", "--checkpoint", str(lm_run.out), "--words", "5"], capsys)
  assert status == 0 and len(default.split()) <= 5  # from a line's end, nothing echoed


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--checkpoint", "/nonexistent"], "--checkpoint: load_model: cannot read model file"),
    (["--checkpoint", "OUT/checkpoints/best.ckpt"], "best.ckpt' is a training checkpoint, not a"),
    (["--checkpoint", "OUT/summary.json"], "summary.json' is not a tbptt_jax model file"),
    (["--prompt", "the zzyzx"], "--prompt: 'zzyzx' is not in the model's vocabulary"),
    (["--prompt", " "], "--prompt ' ' holds no words"),
    (["--temperature", "0"], "argument --temperature: expected a positive float, got '0'"),
    (["--words", "0"], "argument --words: expected a positive int, got '0'"),
    (["--seed", "-2"], "argument --seed: expected an integer in [0, 2**63), got '-2'"),
  ],
)
def test_generate_bad_input_is_one_line_naming_the_flag(lm_run, flags, message, capsys):
  argv = ["generate", "--checkpoint", str(lm_run.out)]
  argv += [f.replace("OUT", str(lm_run.out)) for f in flags]
  status, stdout, stderr = run(argv, capsys)
  assert status == 2 and stdout == ""
  assert stderr.count("\n") == 1 and stderr.startswith("tbptt-jax: error: ")
  assert message in stderr


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
  # 50 updates in one call: nothing was timed after the first call.
  assert summary["tokens_per_s_after_first_call"] is None and summary["tokens_per_s"] > 0


def test_eval_rejects_a_model_of_another_vocabulary(shared_data, tmp_path, capsys):
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
