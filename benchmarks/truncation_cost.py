r"""The cost of the truncation styles, measured with the library's real training step.

`tbptt_jax.truncation` says that window-style TBPTT(k1, k2) costs about k2 / k1
times chunked TBPTT (k1 = k2), because each update's backward pass re-runs a
window of k2 steps instead of its block of k1, and that per-loss style runs one
k2-step window per loss. This script measures both claims end to end: each
configuration is a `tbptt_trainer(...).update` call (forward, backward and
optimizer for `updates_per_call` updates, all inside one jitted call) on random
tokens, with the model

    feedforward(nn.Embed(vocab, hidden)) -> cell -> feedforward(nn.Dense(vocab))

trained with `optax.softmax_cross_entropy_with_integer_labels` and
`optax.sgd(0.1)`.

Configurations: window style with k2 = ratio * k1 for each ratio (ratio 1 is
chunked TBPTT, the reference of every ratio), and per-loss style with
(k1 = 1, k2 = k1) and (k1 = k1, k2 = k1). Each is compiled by a warm-up call
that is not timed; then the configurations are timed round-robin (repeat r
runs every configuration once, starting from a different one each repeat), so
that load from other jobs on a shared machine falls on all of them alike, and
medians are reported. Every call consumes `updates_per_call * k1` new steps of
every stream, so costs are compared per target token (batch * steps).

Usage:
  python benchmarks/truncation_cost.py            # full run
  python benchmarks/truncation_cost.py --quick    # CI smoke run
  python benchmarks/truncation_cost.py --cell gru --ratios 1,2,4 --json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import common
import flax.linen as nn
import jax
import numpy as np
import optax

import tbptt_jax

# Explicit flags win over these; `--quick` only changes what was not given.
_DEFAULTS = {"hidden": 128, "repeats": 7}
_QUICK = {"hidden": 32, "repeats": 3}


class Config(NamedTuple):
  """One truncation to time."""

  style: str  # "window" or "per_loss"
  k1: int  # steps per update
  k2: int  # steps each loss is backpropagated through

  @property
  def name(self) -> str:
    return f"{self.style}(k1={self.k1}, k2={self.k2})"

  def ideal_ratio(self) -> float:
    """Work per target token relative to chunked TBPTT, by the module docstring.

    Window style re-runs k2 steps per block of k1; per-loss style runs a k2-step
    window per loss (its extra forward pass over the block is not counted).
    """
    return self.k2 / self.k1 if self.style == "window" else float(self.k2)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
  return value


def _ratios(text: str) -> list[int]:
  try:
    return sorted({_positive_int(part.strip()) for part in text.split(",") if part.strip()})
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated positive ints such as 1,2,4,8, got {text!r}"
    ) from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Time window- and per-loss-style TBPTT(k1, k2) with tbptt_trainer(...).update."
  )
  pos_int = _positive_int
  parser.add_argument(
    "--cell", choices=tbptt_jax.CELL_NAMES, default="lstm", help="the cell (default %(default)s)"
  )
  parser.add_argument("--hidden", type=pos_int, help="state size (default 128; 32 with --quick)")
  parser.add_argument(
    "--batch-size", type=pos_int, default=32, help="parallel streams (default %(default)s)"
  )
  parser.add_argument(
    "--vocab", type=pos_int, default=256, help="vocabulary size (default %(default)s)"
  )
  parser.add_argument(
    "--k1", type=pos_int, default=8, help="steps per update (default %(default)s)"
  )
  parser.add_argument(
    "--ratios",
    type=_ratios,
    default="1,2,4,8",
    help="window style k2 / k1 values; 1 (chunked, the reference) is always run "
    "(default %(default)s)",
  )
  parser.add_argument(
    "--updates-per-call",
    type=pos_int,
    default=16,
    help="updates per jitted call; a call consumes updates * k1 steps (default %(default)s)",
  )
  parser.add_argument(
    "--repeats", type=pos_int, help="timed calls of each configuration (default 7; 3 with --quick)"
  )
  parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
  parser.add_argument("--quick", action="store_true", help="small settings for a CI smoke run")
  args = parser.parse_args(argv)
  preset = _QUICK if args.quick else _DEFAULTS
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if 1 not in args.ratios:
    args.ratios = [1, *args.ratios]
  return args


def _configs(k1: int, ratios: Sequence[int]) -> list[Config]:
  window = [Config("window", k1, ratio * k1) for ratio in ratios]
  per_loss = [Config("per_loss", 1, k1), Config("per_loss", k1, k1)]
  return window + per_loss


class _Run:
  """A trainer, its state and its pre-generated chunks for one configuration."""

  def __init__(self, config: Config, args: argparse.Namespace, rng: np.random.Generator):
    self.config = config
    model = tbptt_jax.stack(
      tbptt_jax.feedforward(nn.Embed(args.vocab, args.hidden)),
      tbptt_jax.cell_by_name(args.cell, args.hidden),
      tbptt_jax.feedforward(nn.Dense(args.vocab)),
    )
    self.trainer = tbptt_jax.tbptt_trainer(
      model,
      optax.softmax_cross_entropy_with_integer_labels,
      optax.sgd(0.1),
      k1=config.k1,
      k2=config.k2,
      style=config.style,
    )
    self.steps = args.updates_per_call * config.k1
    self.tokens = args.batch_size * self.steps

    # Random tokens, one chunk for the warm-up call and a new one for every
    # timed call, each already its own device array so that no slicing or
    # host-to-device copy falls inside a timed call.
    def chunks() -> list[jax.Array]:
      shape = (args.batch_size, self.steps)
      return [
        jax.device_put(rng.integers(0, args.vocab, shape, dtype=np.int32))
        for _ in range(args.repeats + 1)
      ]

    self.inputs, self.targets = chunks(), chunks()
    self.state = self.trainer.init(jax.random.key(0), self.inputs[0])
    self.seconds: list[float] = []
    self.compile_seconds = float("nan")
    self.last_loss = float("nan")
    self._metrics = None

  def call(self, i: int) -> float:
    """Makes one `update` call on chunk i; returns its wall time in seconds."""
    start = time.perf_counter()
    self.state, metrics = self.trainer.update(self.state, self.inputs[i], self.targets[i])
    jax.block_until_ready(self.state)
    elapsed = time.perf_counter() - start
    self._metrics = metrics
    return elapsed

  def warm_up(self) -> None:
    self.compile_seconds = self.call(0)

  def check(self) -> None:
    losses = np.asarray(self._metrics.loss)
    if not np.all(np.isfinite(losses)):
      raise RuntimeError(f"{self.config.name}: non-finite loss {losses}")
    self.last_loss = float(losses[-1])


def _time_round_robin(runs: list[_Run], repeats: int) -> None:
  """Times `repeats` calls of every run, interleaved; results go to `run.seconds`."""
  gc.collect()
  gc_was_enabled = gc.isenabled()
  gc.disable()  # as timeit does: no collection pauses inside a timed call
  try:
    for r in range(repeats):
      # Rotate the starting configuration so none always runs first or last.
      for j in range(len(runs)):
        run = runs[(r + j) % len(runs)]
        run.seconds.append(run.call(r + 1))
  finally:
    if gc_was_enabled:
      gc.enable()


def _results(runs: list[_Run]) -> list[dict[str, Any]]:
  # The reference is chunked TBPTT: window style with k2 = k1.
  reference = next(r for r in runs if r.config.style == "window" and r.config.k2 == r.config.k1)
  ref_us = [s / reference.tokens * 1e6 for s in reference.seconds]
  ref_median = statistics.median(ref_us)
  rows = []
  for run in runs:
    us = [s / run.tokens * 1e6 for s in run.seconds]
    median_us = statistics.median(us)
    rows.append(
      {
        "style": run.config.style,
        "k1": run.config.k1,
        "k2": run.config.k2,
        "steps_per_call": run.steps,
        "tokens_per_call": run.tokens,
        "compile_seconds": run.compile_seconds,
        "seconds_per_call": run.seconds,
        "median_seconds_per_call": statistics.median(run.seconds),
        "median_us_per_token": median_us,
        "spread": (max(us) - min(us)) / median_us,
        "ratio": median_us / ref_median,
        # Repeat r of every configuration ran within one round, so the ratio
        # within a round is less exposed to slow drifts in the machine's load.
        "paired_ratio": statistics.median(u / v for u, v in zip(us, ref_us, strict=True)),
        "ideal_ratio": run.config.ideal_ratio(),
        "last_loss": run.last_loss,
      }
    )
  return rows


def _table(rows: list[dict[str, Any]]) -> str:
  header = (
    "| style | k1 | k2 | k2/k1 | steps/call | compile s | median s/call | median us/token "
    "| spread | ratio vs chunked | paired ratio | ideal |"
  )
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  for row in rows:
    ideal = f"{row['ideal_ratio']:g}" + ("" if row["style"] == "window" else " *")
    lines.append(
      f"| {row['style']} | {row['k1']} | {row['k2']} | {row['k2'] / row['k1']:g} "
      f"| {row['steps_per_call']} | {row['compile_seconds']:.2f} "
      f"| {row['median_seconds_per_call']:.4f} | {row['median_us_per_token']:.3f} "
      f"| {row['spread']:.0%} | {row['ratio']:.2f} | {row['paired_ratio']:.2f} | {ideal} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  started = datetime.datetime.now(datetime.UTC)
  wall_start = time.perf_counter()
  machine = common.machine()
  load_before = common.load_average()
  print("# tbptt_jax truncation cost")
  print(f"command: {shlex.join(sys.argv)}")
  print(f"python: {sys.executable}")
  print(f"date: {started.isoformat(timespec='seconds')}")
  print(f"jax {machine['jax']} (jaxlib {machine['jaxlib']}), devices {jax.devices()}")
  print(f"cpu: {machine['cpu_model']}, os.cpu_count() = {machine['cpu_count']}")
  print(f"load average before: {load_before}")
  print(
    f"model: Embed({args.vocab}, {args.hidden}) -> {args.cell}({args.hidden}) -> "
    f"Dense({args.vocab}); batch {args.batch_size}; sgd(0.1); "
    f"{args.updates_per_call} updates per call; {args.repeats} timed calls each"
  )

  rng = np.random.default_rng(0)
  runs = [_Run(config, args, rng) for config in _configs(args.k1, args.ratios)]
  for run in runs:
    run.warm_up()
    print(f"compiled {run.config.name} in {run.compile_seconds:.2f} s", flush=True)
  _time_round_robin(runs, args.repeats)
  for run in runs:
    run.check()
  rows = _results(runs)
  load_after = common.load_average()
  wall_seconds = time.perf_counter() - wall_start

  print()
  print(_table(rows))
  print()
  print(
    "us/token: wall time of one call / (batch * steps consumed); ratio: median us/token over "
    "that of window k1 = k2 (chunked); paired ratio: median over repeats of the same ratio "
    "within one round; spread: (max - min) / median of us/token over the timed calls."
  )
  print(
    "ideal: window style k2/k1 (each window re-runs k2 steps instead of k1); * per-loss "
    "style k2 (one k2-step window per loss, the forward pass over the block not counted)."
  )
  print(f"load average after: {load_after}")
  print(f"wall time: {wall_seconds:.1f} s")

  if args.json:
    summary = {
      "benchmark": "truncation_cost",
      "argv": sys.argv,
      "date": started.isoformat(timespec="seconds"),
      "machine": machine,
      "load_average": {"before": load_before, "after": load_after},
      "settings": {
        "cell": args.cell,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "vocab": args.vocab,
        "k1": args.k1,
        "ratios": args.ratios,
        "updates_per_call": args.updates_per_call,
        "repeats": args.repeats,
        "quick": args.quick,
        "optimizer": "sgd(0.1)",
        "loss": "softmax_cross_entropy_with_integer_labels",
      },
      "results": rows,
      "wall_seconds": wall_seconds,
    }
    print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
