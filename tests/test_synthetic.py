"""Tests of `tbptt_jax.synthetic`: the r2rt task and its reference levels."""

import numpy as np
import pytest

from tbptt_jax import synthetic


def test_reference_losses_are_the_published_levels():
  """Computed from the task's definition; r2rt quotes 0.66, 0.52 and 0.45 nats."""
  levels = synthetic.reference_losses()
  assert round(levels.neither, 4) == 0.6616
  assert round(levels.lag3, 4) == 0.5192
  assert round(levels.both, 4) == 0.4545


def test_sequence_follows_the_definition():
  x, y = synthetic.sequence(np.random.default_rng(0), 400_000)
  assert x.shape == y.shape == (400_000,)
  assert x.dtype == y.dtype == np.int32
  assert set(np.unique(x)) == set(np.unique(y)) == {0, 1}
  x3, x8, y = x[5:-3], x[:-8], y[8:]
  for a in (0, 1):
    for b in (0, 1):
      cell = (x3 == a) & (x8 == b)
      p = synthetic.probability(a, b)
      sigma = np.sqrt(p * (1 - p) / cell.sum())
      assert abs(y[cell].mean() - p) < 5 * sigma + 1e-12  # exact when p = 1


def test_terms_before_the_start_are_zero():
  """At t = 1..3 neither input has happened yet: P(Y_t = 1) = 0.5."""
  rng = np.random.default_rng(1)
  first = np.stack([synthetic.sequence(rng, 3)[1] for _ in range(20_000)])
  np.testing.assert_allclose(first.mean(axis=0), 0.5, atol=5 * np.sqrt(0.25 / 20_000))


def test_bad_length():
  with pytest.raises(ValueError, match=r"length must be an integer >= 1, got 0"):
    synthetic.sequence(np.random.default_rng(0), 0)


def test_independent_streams_grow_at_their_ends():
  """A longer draw starts with the shorter one, stream by stream; each follows the task."""
  xs, ys = synthetic.independent_streams(3, 4, 50)
  longer = synthetic.independent_streams(3, 4, 120)
  np.testing.assert_array_equal(longer[0][:, :50], xs)
  np.testing.assert_array_equal(longer[1][:, :50], ys)
  assert xs.dtype == ys.dtype == np.int32 and xs.shape == (4, 50)
  assert not np.array_equal(xs[0], xs[1])  # every stream its own series
  xs, ys = synthetic.independent_streams(0, 4, 100_000)
  x3, x8, y = xs[:, 5:-3], xs[:, :-8], ys[:, 8:]
  for a in (0, 1):
    for b in (0, 1):
      cell = (x3 == a) & (x8 == b)
      p = synthetic.probability(a, b)
      sigma = np.sqrt(p * (1 - p) / cell.sum())
      assert abs(y[cell].mean() - p) < 5 * sigma + 1e-12  # exact when p = 1
