"""The bookkeeping of a command-line training run: signals, the per-update log, resuming.

The training loops of `tbptt_jax.cli` use these so that a run can stop at any
call boundary (a signal, too many non-finite gradients) and continue later
from its checkpoint exactly as if it had not stopped.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import sys
from typing import Any

import numpy as np

from tbptt_jax import _files
from tbptt_jax.train import UpdateMetrics

# Arguments that are not part of a run's settings at all.
NOT_SAVED = frozenset({"command", "run", "out", "json", "resume"})
# Where a run runs, not what it computes (up to float reduction order): never saved, so a
# run resumes on another device count or cluster, and each process keeps its own --process-id.
NOT_SAVED |= {"devices", "coordinator", "num_processes", "process_id", "distributed"}
# Saved settings that do not change what a run computes: --resume keeps them unless given anew.
OVERRIDABLE = frozenset({"save_every", "keep", "max_nonfinite"})


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

  @property
  def status(self) -> int:
    return 128 + (self.signal or 0)

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name if self.signal else ""


class UpdateLog:
  """Every update's metrics as CSV rows (`update, loss, grad_norm, ...`), appended per call.

  On resume the file is cut back to the updates the checkpoint holds: a run
  killed after its last checkpoint may have logged calls that it will redo.
  With `write=False` (processes other than 0 of a multi-host run) it reads the
  file on resume and keeps the metrics, but never writes.
  """

  def __init__(self, path: str | None, updates: int = 0, write: bool = True) -> None:
    self.path, self.write = path, write
    self.metrics: list[UpdateMetrics] = []
    if path is None:
      return
    if updates == 0:
      self._write_rows(None, 0, header=True)
      return
    try:
      with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    except OSError as e:
      raise ValueError(f"--resume: cannot read the update log {path!r}: {e.strerror}") from None
    if len(rows) < updates or list(rows[0]) != ["update", *UpdateMetrics._fields]:
      raise ValueError(
        f"--resume: the update log {path!r} holds {len(rows)} updates, the checkpoint {updates}"
      )
    rows = rows[:updates]
    columns = {name: _column(name, [row[name] for row in rows]) for name in UpdateMetrics._fields}
    self.metrics.append(UpdateMetrics(**columns))
    self._write_rows(self.metrics[0], 1, header=True)

  def append(self, metrics: UpdateMetrics) -> None:
    """Adds one call's metrics (host arrays)."""
    first = len(self) + 1
    self.metrics.append(metrics)
    self._write_rows(metrics, first)

  def joined(self, start: int = 0) -> UpdateMetrics:
    """The metrics of updates start.. as one run."""
    if not self.metrics:
      return UpdateMetrics(**{name: _column(name, []) for name in UpdateMetrics._fields})
    whole = UpdateMetrics(*(np.concatenate(f) for f in zip(*self.metrics, strict=True)))
    return UpdateMetrics(*(f[start:] for f in whole))

  def __len__(self) -> int:
    return sum(len(m.loss) for m in self.metrics)

  def _write_rows(self, metrics: UpdateMetrics | None, first: int, header: bool = False) -> None:
    if self.path is None or not self.write:
      return
    text = self._csv(metrics, first, header)
    if header:
      _files.atomic_write(self.path, text)
      return
    with open(self.path, "a", newline="") as f:
      f.write(text)
      f.flush()

  @staticmethod
  def _csv(metrics: UpdateMetrics | None, first: int, header: bool) -> str:
    table = io.StringIO()
    writer = csv.writer(table)
    if header:
      writer.writerow(["update", *UpdateMetrics._fields])
    if metrics is not None:
      columns = [np.asarray(a).tolist() for a in metrics]
      writer.writerows(zip(range(first, first + len(metrics.loss)), *columns, strict=True))
    return table.getvalue()


def _column(name: str, texts: list[str]) -> np.ndarray:
  """One `UpdateMetrics` field from its CSV texts, in the dtype the trainer gives it."""
  if name in ("clipped", "nonfinite"):
    return np.asarray([text == "True" for text in texts], bool)
  if name == "k2":
    return np.asarray([int(text) for text in texts], np.int32)
  return np.asarray([float(text) for text in texts], np.float32)


def run_arguments(args: argparse.Namespace) -> dict:
  """The arguments that define what a run computes, as saved in its checkpoints."""
  return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SAVED}


def resume_arguments(
  args: argparse.Namespace, defaults: argparse.Namespace, saved: dict, path: str
) -> None:
  """Continues `args` with a checkpoint's: flags left at their defaults take the saved values,
  and a flag given with a value other than the saved one is an error, except the
  checkpointing options (`OVERRIDABLE`), which a resumed run may change."""
  for name, value in saved.items():
    given = getattr(args, name, None)
    if given != getattr(defaults, name, None) and given != value:
      if name in OVERRIDABLE:
        continue
      flag = "--" + name.replace("_", "-")
      raise ValueError(
        f"--resume: {flag} {given} does not match the run's {value} in {path}; "
        "resume with the same settings (or none)"
      )
    setattr(args, name, value)
