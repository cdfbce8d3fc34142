"""`tbptt-jax train --task lm`: a language model on a folder of text, Zaremba et al.'s way.

Each epoch restarts every stream from the zero state and carries it across
chunks; after each epoch the validation perplexity is computed forward only;
the test perplexity at the end uses the best-validation parameters, which go
to `model.msgpack` with the config and the vocabulary (`tbptt-jax eval`,
`tbptt-jax generate`). The learning rate follows the preset's per-epoch
schedule (`lm.lr_schedule`), which depends on the epoch only, not on --epochs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from tbptt_jax import lm
from tbptt_jax.cells import Cell
from tbptt_jax.cli import devices, flags, loop, report, session
from tbptt_jax.data import read_corpus
from tbptt_jax.streams import batchify, iterate_chunks
from tbptt_jax.tensorboard import TensorBoardWriter
from tbptt_jax.train import Trainer, TrainState, UpdateMetrics, tbptt_trainer

EPOCH_LOG = "metrics.jsonl"  # one record per finished epoch
# What TensorBoard shows of each epoch's record (epoch/<name>) and of the run's summary
# (run/<name>), at the update they end at.
_BOARD_EPOCH = (
  "train_ppl",
  "valid_ppl",
  "lr",
  "tokens_per_s",
  "grad_norm_median",
  "clipped_fraction",
)
_BOARD_SUMMARY = ("valid_ppl", "test_ppl", "test_bits_per_token", "tokens_per_s")
# A new run's position: the checkpoints of a run save it as it goes.
_START: dict[str, Any] = {
  "epoch": 1,  # the epoch to run (next, or in progress when chunk > 0)
  "chunk": 0,  # the calls of that epoch already made
  "epoch_start": 0,  # the first update of that epoch
  "epoch_seconds": 0.0,  # its training time so far
  "updates": 0,
  "seconds": 0.0,
  "history": [],  # one record per finished epoch, as in metrics.jsonl
  "best": None,  # {"valid_loss", "epoch"}; its parameters are checkpoints/best.ckpt
}


class _Task(NamedTuple):
  """A language-model run's data, model and trainer: fixed for the whole run."""

  args: argparse.Namespace
  preset: lm.Preset
  vocab: Any  # the corpus's `Vocabulary`
  config: lm.LMConfig
  model: Cell
  trainer: Trainer
  schedule: optax.Schedule
  streams: np.ndarray  # this process's training streams [batch, L]
  valid: np.ndarray  # validation tokens
  test: np.ndarray  # test tokens
  train_tokens: int  # training tokens read
  updates_per_epoch: int
  evaluate: Callable[[Any, Any], lm.Evaluation]
  coverage: dict  # the summary's `unknown_fraction` of valid and test (report.vocabulary_coverage)
  k2: Any  # the trainer's k2: an int, or the set of an adaptive run
  artbp: Any  # the `ARTBP` schedule, or None
  mesh: Any  # the devices' mesh, or None for one device
  out: str | None  # the folder this process writes, or None


class _Best(NamedTuple):
  """The best validation epoch so far, and its parameters (on the host)."""

  valid_loss: float
  epoch: int
  params: Any


class _Epoch(NamedTuple):
  """The epoch in progress."""

  number: int
  first_update: int  # the run's update count when the epoch began
  seconds_before: float  # its training time before this session (resumed mid-epoch)
  start: float  # `time.perf_counter()` when this session began it

  def seconds(self) -> float:
    return self.seconds_before + time.perf_counter() - self.start


def train(
  args: argparse.Namespace,
  resume: session.Resume | None,
  mesh: Any,
  board: TensorBoardWriter | None,
) -> int:
  """Trains the language model the flags and the preset say, logging to `board` too; the exit
  status."""
  preset = _take_defaults(args)
  k2, artbp = flags.truncation(args, args.k1)
  task = _setup(args, preset, k2, artbp, mesh)
  _print_start(task)
  position = dict(_START if resume is None else resume.meta)
  saves = session.Checkpoints(args)
  clock = loop.Clock(position["seconds"])
  key, example = jax.random.key(args.seed), devices.global_batch(mesh, task.streams[:, : args.k1])
  state = saves.restore(resume, task.trainer, key, example)
  best = None
  if position["best"] is not None:
    params = saves.restore_best(task.trainer, key, example).params
    best = _Best(position["best"]["valid_loss"], position["best"]["epoch"], params)
  log = session.UpdateLog.in_folder(args.out, position["updates"])
  # The gradient's decay is measured without dropout: its masks are noise, not dependencies.
  context = (task.model, lm.cross_entropy, task.trainer, task.out, position["updates"])
  adapt = loop.AdaptiveK2.maybe(args, args.k1, *context, lambda x: (x, None))
  if task.out is not None:  # the epochs the checkpoint holds, without any logged after it
    session.write_jsonl(os.path.join(task.out, EPOCH_LOG), position["history"])
  with loop.Interrupts() as interrupts:
    guard = loop.NonfiniteGuard(args.max_nonfinite)
    run = loop.Run(task.trainer, log, saves, clock, adapt, guard, interrupts, board)
    for epoch in range(position["epoch"], args.epochs + 1):
      state, position, best, status = _train_epoch(task, run, state, position, best, epoch)
      if status is not None:
        return status
    assert best is not None  # every finished epoch has a validation loss
    return _finish(task, run, state, position, best)


def _take_defaults(args: argparse.Namespace) -> lm.Preset:
  """Checks the task's flags; the preset's values for those not given, in `args` (so that the
  checkpoints save them); the preset with the schedule's flags."""
  if args.data is None:
    raise ValueError("--task lm needs --data DIR, a folder of train/valid/test text files")
  if args.steps is not None:
    raise ValueError("--steps applies to --task r2rt; --task lm trains for --epochs")
  if args.gradient != "bptt":  # a language model's sensitivity would not fit in memory
    raise ValueError(f"--gradient {args.gradient} applies to --task r2rt")
  preset = lm.preset(args.preset)
  defaults = {
    "k1": preset.k,
    "batch_size": preset.batch_size,
    "epochs": preset.epochs,
    "optimizer": flags.LM_OPTIMIZER,
    "lr": preset.lr,
    "clip": preset.max_grad_norm,
    "decay_after": preset.decay_after,
    "lr_decay": preset.lr_decay,
    "cell": flags.LM_CELL,
    "hidden": preset.hidden,
    "layers": preset.layers,
    "dropout": preset.dropout,
    "init_scale": preset.init_scale,
  }
  for name, value in defaults.items():
    setattr(args, name, flags.pick(getattr(args, name), value))
  return preset._replace(decay_after=args.decay_after, lr_decay=args.lr_decay)


def _setup(args: argparse.Namespace, preset: lm.Preset, k2: Any, artbp: Any, mesh: Any) -> _Task:
  """Reads the corpus and builds the model, its trainer and its evaluation."""
  out = session.prepare_out(args.out)
  try:
    corpus = read_corpus(args.data, args.level)
  except ValueError as e:
    raise ValueError(f"--data: {e}") from None
  train_tokens = corpus.train[: args.train_tokens]
  valid, test = corpus.valid[: args.eval_tokens], corpus.test[: args.eval_tokens]
  if len(train_tokens) < 2 * args.batch_size:
    raise ValueError(
      f"--batch-size {args.batch_size} needs at least {2 * args.batch_size} training tokens, "
      f"got {len(train_tokens)}"
    )
  check_eval_split(valid, args.eval_batch_size, "valid")
  check_eval_split(test, args.eval_batch_size, "test")
  streams = batchify(train_tokens, args.batch_size)
  config = lm.LMConfig(
    vocab_size=len(corpus.vocab),
    hidden=args.hidden,
    layers=args.layers,
    cell=args.cell,
    dropout=args.dropout,
    tie_embeddings=args.tie,
    init_scale=args.init_scale,
  )
  model = lm.language_model(config)
  # Each epoch: ceil((L - 1) / k1) updates, the last one shorter when k1 does not divide L - 1.
  updates_per_epoch = lm.updates_per_epoch(streams, args.k1)
  schedule = lm.lr_schedule(preset, updates_per_epoch, args.lr)
  return _Task(
    args=args,
    preset=preset,
    vocab=corpus.vocab,
    config=config,
    model=model,
    trainer=_trainer(args, model, schedule, k2, artbp, mesh),
    schedule=schedule,
    streams=devices.own_streams(mesh, streams),
    valid=valid,
    test=test,
    train_tokens=len(train_tokens),
    updates_per_epoch=updates_per_epoch,
    evaluate=devices.on_one_device(mesh, lm.evaluator(model, batch_size=args.eval_batch_size)),
    coverage=report.vocabulary_coverage(
      {"valid": corpus.unknown[1], "test": corpus.unknown[2]}, corpus.vocab.unk
    ),
    k2=k2,
    artbp=artbp,
    mesh=mesh,
    out=out,
  )


def _trainer(
  args: argparse.Namespace, model: Cell, schedule: optax.Schedule, k2: Any, artbp: Any, mesh: Any
) -> Trainer:
  with flags.naming_truncation(args, args.k1):
    return tbptt_trainer(
      model,
      lm.cross_entropy,
      # Zaremba et al.'s units: lr and clip apply to the loss summed over a block's k1 steps,
      # whose gradient is k1 times the mean loss's: clipping it at `clip` is clipping the
      # mean loss's at clip / k1, then scaling by k1.
      lm.zaremba_sgd(args.k1, schedule, None, flags.OPTIMIZERS[args.optimizer]),
      k1=args.k1,
      k2=k2,
      style=args.style,
      max_grad_norm=None if args.clip is None else args.clip / args.k1,
      unroll=args.unroll,
      step_rngs=args.dropout > 0,  # a model without dropout draws nothing
      artbp=artbp,
      mesh=mesh,
    )


def check_eval_split(tokens: np.ndarray, batch_size: int, split: str) -> None:
  """Every evaluation stream needs two tokens: one to read, one to predict."""
  if len(tokens) < 2 * batch_size:
    raise ValueError(
      f"--eval-batch-size {batch_size} needs at least {2 * batch_size} {split} tokens, "
      f"got {len(tokens)}"
    )


def _print_start(task: _Task) -> None:
  args, config = task.args, task.config
  epochs = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
  print(
    f"lm: {args.data} ({args.level} level, vocabulary {len(task.vocab):,}, "
    f"{task.train_tokens:,} / {len(task.valid):,} / {len(task.test):,} tokens); "
    f"{config.cell} x{config.layers} state {config.hidden}, dropout {config.dropout}, "
    f"batch {args.batch_size}, "
    f"{report.truncation_text(args.k1, task.k2, args.style, task.artbp, args.delta)}, "
    f"{args.optimizer} "
    f"lr {task.schedule(0):g}, clip {args.clip}, {epochs} of {task.updates_per_epoch} updates",
    flush=True,
  )


def _train_epoch(
  task: _Task,
  run: loop.Run,
  state: TrainState,
  position: dict,
  best: _Best | None,
  number: int,
) -> tuple[TrainState, dict, _Best | None, int | None]:
  """One epoch (or the rest of one): its calls, its validation and its checkpoint.

  Returns the state, the position and the best epoch after it, and the exit
  status if a signal stopped the run, else None.
  """
  start = time.perf_counter()
  if number == position["epoch"] and position["chunk"] > 0:  # resumed mid-epoch
    skip = position["chunk"]
    epoch = _Epoch(number, position["epoch_start"], position["epoch_seconds"], start)
  else:
    state = task.trainer.reset(state)  # each epoch starts every stream from the initial state
    skip, epoch = 0, _Epoch(number, len(run.log), 0.0, start)
  lr = float(task.schedule(state.step))
  chunks = iterate_chunks(task.streams, task.args.updates_per_call * task.args.k1)
  chunks = itertools.islice(chunks, skip, None)
  calls = (loop.Call(n, inputs, targets) for n, (inputs, targets) in enumerate(chunks, skip + 1))
  here = functools.partial(_position, run, position, epoch)
  postfix = functools.partial(_postfix, task, run, epoch)
  desc = f"epoch {number}/{task.args.epochs}"
  # One bar per epoch, gone before the epoch's line is printed.
  done = len(run.log) - epoch.first_update
  with loop.progress(task.updates_per_epoch, done, 1, desc, leave=False) as bar:
    state, status = loop.train_calls(run, state, calls, bar, here, postfix)
  if status is not None:
    return state, position, best, status
  record, best = _validate(task, run, state, epoch, lr, best)
  if task.out is not None:
    session.append_jsonl(os.path.join(task.out, EPOCH_LOG), record)
  position = {
    "epoch": number + 1,
    "chunk": 0,
    "epoch_start": len(run.log),
    "epoch_seconds": 0.0,
    "updates": len(run.log),
    "seconds": run.clock.seconds(),
    "history": [*position["history"], record],
    "best": {"valid_loss": best.valid_loss, "epoch": best.epoch},
  }
  run.saves.save(state, position)  # every epoch's end
  if run.interrupts.stopping():
    return state, position, best, loop.stop_for_signal(run, state, position)
  return state, position, best, None


def _position(run: loop.Run, position: dict, epoch: _Epoch, call: loop.Call) -> dict:
  """Where the run is after `call` of `epoch`, as its checkpoints save it."""
  return {
    **position,
    "epoch": epoch.number,
    "chunk": call.number,
    "epoch_start": epoch.first_update,
    "epoch_seconds": epoch.seconds(),
    "updates": len(run.log),
    "seconds": run.clock.seconds(),
  }


def _postfix(task: _Task, run: loop.Run, epoch: _Epoch, metrics: UpdateMetrics) -> dict:
  tokens = (len(run.log) - epoch.first_update) * task.args.k1 * task.args.batch_size
  return {
    "loss": f"{metrics.loss[-1]:.3f}",
    "ppl": f"{np.exp(metrics.loss[-1]):.1f}",
    "tok_s": f"{tokens / epoch.seconds():,.0f}",
  }


def _validate(
  task: _Task, run: loop.Run, state: TrainState, epoch: _Epoch, lr: float, best: _Best | None
) -> tuple[dict, _Best]:
  """The epoch's record, printed; the best epoch, saved as `best` when it is this one."""
  train_seconds = epoch.seconds()
  metrics = run.log.joined(epoch.first_update)
  valid = task.evaluate(state.params, task.valid)
  steps = task.streams.shape[1] - 1
  record = {
    "epoch": epoch.number,
    "lr": lr,
    # Updates are means over equal blocks but the last: weight by steps.
    "train_loss": lm.epoch_loss(metrics.loss, steps, task.args.k1),
    "valid_loss": valid.loss,
    "valid_ppl": valid.perplexity,
    "train_seconds": round(train_seconds, 3),
    "seconds": round(epoch.seconds(), 3),
    "tokens_per_s": round(steps * task.args.batch_size / train_seconds, 1),
    **report.gradients(metrics),
  }
  record["train_ppl"] = math.exp(record["train_loss"])
  if best is None or valid.loss < best.valid_loss:
    # A host copy: the next update donates the state's buffers.
    best = _Best(valid.loss, epoch.number, jax.tree.map(np.array, state.params))
    run.saves.save(state, {"epoch": epoch.number, "valid_loss": valid.loss}, name="best")
  if run.board is not None:
    run.board.scalars(len(run.log), {f"epoch/{k}": record[k] for k in _BOARD_EPOCH})
  print(
    f"epoch {epoch.number:3d}  lr {lr:.4g}  train ppl {record['train_ppl']:8.2f}  "
    f"valid ppl {valid.perplexity:8.2f}  {record['tokens_per_s']:,.0f} tokens/s",
    flush=True,  # a log that is followed live, e.g. redirected to a file
  )
  return record, best


def _finish(task: _Task, run: loop.Run, state: TrainState, position: dict, best: _Best) -> int:
  """Tests the best epoch's parameters; prints and writes the run's summary and model."""
  test = task.evaluate(best.params, task.test)
  summary = _summary(task, run, state, position["history"], best, test)
  if run.board is not None:
    run.board.scalars(len(run.log), {f"run/{k}": summary[k] for k in _BOARD_SUMMARY})
  print(
    f"best valid ppl {summary['valid_ppl']:.2f} (epoch {best.epoch}), test ppl "
    f"{test.perplexity:.2f} ({test.bits_per_token:.3f} bits per token), "
    f"{summary['tokens']:,} training tokens in {summary['seconds']:.0f} s"
  )
  if task.out is not None:
    vocab = task.vocab
    extra = {"vocabulary": {"tokens": list(vocab.tokens), "level": vocab.level, "unk": vocab.unk}}
    lm.save_model(os.path.join(task.out, "model.msgpack"), task.config, best.params, extra)
    report.write_summary(task.out, summary)
    print(
      f"wrote {task.out}/model.msgpack (best valid), {EPOCH_LOG}, {session.UPDATE_LOG}, "
      "summary.json, checkpoints/"
    )
  if task.args.json:
    print(json.dumps(summary))
  return report.exit_status(summary)


def _summary(
  task: _Task,
  run: loop.Run,
  state: TrainState,
  history: list[dict],
  best: _Best,
  test: lm.Evaluation,
) -> dict:
  args, config, preset = task.args, task.config, task.preset
  tokens = args.epochs * (task.streams.shape[1] - 1) * args.batch_size
  choices = None if run.adapt is None else len(run.adapt.choices)
  # Throughput without compilation: this process's training calls after its first.
  after = run.clock.after_first_call(args.k1 * args.batch_size)
  train_seconds = sum(r["train_seconds"] for r in history)
  return {
    "task": "lm",
    "data": os.path.abspath(args.data),
    "level": args.level,
    "vocab_size": len(task.vocab),
    "preset": args.preset,
    "cell": config.cell,
    "hidden": config.hidden,
    "layers": config.layers,
    "dropout": config.dropout,
    "tie_embeddings": config.tie_embeddings,
    "init_scale": config.init_scale,
    "batch_size": args.batch_size,
    "k1": args.k1,
    "k2": task.k2,
    "style": args.style,
    **report.truncation(args, state, choices, task.artbp),
    "optimizer": args.optimizer,
    "lr": round(float(task.schedule(0)), 8),
    "decay_after": preset.decay_after,
    "lr_decay": preset.lr_decay,
    "clip": args.clip,
    "seed": args.seed,
    "epochs": args.epochs,
    "steps": int(state.step),
    "tokens": tokens,
    **report.timing(run.clock.seconds(), tokens, run.clock.first_call_seconds, after),
    "train_tokens_per_s": round(tokens / train_seconds, 1),
    "final_loss": round(report.final_loss(run.log.joined().loss), 5),
    **report.divergence(report.final_loss(run.log.joined().loss), len(task.vocab)),
    "best_epoch": best.epoch,
    "valid_ppl": round(math.exp(best.valid_loss), 3),
    "test_ppl": round(test.perplexity, 3),
    "test_bits_per_token": round(test.bits_per_token, 4),
    "eval_batch_size": args.eval_batch_size,
    "eval_tokens": args.eval_tokens,
    **task.coverage,
    # Zaremba et al.'s perplexities are for PTB words only.
    "reference": {"valid_ppl": preset.valid_ppl, "test_ppl": preset.test_ppl}
    if args.level == "word" and os.path.isfile(os.path.join(args.data, "ptb.train.txt"))
    else None,
    "backend": jax.default_backend(),
    **devices.summary(task.mesh),
  }
