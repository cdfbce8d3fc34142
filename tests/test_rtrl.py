"""Tests of RTRL: the online gradient through every past step equals full BPTT's, exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import tbptt_jax
from tbptt_jax import synthetic

BATCH, TIME, K1 = 2, 8, 2
loss_fn = optax.softmax_cross_entropy_with_integer_labels

CELLS = {
  "elman": lambda: tbptt_jax.elman(3, param_dtype=jnp.float64),
  "lstm": lambda: tbptt_jax.flax_cell(nn.LSTMCell(3, param_dtype=jnp.float64)),
  "gru": lambda: tbptt_jax.flax_cell(nn.GRUCell(3, param_dtype=jnp.float64)),
  "lru": lambda: tbptt_jax.lru(3, r_min=0.5, r_max=0.99, param_dtype=jnp.float64),
}


def r2rt_model(cell):
  """One-hot input (hoisted into the stack's embed), the cell, a readout (its head)."""
  return tbptt_jax.stack(
    tbptt_jax.feedforward(lambda x: jax.nn.one_hot(x, 2, dtype=jnp.float64)),
    cell,
    tbptt_jax.feedforward(nn.Dense(2, param_dtype=jnp.float64)),
  )


def gradients(model, k2, params, xs, ys, resets):
  """Per-update per-loss TBPTT(K1, k2) gradients and the carry after the call, jitted."""
  truncation = tbptt_jax.Truncation(K1, k2, "per_loss")
  run = functools.partial(tbptt_jax.cell_gradients, model, loss_fn, truncation)
  return jax.jit(run)(params, model.initial_carry(xs[:, 0]), xs, ys, resets=resets)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_rtrl_gradients_are_full_bptts_of_the_same_losses_float64(name):
  """Each update's RTRL gradient (k2 = 1 on the carried sensitivity) equals per-loss TBPTT with
  k2 = T, each loss through every past step, to 1e-10, with a reset in one stream (the other
  runs through). Truncating the same losses at k2 = 1 without the sensitivity gives another
  gradient."""
  with jax.enable_x64(True):
    model = r2rt_model(CELLS[name]())
    xs, ys = synthetic.streams(1, BATCH, TIME)
    params = model.init(jax.random.key(0), xs[:, 0])
    resets = np.zeros((BATCH, TIME), bool)
    resets[1, 5] = True
    got, carry = gradients(tbptt_jax.rtrl_cell(model), 1, params, xs, ys, resets)
    want, want_carry = gradients(model, TIME, params, xs, ys, resets)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    for a, b in zip(jax.tree.leaves(carry.state), jax.tree.leaves(want_carry), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    truncated, _ = gradients(model, 1, params, xs, ys, resets)
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(truncated), strict=True)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs) > 1e-3


def test_rtrl_learns_a_dependency_no_window_of_its_length_reaches(tmp_path):
  """With k2 = 1, no truncated gradient reaches X(t-3) (k = 3 and shorter learn neither
  dependency); RTRL's gradient does, and the network learns it. Its state, sensitivities
  included, goes through a checkpoint and resumes bit-identically."""
  trainer = tbptt_jax.tbptt_trainer(
    synthetic.model(tbptt_jax.elman(8)), loss_fn, optax.adam(1e-2), k1=5, gradient="rtrl"
  )
  xs, ys = synthetic.streams(0, 32, 3000)
  state = trainer.init(jax.random.key(0), xs[:, :5])
  state, first = trainer.update(state, xs[:, :1500], ys[:, :1500])
  path = tbptt_jax.checkpoint.save_checkpoint(tmp_path, state)
  restored = tbptt_jax.checkpoint.load_checkpoint(path, state).state
  state, metrics = trainer.update(state, xs[:, 1500:], ys[:, 1500:])
  restored, _ = trainer.update(restored, xs[:, 1500:], ys[:, 1500:])
  resumed, went_on = (jax.tree.leaves((s.params, s.opt_state, s.carry)) for s in (restored, state))
  for a, b in zip(resumed, went_on, strict=True):
    np.testing.assert_array_equal(a, b)
  final = float(np.mean(metrics.loss[-60:]))
  assert final < synthetic.reference_losses().lag3 + 0.02, final
  assert isinstance(state.carry, tbptt_jax.RTRLCarry)


def test_rtrl_cell_refuses_what_is_not_a_cell():
  with pytest.raises(ValueError, match="rtrl_cell: cell must be a tbptt_jax.Cell, got function"):
    tbptt_jax.rtrl_cell(lambda p, c, x: (c, x))


def online_model(*layers):
  """`r2rt_model` with the given layers between the one-hot input and the readout."""
  return tbptt_jax.stack(
    tbptt_jax.feedforward(lambda x: jax.nn.one_hot(x, 2, dtype=jnp.float64)),
    *layers,
    tbptt_jax.feedforward(nn.Dense(2, param_dtype=jnp.float64)),
  )


def lru_float64(online):
  return (tbptt_jax.online_lru if online else tbptt_jax.lru)(
    3, r_min=0.5, r_max=0.99, param_dtype=jnp.float64
  )


def test_online_lru_gradients_are_full_bptts_for_one_recurrent_layer_float64():
  """Zucchet et al.'s diagonal sensitivities: with one LRU layer, every parameter's gradient (the
  LRU's and the readout's) is full BPTT's of the same losses, to 1e-10, with a reset. Below an
  input projection, the LRU's and the readout's stay exact; the projection's gets the present
  step's path only, and differs (the approximation the docstring states)."""
  with jax.enable_x64(True):
    xs, ys = synthetic.streams(1, BATCH, TIME)
    resets = np.zeros((BATCH, TIME), bool)
    resets[1, 5] = True
    online, full = online_model(lru_float64(True)), online_model(lru_float64(False))
    params = full.init(jax.random.key(0), xs[:, 0])
    got, carry = gradients(online, 1, params, xs, ys, resets)
    want, want_carry = gradients(full, TIME, params, xs, ys, resets)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    for a, b in zip(carry[1].state, want_carry[1], strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)

    projection = tbptt_jax.feedforward(nn.Dense(4, param_dtype=jnp.float64))
    online, full = (online_model(projection, lru_float64(o)) for o in (True, False))
    params = full.init(jax.random.key(0), xs[:, 0])
    got, _ = gradients(online, 1, params, xs, ys, resets)
    want, _ = gradients(full, TIME, params, xs, ys, resets)
    for layer in (2, 3):  # the LRU and the readout
      for a, b in zip(jax.tree.leaves(got[layer]), jax.tree.leaves(want[layer]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    pairs = zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs) > 1e-4


def test_rtrl_memory_is_flat_in_the_sequence_length():
  """XLA's temporary buffers for one trainer call of 32 and of 256 steps: RTRL's (k1 = 4, every
  loss through every past step) grow by no more than the call's own inputs and targets (a few
  copies of 8 bytes per stream and step); full BPTT's over the call grow with every step's
  intermediates."""
  model = synthetic.model(tbptt_jax.elman(16))

  def temp_bytes(time, **truncation):
    trainer = tbptt_jax.tbptt_trainer(model, loss_fn, optax.sgd(0.1), **truncation)
    xs, ys = synthetic.streams(0, 2, time)
    state = trainer.init(jax.random.key(0), xs)
    compiled = trainer.update.lower(state, xs, ys).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  rtrl = [temp_bytes(t, k1=4, gradient="rtrl") for t in (32, 256)]
  bptt = [temp_bytes(t, k1=t) for t in (32, 256)]
  per_step = lambda temps: (temps[1] - temps[0]) / (2 * (256 - 32))  # noqa: E731 (bytes per stream)
  print(f"temporary bytes: rtrl {rtrl}, bptt {bptt}")
  assert per_step(rtrl) <= 4 * 8, rtrl
  assert per_step(bptt) > 10 * max(per_step(rtrl), 8), bptt  # 360 bytes a stream-step here


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (
      dict(gradient="forward"),
      r"gradient must be one of \('bptt', 'rtrl', 'online'\), got 'forward'",
    ),
    (dict(gradient="rtrl", k2=3), r"gradient='rtrl' .* so k2 cannot be given with it, got k2=3"),
    (dict(gradient="online", style="per_loss"), "so style cannot be given with it"),
    (dict(gradient="rtrl", remat=2), "so remat cannot be given with it, got remat=2"),
    (
      dict(gradient="rtrl", artbp=tbptt_jax.ARTBP(0.1)),
      "so artbp cannot be given with it, got artbp=ARTBP",
    ),
  ],
)
def test_the_trainer_refuses_what_rtrl_cannot_honour(kwargs, message):
  model = synthetic.model(tbptt_jax.elman(4))
  with pytest.raises(ValueError, match="tbptt_trainer: .*" + message):
    tbptt_jax.tbptt_trainer(model, loss_fn, optax.sgd(0.1), k1=2, **kwargs)


def test_rtrl_refuses_a_sensitivity_above_its_memory_bound():
  """Elman 64 on r2rt: 64 x 4,418 parameters x 4 bytes x 8 streams = 9 MB, above a bound of
  1 MB; a one-line error with the size and how to raise it, before anything runs."""
  trainer = tbptt_jax.tbptt_trainer(
    tbptt_jax.rtrl_cell(synthetic.model(tbptt_jax.elman(64)), max_sensitivity_bytes=2**20),
    loss_fn,
    optax.sgd(0.1),
    k1=1,
    gradient="online",
  )
  xs, _ = synthetic.streams(0, 8, 4)
  message = (
    r"rtrl_cell: the sensitivity would take 9,048,064 bytes .* "
    r"max_sensitivity_bytes=1,048,576: raise it"
  )
  with pytest.raises(ValueError, match=message):
    trainer.init(jax.random.key(0), xs)
