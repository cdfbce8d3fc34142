"""Tests of `tbptt_jax.adaptive` and of the trainer's compiled set of k2s."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import diagnostics
from tbptt_jax.cells import Cell

BATCH, IN, HIDDEN, CLASSES = 3, 2, 4, 3
xent = optax.softmax_cross_entropy_with_integer_labels


def squared_error(out_t, y_t):
  return 0.5 * jnp.sum((out_t - y_t) ** 2, axis=-1)


def planted_rnn():
  """s_t = beta Q s_{t-1} + U x_t, Q orthogonal: the lag-k norms are beta^k times the lag-0 ones."""
  q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((HIDDEN, HIDDEN)))
  u = np.random.default_rng(2).standard_normal((HIDDEN, IN))

  def apply(params, s, x):
    s = params["beta"] * s @ params["Q"].T + x @ params["U"].T
    return s, s

  return Cell(
    init=lambda rng, x_t: {"beta": jnp.float32(0.5), "Q": jnp.asarray(q, jnp.float32), "U": u},
    initial_carry=lambda x_t: jnp.zeros((x_t.shape[0], HIDDEN), jnp.float32),
    apply=apply,
  )


def test_adaptive_k2_reacts_to_a_planted_decay_rate():
  """The controller recovers beta; it picks the least compiled k2 with beta^k2/(1-beta) <= delta."""
  k2s, delta = (2, 4, 8, 16, 32), 0.1
  model = planted_rnn()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, 40, IN)).astype(np.float32)
  y = rng.standard_normal((BATCH, 40, HIDDEN)).astype(np.float32)
  params = model.init(None, None)
  choose = tbptt_jax.adaptive_k2(model, squared_error, k2s, delta=delta)
  chosen = {}
  for beta, want_suggested in [(0.3, 3), (0.5, 5), (0.8, 18), (0.95, 32)]:
    # beta^k / (1 - beta) <= 0.1: k >= 2.2, 4.3, 17.5 and 103 (capped at max(k2s)).
    choice = choose(dict(params, beta=jnp.float32(beta)), x, y)
    assert choice.beta == pytest.approx(beta, rel=1e-4)
    assert choice.suggested == want_suggested
    assert choice.k2 == min(k for k in k2s if k >= want_suggested)
    assert choice.bias == pytest.approx(float(diagnostics.estimated_bias(choice.beta, choice.k2)))
    assert choice.norms.shape == (33,)
    chosen[beta] = choice.k2
  assert chosen == {0.3: 4, 0.5: 8, 0.8: 32, 0.95: 32}
  # Measuring on fewer streams gives the same decay on this noiseless system.
  few = tbptt_jax.adaptive_k2(model, squared_error, k2s, delta=delta, streams=1)
  assert few(dict(params, beta=jnp.float32(0.5)), x, y).k2 == 8


def make_model():
  return tbptt_jax.stack(tbptt_jax.elman(HIDDEN), tbptt_jax.feedforward(nn.Dense(CLASSES)))


def record_gradients() -> optax.GradientTransformation:
  """An 'optimizer' that keeps the last gradient as its state and never moves."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


@pytest.mark.parametrize("style", ["window", "per_loss"])
def test_compiled_k2s_switch_without_recompiling_and_make_each_k2s_gradient(style):
  """A trainer compiled for k2 in (3, 5, 8), switched between calls, makes at every update the
  TBPTT(k1, k2) gradient of the k2 it is set to; switching never recompiles; an unknown k2
  is refused."""
  k1, k2s, calls = 3, (8, 3, 5), [5, 8, 3, 8]  # k2s in any order
  rng = np.random.default_rng(3)
  x = rng.standard_normal((BATCH, len(calls) * k1, IN)).astype(np.float32)
  y = rng.integers(0, CLASSES, (BATCH, len(calls) * k1))
  model = make_model()
  trainer = tbptt_jax.tbptt_trainer(model, xent, record_gradients(), k1=k1, k2=k2s, style=style)
  assert trainer.k2s == (3, 5, 8)
  state = trainer.init(jax.random.key(0), x)
  assert int(state.k2) == 3
  with pytest.raises(ValueError, match=r"k2 must be one of the trainer's k2s \(3, 5, 8\)"):
    trainer.set_k2(state, 4)
  params, carry = jax.tree.map(jnp.copy, (state.params, state.carry))
  want = {
    k: tbptt_jax.tbptt_gradients(model.apply, xent, params, carry, x, y, k1=k1, k2=k, style=style)[
      0
    ]
    for k in set(calls)
  }
  for call, k2 in enumerate(calls):
    state = trainer.set_k2(state, k2)
    chunk = slice(call * k1, (call + 1) * k1)
    state, _ = trainer.update(state, x[:, chunk], y[:, chunk])
    chex.assert_trees_all_close(
      state.opt_state, jax.tree.map(lambda g, c=call: g[c], want[k2]), rtol=1e-5, atol=1e-7
    )
  assert trainer.update._cache_size() == 1
