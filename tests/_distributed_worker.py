"""What `tests/test_sharding.py` runs in subprocesses: JAX must see its devices from the start.

    python tests/_distributed_worker.py devices
      with XLA_FLAGS=--xla_force_host_platform_device_count=4: trains the synthetic task on 1
      device and on 4, window and per-loss styles, and restores a 4-device checkpoint on 1 and
      2 devices; prints one JSON line of relative differences and observations.

Two-process runs use the command line itself (`python -m tbptt_jax.cli train --coordinator
...`), so this file holds only the one-process, four-device part.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile

import jax
import numpy as np
import optax

import tbptt_jax
from tbptt_jax import checkpoint, cli, sharding, synthetic

BATCH, HIDDEN, CHUNK, CALLS = 8, 8, 12, 2  # 2 calls of 3 updates of k1 = 4 steps


def relative(a, b) -> float:
  """The largest difference over every array of two trees, relative to the second's scale."""
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(y))), 1e-30))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def trainer(style, k1, k2, mesh, artbp=None):
  """k2 None: RTRL (`gradient="rtrl"`), every loss through every past step."""
  return tbptt_jax.tbptt_trainer(
    synthetic.model(tbptt_jax.elman(HIDDEN)),
    optax.softmax_cross_entropy_with_integer_labels,
    optax.adam(0.05),
    k1=k1,
    k2=k2,
    style=style,
    mesh=mesh,
    artbp=artbp,
    gradient="bptt" if k2 is not None else "rtrl",
  )


def train(style, k1, k2, mesh, xs, ys, artbp=None):
  """`CALLS` calls on `mesh`; the trainer, the state and the losses of every update. With a set
  of k2s, each call uses the next one."""
  run = trainer(style, k1, k2, mesh, artbp)
  state = run.init(jax.random.key(0), xs[:, :k1])
  losses = []
  for c in range(CALLS):
    state = run.set_k2(state, run.k2s[c % len(run.k2s)])
    cut = slice(c * CHUNK, (c + 1) * CHUNK)
    state, metrics = run.update(state, xs[:, cut], ys[:, cut])
    losses.append(np.asarray(metrics.loss))
  return run, state, np.concatenate(losses)


def compiles_during(fn) -> int:
  """How many XLA compilations `fn()` triggers."""
  seen = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_, **__: seen.append(event) if event.endswith("backend_compile_duration") else 0
  )
  fn()
  return len(seen)


def devices() -> dict:
  assert len(jax.devices()) == 4, jax.devices()
  mesh = sharding.data_mesh()
  xs, ys = synthetic.streams(0, BATCH, (CALLS + 1) * CHUNK)
  report = {}
  runs = {  # name: (style, k1, k2, artbp); plain window goes on below
    "per_loss": ("per_loss", 4, 6, None),
    "k2s": ("window", 4, (4, 8), None),  # the compiled set, switched between calls
    "artbp": ("window", 4, 8, tbptt_jax.ARTBP(3.0)),  # each stream's own random cuts
    "rtrl": ("window", 4, None, None),  # the sensitivities carried with each stream
    "window": ("window", 4, 8, None),
  }
  for name, (style, k1, k2, artbp) in runs.items():
    _, one_state, one_losses = train(style, k1, k2, None, xs, ys, artbp)
    run, state, losses = train(style, k1, k2, mesh, xs, ys, artbp)
    carry = jax.tree.leaves(state.carry)[0]
    report[name] = {
      "losses": relative(losses, one_losses),
      "params": relative(state.params, one_state.params),
      "opt_state": relative(state.opt_state, one_state.opt_state),
      "carry": relative(state.carry, one_state.carry),
      "steps": [int(state.step), int(one_state.step)],
      "carry_devices": len(carry.sharding.device_set),
      "carry_shard": list(carry.sharding.shard_shape(carry.shape)),
      "lookback_shard": list(
        state.lookback.resets.sharding.shard_shape(state.lookback.resets.shape)
      ),
      "params_replicated": all(
        a.sharding.is_fully_replicated for a in jax.tree.leaves(state.params)
      ),
    }
  # The window-style run goes on: a checkpoint of its 4-device state, restored on 1 and 2.
  cut = slice(CALLS * CHUNK, (CALLS + 1) * CHUNK)
  with tempfile.TemporaryDirectory() as folder:
    path = checkpoint.save_checkpoint(folder, state)
    # The step compiles once: no compilation on a later call.
    report["compiles_on_a_later_call"] = compiles_during(
      lambda: jax.block_until_ready(run.update(state, xs[:, cut], ys[:, cut]))
    )
    like = jax.eval_shape(run.init, jax.random.key(0), xs[:, :4])
    state4 = run.update(checkpoint.load_checkpoint(path, like).state, xs[:, cut], ys[:, cut])
    report["restored"] = {}
    for count in (1, 2):
      other = trainer("window", 4, 8, None if count == 1 else sharding.data_mesh(mesh.devices[:2]))
      like = jax.eval_shape(other.init, jax.random.key(0), xs[:, :4])
      loaded = checkpoint.load_checkpoint(path, like).state
      state_n, metrics_n = other.update(loaded, xs[:, cut], ys[:, cut])
      carry = jax.tree.leaves(state_n.carry)[0]
      report["restored"][count] = {
        "losses": relative(metrics_n.loss, state4[1].loss),
        "params": relative(state_n.params, state4[0].params),
        "carry_devices": len(carry.sharding.device_set),
      }
  # A batch the data axis does not divide: one clear error, in Python and on the command line.
  try:
    trainer("window", 4, 8, mesh).init(jax.random.key(0), xs[:6, :4])
  except ValueError as e:
    report["batch_error"] = str(e)
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = cli.main(["train", "--devices", "4", "--batch-size", "6", "--steps", "1"])
  report["cli_batch_error"] = [status, stderr.getvalue()]
  return report


if __name__ == "__main__":
  print(json.dumps({"devices": devices}[sys.argv[1]]()))
