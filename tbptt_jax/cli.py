"""The `tbptt-jax` command line: a thin shell around `tbptt_trainer`.

`tbptt-jax train` with no arguments trains the embedded default: an Elman
network (state 16) on the synthetic task of r2rt.com's "Recurrent Neural
Networks in Tensorflow I", batch 200, chunked TBPTT with k1 = k2 = 10, and
prints its final loss beside the task's three reference levels.

Bad arguments print one line, `tbptt-jax: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np
import optax
from tqdm import tqdm

from tbptt_jax import synthetic
from tbptt_jax._checks import STYLES
from tbptt_jax.cells import CELL_NAMES, cell_by_name
from tbptt_jax.streams import iterate_chunks
from tbptt_jax.train import tbptt_trainer

PROG = "tbptt-jax"
TASKS = ("r2rt",)
OPTIMIZERS = {
  "adam": optax.adam,
  "adamw": optax.adamw,
  "sgd": optax.sgd,
  "adagrad": optax.adagrad,
  "rmsprop": optax.rmsprop,
}


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line and exit status 2."""

  def error(self, message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _positive(kind):
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"expected a positive {kind.__name__}, got {text!r}"
      ) from None
    if not value > 0:
      raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
    return value

  return parse


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description="Train recurrent networks with exact TBPTT(k1, k2).")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  train = commands.add_parser(
    "train",
    help="train a model (default: Elman state 16 on the r2rt synthetic task)",
    description=(
      "Train with TBPTT(k1, k2). Default: the r2rt synthetic task, Elman cell of state 16, "
      "batch 200, k1 = k2 = 10, Adam."
    ),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  pos_int, pos_float = _positive(int), _positive(float)
  train.add_argument("--task", choices=TASKS, default="r2rt", help="the training task")
  train.add_argument("--cell", choices=CELL_NAMES, default="elman", help="the recurrent cell")
  train.add_argument("--hidden", type=pos_int, default=16, help="state size of each layer")
  train.add_argument("--layers", type=pos_int, default=1, help="stacked recurrent layers")
  train.add_argument("--batch-size", type=pos_int, default=200, help="parallel streams")
  train.add_argument("--k1", type=pos_int, default=10, help="steps per update")
  train.add_argument("--k2", type=pos_int, default=None, help="backprop steps (default: k1)")
  train.add_argument("--style", choices=STYLES, default="window", help="truncation style")
  train.add_argument("--steps", type=pos_int, default=2000, help="optimizer updates")
  train.add_argument(
    "--updates-per-call",
    type=pos_int,
    default=100,
    help="updates made by one jitted call (a lax.scan over chunks)",
  )
  train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
  train.add_argument("--lr", type=pos_float, default=0.01, help="learning rate")
  train.add_argument("--clip", type=pos_float, default=None, help="max global gradient norm")
  train.add_argument("--unroll", type=pos_int, default=1, help="lax.scan unroll over time")
  train.add_argument("--seed", type=int, default=0, help="seed of data and initialisation")
  train.add_argument("--out", default=None, help="folder for summary, metrics and parameters")
  train.add_argument("--json", action="store_true", help="end stdout with a JSON summary line")
  train.set_defaults(run=_train)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `tbptt-jax` console script."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.error("a command is required: train")
  try:
    return args.run(args)
  except ValueError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
  k2 = args.k1 if args.k2 is None else args.k2
  out = _prepare_out(args.out)
  trainer = tbptt_trainer(
    synthetic.model(*(cell_by_name(args.cell, args.hidden) for _ in range(args.layers))),
    optax.softmax_cross_entropy_with_integer_labels,
    OPTIMIZERS[args.optimizer](args.lr),
    k1=args.k1,
    k2=k2,
    style=args.style,
    max_grad_norm=args.clip,
    unroll=args.unroll,
  )
  # Every update sees k1 new steps of each of the batch_size streams.
  xs, ys = synthetic.streams(args.seed, args.batch_size, args.steps * args.k1)
  chunks = iterate_chunks(xs, args.updates_per_call * args.k1, targets=ys)

  start = time.perf_counter()
  state = trainer.init(jax.random.key(args.seed), xs[:, : args.k1])
  losses, grad_norms = [], []
  first_call_seconds = first_call_updates = None  # init, compilation, first call
  with tqdm(total=args.steps, unit="update", file=sys.stderr, mininterval=0.5) as bar:
    for inputs, targets in chunks:
      state, metrics = trainer.update(state, inputs, targets)
      loss = np.asarray(metrics.loss)  # waits for the call to finish
      if first_call_seconds is None:
        first_call_seconds = time.perf_counter() - start
        first_call_updates = len(loss)
      losses.append(loss)
      grad_norms.append(np.asarray(metrics.grad_norm))
      bar.set_postfix(loss=f"{loss[-1]:.4f}", refresh=False)
      bar.update(len(loss))
  seconds = time.perf_counter() - start
  losses, grad_norms = np.concatenate(losses), np.concatenate(grad_norms)

  tokens = args.steps * args.k1 * args.batch_size
  # Throughput without compilation: the calls after the first, when there are any.
  steady_tokens = (args.steps - first_call_updates) * args.k1 * args.batch_size
  steady_seconds = seconds - first_call_seconds
  after_first_call = round(steady_tokens / steady_seconds, 1) if steady_tokens else None
  final_loss = float(losses[-max(1, len(losses) // 10) :].mean())
  levels = synthetic.reference_losses()
  summary = {
    "task": args.task,
    "cell": args.cell,
    "hidden": args.hidden,
    "layers": args.layers,
    "batch_size": args.batch_size,
    "k1": args.k1,
    "k2": k2,
    "style": args.style,
    "optimizer": args.optimizer,
    "lr": args.lr,
    "clip": args.clip,
    "seed": args.seed,
    "steps": args.steps,
    "tokens": tokens,
    "seconds": round(seconds, 3),
    "first_call_seconds": round(first_call_seconds, 3),
    "tokens_per_s": round(tokens / seconds, 1),
    "tokens_per_s_after_first_call": after_first_call,
    "final_loss": round(final_loss, 5),
    "reference_losses": {k: round(v, 4) for k, v in levels._asdict().items()},
    "backend": jax.default_backend(),
  }
  print(
    f"{args.task}: {args.cell} x{args.layers} state {args.hidden}, batch {args.batch_size}, "
    f"TBPTT(k1={args.k1}, k2={k2}, {args.style}), {args.steps} updates, "
    f"{tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)"
  )
  print(f"final loss {final_loss:.4f} nats (mean over the last 10% of updates)")
  print(
    f"reference: {levels.neither:.4f} learns no dependency | {levels.lag3:.4f} learns "
    f"X(t-3) only | {levels.both:.4f} learns X(t-3) and X(t-8)"
  )
  if out is not None:
    _write_outputs(out, summary, losses, grad_norms, state.params)
    print(f"wrote {out}/summary.json, metrics.csv, params.msgpack")
  if args.json:
    print(json.dumps(summary))
  return 0


def _prepare_out(out: str | None) -> str | None:
  if out is None:
    return None
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out must be a folder, got the existing file {out!r}")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out folder {out!r} cannot be created: {e.strerror}") from None
  if not os.access(out, os.W_OK):
    raise ValueError(f"--out folder {out!r} is not writable")
  return out


def _write_outputs(out: str, summary: dict, losses, grad_norms, params: Any) -> None:
  def atomic(name: str, write) -> None:
    # Write beside, then rename: a crash never leaves a half-written file.
    path = os.path.join(out, name)
    tmp = f"{path}.tmp"
    mode = "wb" if name.endswith(".msgpack") else "w"
    with open(tmp, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  def metrics_csv(f):
    writer = csv.writer(f)
    writer.writerow(["update", "loss", "grad_norm"])
    rows = zip(range(1, len(losses) + 1), losses.tolist(), grad_norms.tolist(), strict=True)
    writer.writerows(rows)

  atomic("summary.json", lambda f: json.dump(summary, f, indent=2))
  atomic("metrics.csv", metrics_csv)
  atomic("params.msgpack", lambda f: f.write(flax.serialization.to_bytes(jax.device_get(params))))


if __name__ == "__main__":
  sys.exit(main())
