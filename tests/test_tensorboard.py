"""Tests of `tbptt_jax.tensorboard`: metrics written as event files, read back by TensorBoard."""

import jax
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tbptt_jax
from tbptt_jax import synthetic
from tbptt_jax.tensorboard import UPDATE_TAGS, TensorBoardWriter


def read_scalars(logdir):
  """{tag: [(step, value), ...]} through TensorBoard's own reader."""
  events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_update_and_scalar_is_read_back_by_tensorboard(tmp_path):
  trainer = tbptt_jax.tbptt_trainer(
    synthetic.model(tbptt_jax.elman(4)),
    optax.softmax_cross_entropy_with_integer_labels,
    optax.adam(1e-2),
    k1=5,
    max_grad_norm=0.5,
  )
  x, y = synthetic.streams(0, 4, 30)
  state = trainer.init(jax.random.key(0), x[:, :5])
  calls = []
  with TensorBoardWriter(tmp_path / "run") as board:
    for start in (0, 15):
      first = int(state.step)
      state, metrics = trainer.update(state, x[:, start : start + 15], y[:, start : start + 15])
      board.updates(metrics, first)
      calls.append(metrics)
    board.scalars(int(state.step), {"valid/perplexity": 1.5, "test/perplexity": None})

  scalars = read_scalars(tmp_path / "run")
  assert sorted(scalars) == sorted([*UPDATE_TAGS.values(), "valid/perplexity"])
  for field, tag in UPDATE_TAGS.items():
    want = np.concatenate([np.asarray(getattr(m, field)) for m in calls]).astype(np.float32)
    assert [step for step, _ in scalars[tag]] == list(range(1, 7))
    np.testing.assert_array_equal(np.float32([v for _, v in scalars[tag]]), want, err_msg=tag)
  assert scalars["valid/perplexity"] == [(6, 1.5)]
  assert any(v for _, v in scalars["train/clipped"])  # clipping fired and was recorded


def test_a_folder_that_cannot_be_written_is_named(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"TensorBoardWriter: cannot create '.*a_file/run'"):
    TensorBoardWriter(blocker / "run")


def test_a_resumed_run_hides_what_its_stopped_session_logged_after_the_checkpoint(tmp_path):
  """A run killed after update 6 but checkpointed at 3 logs 4..6 again on resuming: TensorBoard
  shows each step once, the resumed session's value."""
  metrics = lambda losses: tbptt_jax.UpdateMetrics(*(np.float32(losses),) * 6)  # noqa: E731
  with TensorBoardWriter(tmp_path) as board:
    board.updates(metrics([1, 2, 3, 4, 5, 6]), 0)
  with TensorBoardWriter(tmp_path, purge_step=4) as board:
    board.updates(metrics([40, 50, 60, 70]), 3)
  steps = [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60), (7, 70)]
  assert read_scalars(tmp_path)["train/loss"] == steps
