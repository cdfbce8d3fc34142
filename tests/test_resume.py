"""A real `tbptt-jax train` stopped by signals and a kill, mid-run and mid-save, then resumed:
it ends exactly where the run that never stopped ends."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import checkpoint, cli, synthetic
from tbptt_jax.cli import flags, session

# 60 updates in calls of 10, a checkpoint every 10: r2rt, small and quick.
ARGS = ["train", "--steps", "60", "--updates-per-call", "10", "--save-every", "10"]
ARGS += ["--hidden", "8", "--batch-size", "16", "--seed", "3"]


def start(out, *extra, pause=None):
  """Starts `tbptt-jax train` in a subprocess; `pause` seconds in the middle of every file write."""
  env = dict(os.environ)
  env.pop("TBPTT_JAX_TEST_WRITE_PAUSE", None)
  if pause is not None:
    env["TBPTT_JAX_TEST_WRITE_PAUSE"] = str(pause)
  argv = [sys.executable, "-m", "tbptt_jax.cli", *ARGS, "--out", str(out), *extra]
  return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=120):
  """Waits until `path` exists (the process is then inside a write of it)."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"{path} never appeared; stderr: {process.communicate()[1][-2000:]}")
    time.sleep(0.02)


def finish(process, timeout=120):
  try:
    _, err = process.communicate(timeout=timeout)
  finally:
    process.kill()  # bounded: never leave a process behind
  return process.returncode, err


def test_signals_and_kills_mid_run_and_mid_save_then_resume_exactly(tmp_path, capsys):
  reference, out = tmp_path / "reference", tmp_path / "run"
  assert cli.main([*ARGS, "--out", str(reference)]) == 0
  capsys.readouterr()
  folder = out / "checkpoints"

  # 1. SIGTERM mid-run (during the first checkpoint's write): the run finishes that call,
  #    saves, says how to continue and exits 128 + 15.
  run = start(out, pause=0.5)
  wait_for(folder / "step_0000000010.ckpt.tmp", run)
  run.send_signal(signal.SIGTERM)
  status, err = finish(run)
  assert status == 143, err
  assert "SIGTERM: stopped after update 10; saved" in err and "--resume" in err
  assert checkpoint.latest_checkpoint(folder).endswith("step_0000000010.ckpt")

  # 2. SIGKILL in the middle of the next checkpoint's write: the previous one stays intact.
  run = start(out, "--resume", pause=0.5)
  wait_for(folder / "step_0000000020.ckpt.tmp", run)
  run.kill()
  status, _ = finish(run)
  assert status == -signal.SIGKILL
  assert checkpoint.latest_checkpoint(folder).endswith("step_0000000010.ckpt")
  assert os.path.exists(folder / "step_0000000020.ckpt.tmp")  # the half-written file

  # 3. SIGINT twice mid-save: the second one exits at once, without saving.
  shutil.rmtree(folder / "step_0000000020.ckpt.tmp")  # so that the next write can be seen
  run = start(out, "--resume", pause=1.0)
  wait_for(folder / "step_0000000020.ckpt.tmp", run)
  time.sleep(0.2)  # the write has started again
  run.send_signal(signal.SIGINT)
  time.sleep(0.2)
  run.send_signal(signal.SIGINT)
  status, err = finish(run)
  assert status == 130 and "SIGINT again: stopping now" in err
  assert checkpoint.latest_checkpoint(folder).endswith("step_0000000010.ckpt")

  # 4. Resumed to the end: the same parameters and per-update metrics, bit for bit.
  status, err = finish(start(out, "--resume"))
  assert status == 0, err
  assert "resuming from" in err
  for name in ("params.msgpack", "updates.csv"):
    assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_resume_errors_are_one_line(tmp_path, capsys):
  out = tmp_path / "run"
  cases = [
    (["train", "--resume"], "--resume needs --out DIR"),
    (["train", "--resume", "--out", str(out)], "--resume: no checkpoint in"),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
  assert cli.main([*ARGS, "--steps", "10", "--out", str(out)]) == 0
  capsys.readouterr()
  cases = [
    ([*ARGS, "--out", str(out)], "holds the checkpoints of another run: continue it with --resume"),
    (["train", "--out", str(out), "--resume", "--k1", "5"], "--k1 5 does not match the run's 10"),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
  # A damaged checkpoint is named: its largest array file cut in half.
  latest = checkpoint.latest_checkpoint(out / "checkpoints")
  arrays = [os.path.join(root, name) for root, _, names in os.walk(latest) for name in names]
  damaged = max(arrays, key=os.path.getsize)
  with open(damaged, "r+b") as f:
    f.truncate(os.path.getsize(damaged) // 2)
  assert cli.main(["train", "--out", str(out), "--resume"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "corrupt" in err and latest in err, err


def test_nonfinite_gradients_stop_the_run_with_the_last_good_parameters(tmp_path, capsys):
  """SGD at lr 1e38 overflows the parameters; every later gradient is NaN, every such update
  skipped; after --max-nonfinite of them in a row the run stops, saved, with status 1."""
  out = tmp_path / "run"
  # Seed 8's data first give a NaN gradient at update 8: the streak runs into the second call.
  argv = [*ARGS, "--seed", "8", "--optimizer", "sgd", "--lr", "1e38", "--max-nonfinite", "5"]
  argv += ["--out", str(out)]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert "the loss is inf" in err
  assert "the gradient or the update holds NaN or inf; update skipped" in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("tbptt-jax: error: 5 updates in a row") and "saved " in last
  with open(out / "updates.csv") as f:
    rows = list(csv.DictReader(f))
  nonfinite = [row["nonfinite"] == "True" for row in rows]
  assert len(rows) == 20 and nonfinite.count(True) >= 5
  meta = checkpoint.read_meta(checkpoint.latest_checkpoint(out / "checkpoints"))
  assert meta["updates"] == 20 and meta["calls"] == 2


def test_checkpoints_save_this_runs_settings_over_those_of_a_resumed_position(tmp_path):
  """A position read from a checkpoint holds that run's settings; an extended run saves its own."""
  args = flags.parser().parse_args(["train", "--out", str(tmp_path), "--steps", "8"])
  model = synthetic.model(tbptt_jax.elman(2))
  trainer = tbptt_jax.tbptt_trainer(
    model, optax.softmax_cross_entropy_with_integer_labels, optax.sgd(0.1), k1=2
  )
  state = trainer.init(jax.random.key(0), np.zeros((1, 2), np.int32))
  path = session.Checkpoints(args).save(state, {"updates": 0, "args": {"steps": 4}})
  assert checkpoint.read_meta(path)["args"]["steps"] == 8
