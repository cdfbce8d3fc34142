"""Tests of `tbptt_jax.train`: the jitted multi-chunk TBPTT training step."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import lm, synthetic

BATCH, IN, CLASSES = 3, 2, 3
loss_fn = optax.softmax_cross_entropy_with_integer_labels


def make_model(hidden=4):
  return tbptt_jax.stack(tbptt_jax.elman(hidden), tbptt_jax.feedforward(nn.Dense(CLASSES)))


def record_gradients() -> optax.GradientTransformation:
  """An 'optimizer' that keeps the last gradient as its state and never moves."""

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(jnp.zeros_like, grads), grads

  return optax.GradientTransformation(init, update)


def data(time, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, time, IN)).astype(np.float32)
  y = rng.integers(0, CLASSES, (BATCH, time))
  return x, y


@pytest.mark.parametrize("style,k1,k2", [("window", 2, 5), ("window", 3, 3), ("per_loss", 3, 2)])
def test_each_update_is_the_tbptt_gradient_across_calls(style, k1, k2):
  """One block per call, the last one partial: the lookback makes calls seamless.

  Every update's gradient (recorded, parameters held fixed) equals that of
  `tbptt_gradients` over the whole sequence.
  """
  time = 3 * k1 + 1
  x, y = data(time)
  model = make_model()
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, record_gradients(), k1=k1, k2=k2, style=style)
  state = trainer.init(jax.random.key(0), x)
  params, carry = state.params, state.carry
  reference = functools.partial(
    tbptt_jax.tbptt_gradients, model.apply, loss_fn, k1=k1, k2=k2, style=style
  )
  want, want_carry = jax.jit(reference)(params, carry, x, y)
  for i, start in enumerate(range(0, time, k1)):
    cut = slice(start, start + k1)
    state, metrics = trainer.update(state, x[:, cut], y[:, cut])
    assert metrics.loss.shape == (1,)
    chex.assert_trees_all_close(
      state.opt_state, jax.tree.map(lambda g, i=i: g[i], want), rtol=1e-5, atol=1e-7
    )
  chex.assert_trees_all_close(state.carry, want_carry, rtol=1e-6, atol=1e-7)
  assert int(state.step) == -(-time // k1)


def test_calls_split_at_block_borders_make_the_same_updates():
  """T steps in one call equal the same steps over several calls (k2 > k1, Adam)."""
  k1, k2, time = 2, 5, 12
  x, y = data(time, seed=1)
  trainer = tbptt_jax.tbptt_trainer(make_model(), loss_fn, optax.adam(0.05), k1=k1, k2=k2)
  one = trainer.init(jax.random.key(1), x)
  split = trainer.init(jax.random.key(1), x)
  one, one_metrics = trainer.update(one, x, y)
  losses = []
  for start, stop in [(0, 4), (4, 8), (8, 12)]:
    split, metrics = trainer.update(split, x[:, start:stop], y[:, start:stop])
    losses.append(metrics.loss)
  np.testing.assert_allclose(np.concatenate(losses), one_metrics.loss, rtol=1e-5)
  chex.assert_trees_all_close(split.params, one.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(split.carry, one.carry, rtol=1e-5, atol=1e-6)
  assert one_metrics.loss.shape == (time // k1,)


def test_online_chunked_training_matches_a_manual_loop():
  """k1 = k2 with SGD: update, then carry the forward state into the next chunk."""
  k, chunks, lr = 3, 4, 0.5
  x, y = data(k * chunks, seed=2)
  model = make_model()
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, optax.sgd(lr), k1=k)
  state = trainer.init(jax.random.key(2), x)
  params, carry = jax.tree.map(jnp.copy, (state.params, state.carry))  # `update` donates state
  state, _ = trainer.update(state, x, y)

  step = jax.jit(functools.partial(tbptt_jax.tbptt_gradients, model.apply, loss_fn, k1=k, k2=k))
  for i in range(chunks):
    cut = slice(i * k, (i + 1) * k)
    grads, carry = step(params, carry, x[:, cut], y[:, cut])
    params = jax.tree.map(lambda p, g: p - lr * g[0], params, grads)
  chex.assert_trees_all_close(state.params, params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state.carry, carry, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style,k1,k2", [("window", 2, 6), ("per_loss", 2, 3)])
def test_carry_is_the_online_forward_pass(style, k1, k2):
  """The carried state is each block run once, with the parameters of its update.

  The truncation shapes only the backward pass: windows that re-run older steps
  with newer parameters do not change the state carried on.
  """
  time = 4 * k1
  x, y = data(time, seed=7)
  model = make_model()
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, optax.sgd(0.5), k1=k1, k2=k2, style=style)
  state = trainer.init(jax.random.key(7), x)
  carry = jax.tree.map(jnp.copy, state.carry)
  for start in range(0, time, k1):
    cut = slice(start, start + k1)
    carry, _ = tbptt_jax.unroll(model.apply, state.params, carry, x[:, cut])
    state, _ = trainer.update(state, x[:, cut], y[:, cut])
  # float32 rounding only: a block run with another update's parameters is off by ~lr * grad.
  chex.assert_trees_all_close(state.carry, carry, rtol=1e-5, atol=1e-6)


def test_styles_coincide_online_for_k1_1():
  """With k1 = 1 both styles are the same algorithm, so they train identically."""
  x, y = data(12, seed=8)
  runs = []
  for style in ("window", "per_loss"):
    trainer = tbptt_jax.tbptt_trainer(
      make_model(), loss_fn, optax.sgd(0.5), k1=1, k2=4, style=style
    )
    state, metrics = trainer.update(trainer.init(jax.random.key(8), x), x, y)
    runs.append((metrics.loss, state.params, state.carry))
  chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_donation_is_safe_with_shared_initial_arrays():
  """An initial carry that repeats one array, or is cached, survives donation."""
  cached = jnp.zeros((BATCH, 4))

  def lstm_like(params, carry, x_t):
    c, h = carry
    h = jnp.tanh(x_t @ params["U"] + h @ params["W"] + c)
    return (c + h, h), h

  def init(rng, x_t):
    return {"U": jax.random.normal(rng, (IN, 4)), "W": jnp.eye(4) * 0.5}

  model = tbptt_jax.stack(
    tbptt_jax.Cell(init, lambda x_t: (cached, cached), lstm_like),
    tbptt_jax.feedforward(nn.Dense(CLASSES)),
  )
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, optax.sgd(0.1), k1=2, k2=3)
  x, y = data(4, seed=9)
  state, _ = trainer.update(trainer.init(jax.random.key(9), x), x, y)
  state, metrics = trainer.update(trainer.reset(state), x, y)
  assert np.isfinite(np.asarray(metrics.loss)).all()
  assert not cached.is_deleted()


def test_update_compiles_once():
  """The jitted step is traced once for many calls of the same shapes."""
  traces = 0
  model = make_model()

  def counted_apply(params, carry, x_t):
    nonlocal traces
    traces += 1
    return model.apply(params, carry, x_t)

  trainer = tbptt_jax.tbptt_trainer(
    model._replace(apply=counted_apply), loss_fn, optax.adam(1e-2), k1=2, k2=4
  )
  x, y = data(8, seed=3)
  state = trainer.init(jax.random.key(3), x)
  state, _ = trainer.update(state, x, y)
  traced_once = traces
  assert traced_once > 0
  for _ in range(4):
    state, _ = trainer.update(state, x, y)
  assert traces == traced_once


def test_state_is_donated():
  trainer = tbptt_jax.tbptt_trainer(make_model(), loss_fn, optax.sgd(0.1), k1=2)
  x, y = data(4)
  state = trainer.init(jax.random.key(0), x)
  new_state, _ = trainer.update(state, x, y)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state.params))


def test_gradient_clipping_and_its_metrics_and_the_nonfinite_guard():
  """max_grad_norm clips each update; the metrics report the norm before and after, and that
  clipping fired; a NaN input is reported as a non-finite gradient, whose update is skipped."""
  clip, lr = 1e-3, 1.0
  trainer = tbptt_jax.tbptt_trainer(make_model(), loss_fn, optax.sgd(lr), k1=4, max_grad_norm=clip)
  x, y = data(8, seed=4)
  state = trainer.init(jax.random.key(4), x)
  before = jax.tree.map(jnp.copy, state.params)  # `update` donates state
  state, metrics = trainer.update(state, x[:, :4], y[:, :4])
  moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, state.params, before))
  assert float(metrics.grad_norm[0]) > 100 * clip
  np.testing.assert_allclose(float(moved), lr * clip, rtol=1e-4)
  np.testing.assert_allclose(metrics.clipped_grad_norm, [clip], rtol=1e-5)
  assert metrics.clipped.tolist() == [True] and metrics.nonfinite.tolist() == [False]
  poisoned = np.array(x[:, 4:])
  poisoned[0, 1] = np.nan
  good = jax.tree.map(np.array, (state.params, state.opt_state, state.step))
  state, metrics = trainer.update(state, poisoned, y[:, 4:])
  assert metrics.nonfinite.tolist() == [True] and not metrics.clipped[0]
  # The guard skipped the update: parameters, optimizer state and step are the last good ones.
  chex.assert_trees_all_equal((state.params, state.opt_state, state.step), good)
  unguarded = tbptt_jax.tbptt_trainer(
    make_model(), loss_fn, optax.sgd(lr), k1=4, max_grad_norm=clip, skip_nonfinite=False
  )
  state, _ = unguarded.update(unguarded.init(jax.random.key(4), x), poisoned, y[:, 4:])
  assert not np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])).all()

  # A finite gradient whose optimizer update is not finite (a NaN learning rate) is skipped too.
  for optimizer in (optax.sgd(float("nan")), optax.adam(float("nan"))):
    trainer = tbptt_jax.tbptt_trainer(make_model(), loss_fn, optimizer, k1=4)
    state = trainer.init(jax.random.key(4), x)
    start = jax.tree.map(np.array, (state.params, state.opt_state, state.step))
    state, metrics = trainer.update(state, x, y)
    assert np.isfinite(metrics.grad_norm).all() and metrics.nonfinite.tolist() == [True, True]
    chex.assert_trees_all_equal((state.params, state.opt_state, state.step), start)

  # Without clipping, the norm the optimizer gets is the gradient's own.
  trainer = tbptt_jax.tbptt_trainer(make_model(), loss_fn, optax.sgd(lr), k1=4)
  _, metrics = trainer.update(trainer.init(jax.random.key(4), x), x, y)
  np.testing.assert_array_equal(metrics.clipped_grad_norm, metrics.grad_norm)
  assert not metrics.clipped.any() and not metrics.nonfinite.any()


def test_reset_restarts_every_stream():
  """After `reset`, training continues as from a fresh start with the same parameters."""
  k1, k2 = 2, 4
  x, y = data(6, seed=5)
  model = make_model()
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, record_gradients(), k1=k1, k2=k2)
  state = trainer.init(jax.random.key(5), x)
  fresh = jax.tree.map(jnp.copy, state)  # `update` donates state
  state, _ = trainer.update(state, x, y)
  state = trainer.reset(state)
  chex.assert_trees_all_equal(state.carry, model.initial_carry(x[:, 0]))
  assert not np.asarray(state.lookback.valid).any()
  state, after_reset = trainer.update(state, x, y)
  fresh, from_start = trainer.update(fresh, x, y)
  np.testing.assert_allclose(after_reset.loss, from_start.loss, rtol=1e-6)
  chex.assert_trees_all_close(state.opt_state, fresh.opt_state, rtol=1e-6, atol=1e-8)


def test_resets_match_tbptt_gradients():
  k1, k2 = 2, 3
  x, y = data(6, seed=6)
  resets = np.zeros((BATCH, 6), bool)
  resets[0, 3] = resets[2, 1] = True
  model = make_model()
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, record_gradients(), k1=k1, k2=k2)
  state = trainer.init(jax.random.key(6), x)
  reference = functools.partial(tbptt_jax.tbptt_gradients, model.apply, loss_fn, k1=k1, k2=k2)
  want, want_carry = jax.jit(reference)(state.params, state.carry, x, y, resets=resets)
  for i in range(3):
    cut = slice(2 * i, 2 * i + 2)
    state, _ = trainer.update(state, x[:, cut], y[:, cut], resets[:, cut])
    chex.assert_trees_all_close(
      state.opt_state, jax.tree.map(lambda g, i=i: g[i], want), rtol=1e-5, atol=1e-7
    )
  chex.assert_trees_all_close(state.carry, want_carry, rtol=1e-6, atol=1e-7)


def test_step_rngs_are_replayed_by_windows_that_reach_back():
  """With dropout, a window re-running earlier steps uses the masks those steps had.

  The keys the trainer drew are read back from the lookback; the recorded
  gradients must equal `tbptt_gradients` on the inputs paired with those keys.
  """
  k1, k2 = 2, 5
  model = lm.language_model(lm.LMConfig(vocab_size=7, hidden=4, layers=1, dropout=0.5))
  trainer = tbptt_jax.tbptt_trainer(
    model, lm.cross_entropy, record_gradients(), k1=k1, k2=k2, step_rngs=True
  )
  w = np.random.default_rng(7).integers(0, 7, (BATCH, 7)).astype(np.int32)
  x, y = w[:, :-1], w[:, 1:]
  state = trainer.init(jax.random.key(7), x[:, :k1])
  params, carry = jax.tree.map(jnp.copy, (state.params, state.carry))  # `update` donates state
  # A first call of k2 - 1 steps: afterwards the lookback holds exactly its keys.
  state, _ = trainer.update(state, x[:, :4], y[:, :4])
  first_keys = np.swapaxes(np.asarray(state.lookback.inputs[1]), 0, 1)  # [batch, 4, 2]
  np.testing.assert_array_equal(np.swapaxes(np.asarray(state.lookback.inputs[0]), 0, 1), x[:, :4])
  # A second call whose window reaches 3 steps back into the first call.
  state, _ = trainer.update(state, x[:, 4:6], y[:, 4:6])
  second_keys = np.swapaxes(np.asarray(state.lookback.inputs[1]), 0, 1)[:, -2:]
  keys = np.concatenate([first_keys, second_keys], axis=1)
  assert len({tuple(k) for k in keys.reshape(-1, keys.shape[-1])}) == BATCH * 6  # all distinct
  reference = functools.partial(
    tbptt_jax.tbptt_gradients, model.apply, lm.cross_entropy, k1=k1, k2=k2, head_fn=model.head
  )
  want, _ = jax.jit(reference)(params, carry, (x[:, :6], keys), y[:, :6])
  chex.assert_trees_all_close(
    state.opt_state, jax.tree.map(lambda g: g[2], want), rtol=1e-5, atol=1e-7
  )
  # Without the same keys the gradient differs: the masks matter.
  other, _ = jax.jit(reference)(params, carry, (x[:, :6], keys[:, ::-1]), y[:, :6])
  assert not np.allclose(
    jax.tree.leaves(other)[0][2], jax.tree.leaves(state.opt_state)[0], rtol=1e-3
  )


def test_step_rngs_are_reproducible_from_the_seed():
  model = lm.language_model(lm.LMConfig(vocab_size=7, hidden=4, layers=1, dropout=0.5))
  trainer = tbptt_jax.tbptt_trainer(model, lm.cross_entropy, optax.sgd(0.1), k1=2, step_rngs=True)
  w = np.random.default_rng(8).integers(0, 7, (BATCH, 5)).astype(np.int32)

  def run(seed):
    state = trainer.init(jax.random.key(seed), w[:, :2])
    state, metrics = trainer.update(state, w[:, :-1], w[:, 1:])
    return state, metrics.loss

  state_a, loss_a = run(0)
  state_b, loss_b = run(0)
  chex.assert_trees_all_equal(state_a.params, state_b.params)
  np.testing.assert_array_equal(loss_a, loss_b)
  _, loss_c = run(1)
  assert not np.array_equal(loss_a, loss_c)


def r2rt_final_loss(k, updates=3000, seed=0):
  """Final loss (last 10% of updates) of a small Elman network on the r2rt task."""
  glorot = jax.nn.initializers.glorot_uniform()
  model = synthetic.model(tbptt_jax.elman(5, input_init=glorot, recurrent_init=glorot))
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, optax.adam(0.03), k1=k, k2=k)
  xs, ys = synthetic.streams(seed, 200, updates * k)
  state = trainer.init(jax.random.key(seed), xs[:, :k])
  losses = []
  for inputs, targets in tbptt_jax.iterate_chunks(xs, 500 * k, targets=ys):
    state, metrics = trainer.update(state, inputs, targets)
    losses.append(metrics.loss)
  return float(np.concatenate(losses)[-updates // 10 :].mean())


def test_r2rt_task_separates_truncations():
  """k = 3 cannot learn X(t-3), k = 5 learns it, k = 10 learns X(t-8) as well.

  A state of 5 units with Glorot initialisation keeps no memory of its own at
  the start (as in r2rt's 4-unit network), so what is learnt is what the
  truncated gradient reaches. Levels: 0.6616 / 0.5192 / 0.4545.
  """
  levels = synthetic.reference_losses()
  k3, k5, k10 = (r2rt_final_loss(k) for k in (3, 5, 10))
  assert k3 > levels.neither - 0.02  # stays near 0.66: no dependency learned
  assert k5 < levels.lag3 + 0.01  # X(t-3) learned
  assert k10 < levels.both + 0.02  # both learned, about 0.45
  assert k10 < k5 - 0.01


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(k1=0), r"k1 must be an integer >= 1, got 0"),
    (dict(k1=4, k2=2), r"window style needs k2 >= k1"),
    (dict(style="chunked"), r"style must be one of"),
    (dict(max_grad_norm=0.0), r"max_grad_norm must be > 0 or None, got 0\.0"),
    (dict(unroll=0), r"unroll must be an integer >= 1, got 0"),
    (dict(remat=0), r"remat must be an integer >= 1, got 0"),
    (dict(model=lambda p, c, x: (c, x)), r"model must be a tbptt_jax.Cell"),
    (dict(optimizer=0.1), r"optimizer must be an optax.GradientTransformation"),
    (dict(loss_fn=None), r"loss_fn must be a function loss_fn\(out, target\) -> \[batch\], got"),
    (dict(optimizer=optax.GradientTransformation(None, None)), r"optimizer.init must be a"),
    (
      dict(model=tbptt_jax.Cell(lambda r, x: {}, lambda x: (), "apply")),
      r"model.apply must be a function, got str 'apply'",
    ),
    (
      dict(model=make_model()._replace(head=1)),
      r"model.head must be a function or None, got int 1",
    ),
  ],
)
def test_bad_configuration(kwargs, message):
  args = dict(model=make_model(), loss_fn=loss_fn, optimizer=optax.sgd(0.1), k1=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    tbptt_jax.tbptt_trainer(**args)


def test_bad_update_input():
  trainer = tbptt_jax.tbptt_trainer(make_model(), loss_fn, optax.sgd(0.1), k1=2)
  x, y = data(4)
  for bad, given in ((0, "int 0"), (np.zeros(2, np.int32), r"int32\[2\]")):
    with pytest.raises(ValueError, match=r"init: rng must be a PRNG key such as jax.random.key"):
      trainer.init(bad, x)
    with pytest.raises(ValueError, match=given):
      trainer.init(bad, x)
  trainer.init(jax.random.PRNGKey(0), x)  # the raw uint32 data of a key is a key too
  state = trainer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"targets must have \[batch, time\] = \[3, 4\]"):
    trainer.update(state, x, y[:, :3])
  like_init = (
    r"each step of inputs must have the shape and dtype of those the state was initialised"
  )
  with pytest.raises(
    ValueError, match=like_init + r" with, \[3, 2\] float32, got \[2, 2\] float32"
  ):
    trainer.update(state, x[:2], y[:2])
  with pytest.raises(
    ValueError, match=like_init + r" with, \[3, 2\] float32, got \[3, 5\] float32"
  ):
    trainer.update(state, np.ones((3, 4, 5), np.float32), y)
  with pytest.raises(ValueError, match=like_init + r" with, \[3, 2\] float32, got \[3, 2\] int32"):
    trainer.update(state, x.astype(np.int32), y)
  with pytest.raises(ValueError, match=r"resets must have shape \[batch, time\] = \[3, 4\]"):
    trainer.update(state, x, y, np.zeros((3, 2), bool))
  # A state passed to update once was donated: reusing it is explained, not XLA's error.
  new_state, _ = trainer.update(state, x, y)
  with pytest.raises(ValueError, match=r"update: this state was already passed to update"):
    trainer.update(state, x, y)
  new_state, _ = trainer.update(new_state, x, y)  # the returned state goes on
  jax.jit(lambda state: trainer.update(state, x, y))(new_state)  # and under a caller's jit
