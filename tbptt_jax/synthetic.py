"""The synthetic task of r2rt.com's "Recurrent Neural Networks in Tensorflow I".

Input X_t ~ Bernoulli(0.5) i.i.d.; output Y_t ~ Bernoulli(p_t) with

    p_t = 0.5 + 0.5 X_{t-3} - 0.25 X_{t-8}    (terms before the start are 0).

A model that learns neither dependency can do no better than the entropy of
Y_t, 0.6616 nats; one that learns only the X_{t-3} dependency, 0.5192; one that
learns both, 0.4545. Truncation decides which are learnable: a gradient path
of length 3 (k2 > 3) is needed for X_{t-3} and of length 8 for X_{t-8}.

Reference: r2rt.com, "Recurrent Neural Networks in Tensorflow I", 2016.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from tbptt_jax import _checks
from tbptt_jax.cells import Cell, feedforward, stack
from tbptt_jax.streams import batchify

LAGS = (3, 8)  # the dependencies: X_{t-3} and X_{t-8}
CLASSES = 2  # X_t and Y_t are bits


class ReferenceLosses(NamedTuple):
  """Expected cross-entropy (nats) of the best predictor knowing each input."""

  neither: float  # knows no dependency: the entropy of Y_t
  lag3: float  # knows X_{t-3} only
  both: float  # knows X_{t-3} and X_{t-8}


def probability(x_lag3: np.ndarray, x_lag8: np.ndarray) -> np.ndarray:
  """P(Y_t = 1 | X_{t-3}, X_{t-8})."""
  return 0.5 + 0.5 * x_lag3 - 0.25 * x_lag8


def sequence(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws one series (X_1..X_T, Y_1..Y_T) of the task.

  Args:
    rng: a NumPy generator, e.g. `np.random.default_rng(0)`.
    length: T >= 1.

  Returns:
    `(x, y)`, each an int32 array of shape [T] with values in {0, 1}.
  """
  length = _checks.positive_int("synthetic.sequence", "length", length)
  x = rng.integers(0, 2, size=length, dtype=np.int32)
  lagged = [np.concatenate([np.zeros(lag, np.int32), x[:-lag]])[:length] for lag in LAGS]
  y = (rng.random(length) < probability(*lagged)).astype(np.int32)
  return x, y


def streams(seed: int, batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """One series of batch_size * length steps cut into streams, as r2rt did.

  Returns:
    `(xs, ys)`, each `[batch_size, length]` int32: stream b is steps
    b * length + 1 .. (b + 1) * length of the series.
  """
  batch_size = _checks.positive_int("synthetic.streams", "batch_size", batch_size)
  length = _checks.positive_int("synthetic.streams", "length", length)
  x, y = sequence(np.random.default_rng(seed), batch_size * length)
  return batchify(x, batch_size), batchify(y, batch_size)


def independent_streams(seed: int, batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """`batch_size` independent series of the task, each drawn step by step from its own generator.

  Unlike `streams`, the first n steps of a stream do not depend on `length`:
  a longer run sees a shorter run's data first, which is what lets
  `tbptt-jax train --resume --steps N` extend a finished run exactly as a run
  of N updates would have gone. Stream b draws (u_t, v_t) ~ U[0, 1)^2 at each
  step t from `np.random.default_rng([seed, b])`, and X_t = [u_t < 0.5],
  Y_t = [v_t < p_t], with the terms before the stream's start 0.

  Returns:
    `(xs, ys)`, each `[batch_size, length]` int32.
  """
  where = "synthetic.independent_streams"
  batch_size = _checks.positive_int(where, "batch_size", batch_size)
  length = _checks.positive_int(where, "length", length)
  xs = np.empty((batch_size, length), np.int32)
  ys = np.empty((batch_size, length), np.int32)
  for b in range(batch_size):
    # Row by row, (u_t, v_t) pairs: a longer draw starts with a shorter one.
    u, v = np.random.default_rng([seed, b]).random((length, 2)).T
    xs[b] = u < 0.5
    lagged = [np.concatenate([np.zeros(lag, np.int32), xs[b, :-lag]])[:length] for lag in LAGS]
    ys[b] = v < probability(*lagged)
  return xs, ys


def model(*cells: Cell) -> Cell:
  """The task's model: one-hot input, the given recurrent cells, a two-class readout.

  Example: r2rt's network, an Elman cell with a state of 4:
    >>> model(elman(4))
  """
  return stack(
    feedforward(functools.partial(jax.nn.one_hot, num_classes=CLASSES)),
    *cells,
    feedforward(nn.Dense(CLASSES)),
  )


def reference_losses() -> ReferenceLosses:
  """The three reference levels, computed exactly from the task's definition."""
  x3, x8 = np.meshgrid([0, 1], [0, 1], indexing="ij")  # equally likely cases
  p = probability(x3, x8)

  def entropy(q):  # of a Bernoulli(q), in nats; 0 log 0 = 0
    q = np.asarray(q, float)
    with np.errstate(divide="ignore", invalid="ignore"):
      h = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return np.where((q > 0) & (q < 1), h, 0.0)

  return ReferenceLosses(
    neither=float(entropy(p.mean())),
    lag3=float(np.mean(entropy(p.mean(axis=1)))),
    both=float(np.mean(entropy(p))),
  )
