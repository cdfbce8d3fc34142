"""Tests of `tbptt_jax.checkpoint`: exact continuation, atomic writes, pruning, damaged files."""

import json
import os
import shutil

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
    if i in (0, 1):  # the second best replaces the first
      checkpoint.save_checkpoint(folder, state, {"i": i}, name="best")
  return trainer, state, folder, jax.eval_shape(trainer.init, key, x[:, :K1])


def test_only_the_last_checkpoints_and_the_best_are_kept(saved):
  _, state, folder, like = saved
  assert sorted(os.listdir(folder)) == [
    "best-0000000002.ckpt",
    "best.ckpt",
    "step_0000000003.ckpt",
    "step_0000000004.ckpt",
  ]
  assert os.readlink(folder / "best.ckpt") == "best-0000000002.ckpt"
  latest = checkpoint.latest_checkpoint(folder)
  assert latest.endswith("step_0000000004.ckpt") and checkpoint.read_meta(latest) == {"i": 3}
  assert_bit_identical(checkpoint.load_checkpoint(latest, like).state, state)
  assert checkpoint.load_checkpoint(os.path.join(folder, "best.ckpt"), like).meta == {"i": 1}
  assert checkpoint.latest_checkpoint(folder / "missing") is None


def test_a_checkpoint_is_read_by_orbax_alone(saved):
  """Any JAX code base restores it with orbax-checkpoint, without tbptt_jax's loader."""
  import orbax.checkpoint as ocp

  _, state, folder, like = saved
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(folder / "step_0000000004.ckpt", args=args)
  assert restored.meta == {"i": 3}
  assert_bit_identical(tbptt_jax.TrainState(*restored.state), state)


def test_a_crash_mid_save_leaves_the_previous_checkpoint(saved, tmp_path):
  """What a crash during a save leaves, a partial staging folder, changes nothing."""
  _, state, folder, like = saved
  shutil.copytree(folder, tmp_path, symlinks=True, dirs_exist_ok=True)
  partial = tmp_path / "step_0000000005.ckpt.tmp"
  shutil.copytree(folder / "step_0000000004.ckpt" / "state", partial / "state")
  assert checkpoint.latest_checkpoint(tmp_path).endswith("step_0000000004.ckpt")
  assert_bit_identical(
    checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), like).state, state
  )
  with pytest.raises(ValueError, match="step_0000000005.ckpt.tmp'.* not a tbptt_jax checkpoint"):
    checkpoint.load_checkpoint(partial, like)


def _damage(folder, how):
  """Damages one array file of a checkpoint folder: truncates it or flips one of its bits."""
  data = max(
    (os.path.join(root, name) for root, _, names in os.walk(folder / "state") for name in names),
    key=os.path.getsize,
  )
  raw = open(data, "rb").read()
  raw = raw[: len(raw) // 2] if how == "truncate" else raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:]
  open(data, "wb").write(raw)


def test_damaged_foreign_and_mismatched_checkpoints_are_named(saved, tmp_path):
  _, state, folder, like = saved
  good = folder / "step_0000000004.ckpt"
  for name in ("truncated", "flipped", "no_manifest", "future"):
    shutil.copytree(good, tmp_path / f"{name}.ckpt")
  _damage(tmp_path / "truncated.ckpt", "truncate")
  _damage(tmp_path / "flipped.ckpt", "flip")
  os.remove(tmp_path / "no_manifest.ckpt" / checkpoint.MANIFEST)
  manifest = json.loads((good / checkpoint.MANIFEST).read_text())
  (tmp_path / "future.ckpt" / checkpoint.MANIFEST).write_text(
    json.dumps({**manifest, "version": 99})
  )
  (tmp_path / "text.ckpt").write_bytes(b'{"params": 1}')
  old = {"format": checkpoint.FORMAT, "version": 2, "payload": b""}
  (tmp_path / "old.ckpt").write_bytes(msgpack.packb(old))
  cases = {
    "truncated.ckpt": "corrupt",
    "flipped.ckpt": "corrupt",
    "no_manifest.ckpt": "not a tbptt_jax checkpoint",
    "future.ckpt": "version 99",
    "text.ckpt": "not a tbptt_jax checkpoint folder",
    "old.ckpt": "not a tbptt_jax checkpoint folder .*before orbax",
  }
  for name, message in cases.items():
    with pytest.raises(ValueError, match=rf"load_checkpoint: '.*{name}'.* {message}"):
      checkpoint.load_checkpoint(tmp_path / name, like)
  with pytest.raises(ValueError, match="read_meta: .*flipped.ckpt.* corrupt"):
    checkpoint.read_meta(tmp_path / "flipped.ckpt")
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
    checkpoint.load_checkpoint(good, wider)
  adam = like._replace(opt_state=optax.adam(0.1).init(like.params))
  with pytest.raises(ValueError, match="another configuration"):
    checkpoint.load_checkpoint(good, adam)
  typed = like._replace(rng=jax.eval_shape(jax.random.key, 0))
  with pytest.raises(ValueError, match="raw PRNG key"):
    checkpoint.load_checkpoint(good, typed)


def test_bad_arguments_are_named(saved, tmp_path):
  _, state, _, _ = saved
  with pytest.raises(ValueError, match="keep must be an integer >= 1, got 0"):
    checkpoint.save_checkpoint(tmp_path, state, keep=0)
  with pytest.raises(ValueError, match="name must be a plain file name"):
    checkpoint.save_checkpoint(tmp_path, state, name="../up")
  with pytest.raises(ValueError, match="meta must be JSON-able"):
    checkpoint.save_checkpoint(tmp_path, state, {"array": jnp.ones(2)})
  with pytest.raises(ValueError, match="state must be the tbptt_jax.TrainState of a run"):
    checkpoint.save_checkpoint(tmp_path, state.params)
  assert os.listdir(tmp_path) == []
