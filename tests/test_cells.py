"""Tests of `tbptt_jax.cells`: the Elman cell, Flax cells, `feedforward`, `stack`, names."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scan_checks import scan_of_apply, scan_summary

import tbptt_jax

_FLAX_CELL_CLASSES = {
  "simple": nn.SimpleCell,
  "lstm": nn.LSTMCell,
  "optimized_lstm": nn.OptimizedLSTMCell,
  "gru": nn.GRUCell,
  "mgu": nn.MGUCell,
}


def _numpy_elman(U, W, b, s_0, xs):
  """Plain NumPy oracle: s_t = tanh(x_t U + s_{t-1} W + b); xs is [batch, time, in]."""
  s_t, states = s_0, []
  for t in range(xs.shape[1]):
    s_t = np.tanh(xs[:, t] @ U + s_t @ W + b)
    states.append(s_t)
  return s_t, np.stack(states, axis=1)


def _random_elman_float64(rng, in_features=3, hidden=4):
  U = rng.normal(size=(in_features, hidden))
  W = rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)
  b = rng.normal(size=(hidden,))
  return U, W, b


def test_elman_step_equals_equation_float64():
  rng = np.random.default_rng(0)
  U, W, b = _random_elman_float64(rng)
  s_tm1, x_t = rng.normal(size=(2, 4)), rng.normal(size=(2, 3))
  with jax.enable_x64(True):
    params = tbptt_jax.ElmanParams(U=jnp.asarray(U), W=jnp.asarray(W), b=jnp.asarray(b))
    s_t, y_t = tbptt_jax.elman_step(params, jnp.asarray(s_tm1), jnp.asarray(x_t))
  assert s_t.dtype == np.float64
  np.testing.assert_allclose(s_t, np.tanh(x_t @ U + s_tm1 @ W + b), rtol=0, atol=1e-12)
  np.testing.assert_array_equal(y_t, s_t)  # The output is the state itself.


def test_elman_cell_over_steps_equals_equation_float64():
  rng = np.random.default_rng(1)
  U, W, b = _random_elman_float64(rng)
  s_0, xs = rng.normal(size=(2, 4)), rng.normal(size=(2, 5, 3))
  expected_s, expected_states = _numpy_elman(U, W, b, s_0, xs)
  with jax.enable_x64(True):
    cell = tbptt_jax.elman(4, param_dtype=jnp.float64)
    params = tbptt_jax.ElmanParams(U=jnp.asarray(U), W=jnp.asarray(W), b=jnp.asarray(b))
    s_t, states = jnp.asarray(s_0), []
    for t in range(xs.shape[1]):
      s_t, y_t = cell.apply(params, s_t, jnp.asarray(xs[:, t]))
      states.append(y_t)
  assert s_t.dtype == np.float64
  np.testing.assert_allclose(s_t, expected_s, rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.stack(states, axis=1), expected_states, rtol=0, atol=1e-12)


def test_elman_activation_is_used():
  rng = np.random.default_rng(2)
  U, W, b = _random_elman_float64(rng)
  s_tm1, x_t = rng.normal(size=(2, 4)), rng.normal(size=(2, 3))
  with jax.enable_x64(True):
    cell = tbptt_jax.elman(4, activation=jnp.sin, param_dtype=jnp.float64)
    params = tbptt_jax.ElmanParams(U=jnp.asarray(U), W=jnp.asarray(W), b=jnp.asarray(b))
    s_t, _ = cell.apply(params, jnp.asarray(s_tm1), jnp.asarray(x_t))
  np.testing.assert_allclose(s_t, np.sin(x_t @ U + s_tm1 @ W + b), rtol=0, atol=1e-12)


def test_elman_init_shapes_dtype_zero_carry_and_orthogonal_w():
  cell = tbptt_jax.elman(5)
  x_t = jnp.ones((2, 3))
  params = cell.init(jax.random.key(0), x_t)
  assert isinstance(params, tbptt_jax.ElmanParams)
  assert params.U.shape == (3, 5)
  assert params.W.shape == (5, 5)
  assert params.b.shape == (5,)
  assert all(p.dtype == np.float32 for p in params)
  np.testing.assert_array_equal(params.b, np.zeros(5, np.float32))
  np.testing.assert_allclose(params.W.T @ params.W, np.eye(5), rtol=0, atol=1e-5)
  carry = cell.initial_carry(x_t)
  assert carry.shape == (2, 5)
  assert carry.dtype == np.float32
  np.testing.assert_array_equal(carry, np.zeros((2, 5), np.float32))
  # Only the shape of the example step is read.
  shape_only = jax.ShapeDtypeStruct((2, 3), jnp.float32)
  assert cell.initial_carry(shape_only).shape == (2, 5)
  assert jax.tree.map(jnp.shape, cell.init(jax.random.key(0), shape_only)) == jax.tree.map(
    jnp.shape, params
  )


def test_elman_param_dtype_sets_params_and_carry_dtype():
  with jax.enable_x64(True):
    cell = tbptt_jax.elman(3, param_dtype=jnp.float64)
    x_t = jnp.ones((2, 2), jnp.float64)
    params = cell.init(jax.random.key(0), x_t)
    carry = cell.initial_carry(x_t)
  assert all(p.dtype == np.float64 for p in params)
  assert carry.dtype == np.float64


@pytest.mark.parametrize(
  "module_cls", list(_FLAX_CELL_CLASSES.values()), ids=list(_FLAX_CELL_CLASSES)
)
def test_flax_cell_unroll_equals_flax_rnn(module_cls):
  module = module_cls(features=4)
  cell = tbptt_jax.flax_cell(module)
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  variables = cell.init(jax.random.key(0), x[:, 0])
  # flax_cell's variables are the module's own, which nn.RNN nests under "cell".
  assert jax.tree.structure(variables) == jax.tree.structure(
    module.init(jax.random.key(0), module.initialize_carry(jax.random.key(0), (2, 3)), x[:, 0])
  )
  rnn = nn.RNN(module, return_carry=True)
  rnn_variables = {"params": {"cell": variables["params"]}}
  assert jax.tree.map(jnp.shape, rnn.init(jax.random.key(0), x)) == jax.tree.map(
    jnp.shape, rnn_variables
  )
  carry = cell.initial_carry(x[:, 0])
  leaves, treedef = jax.tree.flatten(carry)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  carry = treedef.unflatten(
    [leaf + 0.5 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
  )

  got_carry, got_outputs = tbptt_jax.unroll(cell.apply, variables, carry, x)
  want_carry, want_outputs = rnn.apply(rnn_variables, x, initial_carry=carry)

  assert got_outputs.shape == (2, 5, 4)
  np.testing.assert_allclose(got_outputs, want_outputs, rtol=0, atol=1e-6)
  assert jax.tree.structure(got_carry) == jax.tree.structure(want_carry)
  for got, want in zip(jax.tree.leaves(got_carry), jax.tree.leaves(want_carry), strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_stack_structure_and_step_equals_layers_by_hand():
  embed, lstm, gru, dense = nn.Embed(11, 4), nn.LSTMCell(5), nn.GRUCell(6), nn.Dense(7)
  model = tbptt_jax.stack(
    tbptt_jax.feedforward(embed),
    tbptt_jax.flax_cell(lstm),
    tbptt_jax.flax_cell(gru),
    tbptt_jax.feedforward(dense),
  )
  x_t = jnp.array([1, 10])  # one token per stream, [batch]
  params = model.init(jax.random.key(0), x_t)
  assert isinstance(params, tuple) and len(params) == 4
  assert params[0]["params"]["embedding"].shape == (11, 4)
  assert params[1]["params"]["ii"]["kernel"].shape == (4, 5)  # LSTM input: embedding size
  assert params[2]["params"]["ir"]["kernel"].shape == (5, 6)  # GRU input: LSTM features
  assert params[3]["params"]["kernel"].shape == (6, 7)  # readout input: GRU features
  carry = model.initial_carry(x_t)
  assert isinstance(carry, tuple) and len(carry) == 4
  assert carry[0] == () and carry[3] == ()
  assert jax.tree.map(jnp.shape, carry[1]) == ((2, 5), (2, 5))
  assert carry[2].shape == (2, 6)
  shape_only = jax.ShapeDtypeStruct((2,), jnp.int32)
  assert jax.tree.map(jnp.shape, model.initial_carry(shape_only)) == jax.tree.map(jnp.shape, carry)
  assert jax.tree.map(jnp.shape, model.init(jax.random.key(0), shape_only)) == jax.tree.map(
    jnp.shape, params
  )

  k_c, k_h, k_g = jax.random.split(jax.random.key(1), 3)
  carry = (
    (),
    (jax.random.normal(k_c, (2, 5)), jax.random.normal(k_h, (2, 5))),
    jax.random.normal(k_g, (2, 6)),
    (),
  )
  new_carry, logits = model.apply(params, carry, x_t)

  e_t = embed.apply(params[0], x_t)
  lstm_carry, h1_t = lstm.apply(params[1], carry[1], e_t)
  gru_carry, h2_t = gru.apply(params[2], carry[2], h1_t)
  want_logits = dense.apply(params[3], h2_t)
  assert logits.shape == (2, 7)
  np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-6)
  assert new_carry[0] == () and new_carry[3] == ()
  for got, want in zip(new_carry[1], lstm_carry, strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(new_carry[2], gru_carry, rtol=0, atol=1e-6)


def test_feedforward_function_has_no_params():
  cell = tbptt_jax.feedforward(functools.partial(jax.nn.one_hot, num_classes=3))
  x_t = jnp.array([0, 2])
  params = cell.init(jax.random.key(0), x_t)
  assert params == ()
  assert cell.initial_carry(x_t) == ()
  carry, y_t = cell.apply(params, (), x_t)
  assert carry == ()
  np.testing.assert_array_equal(y_t, np.array([[1, 0, 0], [0, 0, 1]], np.float32))
  # In a stack, the next layer is sized by the function's output.
  model = tbptt_jax.stack(cell, tbptt_jax.elman(4))
  model_params = model.init(jax.random.key(0), x_t)
  assert model_params[0] == ()
  assert model_params[1].U.shape == (3, 4)


@pytest.mark.parametrize("name", tbptt_jax.CELL_NAMES)
def test_cell_by_name_returns_working_cell(name):
  cell = tbptt_jax.cell_by_name(name, 4)
  assert isinstance(cell, tbptt_jax.Cell)
  x_t = jnp.ones((2, 3))
  params = cell.init(jax.random.key(0), x_t)
  if name == "elman":
    assert isinstance(params, tbptt_jax.ElmanParams)
  elif name == "lru":  # lru_block: projection, LRU, GELU layer
    assert isinstance(params[1], tbptt_jax.LRUParams) and params[1].B_re.shape == (4, 4)
  else:
    module = _FLAX_CELL_CLASSES[name](features=4)
    want = module.init(jax.random.key(0), module.initialize_carry(jax.random.key(0), (2, 3)), x_t)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, want)
  carry = cell.initial_carry(x_t)
  new_carry, y_t = cell.apply(params, carry, x_t)
  assert y_t.shape == (2, 4)
  assert np.all(np.isfinite(y_t))
  assert np.any(y_t != 0)
  assert jax.tree.map(jnp.shape, new_carry) == jax.tree.map(jnp.shape, carry)


def test_cell_names_are_the_documented_ones():
  assert set(tbptt_jax.CELL_NAMES) == {"elman", "lru", *_FLAX_CELL_CLASSES}


def test_cell_by_name_unknown_name_raises():
  with pytest.raises(ValueError, match=r"name must be one of .*'transformer'"):
    tbptt_jax.cell_by_name("transformer", 4)


@pytest.mark.parametrize("hidden_size", [0, True, 2.5], ids=["zero", "bool", "float"])
@pytest.mark.parametrize("factory", [tbptt_jax.cell_by_name, None], ids=["cell_by_name", "elman"])
def test_bad_hidden_size_raises(factory, hidden_size):
  with pytest.raises(ValueError, match="hidden_size"):
    if factory is None:
      tbptt_jax.elman(hidden_size)
    else:
      factory("lstm", hidden_size)


def test_flax_cell_rejects_a_non_recurrent_module():
  with pytest.raises(ValueError, match="module must be a flax.linen recurrent cell"):
    tbptt_jax.flax_cell(nn.Dense(3))


def test_with_head_is_the_stack_with_its_readout_moved_after_the_scan():
  recurrent = tbptt_jax.stack(tbptt_jax.feedforward(nn.Embed(9, 3)), tbptt_jax.elman(4))
  fast = tbptt_jax.with_head(recurrent, nn.Dense(5))
  plain = tbptt_jax.stack(recurrent, tbptt_jax.feedforward(nn.Dense(5)))
  x_t = jnp.array([1, 8])
  params = fast.init(jax.random.key(0), x_t)
  # The same parameters: (recurrent part, readout).
  assert jax.tree.structure(params) == jax.tree.structure(plain.init(jax.random.key(0), x_t))
  carry = fast.initial_carry(x_t)
  new_carry, h_t = fast.apply(params, carry, x_t)
  assert h_t.shape == (2, 4)  # the head is not in the step
  want_carry, want_logits = plain.apply(params, carry, x_t)
  np.testing.assert_allclose(fast.head(params, h_t), want_logits, rtol=1e-6)
  chex.assert_trees_all_close(new_carry, want_carry)
  assert plain.head is None


def test_a_head_inside_a_stack_is_applied_in_the_step():
  """Only the last layer's head moves after the scan; an inner one stays in the step."""
  inner = tbptt_jax.with_head(tbptt_jax.elman(4), nn.Dense(3))
  model = tbptt_jax.stack(inner, tbptt_jax.elman(2))
  x_t = jnp.ones((2, 5))
  params = model.init(jax.random.key(0), x_t)
  assert params[1].U.shape == (3, 2)  # sized by the inner head's output
  carry = model.initial_carry(x_t)
  _, y_t = model.apply(params, carry, x_t)
  _, h_t = inner.apply(params[0], carry[0], x_t)
  _, want = tbptt_jax.elman_step(params[1], carry[1], inner.head(params[0], h_t))
  np.testing.assert_allclose(y_t, want, rtol=1e-6)
  assert model.head is None


def test_with_embed_is_the_stack_with_its_first_layer_moved_before_the_scan():
  fast = tbptt_jax.with_embed(nn.Embed(9, 3), tbptt_jax.elman(4))
  plain = tbptt_jax.stack(tbptt_jax.feedforward(nn.Embed(9, 3)), tbptt_jax.elman(4))
  x_t = jnp.array([1, 8])
  params = fast.init(jax.random.key(0), x_t)
  # The same parameters: (embedding, cell).
  assert jax.tree.structure(params) == jax.tree.structure(plain.init(jax.random.key(0), x_t))
  carry = fast.initial_carry(x_t)
  e_t = fast.embed(params, x_t)
  assert e_t.shape == (2, 3)  # the embedding is not in the step
  want_carry, want_y = plain.apply(params, carry, x_t)
  for got_carry, got_y in (
    fast.apply(params, carry, e_t),
    tbptt_jax.full_step(fast)(params, carry, x_t),
  ):
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6)
    chex.assert_trees_all_close(got_carry, want_carry)
  assert plain.embed is None and tbptt_jax.full_step(plain) is plain.apply
  with pytest.raises(ValueError, match="with_embed: cell must be a Cell"):
    tbptt_jax.with_embed(nn.Embed(9, 3), nn.Dense(3))


def test_an_embed_inside_a_stack_is_applied_in_the_step():
  """Only the first layer's embed moves before the scan; a later one stays in the step."""
  inner = tbptt_jax.with_embed(jnp.sin, tbptt_jax.elman(3))
  model = tbptt_jax.with_head(tbptt_jax.stack(tbptt_jax.elman(4), inner), nn.Dense(2))
  x_t = jnp.ones((2, 5))
  params = model.init(jax.random.key(0), x_t)
  assert model.embed is None
  carry = model.initial_carry(x_t)
  _, h_t = model.apply(params, carry, x_t)
  s_t, _ = tbptt_jax.elman_step(params[0][0], carry[0][0], x_t)
  _, want = tbptt_jax.elman_step(params[0][1][1], carry[0][1][1], jnp.sin(s_t))
  np.testing.assert_allclose(h_t, want, rtol=1e-6)
  _, out_t = tbptt_jax.cells.output(model, params, carry, x_t)
  np.testing.assert_allclose(out_t, model.head(params, want), rtol=1e-6)


@pytest.mark.parametrize("activation", [jnp.tanh, jax.nn.relu])
@pytest.mark.parametrize("unroll", [1, True])
def test_elman_scan_is_the_scan_of_its_step_with_its_own_backward_pass(activation, unroll):
  """The written-out backward pass (weight gradients after the loop) is exact at float64:
  values and gradients with respect to the parameters, the initial state and the inputs."""
  cell = tbptt_jax.elman(4, activation=activation, param_dtype=jnp.float64)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    xs = jnp.asarray(rng.standard_normal((6, 3, 2)))
    s_0 = jnp.asarray(rng.standard_normal((3, 4)))
    params = cell.init(jax.random.key(0), xs[0])
    got = scan_summary(lambda p, c, x: cell.scan(p, c, x, unroll), params, s_0, xs)
    want = scan_summary(lambda p, c, x: scan_of_apply(cell, p, c, x, unroll), params, s_0, xs)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-13)
  with pytest.raises(ValueError, match=r"each input step must have shape \[batch, in_features=2\]"):
    cell.scan(params, s_0, xs[..., :1], 1)


def test_a_stack_with_a_scan_runs_layer_by_layer_as_its_step_does():
  """A stack holding a layer with its own scan has one: each layer over the whole window in
  turn (Elman's scan, a Flax GRU's lax.scan, a stateless layer at once), with the inner
  embeds and heads; a stack without such a layer keeps none."""
  inner = tbptt_jax.stack(
    tbptt_jax.elman(4, param_dtype=jnp.float64),
    tbptt_jax.feedforward(jnp.tanh),
    tbptt_jax.flax_cell(nn.GRUCell(3, param_dtype=jnp.float64)),
    tbptt_jax.with_embed(
      jnp.sin,
      tbptt_jax.with_head(
        tbptt_jax.elman(2, param_dtype=jnp.float64), nn.Dense(3, param_dtype=jnp.float64)
      ),
    ),
  )
  model = tbptt_jax.with_head(inner, nn.Dense(2, param_dtype=jnp.float64))
  assert model.scan is not None and tbptt_jax.stack(tbptt_jax.feedforward(jnp.tanh)).scan is None
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    xs = jnp.asarray(rng.standard_normal((5, 2, 3)))
    params = model.init(jax.random.key(0), xs[0])
    carry = jax.tree.map(lambda c: c + 0.1, model.initial_carry(xs[0]))
    got = scan_summary(lambda p, c, x: model.scan(p, c, x, 1), params, carry, xs)
    want = scan_summary(lambda p, c, x: scan_of_apply(model, p, c, x, 1), params, carry, xs)
  chex.assert_trees_all_close(got, want, rtol=1e-11, atol=1e-12)


def test_stack_rejects_no_cells_and_non_cells():
  with pytest.raises(ValueError, match="stack: expected one or more Cell"):
    tbptt_jax.stack()
  with pytest.raises(ValueError, match="stack: expected one or more Cell"):
    tbptt_jax.stack(tbptt_jax.elman(3), nn.LSTMCell(3))


def test_feedforward_rejects_a_non_callable():
  with pytest.raises(ValueError, match="layer must be a flax module or a function"):
    tbptt_jax.feedforward(3)
