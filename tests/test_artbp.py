"""Tests of `tbptt_jax.artbp`: unbiased random truncation (Tallec & Ollivier 2017)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import artbp

BATCH, IN, CLASSES = 3, 2, 3
loss_fn = optax.softmax_cross_entropy_with_integer_labels


def make_model(hidden=3):
  return tbptt_jax.stack(tbptt_jax.elman(hidden), tbptt_jax.feedforward(nn.Dense(CLASSES)))


def record_gradients() -> optax.GradientTransformation:
  """An 'optimizer' that keeps the last gradient as its state and never moves."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def step_keys(seed, shape):
  return np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), shape)))


def test_monte_carlo_mean_is_the_full_bptt_gradient_and_fixed_truncation_is_not():
  """Averaged over many draws the ARTBP gradient equals full BPTT within its standard error;
  per-loss TBPTT with k2 = 3 is many standard errors away.

  T = 8 steps and max_length = T: no segment is ever cut for its length, so the
  estimate is exactly unbiased. 20 groups of 400 streams with the same data and
  their own draws; the spread of the group means gives the standard error.
  """
  time, groups, draws = 8, 20, 400
  model = make_model()
  rng = np.random.default_rng(0)
  x = np.repeat(rng.standard_normal((1, time, IN)).astype(np.float32), draws, axis=0)
  y = np.repeat(rng.integers(0, CLASSES, (1, time)), draws, axis=0)
  params = model.init(jax.random.key(1), x[:, 0])
  # Larger recurrent weights than the default initialisation: long paths matter.
  params = jax.tree.map(lambda p: 2.0 * p, params)
  carry = model.initial_carry(x[:, 0])

  def gradient(step_fn, k2, style, inputs, carry):
    grads, final = tbptt_jax.tbptt_gradients(
      step_fn, loss_fn, params, carry, inputs, y, k1=time, k2=k2, style=style
    )
    return jax.tree.map(lambda g: g[0], grads), final

  full, full_carry = jax.jit(functools.partial(gradient, model.apply, time, "window"))(x, carry)
  truncated, _ = jax.jit(functools.partial(gradient, model.apply, 3, "per_loss"))(x, carry)
  cell = artbp.artbp_cell(model, artbp.ARTBP(mean_length=3.0, alpha=4.0), max_length=time)
  wrapped_carry = cell.initial_carry((x[:, 0], step_keys(0, (draws, 2))[:, 0]))
  keys = step_keys(2, (groups, draws, time))

  @jax.jit
  def group_means(keys):
    run = functools.partial(gradient, cell.apply, time, "window")
    return jax.vmap(lambda k: run((x, k), wrapped_carry))(keys)

  means, finals = group_means(keys)
  # The forward pass is untouched: every draw carries the plain model's state.
  chex.assert_trees_all_close(
    finals.carry, jax.tree.map(lambda a: jnp.broadcast_to(a, (groups,) + a.shape), full_carry)
  )
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])  # noqa: E731
  samples = np.stack([flat(jax.tree.map(lambda a, g=g: a[g], means)) for g in range(groups)])
  estimate, want = samples.mean(axis=0), flat(full)
  error = samples.std(axis=0, ddof=1) / np.sqrt(groups)
  # The head's gradient (lag 0) crosses no step, so it has no randomness: compare it plainly.
  random = error > 1e-6 * np.abs(want).max()
  np.testing.assert_allclose(estimate[~random], want[~random], rtol=1e-5, atol=1e-6)
  assert random.sum() >= 12  # the recurrent cell's U, W and b
  z_artbp = np.abs(estimate - want)[random] / error[random]
  z_fixed = np.abs(flat(truncated) - want)[random] / error[random]
  assert z_artbp.max() < 4.5, z_artbp
  assert z_fixed.max() > 10, z_fixed


def test_cut_schedule_and_segment_lengths():
  """c_t follows the paper's schedule; cuts are forced at the stream start and at max_length;
  the fraction of cut steps matches the renewal rate 1 / E[segment length]."""
  config = artbp.ARTBP(mean_length=4.0, alpha=4.0)
  since = jnp.arange(0, 12)
  c = np.asarray(artbp.cut_probability(config, since, max_length=10))
  want = 3.0 / (2.0 * 4.0 + np.arange(12))
  np.testing.assert_allclose(c[1:10], want[1:10], rtol=1e-6)
  assert c[0] == 1.0 and (c[10:] == 1.0).all()
  # Run the cut process alone (a cell with no state of its own) over many streams.
  identity = tbptt_jax.Cell(
    init=lambda rng, x: {},
    initial_carry=lambda x: jnp.zeros((x.shape[0], 1)),
    apply=lambda params, s, x: (s, s),
  )
  max_length, streams, time = 10, 512, 400
  cell = artbp.artbp_cell(identity, config, max_length=max_length)
  x = np.zeros((streams, time, 1), np.float32)
  keys = step_keys(3, (streams, time))
  carry = cell.initial_carry((x[:, 0], keys[:, 0]))

  def step(carry, inputs):
    carry, _ = cell.apply({}, carry, inputs)
    return carry, carry.since

  _, since = jax.lax.scan(step, carry, (np.swapaxes(x, 0, 1), np.swapaxes(keys, 0, 1)))
  since = np.asarray(since)
  assert since[50:].min() == 1 and since.max() == max_length
  # P(segment length >= n) = prod_{d < n} (1 - c_d), with c forced to 1 at max_length.
  survive = np.cumprod(np.concatenate([[1.0], 1 - c[1:max_length]]))
  rate = 1 / survive.sum()
  # Steps 40 apart are independent (no segment is longer than 10): binomial errors hold.
  cut = since[50::40] == 1
  assert abs(cut.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / cut.size), (cut.mean(), rate)


def test_trainer_with_artbp_makes_the_reweighted_gradient_of_its_draws():
  """The trainer's ARTBP update is `tbptt_gradients` of `artbp_cell` on the keys it drew,
  including a window that re-runs the previous call's steps (same draws replayed)."""
  k1, k2 = 2, 5
  config = artbp.ARTBP(mean_length=2.0)
  model = make_model()
  trainer = tbptt_jax.tbptt_trainer(model, loss_fn, record_gradients(), k1=k1, k2=k2, artbp=config)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((BATCH, 6, IN)).astype(np.float32)
  y = rng.integers(0, CLASSES, (BATCH, 6))
  state = trainer.init(jax.random.key(5), x[:, :k1])
  params, carry = jax.tree.map(jnp.copy, (state.params, state.carry))
  assert isinstance(carry, artbp.ARTBPCarry)
  state, _ = trainer.update(state, x[:, :4], y[:, :4])  # the lookback now holds these 4 keys
  first_keys = np.swapaxes(np.asarray(state.lookback.inputs[1]), 0, 1)
  state, _ = trainer.update(state, x[:, 4:6], y[:, 4:6])
  second_keys = np.swapaxes(np.asarray(state.lookback.inputs[1]), 0, 1)[:, -2:]
  keys = np.concatenate([first_keys, second_keys], axis=1)
  cell = artbp.artbp_cell(model, config, max_length=k2 - k1 + 1)
  reference = functools.partial(tbptt_jax.tbptt_gradients, cell.apply, loss_fn, k1=k1, k2=k2)
  want, _ = jax.jit(reference)(params, carry, (x, keys), y)
  chex.assert_trees_all_close(
    state.opt_state, jax.tree.map(lambda g: g[2], want), rtol=1e-5, atol=1e-6
  )


def test_artbp_on_a_model_with_embed_trains_as_its_stack():
  """ARTBP passes a model's `embed` through with the cut draws beside it: `with_embed` makes
  the updates of the stack it stands for, windows that reach back included."""
  k1, k2 = 2, 5
  fast = tbptt_jax.with_embed(nn.Dense(IN), make_model())
  plain = tbptt_jax.stack(tbptt_jax.feedforward(nn.Dense(IN)), make_model())
  rng = np.random.default_rng(6)
  x = rng.standard_normal((BATCH, 6, IN)).astype(np.float32)
  y = rng.integers(0, CLASSES, (BATCH, 6))
  states = []
  for model in (fast, plain):
    trainer = tbptt_jax.tbptt_trainer(
      model, loss_fn, record_gradients(), k1=k1, k2=k2, artbp=artbp.ARTBP(mean_length=2.0)
    )
    state = trainer.init(jax.random.key(7), x[:, :k1])
    state, _ = trainer.update(state, x[:, :4], y[:, :4])
    state, _ = trainer.update(state, x[:, 4:], y[:, 4:])
    states.append(state)
  assert np.any(np.asarray(states[0].opt_state[0]["params"]["kernel"]) != 0)
  chex.assert_trees_all_close(states[0].opt_state, states[1].opt_state, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(states[0].carry, states[1].carry, rtol=1e-6)


def test_a_set_of_windows_runs_the_shortest_that_reaches_every_cut_with_the_same_gradient():
  """ARTBP with k2 in (4, 6, 9) makes, update by update, the gradient of the k2 = 9 window (the
  same cap, the same draws), while running shorter windows when every stream's segment is short."""
  k1, config = 3, artbp.ARTBP(mean_length=2.0)
  rng = np.random.default_rng(6)
  x = rng.standard_normal((BATCH, 8 * k1, IN)).astype(np.float32)
  y = rng.integers(0, CLASSES, (BATCH, 8 * k1))
  runs = {}
  for k2 in [(4, 6, 9), 9]:
    trainer = tbptt_jax.tbptt_trainer(
      make_model(), loss_fn, record_gradients(), k1=k1, k2=k2, artbp=config
    )
    state = trainer.init(jax.random.key(8), x[:, :k1])
    grads, used = [], []
    for call in range(8):
      chunk = slice(call * k1, (call + 1) * k1)
      state, metrics = trainer.update(state, x[:, chunk], y[:, chunk])
      grads.append(jax.device_get(state.opt_state))  # the next call donates the state
      used.append(int(metrics.k2[0]))
    runs[k2] = grads, used, trainer
  (many, used, trainer), (one, _, _) = runs[(4, 6, 9)], runs[9]
  for got, want in zip(many, one, strict=True):
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert min(used) < 9 and set(used) <= {4, 6, 9}, used
  assert trainer.update._cache_size() == 1
  with pytest.raises(ValueError, match="each update picks its own window"):
    trainer.set_k2(state, 6)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(k1=3, k2=3, artbp=artbp.ARTBP(4.0)), "artbp needs segments of >= 2 steps"),
    (
      dict(k1=3, k2=(4, 8), style="per_loss", artbp=artbp.ARTBP(4.0)),
      "artbp needs segments of >= 2 steps",
    ),
    (dict(k1=3, k2=8, artbp=artbp.ARTBP(1.0)), "mean_length must be > 1"),
    (dict(k1=3, k2=8, artbp=artbp.ARTBP(4.0, alpha=2.0)), "alpha must be > 2"),
    (dict(k1=3, k2=8, artbp=(4.0, 4.0)), "artbp must be a tbptt_jax.ARTBP"),
  ],
)
def test_bad_artbp_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tbptt_jax.tbptt_trainer(make_model(), loss_fn, optax.sgd(0.1), **kwargs)
