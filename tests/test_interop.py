"""Tests of `tbptt_jax.interop` and of the NNX, Equinox and Haiku layers of `_layers`.

Each adapter must give exactly the gradients of an independent implementation
of its cell (a Flax linen cell with the same weights, or the cell's equations
written out), train the r2rt task, keep nothing frozen, checkpoint bit for
bit and run on 4 devices as on one. The 4-device run needs JAX to start with
4 CPU devices, so it is this file run as a script in a subprocess.
"""

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tbptt_jax
from tbptt_jax import _layers, checkpoint, interop, synthetic

# Before this file imports equinox or haiku: what importing tbptt_jax brought in (read by the
# 4-device run, a fresh process).
_IMPORTED_WITH_TBPTT = sorted({"equinox", "haiku"} & set(sys.modules))


def _optional(name):
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


eqx = _optional("equinox")
hk = _optional("haiku")
needs = {
  "nnx": [],
  "equinox": [pytest.mark.skipif(eqx is None, reason="equinox is not installed")],
  "haiku": [pytest.mark.skipif(hk is None, reason="dm-haiku is not installed")],
}

ROOT = Path(__file__).resolve().parents[1]
BATCH, TIME, IN, HIDDEN = 2, 6, 3, 4
STYLES = (("window", 2, 4), ("per_loss", 2, 3))  # (style, k1, k2)


def case(library, *values):
  return pytest.param(library, *values, marks=needs[library], id=f"{library}-{values[0]}")


def _score(out_t, y_t):
  """A loss linear in the outputs: its gradient reaches every output unit."""
  return jnp.sum(out_t * y_t, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _both_styles(step_fn, params, carry, xs, ys):
  """TBPTT gradients in window and per-loss style, in one compiled call."""
  return [
    tbptt_jax.tbptt_gradients(step_fn, _score, params, carry, xs, ys, k1=k1, k2=k2, style=style)[0]
    for style, k1, k2 in STYLES
  ]


# --- Independent implementations, float64: Flax's linen cells with the same weights in their
# layout, and Haiku's GRU (a variant of its own) written out. Each adapter's weights are mapped
# into the reference's by a linear map, whose transpose (its VJP) maps the gradients back. ---

sigmoid = jax.nn.sigmoid
LINEN = {"lstm": nn.LSTMCell(HIDDEN, param_dtype=jnp.float64), "gru": nn.GRUCell(HIDDEN)}
LSTM_GATES, GRU_GATES = "ifgo", ("r", "z", "n")


def linen_lstm(params, carry, x):
  """Flax linen's LSTM: carry (c, h), gates i, f, g, o of products ii + hi (hi with bias)."""
  return LINEN["lstm"].apply(params, carry, x)


def linen_gru(params, carry, x):
  """Flax linen's GRU (Cho et al. 2014): n = tanh(in(x) + r * hn(h)), both with a bias."""
  return LINEN["gru"].apply(params, carry, x)


def haiku_gru(p, h, x):
  """Haiku's GRU: the reset gate before the product, z weighting the new state."""
  w_i, w_h, b = p["gru"]["w_i"], p["gru"]["w_h"], p["gru"]["b"]
  zr_x, a_x = jnp.split(x @ w_i, [2 * HIDDEN], axis=-1)
  z, r = jnp.split(sigmoid(zr_x + h @ w_h[:, : 2 * HIDDEN] + b[: 2 * HIDDEN]), 2, axis=-1)
  a = jnp.tanh(a_x + (r * h) @ w_h[:, 2 * HIDDEN :] + b[2 * HIDDEN :])
  h = (1 - z) * h + z * a
  return h, h


def linen_params(gates, input_kernels, hidden_kernels, biases, hidden_biases=None):
  """Linen's layout from per-gate `[in, h]` / `[h, h]` kernels and input-side biases."""
  out = {}
  for i, gate in enumerate(gates):
    out[f"i{gate}"] = {"kernel": input_kernels[i]}
    out[f"h{gate}"] = {"kernel": hidden_kernels[i]}
    if biases is not None:
      out[f"i{gate}"]["bias"] = biases[i]
  for gate, bias in (hidden_biases or {}).items():
    out[f"h{gate}"]["bias"] = bias
  return {"params": out}


def nnx_lstm_to_linen(p):
  return {"params": {("if" if k == "if_" else k): v for k, v in p.items()}}


def nnx_gru_to_linen(p):
  """NNX's fused (r, z, n) products split in three; linen's hn bias, which NNX lacks, zero."""
  i_kernels = jnp.split(p["dense_i"]["kernel"], 3, axis=-1)
  h_kernels = jnp.split(p["dense_h"]["kernel"], 3, axis=-1)
  biases = jnp.split(p["dense_i"]["bias"], 3)
  zero = jnp.zeros(HIDDEN, biases[0].dtype)
  return linen_params(GRU_GATES, i_kernels, h_kernels, biases, {"n": zero})


def row_blocks(a, gates):
  """The gates' blocks stacked in rows of an Equinox weight, each as a linen kernel."""
  return [w.T for w in jnp.split(a, len(gates))]


def equinox_lstm_to_linen(p):
  """Equinox stacks the gates (i, f, g, o) in rows of `[4h, in]` weights, with one bias."""
  biases = dict(zip(LSTM_GATES, jnp.split(p["bias"], 4), strict=True))
  kernels = (row_blocks(p["weight_ih"], LSTM_GATES), row_blocks(p["weight_hh"], LSTM_GATES))
  return linen_params(LSTM_GATES, *kernels, None, biases)


def equinox_gru_to_linen(p):
  """Equinox's GRU is linen's: gates (r, z, n) in rows, input biases, bias_n on hn."""
  kernels = (row_blocks(p["weight_ih"], GRU_GATES), row_blocks(p["weight_hh"], GRU_GATES))
  return linen_params(GRU_GATES, *kernels, jnp.split(p["bias"], 3), {"n": p["bias_n"]})


def haiku_lstm_to_linen(p):
  """Haiku: one product of [x, h] with `[in + h, 4h]`, gates (i, g, f, o), forget bias + 1."""
  w, b = p["lstm/linear"]["w"], p["lstm/linear"]["b"]
  order = "igfo"
  cols = dict(zip(order, jnp.split(w, 4, axis=-1), strict=True))
  biases = dict(zip(order, jnp.split(b, 4), strict=True))
  biases["f"] = biases["f"] + 1
  input_kernels = [cols[g][:IN] for g in LSTM_GATES]
  hidden_kernels = [cols[g][IN:] for g in LSTM_GATES]
  return linen_params(LSTM_GATES, input_kernels, hidden_kernels, None, biases)


def build(library, kind):
  """`(adapter's cell, reference step, params -> reference's, carry -> reference's)`, float64
  (call under `jax.enable_x64`)."""
  same, f64 = (lambda a: a), jnp.float64
  if library == "nnx":
    module = {"lstm": nnx.LSTMCell, "gru": nnx.GRUCell}[kind]
    cell = interop.nnx_cell(module(IN, HIDDEN, param_dtype=f64, rngs=nnx.Rngs(0)))
    to_linen = {"lstm": nnx_lstm_to_linen, "gru": nnx_gru_to_linen}[kind]
    return cell, {"lstm": linen_lstm, "gru": linen_gru}[kind], to_linen, same
  if library == "equinox":
    module = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}[kind]
    cell = interop.equinox_cell(module(IN, HIDDEN, dtype=f64, key=jax.random.key(0)))
    if kind == "lstm":  # Equinox's state is (h, c), linen's (c, h)
      return cell, linen_lstm, equinox_lstm_to_linen, lambda hc: hc[::-1]
    return cell, linen_gru, equinox_gru_to_linen, same
  if kind == "lstm":
    cell = interop.haiku_cell(lambda: hk.LSTM(HIDDEN))
    return cell, linen_lstm, haiku_lstm_to_linen, lambda state: (state.cell, state.hidden)
  return interop.haiku_cell(lambda: hk.GRU(HIDDEN)), haiku_gru, same, same


@pytest.mark.parametrize(
  "library,kind",
  [case(library, kind) for library in ("nnx", "equinox", "haiku") for kind in ("lstm", "gru")],
)
def test_gradients_equal_an_independent_implementation_float64(library, kind):
  """The same TBPTT gradients, window and per-loss style, as the reference with the same
  weights, from the same nonzero carry: batch axis, argument and return order, carry layout."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    xs = jnp.asarray(rng.standard_normal((BATCH, TIME, IN)))
    ys = jnp.asarray(rng.standard_normal((BATCH, TIME, HIDDEN)))
    cell, reference, to_reference, reference_carry = build(library, kind)
    params = jax.tree.map(
      lambda a: a + 0.1 * rng.standard_normal(a.shape), cell.init(jax.random.key(1), xs[:, 0])
    )
    carry = jax.tree.map(
      lambda a: a + 0.3 * rng.standard_normal(a.shape), cell.initial_carry(xs[:, 0])
    )
    assert all(a.dtype == np.float64 for a in jax.tree.leaves((params, carry)))
    got = _both_styles(cell.apply, params, carry, xs, ys)
    ref_params, back = jax.vjp(to_reference, params)
    want = _both_styles(reference, ref_params, reference_carry(carry), xs, ys)
    # One gradient per update, stacked on a leading axis.
    want = [jax.vmap(lambda g: back(g)[0])(grads) for grads in want]
  for style_got, style_want in zip(got, want, strict=True):
    chex.assert_trees_all_close(style_got, style_want, rtol=0, atol=1e-10)


# --- Training the r2rt task, one run per library, shared by the tests below. ---

R2RT_HIDDEN, R2RT_BATCH, R2RT_K, UPDATES, CHUNK = 16, 64, 10, 1500, 1000  # 100 updates a call


def r2rt_model(library):
  """Embedding, cell and readout all from `library`: every layer's weights must train."""
  h = R2RT_HIDDEN
  if library == "nnx":
    rngs = nnx.Rngs(0)
    return tbptt_jax.stack(
      tbptt_jax.feedforward(nnx.Embed(2, 4, rngs=rngs)),
      interop.nnx_cell(nnx.LSTMCell(4, h, rngs=rngs)),
      tbptt_jax.feedforward(nnx.Linear(h, 2, rngs=rngs)),
    )
  if library == "equinox":
    k_embed, k_cell, k_head = jax.random.split(jax.random.key(0), 3)
    cell = interop.equinox_cell(eqx.nn.LSTMCell(4, h, key=k_cell))
    return tbptt_jax.with_head(
      tbptt_jax.with_embed(eqx.nn.Embedding(2, 4, key=k_embed), cell),
      eqx.nn.Linear(h, 2, key=k_head),
    )
  embed = hk.transform(lambda x: hk.Embed(2, 4)(x))
  readout = hk.without_apply_rng(hk.transform(lambda y: hk.Linear(2)(y)))
  return tbptt_jax.with_head(
    tbptt_jax.with_embed(embed, interop.haiku_cell(lambda: hk.LSTM(h))), readout
  )


def r2rt_trainer(model):
  # The decay ends the run near the optimum, so the last losses are stable.
  schedule = optax.cosine_decay_schedule(0.03, UPDATES, alpha=0.1)
  return tbptt_jax.tbptt_trainer(
    model, optax.softmax_cross_entropy_with_integer_labels, optax.adam(schedule), k1=R2RT_K
  )


def _plain(tree):
  """Whether `tree` is nested dicts, tuples and lists of jax arrays only."""
  if isinstance(tree, dict | tuple | list):
    return all(_plain(v) for v in (tree.values() if isinstance(tree, dict) else tree))
  return isinstance(tree, jax.Array)


# One test per library, not one per property: a shared fixture would train again in each
# pytest-xdist worker that runs one of its tests.
@pytest.mark.parametrize(
  "library", [pytest.param(name, marks=needs[name]) for name in ("nnx", "equinox", "haiku")]
)
def test_trains_r2rt_every_weight_moves_and_a_checkpoint_resumes_exactly(library, tmp_path):
  trainer = r2rt_trainer(r2rt_model(library))
  steps = UPDATES * R2RT_K
  xs, ys = synthetic.streams(0, R2RT_BATCH, steps + CHUNK)
  state = trainer.init(jax.random.key(0), xs[:, :R2RT_K])
  first = jax.tree.map(np.array, state.params)  # update donates the state
  losses = []
  for start in range(0, steps, CHUNK):
    chunk = slice(start, start + CHUNK)
    state, metrics = trainer.update(state, xs[:, chunk], ys[:, chunk])
    losses.append(metrics.loss)
  # Both dependencies learned: the best loss is 0.4545 nats, 0.5192 knowing lag 3 alone.
  assert np.concatenate(losses)[-UPDATES // 10 :].mean() <= 0.47

  # Embedding, cell and readout weights all move, as plain arrays: none is silently frozen.
  assert _plain(state.params), jax.tree.map(type, state.params)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, first)
  assert all(jax.tree.leaves(moved)) and len(jax.tree.leaves(moved)) >= 5, moved

  # A checkpoint restores bit for bit, and the next update is the uninterrupted run's.
  path = checkpoint.save_checkpoint(tmp_path, state)
  like = jax.eval_shape(trainer.init, jax.random.key(0), xs[:, :R2RT_K])
  loaded = checkpoint.load_checkpoint(path, like).state
  chex.assert_trees_all_equal(loaded.params, state.params)
  chex.assert_trees_all_equal((loaded.opt_state, loaded.carry), (state.opt_state, state.carry))
  x, y = xs[:, steps:], ys[:, steps:]
  resumed, resumed_metrics = trainer.update(loaded, x, y)
  went_on, metrics = trainer.update(state, x, y)
  chex.assert_trees_all_equal(resumed.params, went_on.params)
  np.testing.assert_array_equal(resumed_metrics.loss, metrics.loss)


# --- Stateless layers of each library, and the adapters' other forms. ---


def _layers_and_calls():
  key = jax.random.key(0)
  cases = [pytest.param(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(0)), lambda m, x: m(x), id="nnx")]
  if eqx is not None:
    cases.append(
      pytest.param(lambda: eqx.nn.Linear(3, 2, key=key), lambda m, x: jax.vmap(m)(x), id="equinox")
    )
  if hk is not None:
    cases.append(
      pytest.param(
        lambda: hk.transform(lambda x: hk.Linear(2)(x)),
        lambda t, x: t.apply(t.init(jax.random.key(0), x), None, x),
        id="haiku",
      )
    )
  return cases


@pytest.mark.parametrize("make,call", _layers_and_calls())
def test_layer_is_the_library_own_call(make, call):
  layer = make()
  x = jax.random.normal(jax.random.key(1), (BATCH, IN))
  readout = tbptt_jax.feedforward(layer)
  params = readout.init(jax.random.key(0), x)
  assert _plain(params) and jax.tree.leaves(params)
  np.testing.assert_allclose(readout.apply(params, (), x)[1], call(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(hk is None, reason="dm-haiku is not installed")
def test_haiku_transformed_step_equals_core_constructor():
  x = jax.random.normal(jax.random.key(1), (BATCH, IN))
  built = interop.haiku_cell(lambda: hk.LSTM(HIDDEN))
  step = hk.transform(lambda x_t, state: hk.LSTM(HIDDEN)(x_t, state))
  given = interop.haiku_cell(step, initial_state=lambda b: hk.LSTM(HIDDEN).initial_state(b))
  params = built.init(jax.random.key(0), x)
  chex.assert_trees_all_equal(given.init(jax.random.key(0), x), params)
  carry = built.initial_carry(x)
  chex.assert_trees_all_equal(given.initial_carry(x), carry)
  chex.assert_trees_all_equal(given.apply(params, carry, x), built.apply(params, carry, x))


if eqx is not None:

  class EquinoxElman(eqx.Module):
    """An Elman cell written in Equinox: one example, (input, state) -> state."""

    U: jax.Array
    W: jax.Array

    def __call__(self, x, s):
      return jnp.tanh(x @ self.U + s @ self.W)


@pytest.mark.skipif(eqx is None, reason="equinox is not installed")
def test_equinox_cell_of_ones_own_starts_from_initial_state():
  U, W = jax.random.normal(jax.random.key(0), (IN, HIDDEN)), jnp.eye(HIDDEN) * 0.5
  s_0 = jnp.arange(HIDDEN, dtype=jnp.float32) / HIDDEN
  cell = interop.equinox_cell(EquinoxElman(U, W), initial_state=s_0)
  x = jax.random.normal(jax.random.key(1), (BATCH, IN))
  params = cell.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == {"U": (IN, HIDDEN), "W": (HIDDEN, HIDDEN)}
  carry = cell.initial_carry(x)
  np.testing.assert_array_equal(carry, np.broadcast_to(s_0, (BATCH, HIDDEN)))
  s_1, y_1 = cell.apply(params, carry, x)
  np.testing.assert_allclose(s_1, np.tanh(x @ U + carry @ W), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(y_1, s_1)


# --- Refusals: nothing is run with its weights silently frozen. ---


class TorchLike:
  """Stands for a PyTorch or Keras model: weights behind `parameters()`."""

  def parameters(self):
    return iter(())

  def __call__(self, x):
    return x


class Affine:
  """A callable object holding its weights as attributes: JAX cannot see them."""

  def __init__(self):
    self.w = jnp.ones((IN, 2))

  def __call__(self, x):
    return x @ self.w


def _x():
  return jnp.ones((BATCH, IN))


def _applied(layer):
  """Builds `feedforward(layer)` and runs a step: some refusals come when the step is traced."""
  cell = tbptt_jax.feedforward(layer)
  return cell.apply(cell.init(jax.random.key(0), _x()), (), _x())


def _refusal(name, make, message):
  return pytest.param(make, message, id=name)


def _nnx_refusals():
  rngs = nnx.Rngs(0)
  nnx_lstm = functools.partial(nnx.LSTMCell, IN, 4, rngs=rngs)
  return [
    _refusal(
      "feedforward-nnx-cell",
      lambda: tbptt_jax.feedforward(nnx_lstm()),
      r"feedforward: layer is a recurrent NNX module \(LSTMCell\).*interop.nnx_cell",
    ),
    _refusal(
      "feedforward-linen-cell",
      lambda: tbptt_jax.feedforward(nn.LSTMCell(4)),
      r"feedforward: layer is a recurrent flax.linen cell \(LSTMCell\).*tbptt_jax.flax_cell",
    ),
    _refusal(
      "nnx-dropout-draws",
      lambda: _applied(nnx.Dropout(0.5, rngs=rngs)),
      r"feedforward: layer changes its non-trainable state when called \(.*rngs.*\)",
    ),
    _refusal(
      "nnx-batchnorm-updates",
      lambda: _applied(nnx.BatchNorm(IN, rngs=rngs)),
      r"feedforward: layer changes its non-trainable state .*use_running_average=True",
    ),
    _refusal(
      "nnx-bound-method",
      lambda: tbptt_jax.feedforward(nnx.Linear(IN, 2, rngs=rngs).__call__),
      r"feedforward: layer is a bound method of an NNX module \(Linear\)",
    ),
    _refusal(
      "torch-like",
      lambda: tbptt_jax.feedforward(TorchLike()),
      r"feedforward: layer is a TorchLike, another framework's model .*would never train",
    ),
    _refusal(
      "object-holding-arrays",
      lambda: tbptt_jax.with_head(tbptt_jax.elman(3), Affine()),
      r"feedforward: layer is an object of type Affine holding 1 float array",
    ),
    _refusal(
      "flax_cell-nnx",
      lambda: _layers.refuse_foreign_cell("flax_cell", "module", nnx_lstm()),
      r"flax_cell: module is a model of NNX \(LSTMCell\), not of flax.linen: use "
      r"tbptt_jax.interop.nnx_cell\(module\)",
    ),
    _refusal(
      "flax_cell-to_linen",
      lambda: _layers.refuse_foreign_cell(
        "flax_cell", "module", nnx.bridge.to_linen(nnx.LSTMCell, IN, 4)
      ),
      r"flax_cell: module is an NNX module \(LSTMCell\) wrapped by flax.nnx.bridge.to_linen: "
      r"pass the NNX module itself to tbptt_jax.interop.nnx_cell",
    ),
    _refusal(
      "flax_cell-torch-like",
      lambda: _layers.refuse_foreign_cell("flax_cell", "module", TorchLike()),
      r"flax_cell: module is a TorchLike, another framework's model",
    ),
    _refusal(
      "nnx_cell-linen",
      lambda: interop.nnx_cell(nn.LSTMCell(4)),
      r"nnx_cell: module is a model of flax.linen \(LSTMCell\), not of NNX: use "
      r"tbptt_jax.flax_cell",
    ),
    _refusal(
      "nnx_cell-layer",
      lambda: interop.nnx_cell(nnx.Linear(IN, 2, rngs=rngs)),
      r"nnx_cell: module must be an NNX recurrent cell with initialize_carry, got Linear",
    ),
    _refusal(
      "nnx_cell-object-holding-arrays",
      lambda: interop.nnx_cell(Affine()),
      r"nnx_cell: module is an object of type Affine holding",
    ),
  ]


def _equinox_refusals():
  if eqx is None:
    return []
  key = jax.random.key(0)

  class Noisy(eqx.Module):
    scale: jax.Array

    def __call__(self, x, *, key):
      return x + self.scale * jax.random.normal(key, x.shape)

  class NoisyCell(eqx.Module):
    scale: jax.Array

    def __call__(self, x, h, key):
      return h + self.scale * jax.random.normal(key, h.shape)

  return [
    _refusal(
      "feedforward-equinox-cell",
      lambda: tbptt_jax.feedforward(eqx.nn.LSTMCell(IN, 4, key=key)),
      r"feedforward: layer is an Equinox module taking \(input, state\) \(LSTMCell\).*"
      r"interop.equinox_cell",
    ),
    _refusal(
      "equinox-layer-needs-key",
      lambda: tbptt_jax.feedforward(Noisy(jnp.ones(()))),
      r"feedforward: layer is an Equinox module \(Noisy\) whose call needs a key",
    ),
    _refusal(
      "equinox-bound-method",
      lambda: tbptt_jax.feedforward(eqx.nn.Linear(IN, 2, key=key).__call__),
      r"feedforward: layer is a bound method of an Equinox module \(Linear\)",
    ),
    _refusal(
      "equinox_cell-needs-key",
      lambda: interop.equinox_cell(NoisyCell(jnp.ones(())), initial_state=jnp.zeros(4)),
      r"equinox_cell: module is an Equinox module \(NoisyCell\) whose call needs a key",
    ),
    _refusal(
      "equinox_cell-layer",
      lambda: interop.equinox_cell(eqx.nn.Linear(IN, 4, key=key)),
      r"equinox_cell: module must take \(input, hidden\) -> hidden, got Linear of \(x\)",
    ),
    _refusal(
      "equinox_cell-no-initial-state",
      lambda: interop.equinox_cell(EquinoxElman(jnp.ones((IN, 4)), jnp.eye(4))),
      r"equinox_cell: initial_state is needed for EquinoxElman, which is not one of Equinox's",
    ),
    _refusal(
      "equinox_cell-function",
      lambda: interop.equinox_cell(jnp.tanh),
      r"equinox_cell: module must be an Equinox recurrent cell, e.g. eqx.nn.LSTMCell, got",
    ),
    _refusal(
      "equinox_cell-nnx",
      lambda: interop.equinox_cell(nnx.GRUCell(IN, 4, rngs=nnx.Rngs(0))),
      r"equinox_cell: module is a model of NNX \(GRUCell\), not of Equinox: use "
      r"tbptt_jax.interop.nnx_cell",
    ),
    _refusal(
      "flax_cell-equinox",
      lambda: _layers.refuse_foreign_cell("flax_cell", "module", eqx.nn.LSTMCell(IN, 4, key=key)),
      r"flax_cell: module is a model of Equinox \(LSTMCell\), not of flax.linen: use "
      r"tbptt_jax.interop.equinox_cell\(module\)",
    ),
  ]


def _haiku_refusals():
  if hk is None:
    return []
  linear = hk.transform(lambda x: hk.Linear(2)(x))
  stateful = hk.transform_with_state(lambda x: hk.Linear(2)(x))
  return [
    _refusal(
      "haiku-not-transformed",
      lambda: _applied(lambda x: hk.Linear(2)(x)),
      r"feedforward: layer is a Haiku function that is not transformed \(.*\): pass hk.transform",
    ),
    _refusal(
      "feedforward-haiku-with-state",
      lambda: tbptt_jax.feedforward(stateful),
      r"feedforward: layer is hk.transform_with_state\(...\), whose state",
    ),
    _refusal(
      "haiku_cell-with-state",
      lambda: interop.haiku_cell(stateful, initial_state=lambda b: jnp.zeros((b, 4))),
      r"haiku_cell: core is hk.transform_with_state",
    ),
    _refusal(
      "haiku_cell-class",
      lambda: interop.haiku_cell(hk.LSTM),
      r"haiku_cell: core must be a function of no arguments returning an hk.RNNCore, e.g. "
      r"lambda: hk.LSTM\(16\), got .* of \(hidden_size\)",
    ),
    _refusal(
      "haiku_cell-no-initial-state",
      lambda: interop.haiku_cell(linear),
      r"haiku_cell: initial_state\(batch_size\) is needed with a transformed step",
    ),
    _refusal(
      "haiku_cell-not-a-core",
      lambda: interop.haiku_cell(lambda: hk.Linear(2)).initial_carry(_x()),
      r"haiku_cell: core\(\) returned Linear, which has no initial_state",
    ),
    _refusal(
      "haiku_cell-learned-initial-state",
      lambda: interop.haiku_cell(
        lambda: hk.GRU(4),
        initial_state=lambda b: jnp.broadcast_to(
          hk.get_parameter("h0", [4], init=jnp.zeros), (b, 4)
        ),
      ).initial_carry(_x()),
      r"haiku_cell: the initial state has parameters \(.*h0.*\); a carry cannot be trained",
    ),
    _refusal(
      "haiku_cell-linen",
      lambda: interop.haiku_cell(nn.LSTMCell(4)),
      r"haiku_cell: core is a model of flax.linen \(LSTMCell\), not of Haiku: use "
      r"tbptt_jax.flax_cell",
    ),
    _refusal(
      "flax_cell-haiku",
      lambda: _layers.refuse_foreign_cell("flax_cell", "module", linear),
      r"flax_cell: module is a model of Haiku \(Transformed\), not of flax.linen: use "
      r"tbptt_jax.interop.haiku_cell\(core\)",
    ),
  ]


@pytest.mark.parametrize("make,message", _nnx_refusals() + _equinox_refusals() + _haiku_refusals())
def test_refusal_names_the_argument_and_what_to_call(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_flax_cell_refuses_an_nnx_cell():
  with pytest.raises(ValueError, match=r"flax_cell: module is a model of NNX.*interop.nnx_cell"):
    tbptt_jax.flax_cell(nnx.LSTMCell(IN, 4, rngs=nnx.Rngs(0)))


# --- Four devices train as one: this file run as a script, JAX started with 4 CPU devices. ---


def _mixed_model():
  """One model holding every adapter: NNX GRU, Equinox LSTM, Haiku LSTM, Equinox readout."""
  keys = jax.random.split(jax.random.key(0), 2)
  return tbptt_jax.stack(
    tbptt_jax.feedforward(functools.partial(jax.nn.one_hot, num_classes=2)),
    interop.nnx_cell(nnx.GRUCell(2, 4, rngs=nnx.Rngs(0))),
    interop.equinox_cell(eqx.nn.LSTMCell(4, 4, key=keys[0])),
    interop.haiku_cell(lambda: hk.LSTM(4)),
    tbptt_jax.feedforward(eqx.nn.Linear(4, 2, key=keys[1])),
  )


def _four_devices() -> dict:
  """Relative differences of 4-device training from 1-device training, as JSON-able data."""
  from tbptt_jax import sharding

  xs, ys = synthetic.streams(0, 8, 16)
  runs = []
  for mesh in (None, sharding.data_mesh()):
    trainer = tbptt_jax.tbptt_trainer(
      _mixed_model(),
      optax.softmax_cross_entropy_with_integer_labels,
      optax.adam(0.05),
      k1=2,
      k2=4,
      mesh=mesh,
    )
    state = trainer.init(jax.random.key(0), xs[:, :2])
    state, first = trainer.update(state, xs[:, :8], ys[:, :8])
    state, second = trainer.update(state, xs[:, 8:], ys[:, 8:])
    runs.append((sharding.to_host(state), np.concatenate([first.loss, second.loss])))

  def relative(a, b):
    return max(
      float(np.max(np.abs(np.asarray(x) - y)) / max(np.max(np.abs(y)), 1e-30))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )

  (one, one_losses), (four, four_losses) = runs
  return {
    "devices": len(jax.devices()),
    "imported_by_tbptt_jax": _IMPORTED_WITH_TBPTT,
    "losses": relative(four_losses, one_losses),
    "params": relative(four.params, one.params),
    "carry": relative(four.carry, one.carry),
    "steps": [int(four.step), int(one.step)],
  }


@pytest.mark.skipif(eqx is None or hk is None, reason="needs equinox and dm-haiku")
def test_four_devices_train_like_one_and_interop_imports_no_optional_library():
  flags = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4"])
  )
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  done = subprocess.run(
    [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=180
  )
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(done.stdout.strip().splitlines()[-1])
  assert report["devices"] == 4
  assert report["imported_by_tbptt_jax"] == []  # Equinox and Haiku stay optional
  # The gradient's sum over streams is split in 4 and added across devices: float32 order only.
  for name in ("losses", "params", "carry"):
    assert report[name] <= 1e-5, (name, report[name])
  assert report["steps"] == [8, 8]


if __name__ == "__main__":
  print(json.dumps(_four_devices()))
