"""Mini-batch TBPTT over one long sequence: parallel streams at offsets.

A long token sequence is cut into `batch_size` contiguous streams, one per row,
which are then consumed side by side, a chunk of steps at a time. Stream b's
carried state always continues exactly where its previous chunk ended, so the
batch is B independent TBPTT runs over B parts of the sequence. This is the
`batchify` of Zaremba et al. (2014) and of PyTorch's word-language-model
example. The data stay in NumPy on the host; chunks go to the device one call
at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from tbptt_jax import _checks


def batchify(tokens: Any, batch_size: int) -> np.ndarray:
  """Cuts a 1-D sequence into `batch_size` contiguous streams.

  With L = len(tokens) // batch_size, stream b is tokens[b L : (b + 1) L]: it
  starts at offset b L. The last len(tokens) mod batch_size tokens are dropped
  (fewer than one per stream), so every stream has the same length.

  Args:
    tokens: a 1-D integer array (NumPy, JAX or a list).
    batch_size: the number of streams, 1 <= batch_size <= len(tokens).

  Returns:
    A NumPy array `[batch_size, L]` of the tokens' dtype; a view of `tokens`
    when that is a NumPy array, so a large corpus is not copied.

  Example:
    >>> batchify(np.arange(10), 3)
    array([[0, 1, 2],
           [3, 4, 5],
           [6, 7, 8]])
  """
  where = "batchify"
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f"{where}: tokens must be a 1-D array of integers, got an array of shape "
      f"{tokens.shape} and dtype {tokens.dtype}"
    )
  batch_size = _checks.positive_int(where, "batch_size", batch_size)
  if batch_size > len(tokens):
    raise ValueError(
      f"{where}: batch_size must be <= the number of tokens ({len(tokens)}), got {batch_size}"
    )
  length = len(tokens) // batch_size
  return tokens[: batch_size * length].reshape(batch_size, length)


def iterate_chunks(
  streams: Any,
  chunk_len: int,
  *,
  targets: Any = None,
  epochs: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields consecutive `(inputs, targets)` chunks of every stream.

  Language modelling (`targets=None`): the targets are the inputs shifted by
  one, so a stream of length L gives L - 1 steps; chunk c holds inputs
  streams[:, c n : c n + n] and targets streams[:, c n + 1 : c n + n + 1].
  With `targets` (aligned input and target streams of the same shape, e.g. a
  synthetic task) a stream gives L steps.

  The last chunk holds the remaining steps and may be shorter than
  `chunk_len`; no step is dropped. Each epoch runs over the same chunks in the
  same order, every stream restarting at its offset. When training with a
  carried state, restart it with the streams, one epoch per call:

      for epoch in range(epochs):
        state = trainer.reset(state)
        for inputs, targets in iterate_chunks(streams, chunk_len):
          state, metrics = trainer.update(state, inputs, targets)

  With `tbptt_trainer`, make `chunk_len` a multiple of k1, so that every
  update but the last of an epoch covers k1 steps.

  Args:
    streams: `[batch, L]`, e.g. from `batchify`.
    chunk_len: steps per chunk, >= 1.
    targets: optional `[batch, L]` targets aligned with `streams`.
    epochs: how many passes over the streams, >= 1.

  Returns:
    An iterator of `(inputs, targets)`, each a NumPy array `[batch, n]` with
    n <= chunk_len. Arguments are checked at the call, not at the first chunk.
  """
  where = "iterate_chunks"
  streams = np.asarray(streams)
  if streams.ndim != 2:
    raise ValueError(f"{where}: streams must have shape [batch, L], got shape {streams.shape}")
  chunk_len = _checks.positive_int(where, "chunk_len", chunk_len)
  epochs = _checks.positive_int(where, "epochs", epochs)
  if targets is None:
    if streams.shape[1] < 2:
      raise ValueError(
        f"{where}: language-model streams need length >= 2 (targets are the next token), "
        f"got length {streams.shape[1]}"
      )
    inputs, targets = streams[:, :-1], streams[:, 1:]
  else:
    inputs, targets = streams, np.asarray(targets)
    if targets.shape != inputs.shape:
      raise ValueError(
        f"{where}: targets must have the shape of streams {inputs.shape}, got {targets.shape}"
      )
    if inputs.shape[1] < 1:
      raise ValueError(f"{where}: streams must have at least one step, got shape {inputs.shape}")
  return _chunks(inputs, targets, chunk_len, epochs)


def _chunks(
  inputs: np.ndarray, targets: np.ndarray, chunk_len: int, epochs: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  for _ in range(epochs):
    for start in range(0, inputs.shape[1], chunk_len):
      yield inputs[:, start : start + chunk_len], targets[:, start : start + chunk_len]
