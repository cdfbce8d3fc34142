"""The GPU suite: tbptt_jax against PyTorch's cuDNN layers, float32 and bfloat16, one command.

  bash benchmarks/gpu.sh                                   # r2rt, small, medium; both precisions
  python benchmarks/gpu.py --presets small large --precisions bfloat16 --seconds 20
  python benchmarks/gpu.py --smoke --out /tmp/gpu.json     # tiny shapes, any device, CPU included

Each workload is a preset of `benchmarks/throughput.py` (the same model, optimizer and
jitted `tbptt_trainer` rounds, imported from it), or Zaremba's large LSTM (`--presets large`,
not run by default): chunked TBPTT(k, k) on random tokens, full update steps. Its PyTorch
baseline is throughput.py's, on the same device (`nn.LSTM` / `nn.RNN`, cuDNN on a GPU): the
same optimizer, clipping and detached state, and the two alternate in rounds of the same
tokens (`common.alternate`). For each workload and precision the record holds:

* tokens/s of each, the medians of the rounds, and their ratio;
* each framework's peak device memory: JAX's allocator `peak_bytes_in_use`
  (`Device.memory_stats()`, None where the backend has none, as on CPU) and
  `torch.cuda.max_memory_allocated()` (None on CPU);
* where an update's time goes, per k-step window: the forward pass alone (a),
  the forward and backward pass (b), the whole update (c); forward = a,
  backward = b - a, optimizer and other = c - b, in ms and as fractions of c.
  For tbptt_jax (a) is the windows' losses (the engine's scan, `head`, loss, the
  carry chained), (b) is `tbptt_jax.cell_gradients` over the same windows at
  fixed parameters (the engine the trainer runs), and (c) a round of
  `trainer.update`, whose rest is the per-step dropout keys, the gradient norm,
  clipping, the optimizer and the finite check. For PyTorch (a) runs under
  `torch.no_grad()`, (b) adds `loss.backward()`, (c) is the training step. The
  three alternate in rounds, after the throughput's rounds; medians of
  `--repeats` rounds each. Differences of medians: a small piece can come out
  slightly negative.

Precisions. float32: as the libraries leave it; whether their float32 products
use TF32 is recorded with each result (`jax_default_matmul_precision`,
PyTorch's `allow_tf32` flags), not changed. bfloat16: PyTorch runs the forward
pass and the loss under `torch.autocast(device_type, dtype=torch.bfloat16)`.
tbptt_jax has no such switch, so `mixed_precision` wraps the model: master
parameters, optimizer and carried state stay float32; the window computes in
bfloat16; logits come back as float32 for the loss. The wrapped cell's
`apply`, `head` (and `head_steps`) and `embed` cast the parameters and the floating-point inputs
to bfloat16 (token ids and PRNG key data are left alone) and cast the new carry
back to its own dtype, so that a `lax.scan` over `apply` keeps one carry type.
Where the model has its own window `scan` (`Cell.scan`, as r2rt's Elman cell
has), the wrapper keeps it, casting the parameters once per window instead of
once per step: the window then runs the same algorithm in both precisions,
rather than bfloat16 falling back to a step-by-step loop that float32 does not
run. The window's weight gradients are then bfloat16 until the cast back to
float32: one product over all its steps in a scan that computes them so, as
Elman's does (and cuDNN under autocast), a bfloat16 sum over its steps in a
plain `lax.scan`.

Each workload and precision runs in a process of its own (`--isolate`, the default except with
`--smoke`): its memory peaks are its own (JAX cannot reset its peak), and a crash or an
out-of-memory error is recorded and the suite goes on. JAX's allocator takes 75% of the GPU
when it starts (its default); PyTorch has the rest, far more than these models need.
`--budget` bounds the whole suite: a workload that would start after it, or still runs at its
end, is recorded as skipped. Errors make the exit status 1; the JSON file is written in every
case.

PyTorch is optional: without it the baseline is reported as missing, never estimated.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
import throughput

import tbptt_jax as tj
from tbptt_jax import lm
from tbptt_jax.cells import map_head, map_steps
from tbptt_jax.unroll import scan_steps, time_major

# Zaremba et al.'s large LSTM in throughput.py's terms: medium, with large's size and recipe.
_ZAREMBA_LARGE = lm.PRESETS["large"]
LARGE = throughput.PRESETS["medium"]._replace(
  hidden=_ZAREMBA_LARGE.hidden,
  k=_ZAREMBA_LARGE.k,
  dropout=_ZAREMBA_LARGE.dropout,
  lr=_ZAREMBA_LARGE.lr,
  clip=_ZAREMBA_LARGE.max_grad_norm,
)
DEFAULT_WORKLOADS = ("r2rt", "small", "medium")
WORKLOADS = {**{name: throughput.PRESETS[name] for name in DEFAULT_WORKLOADS}, "large": LARGE}
PRECISIONS = ("float32", "bfloat16")
# The default run in under 8 minutes: six workload-precision runs of about a minute each (a
# process starting JAX and PyTorch on the GPU, 30-40 s compiling, 8 s of throughput rounds, the
# profile's few rounds); the budget stops it at 7.5 minutes whatever the compiler takes.
DEFAULT_SECONDS, DEFAULT_REPEATS, DEFAULT_BUDGET = 8.0, 5, 450.0


class Settings(NamedTuple):
  """How each workload is measured."""

  seconds: float  # throughput: measuring time per workload and precision
  rounds: int  # throughput: at least this many rounds of each
  repeats: int  # profile: rounds of each piece
  smoke: bool  # tiny shapes
  isolated: bool  # one process per workload and precision


class Network(NamedTuple):
  """What `throughput.jax_trainer` trains for a preset: model, per-step loss, key draws."""

  model: tj.Cell
  loss_fn: Callable[[Any, Any], jax.Array]
  step_rngs: bool  # the model's steps take (x_t, rng_t): the language models' dropout


def preset(workload: str, smoke: bool) -> throughput.Preset:
  """The workload's preset; with `smoke`, at the tiniest shapes (r2rt keeps its 2 classes)."""
  p = WORKLOADS[workload]
  if not smoke:
    return p
  vocab = p.vocab if p.cell == "elman" else 50
  return p._replace(hidden=8, vocab=vocab, batch=2, k=4, updates_per_round=2)


def network(p: throughput.Preset, precision: str) -> Network:
  """The network `throughput.jax_trainer` builds for `p` by default, in `precision`."""
  if p.cell == "elman":
    loss_fn = optax.softmax_cross_entropy_with_integer_labels
    net = Network(throughput.r2rt_model(p.hidden), loss_fn, False)
  else:
    config = lm.LMConfig(p.vocab, p.hidden, p.layers, "optimized_lstm", p.dropout)
    net = Network(lm.language_model(config), lm.cross_entropy, True)
  if precision == "bfloat16":
    net = net._replace(model=mixed_precision(net.model))
  return net


# ------------------------------------------------------------------ bfloat16 for tbptt_jax


def mixed_precision(cell: tj.Cell, dtype: Any = jnp.bfloat16) -> tj.Cell:
  """`cell` computing in `dtype` on its float32 parameters and carry (see the module docstring).

  `init` and `initial_carry` are the cell's, so parameters, optimizer state and carried state
  stay float32; `apply`, `head`, `head_steps`, `embed` and `scan` cast the parameters and
  floating-point inputs to `dtype` and their results back: the carry to its own dtype, the
  readout (the head's, or the step's output of a cell without one) to float32, for the loss.
  """

  def readout(head: Callable | None) -> Callable | None:
    return None if head is None else functools.partial(_mixed_head, head, dtype)

  return tj.Cell(
    init=cell.init,
    initial_carry=cell.initial_carry,
    apply=functools.partial(_mixed_apply, cell, dtype),
    head=readout(cell.head),
    embed=None if cell.embed is None else functools.partial(_mixed_embed, cell.embed, dtype),
    scan=None if cell.scan is None else functools.partial(_mixed_scan, cell, dtype),
    scan_resets=cell.scan_resets,
    head_steps=readout(cell.head_steps),
  )


def _cast(tree: Any, dtype: Any) -> Any:
  """The floating-point leaves of `tree` in `dtype`; integers (token ids, key data) as they are."""
  return jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree
  )


def _like(tree: Any, reference: Any) -> Any:
  """Each leaf of `tree` in the dtype of `reference`'s (a carry, or carries stacked over time)."""
  return jax.tree.map(lambda a, r: a.astype(jnp.result_type(r)), tree, reference)


def _readout(cell: tj.Cell, y: Any) -> Any:
  # A cell without a head hands its step output to the loss, in float32; with one, the output
  # stays low-precision as the head's input.
  return y if cell.head is not None else _cast(y, jnp.float32)


def _mixed_apply(cell: tj.Cell, dtype: Any, params: Any, carry: Any, x_t: Any):
  new_carry, y_t = cell.apply(_cast(params, dtype), _cast(carry, dtype), _cast(x_t, dtype))
  # Back to the carry's own dtype: lax.scan's carry keeps one type from step to step.
  return _like(new_carry, carry), _readout(cell, y_t)


def _mixed_head(head: Callable, dtype: Any, params: Any, y_t: Any) -> Any:
  return _cast(head(_cast(params, dtype), _cast(y_t, dtype)), jnp.float32)


def _mixed_embed(embed: Callable, dtype: Any, params: Any, x_t: Any) -> Any:
  return _cast(embed(_cast(params, dtype), _cast(x_t, dtype)), dtype)


def _mixed_scan(cell: tj.Cell, dtype: Any, params: Any, carry: Any, inputs: Any, unroll=1, **kw):
  # The parameters cast once for the whole window, not once per step: the cell's own scan then
  # runs as in float32 (a fused scan may take its fast path only when its arrays share a dtype).
  if kw:  # resets, for a cell whose scan takes them (`Cell.scan_resets`)
    kw = dict(kw, reset_carry=_cast(kw["reset_carry"], dtype))
  low = _cast((params, carry, inputs), dtype)
  new_carry, outputs, carries = cell.scan(*low, unroll, **kw)
  return _like(new_carry, carry), _readout(cell, outputs), _like(carries, carry)


# ------------------------------------------------------------------ tbptt_jax's pieces


def window_losses(cell, loss_fn, k, unroll, params, carry, inputs, targets) -> jax.Array:
  """The loss of every k-step window of `inputs` `[batch, n k, ...]`, forward only, the carry
  passed from window to window: an update's forward pass without its backward pass."""
  xs, ys = time_major((inputs, targets))
  windows = jax.tree.map(lambda a: a.reshape((-1, k) + a.shape[1:]), (xs, ys))

  def window(carry, window_steps):
    x, y = window_steps
    run = scan_steps(cell, params, carry, map_steps(cell.embed, params, x), unroll=unroll)
    out = map_head(cell, params, run.outputs)
    return run.carry, jnp.mean(jax.vmap(loss_fn)(out, y))

  return jax.lax.scan(window, carry, windows)[1]


def jax_pieces(p: throughput.Preset, tokens: np.ndarray, net: Network) -> dict[str, Callable]:
  """Rounds of the forward pass alone and of forward and backward, over the windows of one
  `throughput.jax_runner` round, at fixed parameters."""
  steps = p.k * p.updates_per_round
  inputs, targets = tokens[:, :steps], tokens[:, 1 : steps + 1]
  if net.step_rngs:  # the trainer draws them inside `update` (`step_rngs=True`)
    keys = jax.random.split(jax.random.key(1), (p.batch, steps))
    inputs = (inputs, jax.random.key_data(keys))
  x_0 = jax.tree.map(lambda a: a[:, 0], inputs)
  params = net.model.init(jax.random.key(0), x_0)
  args = jax.device_put((params, net.model.initial_carry(x_0), inputs, targets))
  forward = functools.partial(window_losses, net.model, net.loss_fn, p.k, p.unroll)
  gradients = functools.partial(
    tj.cell_gradients, net.model, net.loss_fn, tj.Truncation(p.k), unroll=p.unroll
  )

  def timed(fn):
    fn = jax.jit(fn)
    return lambda: jax.block_until_ready(fn(*args))

  return {"forward": timed(forward), "gradient": timed(gradients)}


def jax_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


# ------------------------------------------------------------------ PyTorch's baseline


class TorchBaseline(NamedTuple):
  """throughput.torch_runner's round on a device, and the pieces of its step."""

  step: Callable[[], None]  # a round of training steps
  forward: Callable[[], None]  # the same windows' forward pass and loss, torch.no_grad()
  gradient: Callable[[], None]  # forward and loss.backward(), no optimizer
  reset_peak: Callable[[], None]
  peak_bytes: Callable[[], int | None]
  description: str  # "pytorch <version> on <device>"
  precision_settings: dict[str, Any]


def torch_baseline(p: throughput.Preset, tokens: np.ndarray, precision: str):
  """throughput.torch_runner on the GPU when there is one (else the CPU), or None without
  PyTorch; bfloat16 runs the forward pass and the loss under `torch.autocast`."""
  try:
    import torch
  except ImportError:
    return None
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest kernels for these shapes
  model = throughput.torch_model(torch, p).to(device)
  optimizer, clip = throughput.torch_optimizer(torch, model, p)
  data = torch.from_numpy(tokens.T.astype(np.int64).copy()).to(device)  # [time, batch]
  window = functools.partial(_torch_window, torch, model, data, p, precision == "bfloat16")
  zeros = torch.zeros(p.layers, p.batch, p.hidden, device=device)
  hidden = zeros if p.cell == "elman" else (zeros, zeros.clone())
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def run(kind: str):
    nonlocal hidden
    model.train()
    for i in range(p.updates_per_round):
      hidden = _torch_update(torch, window, optimizer, model, clip, kind, i, hidden)
    sync()  # a round ends when the device is done

  return TorchBaseline(
    step=functools.partial(run, "step"),
    forward=functools.partial(run, "forward"),
    gradient=functools.partial(run, "gradient"),
    reset_peak=torch.cuda.reset_peak_memory_stats if cuda else (lambda: None),
    peak_bytes=torch.cuda.max_memory_allocated if cuda else (lambda: None),
    description=f"pytorch {torch.__version__} on {device}",
    precision_settings={
      "torch_cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
      "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    },
  )


def _torch_window(torch, model, data, p, bf16: bool, i: int, hidden):
  """Window i's loss and the carried state after it, from `hidden` cut off from the graph."""
  x, y = data[i * p.k : (i + 1) * p.k], data[i * p.k + 1 : (i + 1) * p.k + 1]
  # Truncation: the carried state enters the chunk as a constant.
  hidden = hidden.detach() if p.cell == "elman" else tuple(h.detach() for h in hidden)
  with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=bf16):
    logits, hidden = model(x, hidden)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, p.vocab), y.reshape(-1))
  return loss, hidden


def _torch_update(torch, window, optimizer, model, clip, kind: str, i: int, hidden):
  """One window of a round: its forward pass (`kind` "forward"), with the backward pass
  ("gradient"), or the whole training step ("step"), as throughput.torch_runner's."""
  if kind == "forward":
    with torch.no_grad():
      return window(i, hidden)[1]
  optimizer.zero_grad()
  loss, hidden = window(i, hidden)
  loss.backward()
  if kind == "step":
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
  return hidden


# ------------------------------------------------------------------ one workload


def measure(workload: str, precision: str, settings: Settings) -> dict[str, Any]:
  """Throughput, memory peaks and profile of one workload in one precision, both frameworks."""
  start = time.perf_counter()
  p = preset(workload, settings.smoke)
  steps = p.k * p.updates_per_round
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, p.vocab, (p.batch, steps + 1)).astype(np.int32)
  net = network(p, precision)
  # JAX's backend starts first: it is the one whose memory peak cannot be reset.
  update = throughput.jax_runner(p, tokens, model=net.model)
  baseline = torch_baseline(p, tokens, precision)
  runners = {"tbptt_jax": update}
  if baseline is not None:
    runners["pytorch"] = baseline.step
    baseline.reset_peak()
  times = common.alternate(runners, settings.seconds, settings.rounds, first="tbptt_jax")
  peaks = {"tbptt_jax": jax_peak_bytes(), "pytorch": baseline and baseline.peak_bytes()}
  profile = _profile(p, tokens, net, update, baseline, settings.repeats)
  tokens_per_round = p.batch * steps
  sides = {
    name: {
      "tokens_per_s": tokens_per_round / float(np.median(ts)),
      "rounds": len(ts),
      "round_seconds": [round(t, 5) for t in ts],
      "memory_peak_bytes": peaks[name],
      "profile": profile[name],
    }
    for name, ts in times.items()
  }
  return {
    "workload": workload,
    "precision": precision,
    "settings": p._asdict(),
    "tokens_per_round": tokens_per_round,
    "tbptt_jax": {"device": str(jax.devices()[0]), **sides["tbptt_jax"]},
    "pytorch": sides.get("pytorch"),
    "baseline": baseline and baseline.description,
    "ratio": _ratio(sides),
    "memory_scope": "workload" if settings.isolated else "process so far",
    "precision_settings": {
      "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
      **(baseline.precision_settings if baseline else {}),
    },
    "wall_seconds": round(time.perf_counter() - start, 1),
  }


def _ratio(sides: dict[str, dict]) -> float | None:
  if "pytorch" not in sides:
    return None
  return sides["tbptt_jax"]["tokens_per_s"] / sides["pytorch"]["tokens_per_s"]


def _profile(p, tokens, net, update, baseline, repeats: int) -> dict[str, dict | None]:
  """Each framework's update split into forward, backward and the rest, per window."""
  pieces = jax_pieces(p, tokens, net)
  runners = {"jax forward": pieces["forward"], "jax gradient": pieces["gradient"]}
  runners["jax update"] = update
  if baseline is not None:
    runners.update({"torch forward": baseline.forward, "torch gradient": baseline.gradient})
    runners["torch update"] = baseline.step
  times = common.alternate(runners, 0.0, repeats, first="jax forward")
  median = {name: float(np.median(ts)) for name, ts in times.items()}
  split = functools.partial(_split, p.updates_per_round)
  return {
    "tbptt_jax": split(*(median[f"jax {piece}"] for piece in ("forward", "gradient", "update"))),
    "pytorch": baseline
    and split(*(median[f"torch {piece}"] for piece in ("forward", "gradient", "update"))),
  }


def _split(windows: int, forward: float, gradient: float, update: float) -> dict[str, Any]:
  """Rounds of (a) forward, (b) forward and backward, (c) update as ms per window and shares."""
  parts = {"forward": forward, "backward": gradient - forward, "optimizer_other": update - gradient}
  return {
    **{f"{name}_ms": 1e3 * s / windows for name, s in parts.items()},
    "update_ms": 1e3 * update / windows,
    "fractions": {name: s / update for name, s in parts.items()},
  }


# ------------------------------------------------------------------ the suite


def run_suite(combos, settings: Settings, budget: float | None, child_args) -> list[dict]:
  """Every (workload, precision) of `combos`, in this process or one process each."""
  deadline = None if budget is None else time.monotonic() + budget
  results = []
  for i, (workload, precision) in enumerate(combos, 1):
    left = None if deadline is None else deadline - time.monotonic()
    label = f"[{i}/{len(combos)}] {workload} {precision}"
    if left is not None and left <= 0:
      print(f"{label}: skipped, the --budget is spent", file=sys.stderr, flush=True)
      results.append(_failed(workload, precision, skipped="not started: the --budget was spent"))
      continue
    print(f"{label} ...", file=sys.stderr, flush=True)
    if settings.isolated:
      results.append(_in_child(workload, precision, child_args, left))
    else:
      results.append(_in_process(workload, precision, settings))
  return results


def _failed(workload: str, precision: str, **why: Any) -> dict[str, Any]:
  return {"workload": workload, "precision": precision, **why}


def _in_process(workload: str, precision: str, settings: Settings) -> dict[str, Any]:
  try:
    # Through JSON, as a child's result comes: the same record either way.
    return json.loads(json.dumps(measure(workload, precision, settings)))
  except Exception as e:  # recorded; the suite goes on with the next workload
    traceback.print_exc()
    return _failed(workload, precision, error=f"{type(e).__name__}: {e}"[:2000])


def _in_child(workload: str, precision: str, child_args: list[str], timeout) -> dict:
  """`measure` in a fresh process: a memory peak of its own, and a crash that stays there."""
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, "result.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", f"{workload}:{precision}"]
    command += ["--worker-out", out, *child_args]
    try:
      child = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return _failed(workload, precision, skipped="stopped at the end of the --budget")
    if child.returncode != 0 or not os.path.exists(out):
      sys.stderr.write(child.stderr[-4000:])
      tail = child.stderr.strip().splitlines()[-1:] or ["no message"]
      return _failed(workload, precision, error=f"exit status {child.returncode}: {tail[0]}")
    with open(out) as f:
      return json.load(f)


# ------------------------------------------------------------------ report


def _mib(n: int | None) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f}"


def _shares(side: dict | None) -> str:
  if not side or not side.get("profile"):
    return "-"
  fractions = side["profile"]["fractions"]
  return "/".join(f"{100 * fractions[k]:.0f}" for k in ("forward", "backward", "optimizer_other"))


def table(results: list[dict]) -> str:
  """One row per workload and precision."""
  lines = [
    f"{'workload':8} {'precision':9} {'tbptt_jax tok/s':>15} {'pytorch tok/s':>14} {'ratio':>6} "
    f"{'jax MiB':>8} {'torch MiB':>9}  {'jax fwd/bwd/opt %':>17}  {'torch fwd/bwd/opt %':>19}"
  ]
  for r in results:
    head = f"{r['workload']:8} {r['precision']:9}"
    if "tbptt_jax" not in r:
      lines.append(f"{head} {'skipped' if 'skipped' in r else 'FAILED'}: "
                   f"{r.get('skipped') or r.get('error')}")  # fmt: skip
      continue
    jx, pt = r["tbptt_jax"], r["pytorch"]
    base = "missing" if pt is None else f"{pt['tokens_per_s']:,.0f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    lines.append(
      f"{head} {jx['tokens_per_s']:15,.0f} {base:>14} {ratio:>6} "
      f"{_mib(jx['memory_peak_bytes']):>8} {_mib(pt and pt['memory_peak_bytes']):>9}  "
      f"{_shares(jx):>17}  {_shares(pt):>19}"
    )
  return "\n".join(lines)


# ------------------------------------------------------------------ command line


def _non_negative(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
  return value


def _positive(text: str) -> float:
  value = _non_negative(text)
  if value == 0:
    raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
  return value


def _positive_int(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
  return int(text)


def _combo(text: str) -> tuple[str, str]:
  workload, _, precision = text.partition(":")
  if workload not in WORKLOADS or precision not in PRECISIONS:
    raise argparse.ArgumentTypeError(f"must be WORKLOAD:PRECISION, got {text!r}")
  return workload, precision


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = p.add_argument
  add(
    "--presets",
    nargs="+",
    choices=list(WORKLOADS),
    default=list(DEFAULT_WORKLOADS),
    help="workloads, in this order (default: %(default)s; large is opt-in)",
  )
  add(
    "--precisions",
    nargs="+",
    choices=PRECISIONS,
    default=list(PRECISIONS),
    help="compute precisions (default: %(default)s)",
  )
  add(
    "--seconds",
    type=_non_negative,
    help=f"throughput's measuring time per workload and precision (default: "
    f"{DEFAULT_SECONDS:g}, 0 with --smoke)",
  )
  add(
    "--repeats",
    type=_positive_int,
    help=f"profile rounds of each piece (default: {DEFAULT_REPEATS}, 1 with --smoke)",
  )
  add(
    "--budget",
    type=_positive,
    help=f"seconds for the whole suite (default: {DEFAULT_BUDGET:g}, none with --smoke)",
  )
  add(
    "--out",
    default="benchmarks/results/gpu.json",
    help="the JSON file to write (default: %(default)s)",
  )
  add(
    "--smoke",
    action="store_true",
    help="tiny shapes, one round each, on JAX's default device: checks that the suite runs",
  )
  add(
    "--isolate",
    action=argparse.BooleanOptionalAction,
    help="one process per workload and precision (default: yes, no with --smoke)",
  )
  add("--worker", type=_combo, help=argparse.SUPPRESS)  # a child of --isolate
  add("--worker-out", help=argparse.SUPPRESS)
  return p


def settings_of(args: argparse.Namespace) -> Settings:
  """The measuring settings of the command line, with the defaults of its mode."""
  smoke = args.smoke
  return Settings(
    seconds=(0.0 if smoke else DEFAULT_SECONDS) if args.seconds is None else args.seconds,
    rounds=1 if smoke else 5,
    repeats=(1 if smoke else DEFAULT_REPEATS) if args.repeats is None else args.repeats,
    smoke=smoke,
    isolated=bool(args.worker) or (not smoke if args.isolate is None else args.isolate),
  )


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.worker and not args.worker_out:
    parser().error("--worker needs --worker-out")
  settings = settings_of(args)
  if settings.smoke:
    # A smoke run's time is compilation, and it measures nothing XLA's optimisations would
    # change: without them it takes less than half as long on a 2-core CPU.
    jax.config.update("jax_disable_most_optimizations", True)
  if args.worker:
    with open(args.worker_out, "w") as f:
      json.dump(measure(*args.worker, settings), f)
    return 0
  budget = (None if settings.smoke else DEFAULT_BUDGET) if args.budget is None else args.budget
  combos = [(w, p) for w in dict.fromkeys(args.presets) for p in dict.fromkeys(args.precisions)]
  child_args = ["--seconds", str(settings.seconds), "--repeats", str(settings.repeats)]
  child_args += ["--smoke"] if settings.smoke else []
  results = run_suite(combos, settings, budget, child_args)
  print(table(results))
  record = common.summary("gpu", settings={**settings._asdict(), "budget": budget}, results=results)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
