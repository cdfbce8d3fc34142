"""Tests of `tbptt_jax.unroll`: chunks chain, resets restart and cut, gradients, checks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import tbptt_jax
from tbptt_jax.unroll import scan_steps

BATCH, TIME, IN, HIDDEN = 2, 7, 3, 4

_CELLS = {
  "elman": lambda: tbptt_jax.elman(HIDDEN),
  "lstm": lambda: tbptt_jax.flax_cell(nn.LSTMCell(HIDDEN)),
}


def _setup(name, seed=0):
  """A cell, its params, a nonzero initial carry and inputs [BATCH, TIME, IN]."""
  cell = _CELLS[name]()
  k_x, k_p, k_c = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k_x, (BATCH, TIME, IN))
  params = cell.init(k_p, x[:, 0])
  leaves, treedef = jax.tree.flatten(cell.initial_carry(x[:, 0]))
  keys = jax.random.split(k_c, len(leaves))
  carry = treedef.unflatten(
    [leaf + 0.5 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
  )
  return cell, params, carry, x


def _reference_unroll(step_fn, params, carry, x, resets, reset_carry):
  """Per stream, step by step, replacing the carry by hand where `resets` marks a step."""
  final_carries, outputs = [], []
  for b in range(x.shape[0]):
    carry_b = jax.tree.map(lambda a, b=b: a[b : b + 1], carry)
    ys = []
    for t in range(x.shape[1]):
      if resets[b, t]:
        carry_b = jax.tree.map(lambda a, b=b: a[b : b + 1], reset_carry)
      carry_b, y_t = step_fn(params, carry_b, x[b : b + 1, t])
      ys.append(y_t)
    final_carries.append(carry_b)
    outputs.append(jnp.stack(ys, axis=1))
  final_carry = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *final_carries)
  return final_carry, jnp.concatenate(outputs, axis=0)


@pytest.mark.parametrize("name", list(_CELLS))
def test_chained_chunks_equal_one_scan(name):
  cell, params, carry, x = _setup(name)
  m = 3
  want_carry, want_outputs = tbptt_jax.unroll(cell.apply, params, carry, x)
  carry_a, outputs_a = tbptt_jax.unroll(cell.apply, params, carry, x[:, :m])
  carry_b, outputs_b = tbptt_jax.unroll(cell.apply, params, carry_a, x[:, m:])
  assert want_outputs.shape == (BATCH, TIME, HIDDEN)
  np.testing.assert_allclose(
    jnp.concatenate([outputs_a, outputs_b], axis=1), want_outputs, rtol=0, atol=1e-6
  )
  chex.assert_trees_all_close(carry_b, want_carry, rtol=0, atol=1e-6)


# Stream 0 restarts at its first step and once more; stream 1 restarts twice later on.
_RESETS = np.array(
  [
    [True, False, False, True, False, False, False],
    [False, False, True, False, False, True, False],
  ]
)


@pytest.mark.parametrize("given_reset_carry", [False, True], ids=["zeros", "given"])
@pytest.mark.parametrize("name", list(_CELLS))
def test_resets_restart_each_stream_from_reset_carry(name, given_reset_carry):
  cell, params, carry, x = _setup(name)
  if given_reset_carry:
    _, _, reset_carry, _ = _setup(name, seed=1)
    kwargs = {"reset_carry": reset_carry}
  else:
    reset_carry = jax.tree.map(jnp.zeros_like, carry)
    kwargs = {}
  got_carry, got_outputs = tbptt_jax.unroll(
    cell.apply, params, carry, x, resets=jnp.asarray(_RESETS), **kwargs
  )
  want_carry, want_outputs = _reference_unroll(cell.apply, params, carry, x, _RESETS, reset_carry)
  np.testing.assert_allclose(got_outputs, want_outputs, rtol=0, atol=1e-6)
  chex.assert_trees_all_close(got_carry, want_carry, rtol=0, atol=1e-6)
  # The resets matter: without them the outputs differ.
  _, plain_outputs = tbptt_jax.unroll(cell.apply, params, carry, x)
  assert np.max(np.abs(plain_outputs - got_outputs)) > 1e-3


def test_no_resets_marked_equals_no_resets():
  cell, params, carry, x = _setup("elman")
  want_carry, want_outputs = tbptt_jax.unroll(cell.apply, params, carry, x)
  got_carry, got_outputs = tbptt_jax.unroll(
    cell.apply, params, carry, x, resets=np.zeros((BATCH, TIME), bool)
  )
  np.testing.assert_allclose(got_outputs, want_outputs, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got_carry, want_carry, rtol=0, atol=1e-6)


def test_reset_cuts_the_gradient_to_the_initial_carry():
  cell, params, carry, x = _setup("elman")
  cut = 3
  resets = np.zeros((BATCH, TIME), bool)
  resets[0, cut] = True  # Only stream 0 restarts.

  def loss_after_cut(carry_0, resets):
    _, outputs = tbptt_jax.unroll(cell.apply, params, carry_0, x, resets=resets)
    return jnp.sum(outputs[:, cut:] ** 2)

  grad = np.asarray(jax.grad(loss_after_cut)(carry, jnp.asarray(resets)))
  np.testing.assert_array_equal(grad[0], np.zeros(HIDDEN, np.float32))  # exactly zero
  assert np.all(grad[1] != 0)
  grad_no_reset = np.asarray(jax.grad(loss_after_cut)(carry, jnp.zeros((BATCH, TIME), bool)))
  assert np.all(grad_no_reset != 0)


@pytest.mark.parametrize("unroll", [3, True], ids=["3", "full"])
@pytest.mark.parametrize("name", list(_CELLS))
def test_scan_unroll_gives_the_same_results(name, unroll):
  cell, params, carry, x = _setup(name)
  want_carry, want_outputs = tbptt_jax.unroll(cell.apply, params, carry, x, resets=_RESETS)
  got_carry, got_outputs = tbptt_jax.unroll(
    cell.apply, params, carry, x, resets=_RESETS, unroll=unroll
  )
  np.testing.assert_allclose(got_outputs, want_outputs, rtol=0, atol=1e-6)
  chex.assert_trees_all_close(got_carry, want_carry, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_resets", [False, True], ids=["plain", "resets"])
def test_gradients_match_finite_differences_float64(with_resets):
  with jax.enable_x64(True):
    cell = tbptt_jax.elman(3, param_dtype=jnp.float64)
    k_x, k_p, k_c = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k_x, (2, 4, 2), jnp.float64)
    params = cell.init(k_p, x[:, 0])
    params = params._replace(b=0.1 * jnp.arange(3, dtype=jnp.float64))
    carry = 0.5 * jax.random.normal(k_c, (2, 3), jnp.float64)
    resets = np.array([[False, False, True, False], [False, True, False, False]])
    resets = resets if with_resets else None

    def loss(params, carry_0):
      carry_t, outputs = tbptt_jax.unroll(cell.apply, params, carry_0, x, resets=resets)
      return jnp.sum(outputs**2 * jnp.arange(1, 5)[None, :, None]) + jnp.sum(carry_t**3)

    jax.test_util.check_grads(
      loss, (params, carry), order=1, modes=("rev",), eps=1e-5, atol=1e-7, rtol=1e-7
    )


def _bad(name):
  """Arguments of `unroll` with one of them made bad, and the argument the error names."""
  cell, params, carry, x = _setup("elman")
  kwargs = {}
  if name == "carry_batch":
    carry, match = carry[:1], r"\bcarry must have leading batch size 2"
  elif name == "inputs_ndim":
    x, match = x[:, 0, 0], r"\binputs must have shape \[batch, time, \.\.\.\]"
  elif name == "time_zero":
    x, match = x[:, :0], r"\binputs must have at least one time step"
  elif name == "resets_shape":
    kwargs["resets"], match = _RESETS.T, r"\bresets must have shape \[batch, time\]"
  elif name == "resets_dtype":
    kwargs["resets"], match = _RESETS.astype(np.int32), r"\bresets must be boolean"
  elif name == "reset_carry_batch":
    kwargs["resets"], kwargs["reset_carry"] = _RESETS, carry[:1]
    match = r"\breset_carry must have the shapes of carry, \[\(2, 4\)\], got \[\(1, 4\)\]"
  elif name == "reset_carry_features":
    kwargs["resets"], kwargs["reset_carry"] = _RESETS, jnp.zeros((2, 5))
    match = r"\breset_carry must have the shapes of carry, \[\(2, 4\)\], got \[\(2, 5\)\]"
  elif name == "reset_carry_tree":
    kwargs["resets"], kwargs["reset_carry"] = _RESETS, (carry,)
    match = r"\breset_carry must have the tree structure of carry"
  elif name == "unroll_zero":
    kwargs["unroll"], match = 0, r"\bunroll must be an integer >= 1, got 0"
  elif name == "unroll_float":
    kwargs["unroll"], match = 2.5, r"\bunroll must be an integer >= 1, got 2.5"
  return (cell.apply, params, carry, x), kwargs, match


@pytest.mark.parametrize(
  "name",
  [
    "carry_batch",
    "inputs_ndim",
    "time_zero",
    "resets_shape",
    "resets_dtype",
    "reset_carry_batch",
    "reset_carry_features",
    "reset_carry_tree",
    "unroll_zero",
    "unroll_float",
  ],
)
def test_bad_input_raises_naming_the_argument(name):
  args, kwargs, match = _bad(name)
  with pytest.raises(ValueError, match=match):
    tbptt_jax.unroll(*args, **kwargs)


def test_a_cells_own_scan_runs_where_there_are_no_resets_padding_or_remat():
  """`scan_steps` hands a run to the cell's `scan` only when it is a plain scan of the step."""
  cell = tbptt_jax.elman(3)
  xs = jnp.ones((4, 2, 2))
  params, carry = cell.init(jax.random.key(0), xs[0]), cell.initial_carry(xs[0])
  calls = []

  def spy(*args):
    calls.append(1)
    return cell.scan(*args)

  def run(**kwargs):
    calls.clear()
    out = scan_steps(cell._replace(scan=spy), params, carry, xs, keep_carries=True, **kwargs)
    return len(calls), out

  used, out = run()
  plain = scan_steps(cell.apply, params, carry, xs, keep_carries=True)
  assert used == 1
  chex.assert_trees_all_close(out, plain, rtol=1e-6)
  assert run(resets=jnp.zeros((4, 2), bool))[0] == 0
  assert run(mask=jnp.ones((4,), bool))[0] == 0
  assert run(remat=2)[0] == 0
  assert run(remat=4)[0] == 1  # a segment as long as the run is no remat
