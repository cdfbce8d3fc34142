"""A command-line run's files and how it resumes: its settings, checkpoints and update log.

A run can stop at any call boundary (a signal, too many non-finite gradients)
and continue later from its checkpoint exactly as if it had not stopped, or,
given a larger `--steps` or `--epochs`, go on to the new end exactly as a run
asked for that length from the start. Only process 0 writes (`prepare_out`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Any, NamedTuple

import jax
import numpy as np

from tbptt_jax import _files, checkpoint
from tbptt_jax.cli.flags import parser
from tbptt_jax.train import Trainer, TrainState, UpdateMetrics

UPDATE_LOG = "updates.csv"  # one row per update, both tasks: `update` and `UpdateMetrics`
# Arguments that are not part of a run's settings at all.
NOT_SAVED = frozenset({"command", "out", "json", "resume", "tensorboard"})
# Where a run runs, not what it computes (up to float reduction order): never saved, so a
# run resumes on another device count or cluster, and each process keeps its own --process-id.
NOT_SAVED |= {"devices", "coordinator", "num_processes", "process_id", "distributed"}
# Saved settings that do not change what a run computes: --resume keeps them unless given anew.
OVERRIDABLE = frozenset({"save_every", "keep", "max_nonfinite"})
# The run's length: --resume may raise it (the run goes on to the new end), never lower it.
EXTENDABLE = frozenset({"steps", "epochs"})


class Resume(NamedTuple):
  """The checkpoint a resumed run continues from."""

  path: str
  meta: dict  # the run's position: calls, updates, epoch, ..., and "args"


def checkpoint_folder(out: str | None) -> str | None:
  """The checkpoints' folder in --out, as an absolute path (orbax needs one), or None."""
  return None if out is None else os.path.abspath(os.path.join(out, "checkpoints"))


def resume_point(args: argparse.Namespace) -> Resume | None:
  """With --resume, the last checkpoint in --out, `args` completed from it; else None."""
  folder = checkpoint_folder(args.out)
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
  try:
    meta = checkpoint.read_meta(path)
  except ValueError as e:
    raise ValueError(f"--resume: {e}") from None
  if not isinstance(meta.get("args"), dict):
    raise ValueError(f"--resume: {path!r} holds no run settings")
  resume_arguments(args, parser().parse_args(["train"]), meta["args"], path)
  return Resume(path, meta)


def run_arguments(args: argparse.Namespace) -> dict:
  """The arguments that define what a run computes, as saved in its checkpoints."""
  return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SAVED}


def resume_arguments(
  args: argparse.Namespace, defaults: argparse.Namespace, saved: dict, path: str
) -> None:
  """Continues `args` with a checkpoint's: flags left at their defaults take the saved values.

  A flag given with a value other than the saved one is an error, except the
  checkpointing options (`OVERRIDABLE`), which a resumed run may change, and
  the run's length (`EXTENDABLE`), which it may raise.
  """
  for name, value in saved.items():
    given = getattr(args, name, None)
    if given == getattr(defaults, name, None) or given == value:
      setattr(args, name, value)
      continue
    flag = "--" + name.replace("_", "-")
    if name in OVERRIDABLE or (name in EXTENDABLE and value is not None and given > value):
      continue
    if name in EXTENDABLE and value is not None:
      raise ValueError(
        f"--resume: {flag} {given} is below the run's {value} in {path}; a resumed run can go "
        f"on to a larger {flag}, not stop earlier"
      )
    raise ValueError(
      f"--resume: {flag} {given} does not match the run's {value} in {path}; "
      "resume with the same settings (or none)"
    )


class Checkpoints:
  """Where a command-line run saves, and what it restores from.

  Every process saves: `checkpoint.save_checkpoint` is a collective, in which
  each process writes its own shards and process 0 commits.
  """

  def __init__(self, args: argparse.Namespace) -> None:
    self.folder = checkpoint_folder(args.out)
    self.out = args.out
    self.run_args = run_arguments(args)
    self.every, self.keep = args.save_every, args.keep

  def restore(
    self, resume: Resume | None, trainer: Trainer, key: jax.Array, example: Any
  ) -> TrainState:
    """A fresh state, or the resumed run's, checked against this run's configuration."""
    if resume is None:
      return trainer.init(key, example)
    state = self._load(resume.path, trainer, key, example)
    print(f"resuming from {resume.path}", file=sys.stderr)
    return state

  def restore_best(self, trainer: Trainer, key: jax.Array, example: Any) -> TrainState:
    """The state of the best checkpoint (`best`) of the run resumed from --out."""
    if self.folder is None:
      raise ValueError("--resume needs --out DIR, the folder of the run to continue")
    path = os.path.join(self.folder, "best" + checkpoint.SUFFIX)
    return self._load(path, trainer, key, example)

  def due(self, updates: int, made: int) -> bool:
    """Whether the call that made `made` updates, up to `updates`, crossed a --save-every."""
    return updates // self.every > (updates - made) // self.every

  def save(self, state: TrainState, position: dict, name: str | None = None) -> str | None:
    """Saves `state` with the run's settings and `position`; the path, None without --out."""
    if self.folder is None:
      return None
    # This run's settings, over any that a resumed position still holds.
    meta = {**position, "args": self.run_args}
    return checkpoint.save_checkpoint(self.folder, state, meta, keep=self.keep, name=name)

  @staticmethod
  def _load(path: str, trainer: Trainer, key: jax.Array, example: Any) -> TrainState:
    like = jax.eval_shape(trainer.init, key, example)
    try:
      return checkpoint.load_checkpoint(path, like).state
    except ValueError as e:
      raise ValueError(f"--resume: {e}") from None


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

  @classmethod
  def in_folder(cls, out: str | None, updates: int) -> UpdateLog:
    """The log in --out; other processes than 0 read it (on resume) but never write."""
    path = None if out is None else os.path.join(out, UPDATE_LOG)
    return cls(path, updates, write=jax.process_index() == 0)

  def append(self, metrics: UpdateMetrics) -> None:
    """Adds one call's metrics (host arrays)."""
    first = len(self) + 1
    self.metrics.append(metrics)
    self._write_rows(metrics, first)

  def joined(self, start: int = 0) -> UpdateMetrics:
    """The metrics of updates start.. as one run."""
    if not self.metrics:
      return UpdateMetrics(**{name: _column(name, []) for name in UpdateMetrics._fields})
    whole = jax.tree.map(lambda *calls: np.concatenate(calls), *self.metrics)
    return jax.tree.map(lambda a: a[start:], whole)

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


def _column(name: str, texts: list[str]) -> Any:
  """One `UpdateMetrics` field from its CSV texts, in the dtype the trainer gives it."""
  if name in ("clipped", "nonfinite"):
    return np.asarray([text == "True" for text in texts], bool)
  if name == "k2":
    return np.asarray([int(text) for text in texts], np.int32)
  return np.asarray([float(text) for text in texts], np.float32)


def prepare_out(out: str | None) -> str | None:
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


def write_jsonl(path: str, records: list[dict]) -> None:
  """Replaces `path` with `records`, one JSON line each (a resumed run's log, cut back)."""
  _files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
