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


def test_rtrl_learns_a_dependency_no_window_of_its_length_reaches():
  """With k2 = 1, no truncated gradient reaches X(t-3) (k = 3 and shorter learn neither
  dependency); RTRL's gradient does, and the network learns it."""
  trainer = tbptt_jax.tbptt_trainer(
    tbptt_jax.rtrl_cell(synthetic.model(tbptt_jax.elman(8))),
    loss_fn,
    optax.adam(1e-2),
    k1=5,
    k2=1,
    style="per_loss",
  )
  xs, ys = synthetic.streams(0, 32, 3000)
  state = trainer.init(jax.random.key(0), xs[:, :5])
  state, metrics = trainer.update(state, xs, ys)
  final = float(np.mean(metrics.loss[-60:]))
  assert final < synthetic.reference_losses().lag3 + 0.02, final
  assert isinstance(state.carry, tbptt_jax.RTRLCarry)


def test_rtrl_cell_refuses_what_is_not_a_cell():
  with pytest.raises(ValueError, match="rtrl_cell: cell must be a tbptt_jax.Cell, got function"):
    tbptt_jax.rtrl_cell(lambda p, c, x: (c, x))
