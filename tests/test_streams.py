"""Tests of `tbptt_jax.streams`: `batchify` and `iterate_chunks`."""

import itertools

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import tbptt_jax


@settings(deadline=None)
@given(tokens=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=200), data=st.data())
def test_batchify_streams_are_contiguous_slices(tokens, data):
  batch_size = data.draw(st.integers(1, len(tokens)), label="batch_size")
  streams = tbptt_jax.batchify(tokens, batch_size)
  length = len(tokens) // batch_size
  assert isinstance(streams, np.ndarray)
  assert streams.shape == (batch_size, length)
  for b in range(batch_size):
    np.testing.assert_array_equal(streams[b], tokens[b * length : (b + 1) * length])


def test_batchify_drops_the_remainder():
  streams = tbptt_jax.batchify(np.arange(10), 3)
  np.testing.assert_array_equal(streams, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
  assert 9 not in streams
  np.testing.assert_array_equal(tbptt_jax.batchify(np.arange(7), 7), np.arange(7)[:, None])


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64])
def test_batchify_preserves_numpy_dtype(dtype):
  streams = tbptt_jax.batchify(np.arange(9, dtype=dtype), 2)
  assert streams.dtype == dtype
  np.testing.assert_array_equal(streams, np.arange(8).reshape(2, 4))


def test_batchify_accepts_lists_numpy_and_jax_arrays():
  want = np.array([[5, 3], [8, 1]])
  for tokens in ([5, 3, 8, 1, 9], np.array([5, 3, 8, 1, 9]), jnp.array([5, 3, 8, 1, 9])):
    streams = tbptt_jax.batchify(tokens, 2)
    assert isinstance(streams, np.ndarray)
    np.testing.assert_array_equal(streams, want)
  assert tbptt_jax.batchify(jnp.arange(5, dtype=jnp.int32), 2).dtype == np.int32


@pytest.mark.parametrize(
  "tokens, batch_size, match",
  [
    (np.arange(6).reshape(2, 3), 1, r"tokens must be a 1-D array of integers.*shape \(2, 3\)"),
    (np.arange(6, dtype=np.float32), 2, r"tokens must be a 1-D array of integers.*float32"),
    ([True, False, True], 1, r"tokens must be a 1-D array of integers.*bool"),
    (np.arange(6), 0, r"batch_size must be an integer >= 1, got 0"),
    (np.arange(6), 7, r"batch_size must be <= the number of tokens \(6\), got 7"),
    (np.arange(6), True, r"batch_size must be an integer >= 1, got True"),
    (np.arange(6), 2.0, r"batch_size must be an integer >= 1, got 2.0"),
  ],
  ids=["2d", "float", "bool", "batch0", "batch_gt_len", "batch_bool", "batch_float"],
)
def test_batchify_bad_input_raises_naming_the_argument(tokens, batch_size, match):
  with pytest.raises(ValueError, match=match):
    tbptt_jax.batchify(tokens, batch_size)


def _coded_streams(batch, length):
  """Streams whose every token is distinct, so any misplaced step shows."""
  return np.arange(batch * length).reshape(batch, length)


@settings(deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(2, 40), chunk_len=st.integers(1, 45))
def test_language_model_chunks_cover_the_streams_in_order(batch, length, chunk_len):
  streams = _coded_streams(batch, length)
  chunks = list(tbptt_jax.iterate_chunks(streams, chunk_len))
  steps = length - 1
  n_chunks = -(-steps // chunk_len)
  assert len(chunks) == n_chunks
  for c, (inputs, targets) in enumerate(chunks):
    n = chunk_len if c < n_chunks - 1 else steps - chunk_len * (n_chunks - 1)
    assert inputs.shape == targets.shape == (batch, n)
    # Targets are the next token of each input.
    np.testing.assert_array_equal(targets, inputs + 1)
  np.testing.assert_array_equal(np.concatenate([i for i, _ in chunks], axis=1), streams[:, :-1])
  np.testing.assert_array_equal(np.concatenate([t for _, t in chunks], axis=1), streams[:, 1:])


def test_language_model_targets_are_next_tokens_of_arbitrary_streams():
  streams = np.array([[4, 4, 1, 0, 7, 2, 2], [9, 3, 3, 8, 0, 1, 5]])
  chunks = list(tbptt_jax.iterate_chunks(streams, 4))
  assert len(chunks) == 2
  np.testing.assert_array_equal(chunks[0][0], [[4, 4, 1, 0], [9, 3, 3, 8]])
  np.testing.assert_array_equal(chunks[0][1], [[4, 1, 0, 7], [3, 3, 8, 0]])
  np.testing.assert_array_equal(chunks[1][0], [[7, 2], [0, 1]])
  np.testing.assert_array_equal(chunks[1][1], [[2, 2], [1, 5]])


@pytest.mark.parametrize("paired", [False, True], ids=["lm", "paired"])
def test_epochs_repeat_the_same_chunks_in_order(paired):
  streams = _coded_streams(2, 11)
  kwargs = {"targets": -streams} if paired else {}
  one_epoch = list(tbptt_jax.iterate_chunks(streams, 4, **kwargs))
  three_epochs = list(tbptt_jax.iterate_chunks(streams, 4, epochs=3, **kwargs))
  assert len(three_epochs) == 3 * len(one_epoch)
  for (got_x, got_y), (want_x, want_y) in zip(
    three_epochs, itertools.chain(one_epoch, one_epoch, one_epoch), strict=True
  ):
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_array_equal(got_y, want_y)


@settings(deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 40), chunk_len=st.integers(1, 45))
def test_paired_chunks_align_and_cover_all_steps(batch, length, chunk_len):
  x = _coded_streams(batch, length)
  y = -x - 1
  chunks = list(tbptt_jax.iterate_chunks(x, chunk_len, targets=y))
  n_chunks = -(-length // chunk_len)
  assert len(chunks) == n_chunks
  for c, (inputs, targets) in enumerate(chunks):
    n = chunk_len if c < n_chunks - 1 else length - chunk_len * (n_chunks - 1)
    assert inputs.shape == targets.shape == (batch, n)
    np.testing.assert_array_equal(targets, -inputs - 1)  # aligned step by step
  np.testing.assert_array_equal(np.concatenate([i for i, _ in chunks], axis=1), x)
  np.testing.assert_array_equal(np.concatenate([t for _, t in chunks], axis=1), y)


@pytest.mark.parametrize(
  "streams, kwargs, match",
  [
    (np.arange(6), {"chunk_len": 2}, r"streams must have shape \[batch, L\], got shape \(6,\)"),
    (_coded_streams(2, 5), {"chunk_len": 0}, r"chunk_len must be an integer >= 1, got 0"),
    (_coded_streams(2, 5), {"chunk_len": 2, "epochs": 0}, r"epochs must be an integer >= 1"),
    (_coded_streams(2, 1), {"chunk_len": 2}, r"language-model streams need length >= 2"),
    (
      _coded_streams(2, 5),
      {"chunk_len": 2, "targets": _coded_streams(2, 4)},
      r"targets must have the shape of streams \(2, 5\), got \(2, 4\)",
    ),
    (
      _coded_streams(2, 0),
      {"chunk_len": 2, "targets": _coded_streams(2, 0)},
      r"streams must have at least one step",
    ),
  ],
  ids=["1d", "chunk0", "epochs0", "lm_length1", "targets_shape", "paired_empty"],
)
def test_iterate_chunks_bad_input_raises_naming_the_argument(streams, kwargs, match):
  # Checked at the call, before any chunk is asked for.
  with pytest.raises(ValueError, match=match):
    tbptt_jax.iterate_chunks(streams, **kwargs)
