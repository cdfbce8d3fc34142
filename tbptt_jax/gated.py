r"""The LSTM and the GRU over a window, with a cuDNN-style backward pass: their `Cell.scan`.

Differentiating `jax.lax.scan` of a Flax cell's step gives the right gradient
the slow way: every step multiplies its input by the input weights inside the
loop, and the backward loop accumulates every weight gradient step by step,
`[batch, n]` rows at a time. cuDNN's recurrent layers (Appleyard, Kocisky &
Blunsom, "Optimizing Performance of Recurrent Neural Networks on GPUs",
arXiv:1604.01946, 2016) instead

* project the inputs of all T steps before the loop, one `[T batch, in] x
  [in, G H]` matrix product (G = 4 gates for the LSTM, 3 for the GRU), so the
  loop holds only the recurrent product and the gates' arithmetic;
* run the backward loop through the states alone, carrying the cotangents of
  the state and keeping each step's gate cotangents dz_t;
* compute the weight gradients of all steps after that loop, one matrix
  product each over the T batch rows:

      dW_input = X^T dZ,   dW_recurrent = H_prev^T dZ,   db = 1^T dZ,   dX = dZ W_input^T.

`lstm_scan` and `gru_scan` do this for Flax's `nn.LSTMCell` and
`nn.OptimizedLSTMCell` (one function, two gate layouts of the same parameter
tree) and `nn.GRUCell`, on the cell's own variables: they are the same function
as `jax.lax.scan` of the cell's `apply`, values and gradients (the tests hold
them to 1e-12 at float64). `cells.flax_cell` gives these cells such a scan
(`flax_scan`), which the engine then uses wherever it scans a window.

Notation, one row per stream: x_t the input, (c_t, h_t) the LSTM's carry, h_t
the GRU's, sigma the logistic function, * the elementwise product.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any


class LSTMWeights(NamedTuple):
  """The LSTM's weights with its four gates side by side, in the order i, f, g, o."""

  input: jax.Array  # shape=[in_features, 4 hidden], kernels of ii, if, ig, io
  recurrent: jax.Array  # shape=[hidden, 4 hidden], kernels of hi, hf, hg, ho
  bias: jax.Array  # shape=[4 hidden], biases of hi, hf, hg, ho (Flax's input Denses have none)


class GRUWeights(NamedTuple):
  """The GRU's weights with its three gates side by side, in the order r, z, n."""

  input: jax.Array  # shape=[in_features, 3 hidden], kernels of ir, iz, in
  input_bias: jax.Array  # shape=[3 hidden], biases of ir, iz, in
  recurrent: jax.Array  # shape=[hidden, 3 hidden], kernels of hr, hz, hn
  recurrent_bias: jax.Array  # shape=[hidden], the bias of hn (inside r * (h W_hn + b_hn))


_LSTM_GATES = ("i", "f", "g", "o")
_GRU_GATES = ("r", "z", "n")


def lstm_weights(variables: Params) -> LSTMWeights:
  """The fused weights of a Flax LSTM's variables (`nn.LSTMCell` and `nn.OptimizedLSTMCell`)."""
  side_by_side = functools.partial(_side_by_side, variables["params"], _LSTM_GATES)
  return LSTMWeights(
    input=side_by_side("i", "kernel"),
    recurrent=side_by_side("h", "kernel"),
    bias=side_by_side("h", "bias"),
  )


def gru_weights(variables: Params) -> GRUWeights:
  """The fused weights of a Flax `nn.GRUCell`'s variables."""
  side_by_side = functools.partial(_side_by_side, variables["params"], _GRU_GATES)
  return GRUWeights(
    input=side_by_side("i", "kernel"),
    input_bias=side_by_side("i", "bias"),
    recurrent=side_by_side("h", "kernel"),
    recurrent_bias=variables["params"]["hn"]["bias"],
  )


def _side_by_side(params: Params, gates: tuple[str, ...], side: str, leaf: str) -> jax.Array:
  """Flax's per-gate Dense `leaf`s of one side (`"i"` input, `"h"` recurrent), concatenated in
  the order of `gates` along the features."""
  return jnp.concatenate([params[side + g][leaf] for g in gates], axis=-1)


def lstm_scan(variables: Params, carry: Any, xs: jax.Array, unroll: int | bool = 1):
  """A Flax LSTM over the leading time axis of `xs`: `Cell.scan`'s contract.

  Args:
    variables: the cell's variables, `{"params": {"ii": ..., "hi": ..., ...}}`.
    carry: `(c, h)`, each `[batch, hidden]`.
    xs: the inputs, `[time, batch, in_features]`.
    unroll: `jax.lax.scan`'s, for both loops.

  Returns:
    `((c_T, h_T), hs, (cs, hs))`: the final carry, the outputs h_t and the
    carries after every step, stacked on a leading time axis.
  """
  c_0, h_0 = carry
  w = lstm_weights(variables)
  _check_window("lstm_scan", w, (c_0, h_0), xs)
  c_T, h_T, cs, hs = _lstm_window(unroll, w, c_0, h_0, xs)
  return (c_T, h_T), hs, (cs, hs)


def gru_scan(variables: Params, carry: jax.Array, xs: jax.Array, unroll: int | bool = 1):
  """A Flax GRU over the leading time axis of `xs`: `Cell.scan`'s contract.

  Returns:
    `(h_T, hs, hs)`: the final carry, the outputs and the carries after every step.
  """
  w = gru_weights(variables)
  _check_window("gru_scan", w, (carry,), xs)
  h_T, hs = _gru_window(unroll, w, carry, xs)
  return h_T, hs, hs


def flax_scan(module: nn.Module):
  """The `Cell.scan` of a Flax cell when this module has one for it, else None.

  Only the cells exactly as Flax defines them qualify: `nn.LSTMCell`,
  `nn.OptimizedLSTMCell` or `nn.GRUCell` (not a subclass, which may change the
  step), with the default sigmoid gates, tanh activation and no `dtype`
  override. A window whose arrays do not all share one dtype falls back to
  `jax.lax.scan` of the cell's own `apply`, which promotes as Flax does.
  """
  if type(module) in (nn.LSTMCell, nn.OptimizedLSTMCell):
    fused = lstm_scan
  elif type(module) is nn.GRUCell:
    fused = gru_scan
  else:
    return None
  defaults = module.gate_fn is nn.sigmoid and module.activation_fn is nn.tanh
  if not defaults or module.dtype is not None:
    return None
  return functools.partial(_scan_or_loop, fused, module.apply)


def _scan_or_loop(fused, apply, variables: Params, carry: Any, xs: jax.Array, unroll=1):
  dtypes = {jnp.result_type(a) for a in jax.tree.leaves((variables, carry, xs))}
  if len(dtypes) == 1 and jnp.issubdtype(dtypes.pop(), jnp.floating):
    return fused(variables, carry, xs, unroll)

  def step(c, x_t):
    c, y_t = apply(variables, c, x_t)
    return c, (y_t, c)

  carry, (ys, carries) = jax.lax.scan(step, carry, xs, unroll=unroll)
  return carry, ys, carries


def _check_window(where: str, w: LSTMWeights | GRUWeights, states: tuple, xs: jax.Array) -> None:
  """Shapes checked when traced (free under jit): a wrong one would otherwise surface as a
  bare dot_general error from inside the loop."""
  in_features, hidden = w.input.shape[0], w.recurrent.shape[0]
  if jnp.ndim(xs) < 3 or jnp.shape(xs)[-1] != in_features:
    raise ValueError(
      f"{where}: xs must have shape [time, batch, in_features={in_features}], "
      f"got {list(jnp.shape(xs))}"
    )
  want = [*jnp.shape(xs)[1:-1], hidden]
  for state in states:
    if list(jnp.shape(state)) != want:
      raise ValueError(
        f"{where}: each state in carry must have shape [batch, hidden] = {want}, "
        f"got {list(jnp.shape(state))}"
      )


def _rows(a: jax.Array) -> jax.Array:
  """`[T, batch..., n]` -> `[T * batch, n]`: the steps of a window as one batch."""
  return a.reshape(-1, a.shape[-1])


def _column_sum(rows: jax.Array) -> jax.Array:
  # A product rather than a sum over rows: XLA splits a reduction over the steps of an
  # unrolled loop into one reduction per step.
  return (jnp.ones((1, rows.shape[0]), rows.dtype) @ rows)[0]


def _previous(first: jax.Array, stacked: jax.Array) -> jax.Array:
  """The value entering every step: `first`, then `stacked` without its last step."""
  return jnp.concatenate([first[None], stacked[:-1]])


# ---------------------------------------------------------------------------- LSTM


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm_window(unroll, w: LSTMWeights, c_0, h_0, xs):
  c_T, h_T, _, cs, hs = _lstm_forward(unroll, w, c_0, h_0, xs)
  return c_T, h_T, cs, hs


def _lstm_forward(unroll, w: LSTMWeights, c_0, h_0, xs):
  r"""The LSTM's states and activated gates (Hochreiter & Schmidhuber 1997; Flax's form):

  z_t = x_t W_in + b + h_{t-1} W_rec = [z^i, z^f, z^g, z^o],
  i, f, o = sigma(z^i), sigma(z^f), sigma(z^o),   g = tanh(z^g),
  c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t).
  """
  projected = xs @ w.input + w.bias  # every step's input projection, one product

  def step(carry, p_t):
    c_tm1, h_tm1 = carry
    z_i, z_f, z_g, z_o = jnp.split(p_t + h_tm1 @ w.recurrent, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_g), jax.nn.sigmoid(z_o)
    c_t = f * c_tm1 + i * g
    h_t = o * jnp.tanh(c_t)
    return (c_t, h_t), (jnp.concatenate([i, f, g, o], axis=-1), c_t, h_t)

  (c_T, h_T), (gates, cs, hs) = jax.lax.scan(step, (c_0, h_0), projected, unroll=unroll)
  return c_T, h_T, gates, cs, hs


def _lstm_window_forward(unroll, w, c_0, h_0, xs):
  c_T, h_T, gates, cs, hs = _lstm_forward(unroll, w, c_0, h_0, xs)
  return (c_T, h_T, cs, hs), (w, c_0, h_0, xs, gates, cs, hs)


def _lstm_window_backward(unroll, residuals, cotangents):
  r"""Back through the states, then the weights. With dh_t, dc_t the cotangents h_t and
  c_t receive from the outputs, the carries and step t + 1:

      dc = dc_t + dh_t * o * (1 - tanh(c_t)^2),
      dz_t = [dc * g * i (1 - i),  dc * c_{t-1} * f (1 - f),  dc * i * (1 - g^2),
              dh_t * tanh(c_t) * o (1 - o)],
      dc_{t-1} += dc * f,   dh_{t-1} += dz_t W_rec^T.
  """
  w, c_0, h_0, xs, gates, cs, hs = residuals
  dc_T, dh_T, dcs, dhs = cotangents

  def step(carry, step_in):
    dc_next, dh_next = carry  # what c_t and h_t receive from step t + 1 (or the final carry)
    gates_t, c_t, c_tm1, dc_out, dh_out = step_in
    i, f, g, o = jnp.split(gates_t, 4, axis=-1)
    dh = dh_next + dh_out
    tanh_c = jnp.tanh(c_t)
    dc = dc_next + dc_out + dh * o * (1 - tanh_c * tanh_c)
    dz = jnp.concatenate(
      [dc * g * i * (1 - i), dc * c_tm1 * f * (1 - f), dc * i * (1 - g * g),
       dh * tanh_c * o * (1 - o)],
      axis=-1,
    )  # fmt: skip
    return (dc * f, dz @ w.recurrent.T), dz

  steps = (gates, cs, _previous(c_0, cs), dcs, dhs)
  (dc_0, dh_0), dz = jax.lax.scan(step, (dc_T, dh_T), steps, reverse=True, unroll=unroll)
  dz_rows = _rows(dz)
  grads = LSTMWeights(
    input=_rows(xs).T @ dz_rows,
    recurrent=_rows(_previous(h_0, hs)).T @ dz_rows,
    bias=_column_sum(dz_rows),
  )
  return grads, dc_0, dh_0, dz @ w.input.T


_lstm_window.defvjp(_lstm_window_forward, _lstm_window_backward)


# ---------------------------------------------------------------------------- GRU


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gru_window(unroll, w: GRUWeights, h_0, xs):
  h_T, _, hs = _gru_forward(unroll, w, h_0, xs)
  return h_T, hs


def _gru_forward(unroll, w: GRUWeights, h_0, xs):
  r"""The GRU's states and gates (Cho et al. 2014; Flax's form, b_hn inside the reset):

  p_t = x_t W_in + b_in = [p^r, p^z, p^n],   q_t = h_{t-1} W_rec = [q^r, q^z, q^n],
  r = sigma(p^r + q^r),   z = sigma(p^z + q^z),   n = tanh(p^n + r * (q^n + b_hn)),
  h_t = (1 - z) * n + z * h_{t-1}.
  """
  projected = xs @ w.input + w.input_bias  # every step's input projection, one product

  def step(h_tm1, p_t):
    p_r, p_z, p_n = jnp.split(p_t, 3, axis=-1)
    q_r, q_z, q_n = jnp.split(h_tm1 @ w.recurrent, 3, axis=-1)
    q_n = q_n + w.recurrent_bias
    r, z = jax.nn.sigmoid(p_r + q_r), jax.nn.sigmoid(p_z + q_z)
    n = jnp.tanh(p_n + r * q_n)
    h_t = (1 - z) * n + z * h_tm1
    return h_t, (jnp.concatenate([r, z, n, q_n], axis=-1), h_t)

  h_T, (gates, hs) = jax.lax.scan(step, h_0, projected, unroll=unroll)
  return h_T, gates, hs


def _gru_window_forward(unroll, w, h_0, xs):
  h_T, gates, hs = _gru_forward(unroll, w, h_0, xs)
  return (h_T, hs), (w, h_0, xs, gates, hs)


def _gru_window_backward(unroll, residuals, cotangents):
  r"""Back through the states, then the weights. With dh_t what h_t receives from the
  outputs and step t + 1, and a^n = p^n + r * (q^n + b_hn):

      da^n = dh_t * (1 - z) * (1 - n^2),   da^r = da^n * (q^n + b_hn) * r (1 - r),
      da^z = dh_t * (h_{t-1} - n) * z (1 - z),
      dp_t = [da^r, da^z, da^n],   dq_t = [da^r, da^z, da^n * r],
      dh_{t-1} += dh_t * z + dq_t W_rec^T.
  """
  w, h_0, xs, gates, hs = residuals
  dh_T, dhs = cotangents

  def step(dh_next, step_in):
    gates_t, h_tm1, dh_out = step_in
    r, z, n, q_n = jnp.split(gates_t, 4, axis=-1)
    dh = dh_next + dh_out
    da_n = dh * (1 - z) * (1 - n * n)
    da_r = da_n * q_n * r * (1 - r)
    da_z = dh * (h_tm1 - n) * z * (1 - z)
    dq_n = da_n * r
    dq = jnp.concatenate([da_r, da_z, dq_n], axis=-1)
    return dh * z + dq @ w.recurrent.T, (jnp.concatenate([da_r, da_z, da_n], axis=-1), dq_n)

  h_prev = _previous(h_0, hs)
  dh_0, (dp, dq_n) = jax.lax.scan(step, dh_T, (gates, h_prev, dhs), reverse=True, unroll=unroll)
  dp_rows, dq_n_rows = _rows(dp), _rows(dq_n)
  # dq_t and dp_t share their r and z thirds.
  dq_rows = jnp.concatenate([dp_rows[:, : 2 * dq_n_rows.shape[-1]], dq_n_rows], axis=-1)
  grads = GRUWeights(
    input=_rows(xs).T @ dp_rows,
    input_bias=_column_sum(dp_rows),
    recurrent=_rows(h_prev).T @ dq_rows,
    recurrent_bias=_column_sum(dq_n_rows),
  )
  return grads, dh_0, dp @ w.input.T


_gru_window.defvjp(_gru_window_forward, _gru_window_backward)
