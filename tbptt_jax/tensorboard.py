"""Training metrics as TensorBoard event files, written without TensorFlow.

`TensorBoardWriter` writes what `Trainer.update` returns, one point per
optimizer update, and any other scalars (a validation perplexity, tokens/s)
at the step they belong to. It is the writer `tbptt-jax train --tensorboard`
uses; from Python:

    with TensorBoardWriter("runs/lstm") as board:
      for inputs, targets in iterate_chunks(xs, 1000, targets=ys):
        first = int(state.step)
        state, metrics = trainer.update(state, inputs, targets)
        board.updates(metrics, first)
      board.scalars(int(state.step), {"valid/perplexity": 120.3})

then `tensorboard --logdir runs`. The per-update tags are `train/loss`,
`train/grad_norm`, `train/clipped_grad_norm`, `train/clipped` (1 when
clipping fired), `train/nonfinite` (1 when the update was skipped for a NaN
or an infinity) and `train/k2`.

The event files are written by tensorboardX, a maintained writer of
TensorBoard's format that needs neither TensorFlow nor PyTorch (install
`tbptt-jax[tensorboard]`); TensorBoard's own reader reads them back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from tbptt_jax.train import UpdateMetrics

# UpdateMetrics field -> tag: the metrics of every optimizer update.
UPDATE_TAGS = {
  "loss": "train/loss",
  "grad_norm": "train/grad_norm",
  "clipped_grad_norm": "train/clipped_grad_norm",
  "clipped": "train/clipped",
  "nonfinite": "train/nonfinite",
  "k2": "train/k2",
}


class TensorBoardWriter:
  """Writes scalars to TensorBoard event files in `logdir`.

  Args:
    logdir: the folder of the event files (created if missing); TensorBoard
      shows each folder under its `--logdir` as one run.
    flush_secs: how often buffered events reach the disk; `flush` and `close`
      write them at once.
    purge_step: when a run resumes from a checkpoint at this step, TensorBoard
      hides the events that earlier files in `logdir` hold at this step or
      later (what a stopped run logged after its last checkpoint), so each
      step is shown once.

  Raises:
    ValueError: naming `logdir` if it cannot be created or written, or if
      tensorboardX is not installed.
  """

  def __init__(
    self,
    logdir: str | os.PathLike[str],
    *,
    flush_secs: float = 10.0,
    purge_step: int | None = None,
  ):
    self.logdir = os.fspath(logdir)
    _check_writable(self.logdir)
    try:
      import tensorboardX  # noqa: PLC0415 - optional: only runs that log to TensorBoard need it
    except ImportError:
      raise ValueError(
        "TensorBoardWriter: tensorboardX is not installed; pip install 'tbptt-jax[tensorboard]'"
      ) from None
    # The file's name holds the second it was made in; the nanoseconds after it keep two
    # writers of one second (a quickly resumed run) from overwriting one another, in order.
    self._writer = tensorboardX.SummaryWriter(
      self.logdir,
      flush_secs=flush_secs,
      purge_step=purge_step,
      filename_suffix=f".{time.time_ns() % 10**9:09d}",
    )

  def updates(self, metrics: UpdateMetrics, first_step: int) -> None:
    """One point per update of one `Trainer.update` call, at steps `first_step + 1 ...`.

    Args:
      metrics: the call's `UpdateMetrics`, each field of shape [updates].
      first_step: the optimizer step before the call (`int(state.step)`), so
        that update i is drawn at step `first_step + i + 1`.
    """
    columns = {tag: np.asarray(getattr(metrics, field)) for field, tag in UPDATE_TAGS.items()}
    count = len(columns["train/loss"])
    for i in range(count):
      for tag, values in columns.items():
        self._writer.add_scalar(tag, float(values[i]), first_step + i + 1)

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Scalars at one step, e.g. `{"valid/perplexity": 120.3, "train/tokens_per_s": 8e3}`.

    Values that are None are left out (a metric not measured this time).
    """
    for tag, value in values.items():
      if value is not None:
        self._writer.add_scalar(tag, float(value), int(step))

  def flush(self) -> None:
    """Writes the buffered events to disk."""
    self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    self._writer.close()

  def __enter__(self) -> TensorBoardWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def _check_writable(logdir: str) -> None:
  """A `ValueError` naming `logdir` unless its files can be written there."""
  try:
    os.makedirs(logdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"TensorBoardWriter: cannot create {logdir!r}: {e.strerror}") from None
  if not os.access(logdir, os.W_OK | os.X_OK):
    raise ValueError(f"TensorBoardWriter: cannot write in {logdir!r}: permission denied")
