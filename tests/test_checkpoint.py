"""Tests of `tbptt_jax.checkpoint`: exact continuation, atomic writes, pruning, damaged files."""

import os

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import checkpoint, lm, synthetic

BATCH, K1, K2 = 4, 5, 8


def as_arrays(state):
  """The state as NumPy arrays, a typed PRNG key as its raw data: comparable bit for bit."""
  rng = state.rng
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return jax.tree.map(np.asarray, state._replace(rng=rng))


def assert_bit_identical(a, b):
  a, b = as_arrays(a), as_arrays(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def lm_run():
  """A language model with dropout (so the rng matters), window TBPTT(5, 8), clipping, Adam."""
  model = lm.language_model(lm.LMConfig(vocab_size=17, hidden=6, layers=2, dropout=0.3))
  trainer = tbptt_jax.tbptt_trainer(
    model, lm.cross_entropy, optax.adam(1e-2), k1=K1, k2=K2, max_grad_norm=1.0, step_rngs=True
  )
  tokens = np.random.default_rng(0).integers(0, 17, (BATCH, 41))
  return trainer, tokens[:, :-1], tokens[:, 1:], jax.random.key(0)


def r2rt_run():
  """The synthetic task's model, per-loss TBPTT(5, 8), SGD with momentum, a raw uint32 key."""
  trainer = tbptt_jax.tbptt_trainer(
    synthetic.model(tbptt_jax.elman(6)),
    optax.softmax_cross_entropy_with_integer_labels,
    optax.sgd(0.1, momentum=0.9),
    k1=K1,
    k2=K2,
    style="per_loss",
  )
  x, y = synthetic.streams(0, BATCH, 40)
  return trainer, x, y, jax.random.PRNGKey(1)


@pytest.mark.parametrize("make_run", [lm_run, r2rt_run], ids=["lm_dropout", "r2rt"])
def test_a_resumed_run_is_bit_identical_to_one_that_did_not_stop(make_run, tmp_path):
  trainer, x, y, key = make_run()
  half = x.shape[1] // 2
  calls = [(x[:, :half], y[:, :half]), (x[:, half:], y[:, half:])]

  state = trainer.init(key, x[:, :K1])
  losses = []
  for inputs, targets in calls:
    state, metrics = trainer.update(state, inputs, targets)
    losses.append(np.asarray(metrics.loss))

  stopped = trainer.init(key, x[:, :K1])
  stopped, first = trainer.update(stopped, *calls[0])
  path = checkpoint.save_checkpoint(tmp_path, stopped, {"call": 1})
  del stopped  # the resumed run starts from the file alone
  like = jax.eval_shape(trainer.init, key, x[:, :K1])
  restored = checkpoint.load_checkpoint(path, like)
  assert restored.meta == {"call": 1} and restored.path == path
  resumed, second = trainer.update(restored.state, *calls[1])

  assert_bit_identical(resumed, state)
  assert np.array_equal(np.concatenate([first.loss, second.loss]), np.concatenate(losses))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A small run's state and a folder of its checkpoints at steps 1..4, keep=2, and a best."""
  trainer, x, y, key = r2rt_run()
  folder = tmp_path_factory.mktemp("checkpoints")
  state = trainer.init(key, x[:, :K1])
  for i in range(4):
    state, _ = trainer.update(state, x[:, i * K1 : (i + 1) * K1], y[:, i * K1 : (i + 1) * K1])
    checkpoint.save_checkpoint(folder, state, {"i": i}, keep=2)
    if i == 0:
      checkpoint.save_checkpoint(folder, state, {"i": i}, name="best")
  return trainer, state, folder, jax.eval_shape(trainer.init, key, x[:, :K1])


def test_only_the_last_checkpoints_and_the_best_are_kept(saved):
  _, state, folder, like = saved
  assert sorted(os.listdir(folder)) == ["best.ckpt", "step_0000000003.ckpt", "step_0000000004.ckpt"]
  latest = checkpoint.latest_checkpoint(folder)
  assert latest.endswith("step_0000000004.ckpt") and checkpoint.read_meta(latest) == {"i": 3}
  assert_bit_identical(checkpoint.load_checkpoint(latest, like).state, state)
  assert checkpoint.load_checkpoint(os.path.join(folder, "best.ckpt"), like).meta == {"i": 0}
  assert checkpoint.latest_checkpoint(folder / "missing") is None


def test_a_crash_mid_save_leaves_the_previous_checkpoint(saved, tmp_path):
  """What a crash during a save leaves, a partial temporary file, changes nothing."""
  _, state, folder, like = saved
  latest = checkpoint.latest_checkpoint(folder)
  partial = tmp_path / "step_0000000005.ckpt.tmp"
  for name in os.listdir(folder):
    (tmp_path / name).write_bytes((folder / name).read_bytes())
  partial.write_bytes((folder / os.path.basename(latest)).read_bytes()[:100])
  assert checkpoint.latest_checkpoint(tmp_path).endswith("step_0000000004.ckpt")
  assert_bit_identical(
    checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), like).state, state
  )


def test_damaged_foreign_and_mismatched_files_are_named(saved, tmp_path):
  _, state, folder, like = saved
  good = (folder / "step_0000000004.ckpt").read_bytes()
  header = msgpack.unpackb(good)
  cases = {
    "truncated.ckpt": (good[: len(good) // 2], "not a tbptt_jax checkpoint"),
    "flipped.ckpt": (good[:-10] + bytes([good[-10] ^ 1]) + good[-9:], "corrupt"),
    "foreign.ckpt": (msgpack.packb({"format": "something else"}), "not a tbptt_jax checkpoint"),
    "text.ckpt": (b'{"params": 1}', "not a tbptt_jax checkpoint"),
    "future.ckpt": (msgpack.packb({**header, "version": 99}), "version 99"),
  }
  for name, (data, message) in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=rf"load_checkpoint: '.*{name}'.* {message}"):
      checkpoint.load_checkpoint(tmp_path / name, like)
  with pytest.raises(ValueError, match="cannot read checkpoint .*missing.ckpt"):
    checkpoint.load_checkpoint(tmp_path / "missing.ckpt", like)

  # Another configuration: a wider state, or another optimizer.
  other = tbptt_jax.tbptt_trainer(
    synthetic.model(tbptt_jax.elman(7)),
    optax.softmax_cross_entropy_with_integer_labels,
    optax.sgd(0.1, momentum=0.9),
    k1=K1,
    k2=K2,
  )
  wider = jax.eval_shape(other.init, jax.random.PRNGKey(1), np.zeros((BATCH, K1), np.int32))
  with pytest.raises(ValueError, match="another configuration.*7"):
    checkpoint.load_checkpoint(folder / "step_0000000004.ckpt", wider)
  adam = like._replace(opt_state=optax.adam(0.1).init(like.params))
  with pytest.raises(ValueError, match="another configuration"):
    checkpoint.load_checkpoint(folder / "step_0000000004.ckpt", adam)
  typed = like._replace(rng=jax.eval_shape(jax.random.key, 0))
  with pytest.raises(ValueError, match="raw PRNG key"):
    checkpoint.load_checkpoint(folder / "step_0000000004.ckpt", typed)


def test_bad_arguments_are_named(saved, tmp_path):
  _, state, _, _ = saved
  with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
    checkpoint.save_checkpoint(tmp_path, state, keep=0)
  with pytest.raises(ValueError, match="name must be a plain file name"):
    checkpoint.save_checkpoint(tmp_path, state, name="../up")
  with pytest.raises(ValueError, match="meta must be JSON-able"):
    checkpoint.save_checkpoint(tmp_path, state, {"array": jnp.ones(2)})
  assert os.listdir(tmp_path) == []
