"""The run loop every training task shares: adapt k2, update, time, log, show, save, signals.

A task (`r2rt`, `lm`) turns its data into `Call`s and hands them to
`train_calls`, which makes each jitted call and then does the bookkeeping:
the update log, the progress bar, the NaN/inf guard, a checkpoint every
--save-every updates, and a clean stop at a signal. Everything happens at
call boundaries, so a run stopped here resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from tbptt_jax.adaptive import adaptive_k2
from tbptt_jax.cli import session
from tbptt_jax.cli.flags import ADAPT_EVERY, ADAPT_STREAMS, PROG, pick
from tbptt_jax.tensorboard import TensorBoardWriter
from tbptt_jax.train import Trainer, TrainState, UpdateMetrics


class RunStopped(Exception):
  """A run that cannot go on (non-finite gradients): one line, a non-zero status."""

  def __init__(self, status: int, message: str) -> None:
    super().__init__(message)
    self.status, self.message = status, message


class Interrupts:
  """SIGINT / SIGTERM while training: the first is remembered, the second exits at once.

  The loop checks `signal` after each jitted call (Python runs handlers only
  between calls into XLA, so the call in flight always finishes), saves a
  checkpoint and exits with status 128 + the signal's number.
  """

  def __init__(self) -> None:
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> Interrupts:
    for signum in (signal.SIGINT, signal.SIGTERM):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal is not None:
      print(f"\n{name} again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signal = signum
    print(
      f"\n{name}: finishing the current call, then saving a checkpoint "
      f"({name} again stops at once)",
      file=sys.stderr,
      flush=True,
    )

  def stopping(self) -> bool:
    """Whether a signal stops the run at this call boundary; on several processes, all stop
    together when any got one (saving is a collective), deciding on the gathered flags only."""
    if jax.process_count() > 1:
      signals = multihost_utils.process_allgather(np.int32(self.signal or 0))
      if not signals.max():
        return False
      self.signal = self.signal or int(signals.max())
    return self.signal is not None

  @property
  def status(self) -> int:
    return 128 + (self.signal or 0)

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name if self.signal else ""


class NonfiniteGuard:
  """Reports the first NaN/inf loss and gradient, and stops a run after too many in a row.

  The trainer already skips every update whose gradient is not finite
  (`skip_nonfinite`), so the parameters stay those of the last good update.
  """

  def __init__(self, limit: int) -> None:
    self.limit, self.streak = limit, 0
    self.seen_loss = self.seen_gradient = False

  def observe(self, metrics: UpdateMetrics, last_update: int, write: Any) -> str | None:
    """Reports news of a call's updates; the reason to stop, or None."""
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
          f"update {first + i}: the gradient or the update holds NaN or inf; update skipped, "
          "parameters kept",
          sys.stderr,
        )
      if self.streak >= self.limit:
        return (
          f"{self.streak} updates in a row (to update {first + i}) had NaN or inf gradients or "
          f"updates (--max-nonfinite {self.limit}); the parameters are those before them"
        )
    return None


class Clock:
  """A run's wall time across its sessions, and this session's training calls, timed apart.

  The first call holds initialisation and compilation; the calls after it,
  bookkeeping included, give the throughput without them.
  """

  def __init__(self, seconds_before: float = 0.0) -> None:
    self.start, self.before = time.perf_counter(), seconds_before
    self.first_call_seconds: float | None = None  # from the start to the end of the first call
    self.later_seconds, self.later_updates = 0.0, 0

  def seconds(self) -> float:
    """The run's seconds so far, its earlier sessions included."""
    return self.before + time.perf_counter() - self.start

  def call_done(self, call_start: float, updates: int) -> None:
    now = time.perf_counter()
    if self.first_call_seconds is None:
      self.first_call_seconds = now - self.start
    else:
      self.later_seconds += now - call_start
      self.later_updates += updates

  def after_first_call(self, tokens_per_update: int) -> float | None:
    """Tokens per second of the calls after the first; None when there were none."""
    if not self.later_updates:
      return None
    return round(self.later_updates * tokens_per_update / self.later_seconds, 1)


class AdaptiveK2:
  """Re-chooses k2 every --adapt-every calls (Aicher et al. 2019) on the call's own chunk.

  Each choice is logged to `truncation.jsonl`. The calls it measures before
  depend only on the call's index, so a resumed run chooses as the
  uninterrupted one would. `split_inputs` makes the model's step input of
  the measured chunk (the gradient's decay is measured without dropout).
  """

  def __init__(self, args, k1, model, loss_fn, trainer, out, updates, split_inputs) -> None:
    self.every = pick(args.adapt_every, ADAPT_EVERY)
    self.trainer, self.split_inputs = trainer, split_inputs
    self.window = 2 * max(trainer.k2s)  # measured steps: the losses of the last half reach back
    if args.updates_per_call * k1 < self.window:
      raise ValueError(
        f"--delta measures on the first 2 * max(k2) = {self.window} steps of a call, but a call "
        f"has --updates-per-call x k1 = {args.updates_per_call * k1} steps: raise "
        "--updates-per-call"
      )
    streams = pick(args.adapt_streams, ADAPT_STREAMS)
    self.choose = adaptive_k2(model, loss_fn, trainer.k2s, delta=args.delta, streams=streams)
    self.path = out and os.path.join(out, "truncation.jsonl")
    self.choices: list[dict] = []
    if self.path is not None:  # a resumed run keeps the choices its checkpoint holds
      if updates and os.path.isfile(self.path):
        with open(self.path) as f:
          self.choices = [r for r in map(json.loads, f) if r["update"] <= updates]
      session.write_jsonl(self.path, self.choices)

  @classmethod
  def maybe(cls, args, *context) -> AdaptiveK2 | None:
    """The controller of an adaptive run (--delta), else None; `context` as `__init__`'s."""
    return None if args.delta is None else cls(args, *context)

  def before_call(self, call: int, updates: int, state: TrainState, inputs, targets):
    """The state with a new k2 if call (0-based, counted as the task counts) is due."""
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
      session.append_jsonl(self.path, record)
    return self.trainer.set_k2(state, choice.k2)


class Call(NamedTuple):
  """One jitted call's data."""

  number: int  # 1-based, as the task counts its calls (r2rt: in the run; lm: in the epoch)
  inputs: Any  # [batch, time, ...]
  targets: Any  # [batch, time]
  adapt: bool = True  # False: the rest of a call begun by a shorter run, adapted then


class Run(NamedTuple):
  """What the loop keeps for a whole run."""

  trainer: Trainer
  log: session.UpdateLog
  saves: session.Checkpoints
  clock: Clock
  adapt: AdaptiveK2 | None
  guard: NonfiniteGuard
  interrupts: Interrupts
  board: TensorBoardWriter | None = None  # --tensorboard, on process 0


@contextlib.contextmanager
def tensorboard(logdir: str | None, updates: int) -> Iterator[TensorBoardWriter | None]:
  """The run's TensorBoard writer in `logdir` (None without --tensorboard, or off process 0),
  closed at the end; a ValueError naming the flag, before training, if it cannot write there.

  A run resumed after `updates` updates hides what its earlier session logged after them
  (`purge_step`), so that TensorBoard shows each update once.
  """
  if logdir is None or jax.process_index() > 0:
    yield None
    return
  try:
    board = TensorBoardWriter(logdir, purge_step=updates + 1 if updates else None)
  except ValueError as e:
    raise ValueError(f"--tensorboard: {str(e).removeprefix('TensorBoardWriter: ')}") from None
  try:
    yield board
  finally:
    board.close()


def train_calls(
  run: Run,
  state: TrainState,
  calls: Iterable[Call],
  bar: tqdm,
  position: Callable[[Call], dict],
  postfix: Callable[[UpdateMetrics], dict],
) -> tuple[TrainState, int | None]:
  """Makes the calls in order, each followed by the run's bookkeeping.

  Args:
    run: the run's trainer, log, checkpoints, clock, controller, guard, signals.
    state: the state to start from.
    calls: the calls to make.
    bar: the progress bar, moved on by each call's updates.
    position: the run's position after a call (with `run.log` holding its
      updates), as its checkpoints save it.
    postfix: what the bar shows of a call's metrics.

  Returns:
    `(state, status)`: status None when every call was made, else the exit
    status of a run stopped by a signal (saved). Raises `RunStopped` after
    too many non-finite gradients in a row (saved).
  """
  for call in calls:
    call_start = time.perf_counter()
    if run.adapt is not None and call.adapt:
      state = run.adapt.before_call(call.number - 1, len(run.log), state, call.inputs, call.targets)
    state, metrics = run.trainer.update(state, call.inputs, call.targets)
    metrics = jax.device_get(metrics)  # waits for the call to finish
    run.log.append(metrics)
    if run.board is not None:
      run.board.updates(metrics, len(run.log) - len(metrics.loss))
    bar.set_postfix(postfix(metrics), refresh=False)
    bar.update(len(metrics.loss))
    status = _after_call(run, state, position(call), metrics, bar)
    run.clock.call_done(call_start, len(metrics.loss))
    if status is not None:
      return state, status
  return state, None


def _after_call(
  run: Run, state: TrainState, position: dict, metrics: UpdateMetrics, bar: tqdm
) -> int | None:
  """Saves when due; the exit status if the run must stop here, else None."""
  problem = run.guard.observe(metrics, position["updates"], bar.write)
  if problem is not None:
    path = run.saves.save(state, position)
    raise RunStopped(1, problem + (f"; saved {path}" if path else ""))
  saved = None
  if run.saves.due(position["updates"], len(metrics.loss)):
    saved = run.saves.save(state, position)
  if run.interrupts.stopping():  # perhaps received during that save
    return stop_for_signal(run, state, position, saved)
  return None


def stop_for_signal(run: Run, state: TrainState, position: dict, saved: str | None = None) -> int:
  """Saves (unless `saved`), says how to continue; the exit status of the signal."""
  path = saved or run.saves.save(state, position)
  name, where = run.interrupts.name, f"stopped after update {position['updates']}"
  if path is None:
    print(f"{PROG}: {name}: {where}; nothing saved (no --out)", file=sys.stderr)
  else:
    print(
      f"{PROG}: {name}: {where}; saved {path}; continue with "
      f"`{PROG} train --out {run.saves.out} --resume`",
      file=sys.stderr,
    )
  return run.interrupts.status


def progress(
  total: int, done: int, mininterval: float, desc: str | None = None, leave: bool = True
) -> tqdm:
  """A progress bar in updates, on stderr; process 0's only. With `leave=False` it clears
  itself when closed, so that what is printed next is not followed by it again."""
  return tqdm(
    total=total,
    initial=done,
    desc=desc,
    leave=leave,
    unit="update",
    file=sys.stderr,
    mininterval=mininterval,
    disable=jax.process_index() > 0,
  )
