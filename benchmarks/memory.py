"""Peak memory and time of training on one long sequence: TBPTT, full BPTT, full BPTT with remat.

The model is small so that long sequences fit: Embed(32, 64) -> LSTM(64) ->
Dense(32) (`tbptt_jax.with_head`), batch 8, random tokens (memory and speed do
not depend on them), softmax cross-entropy. For each total length
T = 10^3, 10^4, ... up to `--max-T`, three ways to train:

* `tbptt`: `tbptt_trainer(..., k1=50, k2=50)` with Adam, the sequence fed in
  chunks of 1000 steps (one jitted call each, 20 updates per call): memory
  should not depend on T.
* `full`: full BPTT, one gradient of the mean loss over all T steps,
  `tbptt_gradients(k1=T, k2=T)` (one `lax.scan` over T steps under
  `jax.grad`): every step's residuals are stored, so memory grows with T.
* `remat`: full BPTT with rematerialisation (Gruslys et al. 2016; Chen et al.
  2016): T split into segments of about sqrt(T) steps, an outer `lax.scan`
  over segments whose body is `jax.checkpoint`-ed, so only the states at
  segment boundaries are stored and each segment is run forward again during
  the backward pass: about sqrt(T) memory for one extra forward pass. The
  script first checks that it gives the same gradient as `full`.

Each (method, T) runs in a fresh subprocess, which reports (RSS from
/proc/self/status, peaks being `VmHWM`, the figure behind `ru_maxrss`):

* `baseline`: its peak RSS after `import jax`, the backend's start and the
  creation of the token array (uint8, batch * (T + 1) bytes, kept on the host);
* `compile peak`: its peak RSS once the step is compiled (the compiler's
  transient memory is a few hundred MiB, far more than this model's buffers);
* `run peak`: its peak RSS during the training run, the peak being reset
  (/proc/self/clear_refs) after compilation; `run peak - baseline` is the
  memory training holds above the bare runtime and data (the compiled code and
  what the compiler kept included); `run peak - before run` is what the run
  itself added;
* XLA's buffer sizes for the compiled step (`compiled.memory_analysis()`:
  arguments, outputs, temporaries), which isolate the program's memory from
  the runtime's; for `tbptt` they are per chunk call;
* on a GPU, `jax.devices()[0].memory_stats()["peak_bytes_in_use"]`;
* seconds per token (batch * T tokens) of the run: the first execution of the
  compiled step, compilation excluded.

A configuration whose compiled program needs more than `--limit-gib` GiB
(arguments + outputs + temporaries, by XLA's analysis) is not run and is
reported as skipped, with that figure as the reason.

Writes `memory.png` (memory and time against T, log-log) and `memory.json`
to `--out`.

  python benchmarks/memory.py [--max-T 1000000] [--limit-gib 4] [--out benchmarks/results] [--json]

References:
  Gruslys, Munos, Danihelka, Lanctot & Graves, "Memory-Efficient
  Backpropagation Through Time", NeurIPS 2016.
  Chen, Xu, Zhang & Guestrin, "Training Deep Nets with Sublinear Memory
  Cost", arXiv:1604.06174, 2016.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any

VOCAB, HIDDEN, BATCH, K, CHUNK = 32, 64, 8, 50, 1000
METHODS = ("tbptt", "full", "remat")
GIB = 2**30


def _rss(field: str) -> int:
  """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, bytes (Linux)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
  """Sets this process's peak RSS (`VmHWM`) back to its current RSS (Linux >= 4.0)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _model():
  import flax.linen as nn

  import tbptt_jax as tj

  return tj.with_head(
    tj.stack(tj.feedforward(nn.Embed(VOCAB, HIDDEN)), tj.cell_by_name("lstm", HIDDEN)),
    nn.Dense(VOCAB),
  )


def _loss_fn(logits, targets):
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def segment_length(time_steps: int) -> int:
  """The divisor of `time_steps` closest to its square root."""
  divisors = [d for d in range(1, time_steps + 1) if time_steps % d == 0]
  return min(divisors, key=lambda d: (abs(d - math.sqrt(time_steps)), d))


def full_gradients(model, params, carry, inputs, targets):
  """The gradient of the mean loss over all T steps: `cell_gradients` of `Truncation(T, T)`."""
  import jax

  import tbptt_jax as tj

  time_steps = inputs.shape[1]
  truncation = tj.Truncation(time_steps, time_steps)
  grads, _ = tj.cell_gradients(model, _loss_fn, truncation, params, carry, inputs, targets)
  return jax.tree.map(lambda g: g[0], grads)  # the one update's gradient


def remat_gradients(model, params, carry, inputs, targets, segment: int):
  """The same gradient, storing only the states at the boundaries of `segment`-step segments.

  The outer scan runs over T / segment segments; its body is `jax.checkpoint`-ed,
  so the backward pass keeps only each segment's entering carry and re-runs
  the segment forward to get the residuals of its steps (Gruslys et al. 2016).
  """
  import jax
  import jax.numpy as jnp

  from tbptt_jax.cells import map_head
  from tbptt_jax.unroll import scan_steps, time_major

  batch, time_steps = inputs.shape[:2]
  xs, ys = time_major((inputs, targets))
  n_segments = time_steps // segment
  xs, ys = (a.reshape((n_segments, segment) + a.shape[1:]) for a in (xs, ys))

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan, CSE cannot hurt
  def segment_loss(params, carry, x, y):
    run = scan_steps(model, params, carry, x)
    logits = map_head(model, params, run.outputs)
    return run.carry, jnp.sum(jax.vmap(_loss_fn)(logits, y))

  def mean_loss(params):
    def body(carry, seg):
      return segment_loss(params, carry, *seg)

    _, sums = jax.lax.scan(body, carry, (xs, ys))
    return jnp.sum(sums) / (batch * time_steps)

  return jax.grad(mean_loss)(params)


def check_remat(time_steps: int = 1000) -> float:
  """Asserts that `remat_gradients` equals `full_gradients`; returns the max abs difference."""
  import jax
  import numpy as np

  model = _model()
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, (BATCH, time_steps + 1)).astype(np.int32)
  x_t = tokens[:, 0]
  params = model.init(jax.random.key(0), x_t)
  carry = model.initial_carry(x_t)
  args = (params, carry, tokens[:, :-1], tokens[:, 1:])
  full = jax.jit(functools.partial(full_gradients, model))(*args)
  remat = jax.jit(functools.partial(remat_gradients, model, segment=segment_length(time_steps)))(
    *args
  )
  diffs = []
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(remat), strict=True):
    # float32 sums of T * batch losses in two orders (one mean, per-segment sums).
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8)
    diffs.append(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
  return max(diffs)


def _memory_analysis(compiled) -> dict[str, int] | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  fields = ("argument", "output", "alias", "temp", "generated_code")
  out = {f: int(getattr(stats, f"{f}_size_in_bytes", 0)) for f in fields}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def child(method: str, time_steps: int, limit_bytes: int) -> dict[str, Any]:
  """Runs one configuration in this (fresh) process and returns its measurements."""
  import jax
  import numpy as np
  import optax

  import tbptt_jax as tj

  jax.devices()  # start the backend: the runtime belongs to the baseline
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (BATCH, time_steps + 1), dtype=np.uint8)
  baseline = _rss("VmHWM")
  model = _model()
  result: dict[str, Any] = {"method": method, "T": time_steps, "baseline_rss": baseline}

  if method == "tbptt":
    chunk = min(CHUNK, time_steps)
    trainer = tj.tbptt_trainer(model, _loss_fn, optax.adam(1e-3), k1=K, k2=K)

    def chunk_at(start):
      x = tokens[:, start : start + chunk].astype(np.int32)
      return x, tokens[:, start + 1 : start + chunk + 1].astype(np.int32)

    state = trainer.init(jax.random.key(0), chunk_at(0)[0])
    compiled = trainer.update.lower(state, *chunk_at(0)).compile()
    result["xla"] = _memory_analysis(compiled)
    result["segment"] = None

    def run():
      nonlocal state
      for start in range(0, time_steps, chunk):
        state, metrics = compiled(state, *chunk_at(start))
      return jax.block_until_ready(metrics.loss)
  else:
    x_t = tokens[:, 0].astype(np.int32)
    params = model.init(jax.random.key(0), x_t)
    carry = model.initial_carry(x_t)
    inputs = jax.device_put(tokens[:, :-1].astype(np.int32))
    targets = jax.device_put(tokens[:, 1:].astype(np.int32))
    if method == "full":
      grad_fn = functools.partial(full_gradients, model)
      result["segment"] = None
    else:
      segment = segment_length(time_steps)
      grad_fn = functools.partial(remat_gradients, model, segment=segment)
      result["segment"] = segment
    compiled = jax.jit(grad_fn).lower(params, carry, inputs, targets).compile()
    result["xla"] = _memory_analysis(compiled)

    def run():
      return jax.block_until_ready(compiled(params, carry, inputs, targets))

  if result["xla"] is not None and result["xla"]["total"] > limit_bytes:
    result["skipped"] = (
      f"XLA needs {result['xla']['total'] / GIB:.1f} GiB (arguments + outputs + temporaries) "
      f"> the {limit_bytes / GIB:g} GiB limit"
    )
    return result
  result["compile_peak_rss"] = _rss("VmHWM")
  # The compiler's transient memory is not the training's: measure the run's own peak.
  _reset_peak_rss()
  before_run = _rss("VmRSS")
  start = time.perf_counter()
  out = run()
  seconds = time.perf_counter() - start
  # Outside the timed run: eager ops on the result compile small programs of their own.
  value = float(np.sqrt(sum(np.sum(np.square(np.asarray(a))) for a in jax.tree.leaves(out))))
  if not math.isfinite(value):
    raise RuntimeError(f"{method} T={time_steps}: non-finite result {value}")
  run_peak = _rss("VmHWM")
  result.update(
    skipped=None,
    before_run_rss=before_run,
    run_peak_rss=run_peak,
    peak_rss=max(run_peak, result["compile_peak_rss"]),
    run_over_baseline=run_peak - baseline,
    run_growth=run_peak - before_run,
    seconds=seconds,
    seconds_per_token=seconds / (BATCH * time_steps),
    value=value,
  )
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  result["device_peak_bytes"] = None if not stats else stats.get("peak_bytes_in_use")
  return result


def _run_child(method: str, time_steps: int, limit_gib: float) -> dict[str, Any]:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", method, str(time_steps)]
  cmd += ["--limit-gib", str(limit_gib)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-3:]
    return {"method": method, "T": time_steps, "skipped": f"failed: {' | '.join(tail)}"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: int | None) -> str:
  return "-" if n is None else f"{n / 2**20:,.1f}"


def _table(rows: list[dict[str, Any]]) -> str:
  header = (
    "| method | T | segment | baseline | compile peak | before run | run peak "
    "| run peak - baseline | run peak - before run | XLA temp | XLA total | us/token | note |"
  )
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  for r in rows:
    xla = r.get("xla") or {}
    us = "-" if r.get("seconds_per_token") is None else f"{r['seconds_per_token'] * 1e6:.2f}"
    cells = [r["method"], f"{r['T']:,}", str(r.get("segment") or "-")]
    cells += [
      _mib(r.get(key))
      for key in (
        "baseline_rss",
        "compile_peak_rss",
        "before_run_rss",
        "run_peak_rss",
        "run_over_baseline",
        "run_growth",
      )
    ]
    cells += [_mib(xla.get("temp")), _mib(xla.get("total")), us, r.get("skipped") or ""]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# The memory figures the targets are checked on, each named as in the table.
_FIGURES = {
  "run_over_baseline": "run peak RSS - baseline",
  "run_growth": "run peak RSS - RSS before run",
  "peak_rss": "peak RSS of the process (compilation included)",
  "xla_total": "XLA arguments + outputs + temporaries",
}


def _figure(row: dict[str, Any], key: str) -> int:
  return row["xla"]["total"] if key == "xla_total" else row[key]


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The issue's targets: TBPTT flat within 10% in T; remat <= 20% of full BPTT at T = 10^4."""

  def ran(method):
    return {r["T"]: r for r in rows if r["method"] == method and not r.get("skipped")}

  out = []
  tbptt = ran("tbptt")
  if len(tbptt) >= 2:
    for key, name in _FIGURES.items():
      values = [_figure(tbptt[t], key) for t in sorted(tbptt)]
      spread = max(values) / min(values) - 1
      out.append(
        {
          "target": f"tbptt flat within 10%, T = {min(tbptt):,}..{max(tbptt):,}",
          "figure": name,
          "value": spread,
          "met": spread <= 0.10,
        }
      )
  full, remat = ran("full"), ran("remat")
  if 10_000 in full and 10_000 in remat:
    for key, name in _FIGURES.items():
      ratio = _figure(remat[10_000], key) / _figure(full[10_000], key)
      out.append(
        {
          "target": "remat <= 20% of full BPTT at T = 10,000",
          "figure": name,
          "value": ratio,
          "met": ratio <= 0.20,
        }
      )
  return out


def plot(rows: list[dict[str, Any]], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"wspace": 1.2})
  for method, color in zip(METHODS, ("C0", "C1", "C2"), strict=True):
    done = [r for r in rows if r["method"] == method and not r.get("skipped")]
    ts = [r["T"] for r in done]
    ax_mem.plot(
      ts,
      [r["run_over_baseline"] / 2**20 for r in done],
      "o-",
      color=color,
      label=f"{method}: run peak RSS - baseline",
    )
    ax_mem.plot(
      ts,
      [r["run_growth"] / 2**20 for r in done],
      "^--",
      color=color,
      label=f"{method}: run peak RSS - RSS before run",
    )
    ax_mem.plot(
      ts,
      [r["xla"]["total"] / 2**20 for r in done],
      "s:",
      color=color,
      label=f"{method}: XLA buffers",
    )
    ax_time.plot(ts, [r["seconds_per_token"] * 1e6 for r in done], "o-", color=color, label=method)
  ax_mem.set(
    xscale="log",
    yscale="log",
    xlabel="sequence length T",
    ylabel="MiB",
    title="Memory of training on T steps",
  )
  ax_mem.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  ax_time.set(
    xscale="log",
    yscale="log",
    xlabel="sequence length T",
    ylabel="us per token",
    title="Time per token",
  )
  ax_time.legend()
  fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max-T", type=int, default=1_000_000, help="largest T (default 10^6)")
  parser.add_argument(
    "--limit-gib", type=float, default=4.0, help="skip programs needing more (default 4)"
  )
  parser.add_argument("--out", default="benchmarks/results", help="folder for PNG and JSON")
  parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
  parser.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    method, time_steps = args.child[0], int(args.child[1])
    print(json.dumps(child(method, time_steps, int(args.limit_gib * GIB))))
    return 0

  import common

  started = time.perf_counter()
  load_before = common.load_average()
  print("# memory of training on T steps: TBPTT, full BPTT, full BPTT with remat")
  print(f"command: {shlex.join(sys.argv)}")
  print(
    f"model: Embed({VOCAB}, {HIDDEN}) -> LSTM({HIDDEN}) -> Dense({VOCAB}), batch {BATCH}; "
    f"tbptt: TBPTT({K}, {K}), Adam, chunks of {CHUNK} steps"
  )
  max_diff = check_remat()
  print(f"remat gradient == full BPTT gradient at T = 1000: max abs difference {max_diff:.2e}")
  ts = [10**e for e in range(3, 7) if 10**e <= args.max_T]
  rows = []
  for time_steps in ts:
    for method in METHODS:
      row = _run_child(method, time_steps, args.limit_gib)
      rows.append(row)
      note = row.get("skipped") or (
        f"run peak {_mib(row['run_peak_rss'])} MiB, {_mib(row['run_growth'])} MiB over the "
        f"RSS before the run, XLA total {_mib(row['xla']['total'])} MiB, "
        f"{row['seconds_per_token'] * 1e6:.2f} us/token"
      )
      print(f"{method:6} T={time_steps:>9,}: {note}", flush=True)
  print()
  print(_table(rows))
  targets = _targets(rows)
  print()
  print("Sizes in MiB. Targets, on each memory figure:")
  for t in targets:
    kind = "spread (max / min - 1)" if t["target"].startswith("tbptt") else "remat / full"
    verdict = "met" if t["met"] else "NOT met"
    print(f"  {t['target']}: {t['figure']}: {kind} {t['value']:.1%} -> {verdict}")
  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, "memory.png")
  plot(rows, png)
  load_after = common.load_average()
  summary = {
    "benchmark": "memory",
    "date": datetime.date.today().isoformat(),
    "command": "python " + shlex.join(sys.argv),
    "settings": {
      "vocab": VOCAB,
      "hidden": HIDDEN,
      "batch": BATCH,
      "cell": "lstm",
      "k1": K,
      "k2": K,
      "chunk": CHUNK,
      "optimizer": "adam(1e-3) (tbptt only)",
      "limit_gib": args.limit_gib,
    },
    "remat_check": {"T": 1000, "max_abs_difference": max_diff, "rtol": 1e-5, "atol": 1e-8},
    "results": rows,
    "targets": targets,
    "machine": common.machine(),
    "load_average": {"before": load_before, "after": load_after},
    "wall_seconds": time.perf_counter() - started,
  }
  with open(os.path.join(args.out, "memory.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"wrote {png} and {os.path.join(args.out, 'memory.json')}")
  if args.json:
    print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
