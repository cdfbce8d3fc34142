"""Tests of `tbptt_jax.sharding`: data-parallel training on 4 devices and on 2 processes.

JAX fixes its devices when it starts, so the distributed runs are subprocesses:
one process with 4 CPU devices (`--xla_force_host_platform_device_count`), and
two processes joined by `jax.distributed` on 127.0.0.1 (CPU collectives over
gloo), each holding half of the streams. Each must train as one device does,
up to the order of float reductions.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import checkpoint, cli, sharding, synthetic

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for any subprocess run; they take about 15 on 2 CPU cores


def environment(**extra: str) -> dict:
  """The subprocesses' environment: this checkout importable, CPU only."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  """Waits for every process (at most TIMEOUT seconds in all); kills any left."""
  deadline = time.monotonic() + TIMEOUT
  try:
    results = []
    for p in processes:
      out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      results.append((p.returncode, out, err))
    return results
  except subprocess.TimeoutExpired:
    pytest.fail(f"distributed run took over {TIMEOUT} s")
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()


def test_four_devices_train_like_one():
  """Window, per-loss, switched-k2, ARTBP and RTRL training on 4 devices equal 1 device;
  checkpoints move between counts."""
  flags = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4"])
  )
  worker = [sys.executable, str(ROOT / "tests" / "_distributed_worker.py"), "devices"]
  process = subprocess.Popen(
    worker,
    env=environment(XLA_FLAGS=flags),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  ((status, out, err),) = finish([process])
  assert status == 0, err[-3000:]
  report = json.loads(out.strip().splitlines()[-1])
  for run in ("window", "per_loss", "k2s", "artbp", "rtrl"):
    got = report[run]
    # Sums over streams are split in 4 and added across devices: float32 reduction order only.
    for name in ("losses", "params", "opt_state", "carry"):
      assert got[name] <= 1e-5, (run, name, got[name])
    assert got["steps"] == [6, 6]
    assert got["carry_devices"] == 4 and got["carry_shard"] == [2, 8]  # 8 streams, state 8
    if run != "rtrl":  # RTRL's lookback holds no step (k2 = 1): nothing to split
      assert got["lookback_shard"][1] == 2  # time-major: streams on axis 1
    assert got["params_replicated"]
  assert report["compiles_on_a_later_call"] == 0
  for count, got in report["restored"].items():  # a 4-device checkpoint on 1 and 2 devices
    assert got["losses"] <= 1e-5 and got["params"] <= 1e-5, (count, got)
    assert got["carry_devices"] == int(count)
  assert "batch of inputs" in report["batch_error"] and "4 devices" in report["batch_error"]
  status, stderr = report["cli_batch_error"]
  assert status == 2 and stderr.count("\n") == 1
  assert stderr.startswith("tbptt-jax: error: --batch-size 6 must be a multiple of the 4 devices")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, capsys):
  """`tbptt-jax train` on 2 processes (jax.distributed, gloo) equals 1 process; process 0
  alone writes the run's files, each process writes its own shards of the checkpoints (orbax, no
  gather), and the checkpoints hold the streams of both."""
  argv = ["train", "--steps", "20", "--updates-per-call", "10", "--save-every", "10"]
  argv += ["--hidden", "8", "--batch-size", "8", "--json"]
  cluster = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
  two = tmp_path / "two"
  processes = [
    subprocess.Popen(
      [sys.executable, "-m", "tbptt_jax.cli", *argv, "--out", str(two), *cluster],
      env=environment(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for cluster in (cluster + ["--process-id", "0"], cluster + ["--process-id", "1"])
  ]
  results = finish(processes)
  for status, _, err in results:
    assert status == 0, err[-3000:]
  summaries = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  assert [(s["devices"], s["processes"]) for s in summaries] == [(2, 2), (2, 2)]
  assert summaries[0]["final_loss"] == summaries[1]["final_loss"]

  one = tmp_path / "one"
  assert cli.main([*argv, "--out", str(one)]) == 0
  capsys.readouterr()
  # Process 1 wrote nothing: no second header or duplicated rows, no files of its own.
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
  logs = [np.genfromtxt(f / "updates.csv", delimiter=",", names=True) for f in (two, one)]
  assert len(logs[0]) == 20
  for column in ("loss", "grad_norm"):
    np.testing.assert_allclose(logs[0][column], logs[1][column], rtol=1e-5)
  params = [
    flax.serialization.msgpack_restore((f / "params.msgpack").read_bytes()) for f in (two, one)
  ]
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Each process wrote its own shards (its streams' carry) into the same checkpoint.
  shards = os.path.join(checkpoint.latest_checkpoint(two / "checkpoints"), "state")
  for process in (0, 1):
    assert os.listdir(os.path.join(shards, f"ocdbt.process_{process}", "d")), process
  # Read back whole, the checkpoint holds both processes' streams: the one-process state.
  trainer = tbptt_jax.tbptt_trainer(
    synthetic.model(tbptt_jax.elman(8)),
    optax.softmax_cross_entropy_with_integer_labels,
    optax.adam(0.01),
    k1=10,
  )
  like = jax.eval_shape(trainer.init, jax.random.key(0), np.zeros((8, 10), np.int32))
  states = [
    checkpoint.load_checkpoint(checkpoint.latest_checkpoint(f / "checkpoints"), like).state
    for f in (two, one)
  ]
  for a, b in zip(jax.tree.leaves(states[0].carry), jax.tree.leaves(states[1].carry), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(states[0].step) == int(states[1].step) == 20


def test_mesh_checks():
  """A mesh must be a Mesh with a "data" axis; devices distinct; one process holds all streams."""
  model = synthetic.model(tbptt_jax.elman(4))
  loss = optax.softmax_cross_entropy_with_integer_labels
  for bad in ("cpu", jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))):
    with pytest.raises(
      ValueError, match="tbptt_trainer: mesh must be a jax.sharding.Mesh with a 'data' axis"
    ):
      tbptt_jax.tbptt_trainer(model, loss, optax.sgd(0.1), k1=2, mesh=bad)
  with pytest.raises(ValueError, match="data_mesh: devices must be a non-empty list"):
    sharding.data_mesh([])
  with pytest.raises(ValueError, match="data_mesh: devices must be distinct"):
    sharding.data_mesh(jax.devices()[:1] * 2)
  mesh = sharding.data_mesh(jax.devices()[:1])
  assert mesh.axis_names == ("data",)
  assert sharding.process_streams(mesh, 6) == slice(0, 6)
  with pytest.raises(ValueError, match="process_streams: batch must be a multiple"):
    sharding.process_streams(mesh, 2.0)


@pytest.mark.parametrize(
  "flags,message",
  [
    (
      ["--coordinator", "127.0.0.1:1234"],
      "--coordinator, --num-processes and --process-id go together, got only --coordinator",
    ),
    (
      ["--distributed", "--process-id", "0"],
      "--distributed reads the processes from the environment; drop --process-id",
    ),
    (
      ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
      "--process-id must be below --num-processes 2, got 2",
    ),
    (
      ["--coordinator", "host", "--num-processes", "2", "--process-id", "1"],
      "--coordinator must be HOST:PORT, got 'host'",
    ),
    (["--devices", "64"], "--devices 64: this process has "),
    (["--devices", "0"], "argument --devices: expected a positive int, got '0'"),
  ],
)
def test_device_flags_are_checked(flags, message, capsys):
  """Bad device and cluster flags: one line, exit status 2, before any process is joined."""
  try:
    status = cli.main(["train", *flags])
  except SystemExit as e:
    status = e.code
  err = capsys.readouterr().err
  assert status == 2 and err.count("\n") == 1
  assert err.startswith(f"tbptt-jax: error: {message}"), err
