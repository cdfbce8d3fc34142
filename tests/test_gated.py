"""Tests of `tbptt_jax.gated`: the LSTM and GRU window scans with a cuDNN-style backward pass.

Each must be the same function as `jax.lax.scan` of the Flax cell's own step, values and
gradients, at float64 to 1e-12; a scan whose backward pass is wrong, even slightly, fails
the same check (`test_a_wrong_backward_pass_fails_the_equivalence_check`).
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scan_checks import scan_of_apply, scan_summary

import tbptt_jax
from tbptt_jax import gated

_GATED = {"lstm": nn.LSTMCell, "optimized_lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


def _float64_window(cell, rng, time=5, batch=2, in_features=3):
  """Inputs, parameters away from their initialisation (biases too) and a nonzero carry."""
  xs = jnp.asarray(rng.standard_normal((time, batch, in_features)))
  params = cell.init(jax.random.key(0), xs[0])
  params = jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape), params)
  carry = jax.tree.map(lambda c: c + rng.standard_normal(c.shape), cell.initial_carry(xs[0]))
  return params, carry, xs


def _assert_same_as_scan_of_apply(cell, scan, params, carry, xs, unroll):
  got = scan_summary(lambda p, c, x: scan(p, c, x, unroll), params, carry, xs)
  want = scan_summary(lambda p, c, x: scan_of_apply(cell, p, c, x, unroll), params, carry, xs)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_GATED))
@pytest.mark.parametrize("unroll", [1, True])
def test_the_gated_scans_are_the_scan_of_the_flax_step(name, unroll):
  """Values, and gradients with respect to the Flax parameter tree, the initial carry and
  the inputs, of the final carry, the outputs and every carry: rolled and unrolled."""
  cell = tbptt_jax.flax_cell(_GATED[name](4, param_dtype=jnp.float64))
  assert cell.scan is not None
  with jax.enable_x64(True):
    params, carry, xs = _float64_window(cell, np.random.default_rng(0))
    _assert_same_as_scan_of_apply(cell, cell.scan, params, carry, xs, unroll)


def test_gated_scans_in_a_stack_with_an_embed_and_a_head_train_as_their_steps_do():
  """A model of an embed, an LSTM, a stateless layer, a GRU and a readout head: its scan, and
  the engine's gradients (window style, k1 < k2), equal those of the same model without
  any layer's own scan."""
  f64 = functools.partial(nn.Dense, param_dtype=jnp.float64)
  model = tbptt_jax.with_head(
    tbptt_jax.with_embed(
      f64(3),
      tbptt_jax.stack(
        tbptt_jax.flax_cell(nn.OptimizedLSTMCell(4, param_dtype=jnp.float64)),
        tbptt_jax.feedforward(jnp.tanh),
        tbptt_jax.flax_cell(nn.GRUCell(3, param_dtype=jnp.float64)),
      ),
    ),
    f64(2),
  )
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    params, carry, xs = _float64_window(model, rng, time=6)
    embedded = tbptt_jax.cells.map_steps(model.embed, params, xs)
    _assert_same_as_scan_of_apply(model, model.scan, params, carry, embedded, 1)
    inputs, targets = jnp.swapaxes(xs, 0, 1), jnp.asarray(rng.integers(0, 2, (2, 6)))
    loss_fn = optax.softmax_cross_entropy_with_integer_labels
    truncation = tbptt_jax.Truncation(k1=2, k2=3)
    run = functools.partial(
      tbptt_jax.cell_gradients, loss_fn=loss_fn, truncation=truncation, params=params,
      carry=carry, inputs=inputs, targets=targets,
    )  # fmt: skip
    got, want = run(model), run(_without_scans(model))
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)


def _without_scans(model):
  """The same model, every layer scanned as `jax.lax.scan` of its step."""
  return model._replace(scan=None)


def test_a_wrong_backward_pass_fails_the_equivalence_check():
  """The check above has the power to fail: the LSTM's scan with the gradient through its
  stacked carries dropped, or its recurrent weight gradient off by one part in 1e9, and
  the GRU's with its b_hn gradient summed over the wrong gate, are all caught."""
  with jax.enable_x64(True):
    for name, backward in [
      ("lstm", _lstm_without_carries_gradient),
      ("lstm", _lstm_with_recurrent_gradient_off),
      ("gru", _gru_with_bias_gradient_of_the_wrong_gate),
    ]:
      cell = tbptt_jax.flax_cell(_GATED[name](4, param_dtype=jnp.float64))
      params, carry, xs = _float64_window(cell, np.random.default_rng(2))
      broken = _broken_scan(name, backward)
      with pytest.raises(AssertionError):
        _assert_same_as_scan_of_apply(cell, broken, params, carry, xs, 1)


def _broken_scan(name, backward):
  """`gated`'s scan of `name` with the backward pass `backward`, its forward pass as is."""
  if name == "lstm":
    window = jax.custom_vjp(gated._lstm_window.fun, nondiff_argnums=(0,))
    window.defvjp(gated._lstm_window_forward, backward)

    def scan(variables, carry, xs, unroll):
      c_T, h_T, cs, hs = window(unroll, gated.lstm_weights(variables), *carry, xs)
      return (c_T, h_T), hs, (cs, hs)

    return scan
  window = jax.custom_vjp(gated._gru_window.fun, nondiff_argnums=(0,))
  window.defvjp(gated._gru_window_forward, backward)

  def scan(variables, carry, xs, unroll):
    h_T, hs = window(unroll, gated.gru_weights(variables), carry, xs)
    return h_T, hs, hs

  return scan


def _lstm_without_carries_gradient(unroll, residuals, cotangents):
  dc_T, dh_T, dcs, dhs = cotangents
  return gated._lstm_window_backward(unroll, residuals, (dc_T, dh_T, jnp.zeros_like(dcs), dhs))


def _lstm_with_recurrent_gradient_off(unroll, residuals, cotangents):
  grads, *rest = gated._lstm_window_backward(unroll, residuals, cotangents)
  return (grads._replace(recurrent=grads.recurrent * (1 + 1e-9)), *rest)


def _gru_with_bias_gradient_of_the_wrong_gate(unroll, residuals, cotangents):
  grads, *rest = gated._gru_window_backward(unroll, residuals, cotangents)
  hidden = grads.recurrent_bias.shape[-1]
  return (grads._replace(recurrent_bias=grads.input_bias[2 * hidden :]), *rest)


def test_only_the_cells_as_flax_defines_them_get_a_gated_scan():
  """A subclass, other gate functions or a dtype override keep `jax.lax.scan` of the step;
  a window whose arrays mix dtypes falls back to it, promoting as Flax does."""

  class Peephole(nn.LSTMCell):
    pass

  assert gated.flax_scan(Peephole(3)) is None
  assert gated.flax_scan(nn.LSTMCell(3, gate_fn=jax.nn.hard_sigmoid)) is None
  assert gated.flax_scan(nn.GRUCell(3, activation_fn=jax.nn.relu)) is None
  assert gated.flax_scan(nn.OptimizedLSTMCell(3, dtype=jnp.bfloat16)) is None
  assert gated.flax_scan(nn.SimpleCell(3)) is None
  cell = tbptt_jax.flax_cell(nn.LSTMCell(4))  # float32 parameters
  with jax.enable_x64(True):
    params, carry, xs = _float64_window(cell, np.random.default_rng(3))
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    got = cell.scan(params, carry, xs, 1)
    want = scan_of_apply(cell, params, carry, xs, 1)
  chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_a_window_of_the_wrong_shape_is_refused_by_name(name):
  cell = tbptt_jax.flax_cell(_GATED[name](4))
  xs = jnp.ones((5, 2, 3))
  params, carry = cell.init(jax.random.key(0), xs[0]), cell.initial_carry(xs[0])
  where = f"{name}_scan"
  with pytest.raises(
    ValueError,
    match=rf"{where}: xs must have shape \[time, batch, in_features=3\], got \[5, 2, 7\]",
  ):
    cell.scan(params, carry, jnp.ones((5, 2, 7)), 1)
  short = jax.tree.map(lambda c: c[:1], carry)
  with pytest.raises(
    ValueError,
    match=rf"{where}: each state in carry must have shape \[batch, hidden\] = \[2, 4\], "
    r"got \[1, 4\]",
  ):
    cell.scan(params, short, xs, 1)
