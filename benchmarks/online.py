r"""Online gradients (RTRL, the diagonal online LRU) and the LRU's parallel scan against truncation.

Four parts, each selectable with `--part NAME` (repeatable; default all):

* `r2rt`: updates every step (k1 = 1) on the r2rt task (`tbptt_jax.synthetic`), batch 32:
  RTRL of an Elman network (`gradient="rtrl"`), the diagonal online LRU
  (`synthetic.model(lru_block(16, online=True))`, `gradient="online"`) and window-style
  TBPTT(1, k2) of the same Elman network. Which dependency each learns (final loss, the mean
  of the last 10% of updates, beside the reference levels), what an update costs (median
  seconds per update over the chunks after the first) and what it holds (XLA's temporaries
  of the compiled update, the carry and the lookback). The runs train side by side, one
  chunk each in turn, so that they see the same machine load.
* `rtrl_cost`: RTRL's time per step and memory (O(n^2 p) time and O(n p) memory per stream
  in theory) as the Elman state n grows, beside the diagonal online LRU of the same state
  size (O(n H)) and plain TBPTT(1, 1) of the Elman network, the floor; batch 4, times
  alternated (`common.alternate`), ratios to TBPTT(1, 1). A run whose sensitivity exceeds
  `--max-sensitivity-mib` (rtrl_cell refuses it) or whose compiled update needs more than
  `--max-temp-mib` of XLA temporaries is skipped, with what it would need.
* `window`: chunked TBPTT(k, k) of an LRU block whose windows run as an associative scan
  (`lru(scan="associative")`), as a loop of the elementwise recurrence with the projections
  hoisted out (`scan="sequential"`, what `"auto"` picks on a CPU), and looped step by step by
  the engine (`model._replace(scan=None)`), alternated; the first call's losses of the three
  are compared (the same function).
* `lm`: the LRU (`LMConfig(cell="lru")`, i.e. `lru_block`, its window as `"auto"` picks)
  against the LSTM
  (`optimized_lstm`) in a one-layer language model, the LRU's width chosen so that its
  recurrent layer has about the LSTM's parameter count, on PTB words (TBPTT(35, 35)) and
  tiny-shakespeare characters (TBPTT(100, 100)); both trained with Adam for the same
  training time (`--seconds` each; their calls alternate, so tokens/s are side by side), then
  evaluated on the validation split (perplexity; bits per character). `lm.language_model`
  draws every parameter uniform in [-0.1, 0.1] (Zaremba et al.) except the LRU's, which keep
  the paper's ring initialisation.

Learning rates: at k1 = 1, Adam 1e-2 made both RTRL and the online LRU unstable (after
reaching about 0.47 the loss climbed back to 0.59 and 0.66), and the online LRU still at 3e-3
(clipping did not help); at 3e-3 RTRL reached 0.466 in 10,000 updates, the LRU 0.458 at 1e-3.
So r2rt runs at `--lr 3e-3` (the Elman runs) and `--lru-lr 1e-3` (the LRU).

Usage (from the repository root):
  python benchmarks/online.py                          # every part: about 30 minutes
  python benchmarks/online.py --quick                  # smoke run: about 2.5 minutes
  python benchmarks/online.py --part r2rt --part window --out online.json
  python benchmarks/online.py --out benchmarks/results/online.json \
      --plot benchmarks/results/online.png                   # what RESULTS.md records
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tbptt_jax as tj
from tbptt_jax import lm, rtrl, synthetic
from tbptt_jax.data import read_corpus

PARTS = ("r2rt", "rtrl_cost", "window", "lm")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
CORPORA = {  # name: (folder under --data, level, k, batch)
  "ptb": ("ptb", "word", 35, 20),
  "shakespeare": ("tinyshakespeare", "char", 100, 32),
}
# Explicit flags win; `--quick` changes only what was not given.
_FULL = {
  "updates": 10_000,
  "k2s": "1,2,4,7,8,16",
  "sizes": "16,32,64,128,256",
  "cost_seconds": 10.0,
  "ks": "10,30,100,300,1000",
  "window_seconds": 10.0,
  "seconds": 300.0,
  "lm_hidden": 256,
  "eval_tokens": None,
}
_QUICK = {
  "updates": 500,
  "k2s": "1,4",
  "sizes": "16,32",
  "cost_seconds": 1.0,
  "ks": "10,100",
  "window_seconds": 1.0,
  "seconds": 10.0,
  "lm_hidden": 64,
  "eval_tokens": 5000,
}


def _ints(text: str) -> list[int]:
  return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", action="append", choices=PARTS, help="a part to run (default all)")
  p.add_argument("--quick", action="store_true", help="small settings: all parts in ~2 minutes")
  p.add_argument("--out", help="write every result, with the machine, to this JSON file")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--plot", help="with --out: write the figure to this PNG file")
  p.add_argument(
    "--plot-from", action="append", help="only draw --plot from these earlier --out JSON files"
  )
  g = p.add_argument_group("r2rt")
  g.add_argument("--hidden", type=int, default=16, help="Elman state and LRU width (16)")
  g.add_argument("--batch-size", type=int, default=32, help="streams (32)")
  g.add_argument("--lr", type=float, default=3e-3, help="Adam, the Elman runs (3e-3)")
  g.add_argument("--lru-lr", type=float, default=1e-3, help="Adam, the online LRU (1e-3)")
  g.add_argument("--updates", type=int, help="updates per run (10000; quick 500)")
  g.add_argument("--chunk", type=int, default=100, help="steps per update call (100)")
  g.add_argument("--k2s", type=_ints, help="TBPTT(1, k2) windows (1,2,4,7,8,16; quick 1,4)")
  g = p.add_argument_group("rtrl_cost")
  g.add_argument("--sizes", type=_ints, help="state sizes (16,32,64,128,256; quick 16,32)")
  g.add_argument("--cost-batch", type=int, default=4, help="streams (4)")
  g.add_argument("--cost-steps", type=int, default=4, help="steps (k1 = 1 updates) per call (4)")
  g.add_argument("--cost-seconds", type=float, help="timing per size (10; quick 1)")
  g.add_argument("--max-sensitivity-mib", type=float, default=1024, help="RTRL's bound (1024)")
  g.add_argument("--max-temp-mib", type=float, default=2048, help="skip updates needing more")
  g = p.add_argument_group("window")
  g.add_argument("--ks", type=_ints, help="k1 = k2 (10,30,100,300,1000; quick 10,100)")
  g.add_argument("--window-hidden", type=int, default=64, help="LRU block width (64)")
  g.add_argument("--window-batch", type=int, default=32, help="streams (32)")
  g.add_argument("--window-steps", type=int, default=1000, help="about this many steps per call")
  g.add_argument("--window-seconds", type=float, help="timing per k (10; quick 1)")
  g = p.add_argument_group("lm")
  g.add_argument("--data", default=DATA, help="folder holding ptb/ and tinyshakespeare/")
  g.add_argument("--corpus", action="append", choices=list(CORPORA), help="default both")
  g.add_argument("--seconds", type=float, help="training time per model per corpus (300; 10)")
  g.add_argument("--lm-hidden", type=int, help="embedding and LSTM state size (256; quick 64)")
  g.add_argument("--lm-lr", type=float, default=2e-3, help="Adam (2e-3)")
  g.add_argument("--lm-clip", type=float, default=1.0, help="global norm clip (1.0)")
  g.add_argument("--updates-per-call", type=int, default=10, help="updates per call (10)")
  g.add_argument("--eval-batch", type=int, default=10, help="evaluation streams (10)")
  g.add_argument("--eval-tokens", type=int, help="validation tokens (all; quick 5000)")
  args = p.parse_args(argv)
  for key, value in (_QUICK if args.quick else _FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for key in ("sizes", "ks", "k2s"):
    if isinstance(getattr(args, key), str):
      setattr(args, key, _ints(getattr(args, key)))
  args.part = args.part or list(PARTS)
  args.corpus = args.corpus or list(CORPORA)
  return args


# Shared pieces: a compiled training run, sizes, tables.


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or shape) in `tree`."""
  return sum(math.prod(np.shape(a)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def count(tree: Any) -> int:
  """Numbers in every array (or shape) in `tree`: a parameter count."""
  return sum(math.prod(np.shape(a)) for a in jax.tree.leaves(tree))


class Run:
  """A trainer's state and its `update` compiled for one chunk shape: what every part times.

  Compiling ahead (`update.lower(...).compile()`) keeps compilation out of every timed call
  and gives XLA's memory analysis of the update.
  """

  def __init__(self, trainer: tj.Trainer, inputs: Any, targets: Any, seed: int = 0):
    self.state = trainer.init(jax.random.key(seed), inputs)
    start = time.perf_counter()
    self.update = trainer.update.lower(self.state, inputs, targets).compile()
    self.compile_seconds = time.perf_counter() - start
    self.losses: list[jax.Array] = []
    self.seconds: list[float] = []

  def __call__(self, inputs: Any, targets: Any) -> float:
    """One update call; its wall time (also appended to `seconds`)."""
    start = time.perf_counter()
    self.state, metrics = self.update(self.state, inputs, targets)
    jax.block_until_ready(metrics.loss)
    self.seconds.append(time.perf_counter() - start)
    self.losses.append(metrics.loss)
    return self.seconds[-1]

  def memory(self) -> dict[str, int | None]:
    """XLA's temporaries of the compiled update, and the bytes the state carries along."""
    stats = self.update.memory_analysis()
    return {
      "temp_bytes": None if stats is None else int(stats.temp_size_in_bytes),
      "carry_bytes": tree_bytes(self.state.carry),
      "lookback_bytes": tree_bytes(self.state.lookback),
    }

  def all_losses(self) -> np.ndarray:
    return np.concatenate([np.asarray(x) for x in self.losses])


def r2rt_trainer(model: tj.Cell, lr: float, k1: int, **kw: Any) -> tj.Trainer:
  loss = optax.softmax_cross_entropy_with_integer_labels
  return tj.tbptt_trainer(model, loss, optax.adam(lr), k1=k1, **kw)


def chunks(arrays: Sequence[np.ndarray], size: int) -> list[tuple[jax.Array, ...]]:
  """Consecutive `size`-step chunks of `[batch, T]` arrays, on the device already, so that no
  slicing or host-to-device copy falls inside a timed call."""
  length = arrays[0].shape[1] // size * size
  return [tuple(jax.device_put(a[:, i : i + size]) for a in arrays) for i in range(0, length, size)]


def median_after_first(seconds: Sequence[float]) -> float:
  """The median call time, the first call (allocations, caches) left out when there are more."""
  return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def emit(rows: list[dict], row: dict) -> None:
  """Records a result and prints it as one JSON line."""
  rows.append(row)
  print(json.dumps(row), flush=True)


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """A Markdown table: one line per row, columns (header, key, format)."""

  def cell(row, key, fmt):
    value = row.get(key)
    return "-" if value is None else (fmt.format(value) if fmt else str(value))

  lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|---" * len(columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(cell(row, k, f) for _, k, f in columns) + " |")
  return "\n".join(lines)


def with_units(row: dict, unit: str, size: int) -> dict:
  """The row with every `*_bytes` (or `*_bytes_*`) figure also in `unit`s of `size` bytes."""
  extra = {
    k.replace("bytes", unit): v / size
    for k, v in row.items()
    if "_bytes" in k and isinstance(v, int)
  }
  return {**row, **extra}


def runners(runs: dict[str, Run], inputs: Any, targets: Any) -> dict[str, Any]:
  """For `common.alternate`: each run's call on the same chunk (only the state is donated)."""
  return {name: functools.partial(run, inputs, targets) for name, run in runs.items()}


# Part 1: r2rt at k1 = 1.


def r2rt_runs(args: argparse.Namespace) -> dict[str, tuple[tj.Cell, float, dict]]:
  """name: (model, learning rate, trainer keywords) of every r2rt run."""
  elman = lambda: synthetic.model(tj.elman(args.hidden))  # noqa: E731
  runs = {
    "rtrl": (elman(), args.lr, {"gradient": "rtrl"}),
    "online_lru": (
      synthetic.model(tj.lru_block(args.hidden, online=True)),
      args.lru_lr,
      {"gradient": "online"},
    ),
  }
  for k2 in args.k2s:
    runs[f"tbptt(1,{k2})"] = (elman(), args.lr, {"k2": k2})
  return runs


def part_r2rt(args: argparse.Namespace, rows: list[dict]) -> None:
  """Trains every run for `--updates` updates at k1 = 1, one chunk each in turn.

  Taking turns gives every run the same machine load, so their times per update compare;
  the final loss says which of r2rt's dependencies (lag 3, lag 8) each gradient reaches.
  """
  updates = -(-args.updates // args.chunk) * args.chunk
  data = chunks(synthetic.streams(args.seed, args.batch_size, updates), args.chunk)
  runs = {}
  for name, (model, lr, kw) in r2rt_runs(args).items():
    runs[name] = Run(r2rt_trainer(model, lr, 1, **kw), *data[0], seed=args.seed)
    print(f"r2rt: compiled {name} in {runs[name].compile_seconds:.1f} s", flush=True)
  for xs, ys in data:
    for run in runs.values():
      time.sleep(common.SETTLE_SECONDS)
      run(xs, ys)
  lrs = {name: lr for name, (_, lr, _) in r2rt_runs(args).items()}
  for name, run in runs.items():
    losses = run.all_losses()
    memory = run.memory()
    state_bytes, temp = memory["carry_bytes"] + memory["lookback_bytes"], memory["temp_bytes"]
    emit(
      rows,
      {
        "part": "r2rt",
        "method": name,
        "lr": lrs[name],
        "updates": len(losses),
        "final_loss": float(losses[-max(1, len(losses) // 10) :].mean()),
        "us_per_update": median_after_first(run.seconds) / args.chunk * 1e6,
        **memory,
        "memory_bytes": None if temp is None else temp + state_bytes,
        "nonfinite": bool(not np.all(np.isfinite(losses))),
      },
    )


R2RT_COLUMNS = [
  ("method", "method", ""),
  ("Adam lr", "lr", "{:g}"),
  ("updates", "updates", "{:,}"),
  ("final loss", "final_loss", "{:.4f}"),
  ("us / update", "us_per_update", "{:,.0f}"),
  ("XLA temp KiB", "temp_kib", "{:,.1f}"),
  ("carry KiB", "carry_kib", "{:,.1f}"),
  ("lookback KiB", "lookback_kib", "{:,.1f}"),
  ("total KiB", "memory_kib", "{:,.1f}"),
]


def print_r2rt(rows: list[dict]) -> None:
  levels = synthetic.reference_losses()
  print("\n## r2rt, k1 = 1 (an update every step)\n")
  print(table([with_units(r, "kib", 2**10) for r in rows], R2RT_COLUMNS))
  print(
    f"\nreference: {levels.neither:.4f} neither dependency | {levels.lag3:.4f} X(t-3) only | "
    f"{levels.both:.4f} both. final loss: mean of the last 10% of updates; us / update: "
    "median over chunk calls after the first, per update; total: XLA temp + carry + lookback."
  )


# Part 2: what RTRL costs as the state grows.


def sensitivity_bytes(carry: Any) -> int:
  """Bytes of the sensitivities (`RTRLCarry.sensitivity`) anywhere in a carry."""
  is_rtrl = lambda x: isinstance(x, tj.RTRLCarry)  # noqa: E731
  found = [c.sensitivity for c in jax.tree.leaves(carry, is_leaf=is_rtrl) if is_rtrl(c)]
  return tree_bytes(found)


def cost_runs(args: argparse.Namespace, n: int, xs: Any, ys: Any) -> dict[str, Run | str]:
  """TBPTT(1, 1) of Elman n, RTRL of it (rtrl_cell's bound raised to `--max-sensitivity-mib`
  explicitly) and the online LRU of n units, compiled. A run above the sensitivity bound, or
  whose compiled update needs more than `--max-temp-mib` of XLA temporaries, is a note."""
  elman = synthetic.model(tj.elman(n))
  bound = int(args.max_sensitivity_mib * 2**20)
  specs = {
    "tbptt(1,1)": (elman, {}),
    "rtrl": (tj.rtrl_cell(elman, max_sensitivity_bytes=bound), {"gradient": "online"}),
    "online_lru": (synthetic.model(tj.lru_block(n, online=True)), {"gradient": "online"}),
  }
  runs: dict[str, Run | str] = {}
  for name, (model, kw) in specs.items():
    try:
      run = Run(r2rt_trainer(model, args.lr, 1, **kw), xs, ys, seed=args.seed)
    except ValueError:  # rtrl_cell's bound
      runs[name] = f"sensitivity above --max-sensitivity-mib {args.max_sensitivity_mib:g}"
      continue
    temp = run.memory()["temp_bytes"] or 0
    if temp > args.max_temp_mib * 2**20:
      runs[name] = f"XLA temp {temp / 2**20:,.0f} MiB > --max-temp-mib {args.max_temp_mib:g}"
    else:
      runs[name] = run
  return runs


def part_rtrl_cost(args: argparse.Namespace, rows: list[dict]) -> None:
  """Times an update call of `--cost-steps` steps (one update each) of every run, alternated,
  for every state size: RTRL's O(n^2 p) against the diagonal O(n H) and the TBPTT(1, 1) floor."""
  for n in args.sizes:
    steps = args.cost_steps
    xs, ys = chunks(synthetic.streams(args.seed, args.cost_batch, steps), steps)[0]
    runs = cost_runs(args, n, xs, ys)
    live = {name: run for name, run in runs.items() if isinstance(run, Run)}
    times = common.alternate(runners(live, xs, ys), args.cost_seconds, 3, first="tbptt(1,1)")
    floor = statistics.median(times["tbptt(1,1)"])
    for name, run in runs.items():
      row: dict[str, Any] = {"part": "rtrl_cost", "state": n, "method": name}
      if isinstance(run, str):
        elman = synthetic.model(tj.elman(n))
        params = jax.eval_shape(elman.init, jax.random.key(0), xs[:, 0])
        needed = rtrl.sensitivity_bytes(elman, xs[:, 0])
        emit(rows, {**row, "params": count(params), "skipped": run, "sensitivity_bytes": needed})
        continue
      emit(
        rows,
        {
          **row,
          "params": count(run.state.params),
          "us_per_step": statistics.median(times[name]) / steps * 1e6,
          "ratio_to_tbptt": statistics.median(times[name]) / floor,
          "rounds": len(times[name]),
          "sensitivity_bytes": sensitivity_bytes(run.state.carry),
          **run.memory(),
        },
      )


COST_COLUMNS = [
  ("state n", "state", ""),
  ("method", "method", ""),
  ("params", "params", "{:,}"),
  ("us / step", "us_per_step", "{:,.0f}"),
  ("x TBPTT(1,1)", "ratio_to_tbptt", "{:,.1f}"),
  ("sensitivity MiB", "sensitivity_mib", "{:,.2f}"),
  ("carry MiB", "carry_mib", "{:,.2f}"),
  ("XLA temp MiB", "temp_mib", "{:,.2f}"),
  ("note", "skipped", ""),
]


def print_rtrl_cost(rows: list[dict]) -> None:
  print("\n## RTRL's cost as the Elman state grows (batch as --cost-batch, k1 = 1)\n")
  print(table([with_units(r, "mib", 2**20) for r in rows], COST_COLUMNS))
  print("\nus / step: median call time (alternated) / steps per call; x TBPTT(1,1): same size.")


# Part 3: the LRU's window: associative scan, hoisted loop, and the engine's step-by-step loop.

WINDOW_KINDS = ("associative", "sequential", "stepwise")


def window_model(args: argparse.Namespace, kind: str) -> tj.Cell:
  """The r2rt model around an LRU block whose windows run as `kind`: `lru`'s associative scan,
  its hoisted loop (`scan="sequential"`), or the engine's loop of its step (no `Cell.scan`)."""
  if kind == "stepwise":
    return synthetic.model(tj.lru_block(args.window_hidden))._replace(scan=None)
  return synthetic.model(tj.lru_block(args.window_hidden, scan=kind))


def part_window(args: argparse.Namespace, rows: list[dict]) -> None:
  """Times chunked TBPTT(k, k) of an LRU block with its windows as `jax.lax.associative_scan`,
  as a loop of the elementwise recurrence with the projections hoisted out of it, and as the
  engine's loop of the whole step, alternated; checks that their losses agree."""
  for k in args.ks:
    steps = k * max(1, args.window_steps // k)
    xs, ys = chunks(synthetic.streams(args.seed, args.window_batch, steps), steps)[0]
    runs = {
      kind: Run(r2rt_trainer(window_model(args, kind), args.lr, k, k2=k), xs, ys, seed=args.seed)
      for kind in WINDOW_KINDS
    }
    times = common.alternate(runners(runs, xs, ys), args.window_seconds, 3, first="associative")
    us = {name: statistics.median(t) / steps * 1e6 for name, t in times.items()}
    first = [np.asarray(run.losses[0]) for run in runs.values()]
    emit(
      rows,
      {
        "part": "window",
        "k": k,
        "steps_per_call": steps,
        **{f"us_per_step_{kind}": us[kind] for kind in WINDOW_KINDS},
        **{f"{kind}_over_associative": us[kind] / us["associative"] for kind in WINDOW_KINDS[1:]},
        "rounds": len(times["associative"]),
        "first_call_max_loss_difference": max(
          float(np.max(np.abs(other - first[0]))) for other in first[1:]
        ),
        **{f"temp_bytes_{kind}": runs[kind].memory()["temp_bytes"] for kind in WINDOW_KINDS},
      },
    )


WINDOW_COLUMNS = [
  ("k1 = k2", "k", ""),
  ("steps / call", "steps_per_call", "{:,}"),
  ("us / step, associative", "us_per_step_associative", "{:,.2f}"),
  ("us / step, hoisted loop", "us_per_step_sequential", "{:,.2f}"),
  ("us / step, step by step", "us_per_step_stepwise", "{:,.2f}"),
  ("hoisted / assoc.", "sequential_over_associative", "{:.2f}"),
  ("step by step / assoc.", "stepwise_over_associative", "{:.2f}"),
  ("XLA temp MiB, assoc.", "temp_mib_associative", "{:,.2f}"),
  ("XLA temp MiB, hoisted", "temp_mib_sequential", "{:,.2f}"),
  ("max |loss diff|", "first_call_max_loss_difference", "{:.1e}"),
]


def print_window(rows: list[dict]) -> None:
  shown = [with_units(r, "mib", 2**20) for r in rows]
  print("\n## LRU block: associative scan, hoisted loop and step-by-step loop, TBPTT(k, k)\n")
  print(table(shown, WINDOW_COLUMNS))
  print("\nus / step: median call time (alternated) / steps per call; loss diff: first call.")


# Part 4: language models, LRU against LSTM.


def param_counts(config: lm.LMConfig) -> tuple[int, int]:
  """(all parameters, those of the recurrent layers) of a language model: shapes only."""
  model = lm.language_model(config)
  x_t = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x_t)
  return count(params), count(params.layers)


def lm_configs(args: argparse.Namespace, vocab: int) -> dict[str, lm.LMConfig]:
  """The one-layer LSTM of `--lm-hidden`, and the LRU of the width whose recurrent layer has
  the parameter count nearest the LSTM's, with the same embedding size."""
  e = args.lm_hidden
  lstm = lm.LMConfig(vocab, hidden=e, layers=1, cell="optimized_lstm")
  target = param_counts(lstm)[1]

  def lru(width: int) -> lm.LMConfig:
    return lm.LMConfig(vocab, hidden=width, layers=1, cell="lru", embedding_size=e)

  lo, hi = 1, e
  while param_counts(lru(hi))[1] < target:
    hi *= 2
  while hi - lo > 1:  # recurrent parameters grow with the width
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if param_counts(lru(mid))[1] < target else (lo, mid)
  width = min((lo, hi), key=lambda w: abs(param_counts(lru(w))[1] - target))
  return {"lstm": lstm, "lru": lru(width)}


def lm_run(args: argparse.Namespace, config: lm.LMConfig, k: int, example: Any) -> Run:
  """A compiled TBPTT(k, k) run of `config`, Adam with clipping."""
  optimizer = optax.adam(args.lm_lr)
  model = lm.language_model(config)
  trainer = tj.tbptt_trainer(
    model, lm.cross_entropy, optimizer, k1=k, k2=k, max_grad_norm=args.lm_clip
  )
  run = Run(trainer, *example, seed=args.seed)
  run.trainer, run.model = trainer, model
  return run


def train_side_by_side(runs: dict[str, Run], data: list, seconds: float) -> dict[str, int]:
  """Trains the runs in turn, one call each, until each has trained `seconds`; every stream
  restarts at each pass over the data (an epoch). Returns each run's call count."""
  calls = dict.fromkeys(runs, 0)
  spent = dict.fromkeys(runs, 0.0)
  while any(s < seconds for s in spent.values()):
    for name, run in runs.items():
      if spent[name] >= seconds:
        continue
      i = calls[name] % len(data)
      if i == 0:
        run.state = run.trainer.reset(run.state)
      time.sleep(common.SETTLE_SECONDS)
      spent[name] += run(*data[i])
      calls[name] += 1
  return calls


def part_lm(args: argparse.Namespace, rows: list[dict]) -> None:
  """For each corpus: LRU and LSTM trained for the same time side by side, then evaluated
  on the validation split with the state carried throughout (`lm.evaluator`)."""
  for corpus_name in args.corpus:
    folder, level, k, batch = CORPORA[corpus_name]
    corpus = read_corpus(os.path.join(args.data, folder), level)
    streams = tj.batchify(corpus.train, batch)
    data = [
      tuple(jax.device_put(a) for a in chunk)
      for chunk in tj.iterate_chunks(streams, args.updates_per_call * k)
      if chunk[0].shape[1] == args.updates_per_call * k  # whole chunks: one compiled shape
    ]
    configs = lm_configs(args, len(corpus.vocab))
    runs = {name: lm_run(args, config, k, data[0]) for name, config in configs.items()}
    calls = train_side_by_side(runs, data, args.seconds)
    valid = corpus.valid[: args.eval_tokens]
    for name, run in runs.items():
      emit(rows, lm_row(args, corpus_name, level, k, batch, configs[name], run, calls[name], valid))


def lm_row(args, corpus_name, level, k, batch, config, run, calls, valid) -> dict:
  """One model's result: sizes, throughput, final training loss and validation score."""
  total, recurrent = param_counts(config)
  result = lm.evaluator(run.model, batch_size=args.eval_batch)(run.state.params, valid)
  losses = run.all_losses()
  tokens = calls * args.updates_per_call * k * batch
  return {
    "part": "lm",
    "corpus": corpus_name,
    "level": level,
    "model": config.cell,
    "hidden": config.hidden,
    "embedding": config.embedding_dim,
    "params": total,
    "recurrent_params": recurrent,
    "k": k,
    "batch": batch,
    "train_seconds": sum(run.seconds),
    "updates": len(losses),
    "tokens": tokens,
    "tokens_per_s": tokens / sum(run.seconds),
    "train_loss": float(losses[-max(1, len(losses) // 10) :].mean()),
    "valid_tokens": result.tokens,
    "valid_loss": result.loss,
    "valid_ppl": result.perplexity if level == "word" else None,
    "valid_bpc": result.bits_per_token if level == "char" else None,
    "compile_seconds": run.compile_seconds,
  }


LM_COLUMNS = [
  ("corpus", "corpus", ""),
  ("model", "model", ""),
  ("width", "hidden", ""),
  ("params", "params", "{:,}"),
  ("recurrent params", "recurrent_params", "{:,}"),
  ("TBPTT(k, k)", "k", ""),
  ("train s", "train_seconds", "{:.0f}"),
  ("updates", "updates", "{:,}"),
  ("tokens / s", "tokens_per_s", "{:,.0f}"),
  ("train loss", "train_loss", "{:.3f}"),
  ("valid ppl", "valid_ppl", "{:.1f}"),
  ("valid bits/char", "valid_bpc", "{:.3f}"),
]


def print_lm(rows: list[dict]) -> None:
  print("\n## Language models: LRU block against LSTM, one layer, same training time\n")
  print(table(rows, LM_COLUMNS))
  print(
    "\ntrain loss: mean of the last 10% of updates (nats); valid: the validation split (or its "
    "first --eval-tokens), the state carried throughout; tokens / s: training calls only."
  )


PART_FUNCTIONS = {
  "r2rt": (part_r2rt, print_r2rt),
  "rtrl_cost": (part_rtrl_cost, print_rtrl_cost),
  "window": (part_window, print_window),
  "lm": (part_lm, print_lm),
}


def plot(record: dict, path: str) -> None:
  """The figure of a run's record: r2rt's final losses against the reference levels, RTRL's
  time per step against the state size, and the associative window against the loop."""
  import matplotlib  # noqa: PLC0415 (only this needs it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  rows = record["results"]
  fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
  r2rt = [r for r in rows if r["part"] == "r2rt"]
  a.bar([r["method"] for r in r2rt], [r["final_loss"] for r in r2rt], color="tab:gray")
  levels = synthetic.reference_losses()
  references = ((levels.lag3, "X(t-3) only", "tab:orange"), (levels.both, "both", "tab:green"))
  for value, label, colour in references:
    a.axhline(value, ls="--", lw=1, color=colour, label=f"{label} {value:.4f}")
  a.set(ylim=(0.44, 0.7), ylabel="final loss (nats)", title="r2rt, an update every step")
  a.tick_params(axis="x", rotation=45)
  a.legend(fontsize=8)
  cost = [r for r in rows if r["part"] == "rtrl_cost" and r.get("us_per_step")]
  for method in dict.fromkeys(r["method"] for r in cost):
    mine = [r for r in cost if r["method"] == method]
    b.loglog([r["state"] for r in mine], [r["us_per_step"] for r in mine], "o-", label=method)
  b.set(xlabel="state size n", ylabel="us per step (median)", title="cost per step")
  b.legend(fontsize=8)
  window = [r for r in rows if r["part"] == "window"]
  kinds = (("associative", "associative scan"), ("sequential", "hoisted loop"))
  for key, label in (*kinds, ("stepwise", "step by step")):
    if window and f"us_per_step_{key}" in window[0]:  # records before the hoisted loop lack it
      us = [r[f"us_per_step_{key}"] for r in window]
      c.loglog([r["k"] for r in window], us, "o-", label=label)
  c.set(xlabel="k1 = k2", ylabel="us per step (median)", title="LRU window, TBPTT(k, k)")
  c.legend(fontsize=8)
  fig.suptitle(f"benchmarks/online.py, {record['date']}, {record['machine']['cpu_model']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.plot_from:  # each part from the last file that holds it
    records = []
    for path in args.plot_from:
      with open(path) as f:
        records.append(json.load(f))
    parts: dict[str, list[dict]] = {}
    for record in records:
      for part in {r["part"] for r in record["results"]}:
        parts[part] = [r for r in record["results"] if r["part"] == part]
    plot({**records[-1], "results": [r for rows in parts.values() for r in rows]}, args.plot)
    return 0
  start = time.perf_counter()
  machine = common.machine()
  print(f"# online gradients and the LRU against truncation\ncommand: python {' '.join(sys.argv)}")
  print(f"jax {machine['jax']}, {machine['cpu_model']}, {machine['cpu_count']} cpus")
  print(f"load average before: {common.load_average()}", flush=True)
  rows: list[dict] = []
  for part in PARTS:
    if part in args.part:
      run_part, print_part = PART_FUNCTIONS[part]
      done = len(rows)
      run_part(args, rows)
      print_part(rows[done:])
      print(flush=True)
  wall = time.perf_counter() - start
  print(f"load average after: {common.load_average()}; wall time {wall:.0f} s")
  if args.out:
    record = common.summary("online", settings=vars(args), results=rows, wall_seconds=wall)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
      plot(record, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
