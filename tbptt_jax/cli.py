"""The `tbptt-jax` command line: a thin shell around `tbptt_trainer`.

`tbptt-jax train` with no arguments trains the embedded default: an Elman
network (state 16) on the synthetic task of r2rt.com's "Recurrent Neural
Networks in Tensorflow I", batch 200, chunked TBPTT with k1 = k2 = 10, and
prints its final loss beside the task's three reference levels.

Bad arguments print one line, `tbptt-jax: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.serialization
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from tbptt_jax import _files, _session, checkpoint, lm, sharding, synthetic
from tbptt_jax._checks import STYLES
from tbptt_jax.adaptive import adaptive_k2
from tbptt_jax.artbp import ARTBP
from tbptt_jax.cells import CELL_NAMES, cell_by_name
from tbptt_jax.data import LEVELS, Vocabulary, read_corpus
from tbptt_jax.streams import batchify, iterate_chunks
from tbptt_jax.train import Trainer, TrainState, UpdateMetrics, tbptt_trainer

PROG = "tbptt-jax"
TASKS = ("r2rt", "lm")
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


# Defaults of the r2rt task; the lm task takes its defaults from `--preset`.
R2RT_DEFAULTS = dict(
  cell="elman",
  hidden=16,
  layers=1,
  batch_size=200,
  k1=10,
  steps=2000,
  optimizer="adam",
  lr=0.01,
  clip=None,
)
LM_CELL = "optimized_lstm"


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description="Train recurrent networks with exact TBPTT(k1, k2).")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  train = commands.add_parser(
    "train",
    help="train a model (default: Elman state 16 on the r2rt synthetic task)",
    description=(
      "Train with TBPTT(k1, k2). Default: the r2rt synthetic task, Elman cell of state 16, "
      "batch 200, k1 = k2 = 10, Adam. --task lm trains a language model on --data DIR "
      "with a Zaremba et al. (2014) preset; flags given override the preset."
    ),
  )
  pos_int, pos_float = _positive(int), _positive(float)
  train.add_argument("--task", choices=TASKS, default="r2rt", help="the training task")
  train.add_argument(
    "--cell", choices=CELL_NAMES, help=f"the recurrent cell (r2rt: elman; lm: {LM_CELL})"
  )
  train.add_argument("--hidden", type=pos_int, help="state size of each layer (r2rt: 16)")
  train.add_argument("--layers", type=pos_int, help="stacked recurrent layers (r2rt: 1)")
  train.add_argument("--batch-size", type=pos_int, help="parallel streams (r2rt: 200)")
  train.add_argument("--k1", type=pos_int, help="steps per update (r2rt: 10)")
  train.add_argument(
    "--k2",
    type=_k2_list,
    default=None,
    help="backprop steps (default: k1); a list such as 10,20,50,100 with --delta (adaptive k2) "
    "or --artbp (the shortest window that holds the segments drawn)",
  )
  train.add_argument("--style", choices=STYLES, default="window", help="truncation style")
  train.add_argument(
    "--delta",
    type=pos_float,
    help="adaptive truncation (Aicher et al. 2019): tolerated relative gradient bias; "
    "k2 is re-chosen from the --k2 list",
  )
  train.add_argument(
    "--adapt-every",
    type=pos_int,
    help="with --delta: calls between k2 choices (default 10; a call: --updates-per-call updates)",
  )
  train.add_argument(
    "--adapt-streams",
    type=pos_int,
    help="with --delta: streams the gradient decay is measured on (default 4)",
  )
  train.add_argument(
    "--artbp",
    type=pos_float,
    metavar="L0",
    help="unbiased random truncation (ARTBP, Tallec & Ollivier 2017) with mean segment length "
    "L0 > 1, inside windows of k2 > k1 steps",
  )
  train.add_argument("--artbp-alpha", type=pos_float, help="ARTBP's tail exponent (> 2; default 4)")
  train.add_argument("--steps", type=pos_int, help="optimizer updates (r2rt only: 2000)")
  train.add_argument(
    "--updates-per-call",
    type=pos_int,
    default=100,
    help="updates made by one jitted call, a lax.scan over chunks (default 100)",
  )
  train.add_argument(
    "--optimizer", choices=sorted(OPTIMIZERS), help="optax optimizer (r2rt: adam; lm: sgd)"
  )
  train.add_argument("--lr", type=pos_float, help="learning rate (r2rt: 0.01)")
  train.add_argument("--clip", type=pos_float, help="max global gradient norm (r2rt: none)")
  train.add_argument("--unroll", type=pos_int, default=1, help="lax.scan unroll over time")
  train.add_argument("--seed", type=int, default=0, help="seed of data and initialisation")
  train.add_argument(
    "--out", default=None, help="folder for summary, metrics, parameters and checkpoints"
  )
  train.add_argument(
    "--resume", action="store_true", help="continue the run saved in --out from its last checkpoint"
  )
  train.add_argument(
    "--save-every", type=pos_int, default=1000, help="updates between checkpoints (default 1000)"
  )
  train.add_argument("--keep", type=pos_int, default=3, help="step checkpoints kept (default 3)")
  train.add_argument(
    "--max-nonfinite",
    type=pos_int,
    default=10,
    help="stop after this many updates in a row with NaN/inf gradients (default 10)",
  )
  train.add_argument("--json", action="store_true", help="end stdout with a JSON summary line")
  _add_device_flags(train)
  lm_flags = train.add_argument_group("language modelling (--task lm)")
  lm_flags.add_argument("--data", help="folder of train/valid/test text files")
  lm_flags.add_argument("--level", choices=LEVELS, default="word", help="tokens: words or chars")
  lm_flags.add_argument(
    "--preset", choices=sorted(lm.PRESETS), default="small", help="Zaremba et al. settings"
  )
  lm_flags.add_argument("--epochs", type=pos_int, help="passes over the training text")
  lm_flags.add_argument(
    "--decay-after", type=pos_int, help="epochs at the full learning rate (preset's)"
  )
  lm_flags.add_argument(
    "--lr-decay", type=pos_float, help="learning-rate factor per epoch after that (preset's)"
  )
  lm_flags.add_argument("--dropout", type=_probability, help="dropout on non-recurrent links")
  lm_flags.add_argument("--init-scale", type=pos_float, help="uniform initialisation range")
  lm_flags.add_argument("--tie", action="store_true", help="tie softmax and embedding weights")
  lm_flags.add_argument(
    "--train-tokens", type=pos_int, help="use only the first N training tokens (quick runs)"
  )
  lm_flags.add_argument(
    "--eval-batch-size", type=pos_int, default=10, help="streams in evaluation (default 10)"
  )
  lm_flags.add_argument(
    "--eval-tokens", type=pos_int, help="evaluate on the first N tokens of valid and test only"
  )
  train.set_defaults(run=_train)

  evaluate = commands.add_parser(
    "eval",
    help="perplexity of a saved language model on a corpus",
    description="Evaluate a model file written by `train --task lm --out DIR` on --data DIR.",
  )
  evaluate.add_argument("--data", required=True, help="folder of train/valid/test text files")
  evaluate.add_argument(
    "--checkpoint", required=True, help="model.msgpack, or the --out folder holding it"
  )
  evaluate.add_argument(
    "--split", choices=("valid", "test"), default="test", help="which split (default test)"
  )
  evaluate.add_argument(
    "--eval-batch-size", type=pos_int, default=10, help="streams in evaluation (default 10)"
  )
  evaluate.add_argument(
    "--eval-tokens", type=pos_int, help="evaluate on the first N tokens of the split only"
  )
  evaluate.add_argument("--json", action="store_true", help="end stdout with a JSON summary line")
  evaluate.set_defaults(run=_eval)
  return parser


def _k2_list(text: str) -> int | list[int]:
  """`--k2 N`, or `--k2 N1,N2,...` for a compiled set of k2s (adaptive truncation)."""
  try:
    values = [int(part) for part in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(
      f"expected a positive int or a comma-separated list of them, got {text!r}"
    )
  return values[0] if len(values) == 1 and "," not in text else sorted(set(values))


def _truncation_flags(args: argparse.Namespace, k1: int) -> tuple[int | tuple[int, ...], Any]:
  """The trainer's `k2` (an int, or the compiled set for --delta) and its `artbp` from the flags."""
  k2 = k1 if args.k2 is None else args.k2
  if isinstance(k2, list):
    if args.delta is None and args.artbp is None:
      raise ValueError(
        f"--k2 {','.join(map(str, k2))} is a list: it needs --delta (adaptive k2) or --artbp "
        "(windows as long as the segments drawn)"
      )
    k2 = tuple(k2)
  elif args.delta is not None:
    raise ValueError(f"--delta needs --k2 to list the k2s to choose from, e.g. 10,20,50, got {k2}")
  if args.artbp is not None and args.delta is not None:
    raise ValueError("--artbp and --delta are two ways to choose truncation: give one")
  for flag, name, parent in (
    ("--adapt-every", "adapt_every", "delta"),
    ("--adapt-streams", "adapt_streams", "delta"),
    ("--artbp-alpha", "artbp_alpha", "artbp"),
  ):
    if getattr(args, name) is not None and getattr(args, parent) is None:
      raise ValueError(f"{flag} applies with --{parent}, which is not given")
  if args.delta is not None and jax.process_count() > 1:
    # Each process would measure its own streams and could choose another k2.
    raise ValueError(f"--delta runs on one process, got {jax.process_count()} processes")
  config = None if args.artbp is None else ARTBP(args.artbp, _pick(args.artbp_alpha, 4.0))
  return k2, config


class _AdaptiveK2:
  """Re-chooses k2 every --adapt-every calls (Aicher et al. 2019), on the call's own chunk, and
  logs each choice to `truncation.jsonl`. The calls it measures before depend only on the
  call's index, so a resumed run chooses as the uninterrupted one would."""

  def __init__(self, args, k1, model, loss_fn, trainer, out, updates, split_inputs) -> None:
    self.every = _pick(args.adapt_every, 10)
    self.trainer, self.split_inputs = trainer, split_inputs
    self.window = 2 * max(trainer.k2s)  # measured steps: the losses of the last half reach back
    if args.updates_per_call * k1 < self.window:
      raise ValueError(
        f"--delta measures on the first 2 * max(k2) = {self.window} steps of a call, but a call "
        f"has --updates-per-call x k1 = {args.updates_per_call * k1} steps: raise "
        "--updates-per-call"
      )
    self.choose = adaptive_k2(
      model, loss_fn, trainer.k2s, delta=args.delta, streams=_pick(args.adapt_streams, 4)
    )
    self.path = out and os.path.join(out, "truncation.jsonl")
    self.choices: list[dict] = []
    if self.path is not None:  # a resumed run keeps the choices its checkpoint holds
      if updates and os.path.isfile(self.path):
        with open(self.path) as f:
          self.choices = [r for r in map(json.loads, f) if r["update"] <= updates]
      _write_jsonl(self.path, self.choices)

  @classmethod
  def maybe(cls, args, *context) -> _AdaptiveK2 | None:
    """The controller of an adaptive run (--delta), else None; `context` as `__init__`'s."""
    return None if args.delta is None else cls(args, *context)

  def before_call(self, call: int, updates: int, state: TrainState, inputs, targets):
    """The state with a new k2 if call (0-based, counted as the loop counts) is due."""
    steps = jax.tree.leaves(inputs)[0].shape[1]
    if call % self.every or steps < self.window:
      return state
    cut = lambda a: a[:, : self.window]  # noqa: E731
    choice = self.choose(
      state.params, self.split_inputs(jax.tree.map(cut, inputs)), cut(targets), carry=state.carry
    )
    record = {
      "update": updates + 1,
      "k2": choice.k2,
      "suggested": choice.suggested,
      "beta": round(choice.beta, 6),
      "bias": round(choice.bias, 6),
    }
    self.choices.append(record)
    if self.path is not None:
      _append_jsonl(self.path, record)
    return self.trainer.set_k2(state, choice.k2)


def _probability(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
  return value


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `tbptt-jax` console script."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.error("a command is required: train or eval")
  try:
    return args.run(args)
  except ValueError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  except _RunStopped as e:
    print(f"{PROG}: error: {e.message}", file=sys.stderr)
    return e.status
  except KeyboardInterrupt:  # outside the training loop, which handles SIGINT itself
    print(f"\n{PROG}: interrupted outside the training loop; no checkpoint", file=sys.stderr)
    return 130


def _train(args: argparse.Namespace) -> int:
  mesh = _data_mesh(args)  # first: jax.distributed must start before JAX's backends
  if args.data is not None:
    args.data = os.path.abspath(args.data)  # a run resumes from any working folder
  resume = _resume_point(args)
  if args.task == "lm":
    return _train_lm(args, resume, mesh)
  for flag, name in (
    ("--data", "data"),
    ("--epochs", "epochs"),
    ("--dropout", "dropout"),
    ("--init-scale", "init_scale"),
    ("--train-tokens", "train_tokens"),
    ("--eval-tokens", "eval_tokens"),
    ("--decay-after", "decay_after"),
    ("--lr-decay", "lr_decay"),
  ):
    if getattr(args, name) is not None:
      raise ValueError(f"{flag} applies to --task lm, got --task {args.task}")
  for name, value in R2RT_DEFAULTS.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return _train_r2rt(args, resume, mesh)


def _train_r2rt(args: argparse.Namespace, resume: _Resume | None, mesh: Any) -> int:
  k2, artbp = _truncation_flags(args, args.k1)
  out = _prepare_out(args.out)
  model = synthetic.model(*(cell_by_name(args.cell, args.hidden) for _ in range(args.layers)))
  loss_fn = optax.softmax_cross_entropy_with_integer_labels
  trainer = tbptt_trainer(
    model,
    loss_fn,
    OPTIMIZERS[args.optimizer](args.lr),
    k1=args.k1,
    k2=k2,
    style=args.style,
    max_grad_norm=args.clip,
    unroll=args.unroll,
    artbp=artbp,
    mesh=mesh,
  )
  # Every update sees k1 new steps of each of the batch_size streams.
  xs, ys = synthetic.streams(args.seed, args.batch_size, args.steps * args.k1)
  xs, ys = _own_streams(mesh, xs), _own_streams(mesh, ys)
  position = {"calls": 0, "updates": 0, "seconds": 0.0} if resume is None else resume.meta
  saves = _Checkpoints(args)
  start = time.perf_counter()
  example = _global_batch(mesh, xs[:, : args.k1])
  state = saves.restore(resume, trainer, jax.random.key(args.seed), example)
  log = _update_log(args, "metrics.csv", position["updates"])
  adapt = _AdaptiveK2.maybe(
    args, args.k1, model, loss_fn, trainer, out, position["updates"], lambda x: x
  )
  chunks = iterate_chunks(xs, args.updates_per_call * args.k1, targets=ys)
  guard = _NonfiniteGuard(args.max_nonfinite)
  first_call_seconds = first_call_updates = None  # init, compilation, first call
  bar = _progress(args.steps, len(log), mininterval=0.5)
  with _session.Interrupts() as interrupts, bar:
    # A resumed run skips the calls its checkpoint holds.
    for calls, (inputs, targets) in enumerate(
      itertools.islice(chunks, position["calls"], None), position["calls"] + 1
    ):
      if adapt is not None:
        state = adapt.before_call(calls - 1, len(log), state, inputs, targets)
      state, metrics = trainer.update(state, inputs, targets)
      metrics = jax.device_get(metrics)  # waits for the call to finish
      if first_call_seconds is None:
        first_call_seconds = time.perf_counter() - start
        first_call_updates = len(metrics.loss)
      log.append(metrics)
      bar.set_postfix(loss=f"{metrics.loss[-1]:.4f}", refresh=False)
      bar.update(len(metrics.loss))
      here = {
        "calls": calls,
        "updates": len(log),
        "seconds": position["seconds"] + time.perf_counter() - start,
      }
      status = saves.after_call(state, here, metrics, interrupts, guard, bar.write)
      if status is not None:
        return status
  seconds = position["seconds"] + time.perf_counter() - start
  if first_call_seconds is not None:  # the final checkpoint (none if nothing was left to do)
    saves.save(state, {**here, "seconds": seconds})
  history = log.joined()
  losses = history.loss

  tokens = args.steps * args.k1 * args.batch_size
  # Throughput without compilation: this process's calls after its first, when there are any.
  this_run = time.perf_counter() - start
  steady_updates = len(log) - position["updates"] - (first_call_updates or 0)
  steady_tokens = steady_updates * args.k1 * args.batch_size
  after_first_call = (
    round(steady_tokens / (this_run - first_call_seconds), 1) if steady_tokens else None
  )
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
    **_truncation_summary(args, state, adapt, artbp),
    "optimizer": args.optimizer,
    "lr": args.lr,
    "clip": args.clip,
    "seed": args.seed,
    "steps": args.steps,
    "tokens": tokens,
    "seconds": round(seconds, 3),
    "first_call_seconds": None if first_call_seconds is None else round(first_call_seconds, 3),
    "tokens_per_s": round(tokens / seconds, 1),
    "tokens_per_s_after_first_call": after_first_call,
    "final_loss": round(final_loss, 5),
    **_gradient_summary(history),
    "reference_losses": {k: round(v, 4) for k, v in levels._asdict().items()},
    "backend": jax.default_backend(),
    **_device_summary(mesh),
  }
  print(
    f"{args.task}: {args.cell} x{args.layers} state {args.hidden}, batch {args.batch_size}, "
    f"{_truncation_text(args.k1, k2, args.style, artbp, args.delta)}, {args.steps} updates, "
    f"{tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)"
  )
  print(f"final loss {final_loss:.4f} nats (mean over the last 10% of updates)")
  print(
    f"reference: {levels.neither:.4f} learns no dependency | {levels.lag3:.4f} learns "
    f"X(t-3) only | {levels.both:.4f} learns X(t-3) and X(t-8)"
  )
  if out is not None:
    _write_outputs(out, summary, state.params)
    print(f"wrote {out}/summary.json, metrics.csv, params.msgpack, checkpoints/")
  if args.json:
    print(json.dumps(summary))
  return 0


def _train_lm(args: argparse.Namespace, resume: _Resume | None, mesh: Any) -> int:
  if args.data is None:
    raise ValueError("--task lm needs --data DIR, a folder of train/valid/test text files")
  if args.steps is not None:
    raise ValueError("--steps applies to --task r2rt; --task lm trains for --epochs")
  preset = lm.PRESETS[args.preset]
  preset = preset._replace(
    decay_after=_pick(args.decay_after, preset.decay_after),
    lr_decay=_pick(args.lr_decay, preset.lr_decay),
  )
  k1 = _pick(args.k1, preset.k)
  k2, artbp = _truncation_flags(args, k1)
  batch_size = _pick(args.batch_size, preset.batch_size)
  epochs = _pick(args.epochs, preset.epochs)
  optimizer_name = _pick(args.optimizer, "sgd")
  clip = _pick(args.clip, preset.max_grad_norm)
  out = _prepare_out(args.out)

  corpus = read_corpus(args.data, args.level)
  train_tokens = corpus.train if args.train_tokens is None else corpus.train[: args.train_tokens]
  valid_tokens, test_tokens = corpus.valid, corpus.test
  if args.eval_tokens is not None:
    valid_tokens, test_tokens = valid_tokens[: args.eval_tokens], test_tokens[: args.eval_tokens]
  if len(train_tokens) < 2 * batch_size:
    raise ValueError(
      f"--batch-size {batch_size} needs at least {2 * batch_size} training tokens, "
      f"got {len(train_tokens)}"
    )
  streams = batchify(train_tokens, batch_size)
  config = lm.LMConfig(
    vocab_size=len(corpus.vocab),
    hidden=_pick(args.hidden, preset.hidden),
    layers=_pick(args.layers, preset.layers),
    cell=_pick(args.cell, LM_CELL),
    dropout=_pick(args.dropout, preset.dropout),
    tie_embeddings=args.tie,
    init_scale=_pick(args.init_scale, preset.init_scale),
  )
  model = lm.language_model(config)
  # Each epoch: ceil((L - 1) / k1) updates, the last one shorter when k1 does not divide L - 1.
  updates_per_epoch = lm.updates_per_epoch(streams, k1)
  schedule = lm.lr_schedule(preset, updates_per_epoch, args.lr)
  trainer = tbptt_trainer(
    model,
    lm.cross_entropy,
    # Zaremba et al.'s units: lr and clip apply to the loss summed over a block's k1 steps,
    # whose gradient is k1 times the mean loss's: clipping it at `clip` is clipping the
    # mean loss's at clip / k1, then scaling by k1.
    lm.zaremba_sgd(k1, schedule, None, OPTIMIZERS[optimizer_name]),
    k1=k1,
    k2=k2,
    style=args.style,
    max_grad_norm=None if clip is None else clip / k1,
    unroll=args.unroll,
    step_rngs=True,
    artbp=artbp,
    mesh=mesh,
  )
  evaluate = _on_one_device(mesh, lm.evaluator(model, batch_size=args.eval_batch_size))
  _check_eval_split(valid_tokens, args.eval_batch_size, "valid")
  _check_eval_split(test_tokens, args.eval_batch_size, "test")

  print(
    f"lm: {args.data} ({args.level} level, vocabulary {len(corpus.vocab):,}, "
    f"{len(train_tokens):,} / {len(valid_tokens):,} / {len(test_tokens):,} tokens); "
    f"{config.cell} x{config.layers} state {config.hidden}, dropout {config.dropout}, "
    f"batch {batch_size}, {_truncation_text(k1, k2, args.style, artbp, args.delta)}, "
    f"{optimizer_name} "
    f"lr {schedule(0):g}, clip {clip}, {epochs} epochs of {updates_per_epoch} updates",
    flush=True,
  )
  position = (
    resume.meta
    if resume is not None
    else {
      "epoch": 1,  # the epoch to run (next, or in progress when chunk > 0)
      "chunk": 0,  # the calls of that epoch already made
      "epoch_start": 0,  # the first update of that epoch
      "epoch_seconds": 0.0,  # its training time so far
      "updates": 0,
      "seconds": 0.0,
      "history": [],  # one record per finished epoch, as in metrics.jsonl
      "best": None,  # {"valid_loss", "epoch"}; its parameters are checkpoints/best.ckpt
    }
  )
  streams = _own_streams(mesh, streams)
  saves = _Checkpoints(args)
  key, example = jax.random.key(args.seed), _global_batch(mesh, streams[:, :k1])
  start = time.perf_counter()
  state = saves.restore(resume, trainer, key, example)
  history = list(position["history"])
  best = None  # (valid loss, epoch, params)
  if position["best"] is not None:
    best_state = saves.restore_best(trainer, key, example)
    best = (position["best"]["valid_loss"], position["best"]["epoch"], best_state.params)
  log = _update_log(args, "updates.csv", position["updates"])
  # The gradient's decay is measured without dropout: its masks are noise, not dependencies.
  adapt = _AdaptiveK2.maybe(
    args, k1, model, lm.cross_entropy, trainer, out, position["updates"], lambda x: (x, None)
  )
  if out is not None:  # the epochs the checkpoint holds, without any logged after it
    _write_jsonl(os.path.join(out, "metrics.jsonl"), history)
  chunk_len = args.updates_per_call * k1
  guard = _NonfiniteGuard(args.max_nonfinite)
  first_call_seconds, first_call_train_seconds, first_call_updates = None, 0.0, 0
  updates_at_start, run_train_seconds = len(log), 0.0  # this process's share of the run
  bar = _progress(epochs * updates_per_epoch, len(log), mininterval=1)
  with _session.Interrupts() as interrupts, bar:
    for epoch in range(position["epoch"], epochs + 1):
      epoch_start = time.perf_counter()
      if epoch == position["epoch"] and position["chunk"] > 0:  # resumed mid-epoch
        skip, first_update = position["chunk"], position["epoch_start"]
        seconds_before = position["epoch_seconds"]
      else:
        state = trainer.reset(state)  # each epoch starts every stream from the initial state
        skip, first_update, seconds_before = 0, len(log), 0.0
      lr = float(schedule(state.step))
      chunks = itertools.islice(iterate_chunks(streams, chunk_len), skip, None)
      for chunk, (inputs, targets) in enumerate(chunks, skip + 1):
        if adapt is not None:
          state = adapt.before_call(chunk - 1, len(log), state, inputs, targets)
        state, metrics = trainer.update(state, inputs, targets)
        metrics = jax.device_get(metrics)  # waits for the call to finish
        if first_call_seconds is None:  # init, compilation and the first call
          first_call_seconds = time.perf_counter() - start
          first_call_train_seconds = time.perf_counter() - epoch_start
          first_call_updates = len(metrics.loss)
        log.append(metrics)
        epoch_updates = len(log) - first_update
        epoch_seconds = seconds_before + time.perf_counter() - epoch_start
        bar.set_description(f"epoch {epoch}/{epochs}", refresh=False)
        bar.set_postfix(
          loss=f"{metrics.loss[-1]:.3f}",
          ppl=f"{np.exp(metrics.loss[-1]):.1f}",
          tok_s=f"{epoch_updates * k1 * batch_size / epoch_seconds:,.0f}",
          refresh=False,
        )
        bar.update(len(metrics.loss))
        here = {
          **position,
          "epoch": epoch,
          "chunk": chunk,
          "epoch_start": first_update,
          "epoch_seconds": epoch_seconds,
          "updates": len(log),
          "seconds": position["seconds"] + time.perf_counter() - start,
          "history": history,
        }
        status = saves.after_call(state, here, metrics, interrupts, guard, bar.write)
        if status is not None:
          return status
      run_train_seconds += time.perf_counter() - epoch_start
      train_seconds = seconds_before + time.perf_counter() - epoch_start
      epoch_metrics = log.joined(first_update)
      valid = evaluate(state.params, valid_tokens)
      record = {
        "epoch": epoch,
        "lr": lr,
        # Updates are means over equal blocks but the last: weight by steps.
        "train_loss": lm.epoch_loss(epoch_metrics.loss, streams.shape[1] - 1, k1),
        "valid_loss": valid.loss,
        "valid_ppl": valid.perplexity,
        "train_seconds": round(train_seconds, 3),
        "seconds": round(seconds_before + time.perf_counter() - epoch_start, 3),
        "tokens_per_s": round((streams.shape[1] - 1) * batch_size / train_seconds, 1),
        **_gradient_summary(epoch_metrics),
      }
      record["train_ppl"] = math.exp(record["train_loss"])
      history.append(record)
      if best is None or valid.loss < best[0]:
        # A host copy: the next update donates the state's buffers.
        best = (valid.loss, epoch, jax.tree.map(np.array, state.params))
        saves.save(state, {"epoch": epoch, "valid_loss": valid.loss}, name="best")
      bar.write(
        f"epoch {epoch:3d}  lr {lr:.4g}  train ppl {record['train_ppl']:8.2f}  "
        f"valid ppl {valid.perplexity:8.2f}  {record['tokens_per_s']:,.0f} tokens/s",
        file=sys.stdout,
      )
      sys.stdout.flush()  # a log that is followed live, e.g. redirected to a file
      if out is not None:
        _append_jsonl(os.path.join(out, "metrics.jsonl"), record)
      position = {
        "epoch": epoch + 1,
        "chunk": 0,
        "epoch_start": len(log),
        "epoch_seconds": 0.0,
        "updates": len(log),
        "seconds": position["seconds"] + time.perf_counter() - start,
        "history": history,
        "best": {"valid_loss": best[0], "epoch": best[1]},
      }
      start = time.perf_counter()
      saves.save(state, position)  # every epoch's end
      if _stopping(interrupts):
        return saves.interrupted(state, position, interrupts)
  _, best_epoch, best_params = best
  test = evaluate(best_params, test_tokens)
  seconds = position["seconds"] + time.perf_counter() - start
  losses = log.joined().loss
  tokens = epochs * (streams.shape[1] - 1) * batch_size
  train_seconds = sum(r["train_seconds"] for r in history)
  # Throughput without compilation: this process's training calls after its first.
  after_first_call = None
  if run_train_seconds > first_call_train_seconds:
    steady_updates = len(log) - updates_at_start - first_call_updates
    after_first_call = round(
      steady_updates * k1 * batch_size / (run_train_seconds - first_call_train_seconds), 1
    )
  summary = {
    "task": "lm",
    "data": os.path.abspath(args.data),
    "level": args.level,
    "vocab_size": len(corpus.vocab),
    "preset": args.preset,
    "cell": config.cell,
    "hidden": config.hidden,
    "layers": config.layers,
    "dropout": config.dropout,
    "tie_embeddings": config.tie_embeddings,
    "init_scale": config.init_scale,
    "batch_size": batch_size,
    "k1": k1,
    "k2": k2,
    "style": args.style,
    **_truncation_summary(args, state, adapt, artbp),
    "optimizer": optimizer_name,
    "lr": round(float(schedule(0)), 8),
    "decay_after": preset.decay_after,
    "lr_decay": preset.lr_decay,
    "clip": clip,
    "seed": args.seed,
    "epochs": epochs,
    "steps": int(state.step),
    "tokens": tokens,
    "seconds": round(seconds, 3),
    "first_call_seconds": None if first_call_seconds is None else round(first_call_seconds, 3),
    "tokens_per_s": round(tokens / seconds, 1),
    "tokens_per_s_after_first_call": after_first_call,
    "train_tokens_per_s": round(tokens / train_seconds, 1),
    "final_loss": round(float(losses[-max(1, len(losses) // 10) :].mean()), 5),
    "best_epoch": best_epoch,
    "valid_ppl": round(math.exp(best[0]), 3),
    "test_ppl": round(test.perplexity, 3),
    "test_bits_per_token": round(test.bits_per_token, 4),
    "eval_batch_size": args.eval_batch_size,
    "eval_tokens": args.eval_tokens,
    # Zaremba et al.'s perplexities are for PTB words only.
    "reference": {"valid_ppl": preset.valid_ppl, "test_ppl": preset.test_ppl}
    if args.level == "word" and os.path.isfile(os.path.join(args.data, "ptb.train.txt"))
    else None,
    "backend": jax.default_backend(),
    **_device_summary(mesh),
  }
  print(
    f"best valid ppl {summary['valid_ppl']:.2f} (epoch {best_epoch}), test ppl "
    f"{test.perplexity:.2f} ({test.bits_per_token:.3f} bits per token), "
    f"{tokens:,} training tokens in {seconds:.0f} s"
  )
  if out is not None:
    vocab = corpus.vocab
    extra = {"vocabulary": {"tokens": list(vocab.tokens), "level": vocab.level, "unk": vocab.unk}}
    lm.save_model(os.path.join(out, "model.msgpack"), config, best_params, extra)
    _files.atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    print(
      f"wrote {out}/model.msgpack (best valid), metrics.jsonl, updates.csv, summary.json, "
      "checkpoints/"
    )
  if args.json:
    print(json.dumps(summary))
  return 0


class _Resume(NamedTuple):
  """The checkpoint a resumed run continues from."""

  path: str
  meta: dict  # the run's position: calls, updates, epoch, ..., and "args"


class _RunStopped(Exception):
  """A run that cannot go on (non-finite gradients): one line, a non-zero status."""

  def __init__(self, status: int, message: str) -> None:
    super().__init__(message)
    self.status, self.message = status, message


def _resume_point(args: argparse.Namespace) -> _Resume | None:
  """With --resume, the last checkpoint in --out, `args` completed from it; else None."""
  folder = None if args.out is None else os.path.join(args.out, "checkpoints")
  if not args.resume:
    if folder is not None and checkpoint.latest_checkpoint(folder) is not None:
      raise ValueError(
        f"--out {args.out!r} holds the checkpoints of another run: continue it with --resume, "
        "or choose another --out"
      )
    return None
  if folder is None:
    raise ValueError("--resume needs --out DIR, the folder of the run to continue")
  path = checkpoint.latest_checkpoint(folder)
  if path is None:
    raise ValueError(f"--resume: no checkpoint in {folder!r}")
  meta = checkpoint.read_meta(path)
  if not isinstance(meta.get("args"), dict):
    raise ValueError(f"--resume: {path!r} holds no run settings")
  defaults = _parser().parse_args(["train"])
  _session.resume_arguments(args, defaults, meta["args"], path)
  return _Resume(path, meta)


class _Checkpoints:
  """Where and when a command-line run saves: every --save-every updates, at the end of
  each epoch and of the run, on SIGINT / SIGTERM, and when it stops on NaN gradients."""

  def __init__(self, args: argparse.Namespace) -> None:
    # Every process saves (a collective gather); only process 0 writes (`save_checkpoint`).
    self.folder = None if args.out is None else os.path.join(args.out, "checkpoints")
    self.out = args.out
    self.run_args = _session.run_arguments(args)
    self.every, self.keep = args.save_every, args.keep

  def restore(
    self, resume: _Resume | None, trainer: Trainer, key: jax.Array, example: Any
  ) -> TrainState:
    """A fresh state, or the resumed run's, checked against this run's configuration."""
    if resume is None:
      return trainer.init(key, example)
    state = checkpoint.load_checkpoint(resume.path, self._like(trainer, key, example)).state
    print(f"resuming from {resume.path}", file=sys.stderr)
    return state

  def restore_best(self, trainer: Trainer, key: jax.Array, example: Any) -> TrainState:
    path = os.path.join(self.folder, "best" + checkpoint.SUFFIX)
    return checkpoint.load_checkpoint(path, self._like(trainer, key, example)).state

  def save(self, state: TrainState, position: dict, name: str | None = None) -> str | None:
    if self.folder is None:
      return None
    meta = {"args": self.run_args, **position}
    return checkpoint.save_checkpoint(self.folder, state, meta, keep=self.keep, name=name)

  def after_call(
    self,
    state: TrainState,
    position: dict,
    metrics: UpdateMetrics,
    interrupts: _session.Interrupts,
    guard: _NonfiniteGuard,
    write: Any,
  ) -> int | None:
    """Saves when due; the exit status if the run must stop here, else None."""
    problem = guard.observe(metrics, position["updates"], write)
    if problem is not None:
      path = self.save(state, position)
      saved = f"; saved {path}" if path else ""
      raise _RunStopped(1, problem + saved)
    done, saved = position["updates"], None
    if done // self.every > (done - len(metrics.loss)) // self.every:
      saved = self.save(state, position)
    if _stopping(interrupts):  # perhaps received during that save
      return self.interrupted(state, position, interrupts, saved)
    return None

  def interrupted(
    self,
    state: TrainState,
    position: dict,
    interrupts: _session.Interrupts,
    saved: str | None = None,
  ) -> int:
    path = saved or self.save(state, position)
    where = f"stopped after update {position['updates']}"
    if path is None:
      print(f"{PROG}: {interrupts.name}: {where}; nothing saved (no --out)", file=sys.stderr)
    else:
      print(
        f"{PROG}: {interrupts.name}: {where}; saved {path}; continue with "
        f"`{PROG} train --out {self.out} --resume`",
        file=sys.stderr,
      )
    return interrupts.status

  @staticmethod
  def _like(trainer: Trainer, key: jax.Array, example: Any) -> Any:
    return jax.eval_shape(trainer.init, key, example)


class _NonfiniteGuard:
  """Reports the first NaN/inf loss and gradient, and stops a run after too many in a row.

  The trainer already skips every update whose gradient is not finite
  (`skip_nonfinite`), so the parameters stay those of the last good update.
  """

  def __init__(self, limit: int) -> None:
    self.limit, self.streak = limit, 0
    self.seen_loss = self.seen_gradient = False

  def observe(self, metrics: UpdateMetrics, last_update: int, write: Any) -> str | None:
    first = last_update - len(metrics.loss) + 1
    bad_loss = np.flatnonzero(~np.isfinite(metrics.loss))
    if bad_loss.size and not self.seen_loss:
      self.seen_loss = True
      write(f"update {first + bad_loss[0]}: the loss is {metrics.loss[bad_loss[0]]}", sys.stderr)
    for i, bad in enumerate(metrics.nonfinite):
      self.streak = self.streak + 1 if bad else 0
      if bad and not self.seen_gradient:
        self.seen_gradient = True
        write(
          f"update {first + i}: the gradient holds NaN or inf; update skipped, parameters kept",
          sys.stderr,
        )
      if self.streak >= self.limit:
        return (
          f"{self.streak} updates in a row (to update {first + i}) had NaN or inf gradients "
          f"(--max-nonfinite {self.limit}); the parameters are those before them"
        )
    return None


def _add_device_flags(train: argparse.ArgumentParser) -> None:
  flags = train.add_argument_group(
    "several devices and hosts",
    "the streams (--batch-size) are split over the devices of every process; only process 0 "
    "writes --out",
  )
  flags.add_argument(
    "--devices",
    type=_device_count,
    default=1,
    metavar="N|all",
    help="devices of each process to split the streams over (default 1)",
  )
  flags.add_argument(
    "--coordinator",
    metavar="HOST:PORT",
    help="process 0's address for jax.distributed (with --num-processes and --process-id)",
  )
  flags.add_argument("--num-processes", type=_positive(int), help="processes in the run")
  flags.add_argument("--process-id", type=_process_id, help="this process's number, 0..N-1")
  flags.add_argument(
    "--distributed",
    action="store_true",
    help="jax.distributed.initialize() from the cluster's environment (SLURM, Open MPI, TPU)",
  )


def _device_count(text: str) -> int | str:
  if text == "all":
    return text
  return _positive(int)(text)


def _process_id(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
  return int(text)


def _data_mesh(args: argparse.Namespace) -> Any:
  """Joins the run's other processes if asked, then the mesh of --devices; None for one device."""
  trio = {
    "--coordinator": args.coordinator,
    "--num-processes": args.num_processes,
    "--process-id": args.process_id,
  }
  given = [flag for flag, value in trio.items() if value is not None]
  if args.distributed and given:
    raise ValueError(f"--distributed reads the processes from the environment; drop {given[0]}")
  if given and len(given) < 3:
    raise ValueError(
      "--coordinator, --num-processes and --process-id go together, got only " + " and ".join(given)
    )
  if given:
    if args.process_id >= args.num_processes:
      raise ValueError(
        f"--process-id must be below --num-processes {args.num_processes}, got {args.process_id}"
      )
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
  if given or args.distributed:
    if jax.config.jax_cpu_collectives_implementation is None:  # older JAX: none on CPU
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except (RuntimeError, ValueError) as e:
      raise ValueError(f"jax.distributed.initialize failed: {str(e).splitlines()[0]}") from None
  local = jax.local_devices()
  per_process = len(local) if args.devices == "all" else args.devices
  if per_process > len(local):
    hint = ""
    if jax.default_backend() == "cpu":
      hint = " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices)"
    raise ValueError(
      f"--devices {args.devices}: this process has {len(local)} {jax.default_backend()} "
      f"device(s){hint}"
    )
  if jax.process_count() == 1 and per_process == 1:
    return None  # one device: the trainer without a mesh
  devices = []
  for process in range(jax.process_count()):
    own = [d for d in jax.devices() if d.process_index == process]
    if len(own) < per_process:
      raise ValueError(
        f"--devices {args.devices}: process {process} has {len(own)} device(s), fewer than "
        f"{per_process}"
      )
    devices += own[:per_process]
  return sharding.data_mesh(devices)


def _own_streams(mesh: Any, streams: np.ndarray) -> np.ndarray:
  """This process's block of streams (all of them without a mesh)."""
  if mesh is None:
    return streams
  batch, count = streams.shape[0], mesh.shape[sharding.DATA]
  if batch % count:
    raise ValueError(
      f"--batch-size {batch} must be a multiple of the {count} devices the streams are split "
      f"over (--devices x processes)"
    )
  return streams[sharding.process_streams(mesh, batch)]


def _global_batch(mesh: Any, chunk: np.ndarray) -> Any:
  """This process's streams as the global batch, whose shape the run's state is built for."""
  return chunk if mesh is None else sharding.shard_batch(chunk, mesh)


def _on_one_device(mesh: Any, evaluate: Any) -> Any:
  """`evaluate` on this process's first device: a forward pass, the same on every process."""
  if mesh is None:
    return evaluate
  device = jax.local_devices()[0]
  return lambda params, tokens: evaluate(jax.device_put(sharding.to_host(params), device), tokens)


def _update_log(args: argparse.Namespace, name: str, updates: int) -> _session.UpdateLog:
  """The per-update log in --out; other processes than 0 read it (on resume) but never write."""
  path = None if args.out is None else os.path.join(args.out, name)
  return _session.UpdateLog(path, updates, write=jax.process_index() == 0)


def _stopping(interrupts: _session.Interrupts) -> bool:
  """Whether a signal stops the run at this call boundary; on several processes, all stop
  together when any got one (saving is a collective), deciding on the gathered flags only."""
  if jax.process_count() > 1:
    signals = multihost_utils.process_allgather(np.int32(interrupts.signal or 0))
    if not signals.max():
      return False
    interrupts.signal = interrupts.signal or int(signals.max())
  return interrupts.signal is not None


def _device_summary(mesh: Any) -> dict:
  return {"devices": 1 if mesh is None else mesh.size, "processes": jax.process_count()}


def _progress(total: int, done: int, mininterval: float) -> tqdm:
  """The training progress bar, in updates, on stderr; process 0's only."""
  return tqdm(
    total=total,
    initial=done,
    unit="update",
    file=sys.stderr,
    mininterval=mininterval,
    disable=jax.process_index() > 0,
  )


def _pick(value: Any, default: Any) -> Any:
  """A flag's value, or the preset's where the flag was not given."""
  return default if value is None else value


def _check_eval_split(tokens: np.ndarray, batch_size: int, split: str) -> None:
  if len(tokens) < 2 * batch_size:
    raise ValueError(
      f"--eval-batch-size {batch_size} needs at least {2 * batch_size} {split} tokens, "
      f"got {len(tokens)}"
    )


def _eval(args: argparse.Namespace) -> int:
  path = args.checkpoint
  if os.path.isdir(path):
    path = os.path.join(path, "model.msgpack")
  config, params, extra = lm.load_model(path)
  saved = extra.get("vocabulary") if isinstance(extra, dict) else None
  if not saved:
    raise ValueError(f"--checkpoint {path!r} holds no vocabulary")
  try:
    vocab = Vocabulary(tuple(saved["tokens"]), saved["level"], saved["unk"])
  except (KeyError, TypeError) as e:
    raise ValueError(f"--checkpoint {path!r} holds a malformed vocabulary: {e!r}") from None
  if len(vocab) != config.vocab_size:
    raise ValueError(
      f"--checkpoint {path!r}: vocabulary of {len(vocab)} tokens does not match the model's "
      f"{config.vocab_size}"
    )
  corpus = read_corpus(args.data, vocab.level, vocab=vocab)
  tokens = getattr(corpus, args.split)[: args.eval_tokens]
  _check_eval_split(tokens, args.eval_batch_size, args.split)
  start = time.perf_counter()
  result = lm.evaluator(lm.language_model(config), batch_size=args.eval_batch_size)(params, tokens)
  seconds = time.perf_counter() - start
  summary = {
    "checkpoint": os.path.abspath(path),
    "data": os.path.abspath(args.data),
    "split": args.split,
    "tokens": result.tokens,
    "loss": result.loss,
    "ppl": result.perplexity,
    "bits_per_token": result.bits_per_token,
    "eval_batch_size": args.eval_batch_size,
    "seconds": round(seconds, 3),
  }
  print(
    f"{args.split}: perplexity {result.perplexity:.2f} ({result.bits_per_token:.4f} bits per "
    f"token) over {result.tokens:,} tokens, {args.eval_batch_size} streams, {seconds:.1f} s"
  )
  if args.json:
    print(json.dumps(summary))
  return 0


def _write_jsonl(path: str, records: list[dict]) -> None:
  """Replaces `path` with `records`, one JSON line each (a resumed run's log, cut back)."""
  _files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _prepare_out(out: str | None) -> str | None:
  """The folder to write to, or None; None on processes other than 0, which write nothing."""
  if out is None or jax.process_index() > 0:
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


def _gradient_summary(metrics: UpdateMetrics) -> dict:
  """What the updates' gradients did: their median norm, how often clipping and NaN/inf hit."""
  return {
    "grad_norm_median": float(np.median(metrics.grad_norm)),
    "clipped_fraction": round(float(np.mean(metrics.clipped)), 6),
    "nonfinite_updates": int(np.sum(metrics.nonfinite)),
    "k2_mean": round(float(np.mean(metrics.k2)), 3) if len(metrics.k2) else None,
  }


def _truncation_summary(
  args: argparse.Namespace, state: TrainState, adapt: Any, artbp: ARTBP | None
) -> dict:
  """The summary's keys for adaptive truncation and ARTBP."""
  return {
    "delta": args.delta,
    "k2_final": int(state.k2) if artbp is None else None,  # ARTBP picks each window
    "k2_choices": None if adapt is None else len(adapt.choices),
    "artbp": None if artbp is None else artbp._asdict(),
  }


def _truncation_text(k1: int, k2: Any, style: str, artbp: Any, delta: Any) -> str:
  if delta is not None:
    return f"adaptive TBPTT(k1={k1}, k2 in {list(k2)}, delta={delta:g}, {style})"
  if artbp is not None:
    return f"ARTBP(k1={k1}, k2={k2}, L0={artbp.mean_length:g}, alpha={artbp.alpha:g}, {style})"
  return f"TBPTT(k1={k1}, k2={k2}, {style})"


def _write_outputs(out: str, summary: dict, params: Any) -> None:
  _files.atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
  _files.atomic_write(
    os.path.join(out, "params.msgpack"), flax.serialization.to_bytes(jax.device_get(params))
  )


if __name__ == "__main__":
  sys.exit(main())
