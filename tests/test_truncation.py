"""Tests of `tbptt_jax.truncation`: exact TBPTT(k1, k2) in both styles."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_oracle
import optax
import pytest

import tbptt_jax
from tbptt_jax.truncation import (
  Block,
  Lookback,
  ScanOptions,
  StreamState,
  Truncation,
  block_gradients,
)

BATCH, TIME, IN, HIDDEN, CLASSES = 2, 7, 3, 4, 3
loss_fn = optax.softmax_cross_entropy_with_integer_labels


def seed_step(params, s_tm1, x_t):
  """The oracle's network through the library's Elman cell: state -> logits."""
  elman = tbptt_jax.ElmanParams(params["U"], params["W"], params["b"])
  s_t, _ = tbptt_jax.elman_step(elman, s_tm1, x_t)
  return s_t, s_t @ params["V"] + params["c"]


@pytest.fixture(scope="module")
def problem():
  """A tiny float64 problem as NumPy arrays: params, s0, x, y, resets."""
  rng = np.random.default_rng(0)
  shapes = {"U": (IN, HIDDEN), "W": (HIDDEN, HIDDEN), "b": (HIDDEN,), "V": (HIDDEN, CLASSES)}
  params = {name: 0.6 * rng.standard_normal(shape) for name, shape in shapes.items()}
  params["c"] = 0.1 * rng.standard_normal(CLASSES)
  return dict(
    params=params,
    s0=0.5 * rng.standard_normal((BATCH, HIDDEN)),
    x=rng.standard_normal((BATCH, TIME, IN)),
    y=rng.integers(0, CLASSES, (BATCH, TIME)),
    resets=rng.random((BATCH, TIME)) < 0.3,
  )


_compiled = {}


def seed_cell():
  """The oracle's network as a `Cell`: the Elman recurrence with its own scan, the readout
  as the head, so the engine takes the path the trainer takes (`cell_gradients`)."""

  def elman(params):
    return tbptt_jax.ElmanParams(params["U"], params["W"], params["b"])

  cell = tbptt_jax.elman(HIDDEN)
  return tbptt_jax.Cell(
    init=None,
    initial_carry=None,
    apply=lambda params, s, x_t: cell.apply(elman(params), s, x_t),
    head=lambda params, s_t: s_t @ params["V"] + params["c"],
    scan=lambda params, s, xs, unroll: cell.scan(elman(params), s, xs, unroll),
  )


ENTRIES = ["tbptt_gradients", "cell_gradients"]


def library_gradients(problem, k1, k2, style, resets=None, entry="tbptt_gradients"):
  """The engine at float64 through `entry`, compiled once per truncation and reused."""
  key = (k1, k2, style, resets is not None, entry)
  if key not in _compiled:
    if entry == "tbptt_gradients":
      fn = functools.partial(
        tbptt_jax.tbptt_gradients, seed_step, loss_fn, k1=k1, k2=k2, style=style
      )
    else:
      truncation = tbptt_jax.Truncation(k1, k2, style)
      fn = functools.partial(tbptt_jax.cell_gradients, seed_cell(), loss_fn, truncation)
    with jax.enable_x64(True):
      grads, carry = jax.jit(fn)(
        problem["params"], problem["s0"], problem["x"], problem["y"], resets=resets
      )
      _compiled[key] = jax.tree.map(np.asarray, grads), np.asarray(carry)
  return _compiled[key]


WINDOW = [(1, 1), (1, 4), (2, 2), (2, 3), (3, 3), (3, 5), (4, 4), (7, 7), (2, 9)]
PER_LOSS = [(1, 1), (1, 4), (2, 2), (2, 3), (3, 3), (3, 2), (5, 1), (4, 9), (7, 7)]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
  "style,k1,k2", [("window", *k) for k in WINDOW] + [("per_loss", *k) for k in PER_LOSS]
)
def test_matches_numpy_oracle(problem, style, k1, k2, entry):
  grads, carry = library_gradients(problem, k1, k2, style, entry=entry)
  want, want_carry = numpy_oracle.tbptt_gradients(
    problem["params"], problem["s0"], problem["x"], problem["y"], k1, k2, style
  )
  assert grads["W"].shape[0] == -(-TIME // k1)  # one gradient per update
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(grads[name], want[name], rtol=1e-8, atol=1e-12, err_msg=name)
  # The forward pass is never cut.
  np.testing.assert_allclose(carry, want_carry, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("style,k1,k2", [("window", 2, 4), ("per_loss", 3, 2)])
def test_matches_numpy_oracle_with_resets(problem, style, k1, k2, entry):
  assert problem["resets"].any()
  grads, carry = library_gradients(problem, k1, k2, style, resets=problem["resets"], entry=entry)
  want, want_carry = numpy_oracle.tbptt_gradients(
    problem["params"],
    problem["s0"],
    problem["x"],
    problem["y"],
    k1,
    k2,
    style,
    resets=problem["resets"],
  )
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(grads[name], want[name], rtol=1e-8, atol=1e-12, err_msg=name)
  np.testing.assert_allclose(carry, want_carry, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("style,k1,k2", [("window", 2, 3), ("per_loss", 3, 2)])
def test_finite_differences(problem, style, k1, k2, entry):
  """Each update's gradient is the derivative of its truncated objective."""
  grads, _ = library_gradients(problem, k1, k2, style, entry=entry)
  params, s0, x, y = (problem[k] for k in ("params", "s0", "x", "y"))
  _, frozen = numpy_oracle.forward(params, s0, x)
  rng = np.random.default_rng(1)
  eps = 1e-5
  for i in range(-(-TIME // k1)):
    v = {name: rng.standard_normal(p.shape) for name, p in params.items()}

    def objective(sign, i=i, v=v):
      shifted = {name: params[name] + sign * eps * v[name] for name in params}
      return numpy_oracle.truncated_objective(shifted, frozen, s0, x, y, i, k1, k2, style)

    finite_difference = (objective(1) - objective(-1)) / (2 * eps)
    directional = sum(np.sum(grads[name][i] * v[name]) for name in params)
    np.testing.assert_allclose(directional, finite_difference, rtol=1e-6, atol=1e-9)


def test_full_bptt_is_the_gradient_of_the_whole_sequence(problem):
  """k1 = k2 = T is full BPTT: one update, `jax.grad` of the mean loss."""
  grads, _ = library_gradients(problem, TIME, TIME, "window")

  def whole_sequence_loss(params):
    _, logits = tbptt_jax.unroll(seed_step, params, problem["s0"], problem["x"])
    return jnp.mean(jax.vmap(loss_fn, in_axes=1)(logits, problem["y"]))

  with jax.enable_x64(True):
    want = jax.grad(whole_sequence_loss)(problem["params"])
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(grads[name][0], want[name], rtol=1e-10, atol=1e-13)


def state_step(params, s_tm1, x_t):
  """The oracle's recurrence without its readout: state -> state."""
  elman = tbptt_jax.ElmanParams(params["U"], params["W"], params["b"])
  return tbptt_jax.elman_step(elman, s_tm1, x_t)


def readout(params, s_t):
  return s_t @ params["V"] + params["c"]


@pytest.mark.parametrize("style,k1,k2", [("window", 2, 5), ("per_loss", 3, 2)])
def test_head_after_the_scan_equals_the_readout_inside_the_step(problem, style, k1, k2):
  """A `head_fn` applied to all steps at once is the same model as a readout in each step."""
  grads, carry = library_gradients(problem, k1, k2, style)
  fn = functools.partial(
    tbptt_jax.tbptt_gradients, state_step, loss_fn, k1=k1, k2=k2, style=style, head_fn=readout
  )
  with jax.enable_x64(True):
    got, got_carry = jax.jit(fn)(problem["params"], problem["s0"], problem["x"], problem["y"])
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(got[name], grads[name], rtol=1e-12, atol=1e-15, err_msg=name)
  np.testing.assert_array_equal(got_carry, carry)


def input_projection(params, x_t):
  return x_t @ params["U"]


def projected_step(params, s_tm1, e_t):
  """The oracle's step after its input projection: tanh(e_t + s_{t-1} W + b), then readout."""
  s_t = jnp.tanh(e_t + s_tm1 @ params["W"] + params["b"])
  return s_t, readout(params, s_t)


@pytest.mark.parametrize("style,k1,k2", [("window", 2, 5), ("per_loss", 3, 2)])
def test_embed_before_the_scan_equals_the_projection_inside_the_step(problem, style, k1, k2):
  """An `embed_fn` applied to all steps at once, the windows that reach back included, is
  the same model as the input projection in each step; its gradient (here U's) flows."""
  grads, carry = library_gradients(problem, k1, k2, style)
  fn = functools.partial(
    tbptt_jax.tbptt_gradients,
    projected_step,
    loss_fn,
    k1=k1,
    k2=k2,
    style=style,
    embed_fn=input_projection,
  )
  with jax.enable_x64(True):
    got, got_carry = jax.jit(fn)(problem["params"], problem["s0"], problem["x"], problem["y"])
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(got[name], grads[name], rtol=1e-12, atol=1e-15, err_msg=name)
  np.testing.assert_allclose(got_carry, carry, rtol=1e-14)


def test_k2_beyond_the_sequence_is_full_backpropagation(problem):
  """No window reaches behind step 1: any k2 >= T gives the k2 = T gradients."""
  for style in ("window", "per_loss"):
    beyond, _ = library_gradients(problem, 2, 10**6, style)
    at_t, _ = library_gradients(problem, 2, TIME, style)
    for name in numpy_oracle.NAMES:
      np.testing.assert_array_equal(beyond[name], at_t[name])


@pytest.mark.parametrize("style,k1,k2", [("window", 2, 4), ("per_loss", 2, 3)])
def test_padding_never_makes_nan(problem, style, k1, k2):
  """A cell undefined at zero input gets finite gradients in the first windows,
  whose padding steps (before step 1) are masked out."""

  def log_step(params, s, x_t):
    return seed_step(params, s, jnp.log(x_t))

  x = np.exp(problem["x"])  # log_step sees the problem's inputs
  fn = functools.partial(tbptt_jax.tbptt_gradients, log_step, loss_fn, k1=k1, k2=k2, style=style)
  with jax.enable_x64(True):
    grads, _ = jax.jit(fn)(problem["params"], problem["s0"], x, problem["y"])
  want, _ = library_gradients(problem, k1, k2, style)
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-13)


def test_per_loss_and_window_agree_for_k1_1(problem):
  """With k1 = 1 both styles are the 'true' TBPTT of the literature."""
  window, _ = library_gradients(problem, 1, 4, "window")
  per_loss, _ = library_gradients(problem, 1, 4, "per_loss")
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(window[name], per_loss[name], rtol=1e-12, atol=1e-14)


def test_chunked_tbptt_is_independent_chunks_with_carried_state():
  """k1 = k2 = k: each chunk's own gradient from the carried (constant) state.

  Any Flax cell works unchanged: a stacked LSTM with a readout here.
  """
  model = tbptt_jax.stack(
    tbptt_jax.flax_cell(nn.LSTMCell(5)),
    tbptt_jax.flax_cell(nn.GRUCell(4)),
    tbptt_jax.feedforward(nn.Dense(CLASSES)),
  )
  k, chunks = 3, 3
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((BATCH, k * chunks, IN)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, (BATCH, k * chunks)))
  params = model.init(jax.random.key(0), x[:, 0])
  carry = model.initial_carry(x[:, 0])
  tbptt = functools.partial(tbptt_jax.tbptt_gradients, model.apply, loss_fn, k1=k, k2=k)
  grads, final = jax.jit(tbptt)(params, carry, x, y)

  @jax.jit
  @functools.partial(jax.grad, has_aux=True)
  def chunk_grad(params, carry, x, y):
    carry, logits = tbptt_jax.unroll(model.apply, params, carry, x)
    return jnp.mean(jax.vmap(loss_fn, in_axes=1)(logits, y)), carry

  for i in range(chunks):
    cut = slice(i * k, (i + 1) * k)
    want, carry = chunk_grad(params, carry, x[:, cut], y[:, cut])
    got = jax.tree.map(lambda g, i=i: g[i], grads)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(final, carry, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "style,k2", [("window", 5), ("window", 3), ("per_loss", 2), ("per_loss", 4)]
)
def test_zero_gradient_across_every_cut(problem, style, k2):
  """No gradient reaches the carry or any state stored behind the windows."""
  r = 3  # block length
  rng = np.random.default_rng(3)
  lookback = Lookback(
    states=rng.standard_normal((k2 - 1, BATCH, HIDDEN)),
    inputs=rng.standard_normal((k2 - 1, BATCH, IN)),
    resets=np.zeros((k2 - 1, BATCH), bool),
    valid=np.ones((k2 - 1,), bool),
  )
  xs = rng.standard_normal((r, BATCH, IN))
  ys = rng.integers(0, CLASSES, (r, BATCH))

  def block_loss(carry, states, xs):
    return block_gradients(
      tbptt_jax.from_step(seed_step),
      loss_fn,
      Truncation(1, k2, style),
      problem["params"],
      StreamState(carry, lookback._replace(states=states)),
      Block(xs, ys, None),
      jnp.zeros_like(carry),
      ScanOptions(),
    ).loss

  with jax.enable_x64(True):
    d_carry, d_states, d_inputs = jax.grad(block_loss, argnums=(0, 1, 2))(
      problem["s0"], lookback.states, xs
    )
  assert np.all(np.asarray(d_carry) == 0.0)
  assert np.all(np.asarray(d_states) == 0.0)
  # Control: the loss does depend on the block's inputs.
  assert np.abs(np.asarray(d_inputs)).max() > 1e-3


@pytest.mark.parametrize("style,k1,k2,first", [("window", 3, 3, 3), ("per_loss", 3, 2, 2)])
def test_cell_gradients_of_an_update_stop_at_its_cut(problem, style, k1, k2, first):
  """Through the public entry point: the second update's gradient does not depend on any
  input behind its windows' cuts (exactly zero), and does on the inputs inside them (its
  earliest reachable step, 0-based: `first`, 2 k1 - k2 in window style, k1 - k2 + 1 per loss)."""
  truncation = tbptt_jax.Truncation(k1, k2, style)
  cell = tbptt_jax.from_step(seed_step)

  def second_update_gradient(x):
    grads, _ = tbptt_jax.cell_gradients(
      cell, loss_fn, truncation, problem["params"], problem["s0"], x, problem["y"][:, : 2 * k1]
    )
    return sum(jnp.sum(g[1]) for g in jax.tree.leaves(grads))

  with jax.enable_x64(True):
    d_x = np.asarray(jax.grad(second_update_gradient)(problem["x"][:, : 2 * k1]))
  assert np.all(d_x[:, :first] == 0.0)
  assert np.all(np.abs(d_x[:, first:]).max(axis=(0, 2)) > 1e-6)


def test_cell_gradients_compiles_once(problem):
  """The jitted entry point is traced once for many calls of the same shapes."""
  cell, truncation = tbptt_jax.from_step(seed_step), tbptt_jax.Truncation(2, 3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def gradients(params, carry, inputs, targets):
    return tbptt_jax.cell_gradients(cell, loss_fn, truncation, params, carry, inputs, targets)

  for seed in range(3):
    x = np.random.default_rng(seed).standard_normal(problem["x"].shape).astype(np.float32)
    gradients(problem["params"], problem["s0"].astype(np.float32), x, problem["y"])


@pytest.mark.parametrize(
  "args,message",
  [
    ((0, 2), r"Truncation: k1 must be an integer >= 1, got 0"),
    ((2, 0), r"Truncation: k2 must be an integer >= 1, got 0"),
    ((3, 2), r"Truncation: window style needs k2 >= k1.*got k1=3, k2=2"),
    ((2, 3, "tf"), r"Truncation: style must be one of \('window', 'per_loss'\), got 'tf'"),
  ],
)
def test_a_truncation_is_checked_where_it_is_made(args, message):
  with pytest.raises(ValueError, match=message):
    tbptt_jax.Truncation(*args)
  with pytest.raises(ValueError, match=message):
    tbptt_jax.Truncation(4, 5)._replace(**dict(zip(("k1", "k2", "style"), args, strict=False)))
  assert tbptt_jax.Truncation(3) == (3, 3, "window")  # k2 defaults to k1


def test_cell_gradients_bad_input(problem):
  args = (problem["params"], problem["s0"], problem["x"], problem["y"])
  with pytest.raises(ValueError, match=r"cell_gradients: cell must be a tbptt_jax.Cell"):
    tbptt_jax.cell_gradients(seed_step, loss_fn, tbptt_jax.Truncation(2), *args)
  with pytest.raises(ValueError, match=r"cell_gradients: truncation must be a .*Truncation"):
    tbptt_jax.cell_gradients(tbptt_jax.from_step(seed_step), loss_fn, (2, 2, "window"), *args)
  with pytest.raises(ValueError, match=r"cell_gradients: targets must have \[batch, time\]"):
    tbptt_jax.cell_gradients(
      tbptt_jax.from_step(seed_step), loss_fn, tbptt_jax.Truncation(2), *args[:3], args[3][:1]
    )


def test_pytree_inputs(problem):
  """Inputs may be any pytree of [batch, time, ...] arrays; the lookback keeps it."""

  def split_step(params, s, x_t):
    return seed_step(params, s, jnp.concatenate([x_t["a"], x_t["b"]], axis=-1))

  x = problem["x"]
  want, _ = library_gradients(problem, 2, 3, "window")
  tbptt = functools.partial(tbptt_jax.tbptt_gradients, split_step, loss_fn, k1=2, k2=3)
  with jax.enable_x64(True):
    got, _ = jax.jit(tbptt)(
      problem["params"], problem["s0"], {"a": x[..., :1], "b": x[..., 1:]}, problem["y"]
    )
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(k1=0), r"k1 must be an integer >= 1, got 0"),
    (dict(k1=2.0), r"k1 must be an integer >= 1, got 2\.0"),
    (dict(k2=0), r"k2 must be an integer >= 1, got 0"),
    (dict(k1=3, k2=2), r"window style needs k2 >= k1.*got k1=3, k2=2"),
    (dict(style="tf"), r"style must be one of \('window', 'per_loss'\), got 'tf'"),
    (dict(targets=lambda p: p["y"][:1]), r"targets must have \[batch, time\] = \[2, 7\]"),
    (dict(targets=lambda p: p["y"][:, :5]), r"targets must have \[batch, time\] = \[2, 7\]"),
    (dict(carry=lambda p: p["s0"][:1]), r"carry must have leading batch size 2"),
    (dict(inputs=lambda p: p["x"][:, :0], targets=lambda p: p["y"][:, :0]), r"time size 0"),
    (dict(inputs=lambda p: p["x"][0, 0]), r"inputs must have shape \[batch, time, \.\.\.\]"),
    (dict(resets=lambda p: p["resets"][:, :3]), r"resets must have shape \[batch, time\]"),
    (dict(resets=lambda p: p["resets"].astype(int)), r"resets must be boolean"),
    (dict(loss_fn=lambda out, y: jnp.sum(out)), r"per-example losses of shape \[batch\]"),
    (
      dict(reset_carry=lambda p: p["s0"][:, :2]),
      r"reset_carry must have the shapes of carry, \[\(2, 4\)\], got \[\(2, 2\)\]",
    ),
  ],
)
def test_bad_input(problem, change, message):
  args = dict(
    step_fn=seed_step,
    loss_fn=loss_fn,
    params=problem["params"],
    carry=problem["s0"],
    inputs=problem["x"],
    targets=problem["y"],
    k1=2,
    k2=3,
    style="window",
  )
  for key, value in change.items():
    args[key] = value(problem) if callable(value) and key != "loss_fn" else value
  with pytest.raises(ValueError, match=message):
    tbptt_jax.tbptt_gradients(**args)


@pytest.mark.parametrize("style,k1,k2", [("window", 3, 7), ("per_loss", 2, 5)])
def test_rematerialised_windows_give_the_same_gradients(problem, style, k1, k2):
  """remat=2: windows of 5 and 7 steps run as checkpointed segments, the last one padded; the
  gradients are those of the plain windows (which the oracle tests check), up to float32."""

  def gradients(remat):
    fn = functools.partial(
      tbptt_jax.tbptt_gradients, seed_step, loss_fn, k1=k1, k2=k2, style=style, remat=remat
    )
    args = jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float32),
      (problem["params"], problem["s0"], problem["x"]),
    )
    return jax.jit(fn)(*args, problem["y"], resets=problem["resets"])

  (plain, plain_carry), (remat, remat_carry) = gradients(None), gradients(2)
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(remat[name], plain[name], rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_array_equal(remat_carry, plain_carry)


def test_remat_stores_a_fraction_of_full_bptts_intermediates():
  """Full BPTT over 256 steps of an LSTM: XLA's temporary buffers with segments of 16 steps
  (16 stored carries and one segment's intermediates) against every step's intermediates."""
  cell = tbptt_jax.cell_by_name("lstm", 32)
  x = jnp.zeros((4, 256, 8))
  y = jnp.zeros((4, 256), jnp.int32)
  params = cell.init(jax.random.key(0), x[:, 0])

  def temp_bytes(remat):
    fn = functools.partial(
      tbptt_jax.tbptt_gradients, cell.apply, loss_fn, k1=256, k2=256, remat=remat
    )
    compiled = jax.jit(fn).lower(params, cell.initial_carry(x[:, 0]), x, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain, segmented = temp_bytes(None), temp_bytes(16)
  assert segmented < 0.5 * plain, (segmented, plain)
