"""`tbptt-jax train --task r2rt` (the default): r2rt.com's synthetic task and its levels.

Each of --batch-size streams is its own series of the task
(`synthetic.independent_streams`), so a longer run sees a shorter run's data
first and `--resume --steps N` extends a finished run exactly as a run of N
updates would have gone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import flax.serialization
import jax
import numpy as np
import optax

from tbptt_jax import _files, linear_rnn, rtrl, synthetic
from tbptt_jax.artbp import ARTBP
from tbptt_jax.cells import Cell, cell_by_name
from tbptt_jax.cli import devices, flags, loop, report, session
from tbptt_jax.streams import iterate_chunks
from tbptt_jax.tensorboard import TensorBoardWriter
from tbptt_jax.train import TrainState, UpdateMetrics, tbptt_trainer

# Flags of the language-model task, which this one refuses.
_LM_ONLY = (
  ("--data", "data"),
  ("--epochs", "epochs"),
  ("--dropout", "dropout"),
  ("--init-scale", "init_scale"),
  ("--train-tokens", "train_tokens"),
  ("--eval-tokens", "eval_tokens"),
  ("--decay-after", "decay_after"),
  ("--lr-decay", "lr_decay"),
)
# What TensorBoard shows of the run's summary, as run/<name> at its last update.
_BOARD_SUMMARY = ("final_loss", "tokens_per_s", "tokens_per_s_after_first_call")


def train(
  args: argparse.Namespace,
  resume: session.Resume | None,
  mesh: Any,
  board: TensorBoardWriter | None,
) -> int:
  """Trains the task's network as the flags say, logging to `board` too; the exit status."""
  _take_defaults(args)
  k2, artbp = flags.truncation(args, args.k1)
  out = session.prepare_out(args.out)
  model, gradient = _model(args)
  loss_fn = optax.softmax_cross_entropy_with_integer_labels
  with flags.naming_truncation(args, args.k1):
    trainer = tbptt_trainer(
      model,
      loss_fn,
      flags.OPTIMIZERS[args.optimizer](args.lr),
      k1=args.k1,
      k2=k2,
      style=args.style,
      max_grad_norm=args.clip,
      unroll=args.unroll,
      artbp=artbp,
      mesh=mesh,
      gradient=gradient,
    )
  # Every update sees k1 new steps of each of the batch_size streams.
  xs, ys = synthetic.independent_streams(args.seed, args.batch_size, args.steps * args.k1)
  xs, ys = devices.own_streams(mesh, xs), devices.own_streams(mesh, ys)
  position: dict[str, Any] = {"calls": 0, "updates": 0, "seconds": 0.0}
  if resume is not None:
    position = resume.meta
  saves = session.Checkpoints(args)
  clock = loop.Clock(position["seconds"])
  example = devices.global_batch(mesh, xs[:, : args.k1])
  state = saves.restore(resume, trainer, jax.random.key(args.seed), example)
  log = session.UpdateLog.in_folder(args.out, position["updates"])
  adapt = loop.AdaptiveK2.maybe(
    args, args.k1, model, loss_fn, trainer, out, position["updates"], lambda x: x
  )
  guard = loop.NonfiniteGuard(args.max_nonfinite)
  with loop.Interrupts() as interrupts, loop.progress(args.steps, len(log), 0.5) as bar:
    run = loop.Run(trainer, log, saves, clock, adapt, guard, interrupts, board)
    here, calls = functools.partial(_position, args, run), _calls(args, xs, ys, len(log))
    state, status = loop.train_calls(run, state, calls, bar, here, _postfix)
  if status is not None:
    return status
  if clock.first_call_seconds is not None:  # the final checkpoint (none if nothing was left)
    saves.save(state, _position(args, run))
  summary = _summary(args, run, state, k2, artbp, mesh)
  if board is not None:
    board.scalars(len(log), {f"run/{k}": summary[k] for k in _BOARD_SUMMARY})
  _print(args, summary, report.final_loss(log.joined().loss), k2, artbp)
  if out is not None:
    report.write_summary(out, summary)
    params = flax.serialization.to_bytes(jax.device_get(state.params))
    _files.atomic_write(os.path.join(out, "params.msgpack"), params)
    print(f"wrote {out}/summary.json, {session.UPDATE_LOG}, params.msgpack, checkpoints/")
  if args.json:
    print(json.dumps(summary))
  return report.exit_status(summary)


def _model(args: argparse.Namespace) -> tuple[Cell, str]:
  """The task's network from the flags, and the trainer's `gradient`: with --gradient rtrl, an
  LRU carries its own diagonal sensitivities (`online_lru`), any other cell is wrapped whole."""
  online = args.gradient == "rtrl" and args.cell == "lru"
  if online:
    cells = [linear_rnn.lru_block(args.hidden, online=True) for _ in range(args.layers)]
  else:
    cells = [cell_by_name(args.cell, args.hidden) for _ in range(args.layers)]
  model = synthetic.model(*cells)
  if args.gradient == "rtrl" and not online:
    needed = rtrl.sensitivity_bytes(model, jax.ShapeDtypeStruct((args.batch_size,), np.int32))
    if needed > rtrl.MAX_SENSITIVITY_BYTES:
      raise ValueError(
        f"--gradient rtrl: the sensitivity of --cell {args.cell} --hidden {args.hidden} "
        f"--layers {args.layers} --batch-size {args.batch_size} would take {needed:,} bytes, "
        f"above the bound of {rtrl.MAX_SENSITIVITY_BYTES:,}: lower --hidden or --batch-size, "
        "or use --cell lru (its diagonal sensitivities)"
      )
  return model, "online" if online else args.gradient


def _take_defaults(args: argparse.Namespace) -> None:
  """Refuses the language-model flags; the task's defaults for the flags not given."""
  for flag, name in _LM_ONLY:
    if getattr(args, name) is not None:
      raise ValueError(f"{flag} applies to --task lm, got --task {args.task}")
  for name, value in flags.R2RT_DEFAULTS.items():
    if getattr(args, name) is None:
      setattr(args, name, value)


def _calls(
  args: argparse.Namespace, xs: np.ndarray, ys: np.ndarray, updates: int
) -> Iterator[loop.Call]:
  """The calls after the first `updates` updates: --updates-per-call each, counted from the
  run's start, so that an extended run's calls are those of a run asked for its length."""
  per_call, k1 = args.updates_per_call, args.k1
  begun = -(-updates // per_call)  # calls begun, perhaps by a shorter run that ended inside one
  start = updates * k1
  if updates % per_call:
    # The rest of a call a shorter run began (and adapted k2 before): the same updates.
    stop = begun * per_call * k1
    yield loop.Call(begun, xs[:, start:stop], ys[:, start:stop], adapt=False)
    start = stop
  if start >= xs.shape[1]:
    return
  chunks = iterate_chunks(xs[:, start:], per_call * k1, targets=ys[:, start:])
  for number, (inputs, targets) in enumerate(chunks, begun + 1):
    yield loop.Call(number, inputs, targets)


def _position(args: argparse.Namespace, run: loop.Run, call: loop.Call | None = None) -> dict:
  """Where the run is, as its checkpoints save it."""
  del call
  updates = len(run.log)
  return {
    "calls": -(-updates // args.updates_per_call),
    "updates": updates,
    "seconds": run.clock.seconds(),
  }


def _postfix(metrics: UpdateMetrics) -> dict:
  return {"loss": f"{metrics.loss[-1]:.4f}"}


def _summary(
  args: argparse.Namespace,
  run: loop.Run,
  state: TrainState,
  k2: Any,
  artbp: ARTBP | None,
  mesh: Any,
) -> dict:
  history = run.log.joined()
  tokens = args.steps * args.k1 * args.batch_size
  # Throughput without compilation: this process's calls after its first, when there are any.
  after = run.clock.after_first_call(args.k1 * args.batch_size)
  levels = synthetic.reference_losses()
  choices = None if run.adapt is None else len(run.adapt.choices)
  return {
    "task": args.task,
    "cell": args.cell,
    "hidden": args.hidden,
    "layers": args.layers,
    "batch_size": args.batch_size,
    "k1": args.k1,
    "k2": k2,
    "style": args.style,
    "gradient": args.gradient,
    **report.truncation(args, state, choices, artbp),
    "optimizer": args.optimizer,
    "lr": args.lr,
    "clip": args.clip,
    "seed": args.seed,
    "steps": args.steps,
    "tokens": tokens,
    **report.timing(run.clock.seconds(), tokens, run.clock.first_call_seconds, after),
    "final_loss": round(report.final_loss(history.loss), 5),
    **report.divergence(report.final_loss(history.loss), synthetic.CLASSES),
    **report.gradients(history),
    "reference_losses": {k: round(v, 4) for k, v in levels._asdict().items()},
    "backend": jax.default_backend(),
    **devices.summary(mesh),
  }


def _print(
  args: argparse.Namespace, summary: dict, final_loss: float, k2: Any, artbp: ARTBP | None
) -> None:
  tokens, seconds = summary["tokens"], summary["seconds"]
  levels = synthetic.reference_losses()
  print(
    f"{args.task}: {args.cell} x{args.layers} state {args.hidden}, batch {args.batch_size}, "
    f"{report.truncation_text(args.k1, k2, args.style, artbp, args.delta)}, {args.steps} "
    f"updates, {tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)"
  )
  print(f"final loss {final_loss:.4f} nats (mean over the last 10% of updates)")
  print(
    f"reference: {levels.neither:.4f} learns no dependency | {levels.lag3:.4f} learns "
    f"X(t-3) only | {levels.both:.4f} learns X(t-3) and X(t-8)"
  )
