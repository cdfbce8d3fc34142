"""Tests of `tbptt_jax.diagnostics` and `tbptt_jax.plots`: closed forms, sums, reductions."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import diagnostics, plots
from tbptt_jax.cells import Cell

BATCH, TIME, IN, HIDDEN = 2, 7, 3, 4
xent = optax.softmax_cross_entropy_with_integer_labels


def squared_error(out_t, y_t):
  return 0.5 * jnp.sum((out_t - y_t) ** 2, axis=-1)


def linear_rnn(W, U):
  """s_t = W s_{t-1} + U x_t (column convention, as in the closed form), output s_t."""

  def apply(params, s, x):
    s = s @ params["W"].T + x @ params["U"].T
    return s, s

  return Cell(
    init=lambda rng, x_t: {"W": jnp.asarray(W), "U": jnp.asarray(U)},
    initial_carry=lambda x_t: jnp.zeros((x_t.shape[0], W.shape[0]), jnp.asarray(W).dtype),
    apply=apply,
  )


def orthogonal(n, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  return q


@pytest.fixture(scope="module")
def linear_problem():
  rng = np.random.default_rng(0)
  # Distinct singular values 1.3 > 0.9 > 0.6 > 0.2, so power iteration converges fast.
  W = orthogonal(HIDDEN, 1) @ np.diag([1.3, 0.9, 0.6, 0.2]) @ orthogonal(HIDDEN, 2)
  U = rng.standard_normal((HIDDEN, IN))
  x = rng.standard_normal((BATCH, TIME, IN))
  y = rng.standard_normal((BATCH, TIME, HIDDEN))
  return W, U, x, y


def linear_states(W, U, x):
  s, states = np.zeros((x.shape[0], W.shape[0])), []
  for t in range(x.shape[1]):
    s = s @ W.T + x[:, t] @ U.T
    states.append(s)
  return np.stack(states, axis=1)  # [batch, T, hidden]


def test_per_lag_norms_of_a_linear_rnn_match_the_closed_form(linear_problem):
  """||d l_t / d s_{t-k}|| = ||(W^T)^k g_t||, g_t = d l_t / d s_t; and the W, U contributions."""
  W, U, x, y = linear_problem
  with jax.enable_x64(True):
    model = linear_rnn(W, U)
    profile = diagnostics.lag_profile(model, squared_error, model.init(None, None), x, y, max_lag=3)
  states = linear_states(W, U, x)
  max_lag = 3
  state_sums, param_sums = np.zeros(max_lag + 1), np.zeros(max_lag + 1)
  for t in range(max_lag, TIME):  # the losses that reach back max_lag steps
    g = states[:, t] - y[:, t]  # [batch, hidden]: d l_t^b / d s_t^b
    for k in range(max_lag + 1):
      tau = t - k
      s_before = states[:, tau - 1] if tau > 0 else np.zeros_like(g)
      # Step tau's part of d (mean_b l_t^b) / d (W, U): outer products with its inputs.
      dW = np.einsum("bi,bj->ij", g, s_before) / BATCH
      dU = np.einsum("bi,bj->ij", g, x[:, tau]) / BATCH
      state_sums[k] += np.linalg.norm(g, axis=1).sum()
      param_sums[k] += np.sqrt(np.sum(dW**2) + np.sum(dU**2))
      g = g @ W  # (W^T)^k g, batched as rows
  losses = TIME - max_lag
  assert profile.losses == losses
  np.testing.assert_allclose(profile.state_norms, state_sums / (losses * BATCH), rtol=1e-12)
  np.testing.assert_allclose(profile.param_norms, param_sums / losses, rtol=1e-12)


def test_decay_rate_of_a_scaled_orthogonal_rnn_is_its_scale():
  """With W = rho Q, Q orthogonal, ||(W^T)^k g|| = rho^k ||g||: beta is rho exactly."""
  rng = np.random.default_rng(3)
  rho = 0.8
  W, U = rho * orthogonal(HIDDEN, 4), rng.standard_normal((HIDDEN, IN))
  x, y = rng.standard_normal((BATCH, TIME, IN)), rng.standard_normal((BATCH, TIME, HIDDEN))
  with jax.enable_x64(True):
    model = linear_rnn(W, U)
    profile = diagnostics.lag_profile(model, squared_error, model.init(None, None), x, y, max_lag=5)
    # The state norms alone (no parameter cotangents, as adaptive_k2 measures): the same.
    lean = diagnostics.lag_profile(
      model, squared_error, model.init(None, None), x, y, max_lag=5, parameters=False
    )
  assert diagnostics.decay_rate(profile.state_norms) == pytest.approx(rho, rel=1e-10)
  np.testing.assert_allclose(lean.state_norms, profile.state_norms, rtol=1e-12)
  assert lean.gradient is None and lean.losses == profile.losses


def test_decay_rate_recovers_beta_from_noisy_geometric_norms():
  rng = np.random.default_rng(0)
  for beta in (0.3, 0.7, 0.95, 1.1):
    lags = np.arange(40)
    norms = 2.5 * beta**lags * np.exp(0.05 * rng.standard_normal(lags.size))
    assert diagnostics.decay_rate(norms) == pytest.approx(beta, rel=5e-3)
  # Underflowed lags are left out of the fit.
  norms = 0.5 ** np.arange(10.0)
  norms[7:] = 0.0
  assert diagnostics.decay_rate(norms) == pytest.approx(0.5, rel=1e-12)


def test_suggested_k2_is_the_smallest_within_the_bias_tolerance():
  for beta, delta in ((0.5, 0.01), (0.9, 0.1), (0.99, 0.05), (0.3, 1e-6)):
    k2 = diagnostics.suggest_k2(beta, delta, k_max=10_000)
    assert diagnostics.estimated_bias(beta, k2) <= delta < diagnostics.estimated_bias(beta, k2 - 1)
  assert diagnostics.estimated_bias(0.5, 3) == pytest.approx(0.125 / 0.5)
  assert diagnostics.suggest_k2(0.5, 0.01, k_min=20) == 20
  assert diagnostics.suggest_k2(0.99, 1e-9, k_max=50) == 50
  assert diagnostics.suggest_k2(1.2, 0.1, k_max=300) == 300  # nothing decays
  assert diagnostics.estimated_bias(1.0, [1, 2]).tolist() == [np.inf, np.inf]


def test_jacobians_of_a_linear_rnn_are_w_and_its_powers(linear_problem):
  W, U, x, _ = linear_problem
  with jax.enable_x64(True):
    model = linear_rnn(W, U)
    params = model.init(None, None)
    spectra = diagnostics.step_jacobian_spectra(model, params, x, stream=1)
    exact = diagnostics.jacobian_product_norms(model, params, x, max_lag=TIME)
    power = diagnostics.jacobian_product_norms(
      model, params, x, max_lag=TIME, method="power", iterations=60
    )
  np.testing.assert_allclose(spectra, np.tile([1.3, 0.9, 0.6, 0.2], (TIME, 1)), rtol=1e-12)
  want = [np.linalg.norm(np.linalg.matrix_power(W, k), 2) for k in range(1, TIME + 1)]
  np.testing.assert_allclose(exact, want, rtol=1e-12)
  np.testing.assert_allclose(power, want, rtol=1e-8)


# One of each kind of carry: a state, (c, h), a gated state.
CELLS = ["elman", "lstm", "gru"]


@pytest.fixture(scope="module")
def classification():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((BATCH, TIME, IN)).astype(np.float32)
  y = rng.integers(0, 3, (BATCH, TIME))
  return x, y


@pytest.mark.parametrize("name", CELLS)
def test_contributions_sum_to_full_bptt_and_to_per_loss_tbptt(name, classification):
  """Every cell: sum_k c_{t,k} over all lags is jax.grad of the whole sequence; over
  lags < k2 it is the engine's per-loss TBPTT gradient; chunking the losses changes nothing."""
  x, y = classification
  model = tbptt_jax.with_head(tbptt_jax.cell_by_name(name, HIDDEN), nn.Dense(3))
  params = model.init(jax.random.key(0), x[:, 0])

  def mean_loss(params):
    _, ys = tbptt_jax.unroll(model.apply, params, model.initial_carry(x[:, 0]), x)
    return jnp.mean(xent(jax.vmap(model.head, (None, 1), 1)(params, ys), y))

  full = diagnostics.lag_profile(model, xent, params, x, y, max_lag=TIME - 1, loss_chunk=3)
  chex_close(full.gradient, jax.jit(jax.grad(mean_loss))(params), atol=2e-6)
  assert np.all(np.asarray(full.state_norms) > 0) and np.all(np.asarray(full.param_norms) > 0)

  k2 = 3
  truncated = diagnostics.lag_profile(model, xent, params, x, y, max_lag=k2 - 1)
  engine, _ = jax.jit(
    functools.partial(
      tbptt_jax.tbptt_gradients, model.apply, xent,
      k1=TIME, k2=k2, style="per_loss", head_fn=model.head,
    )
  )(params, model.initial_carry(x[:, 0]), x, y)  # fmt: skip
  chex_close(truncated.gradient, jax.tree.map(lambda g: g[0], engine), atol=2e-6)
  assert np.all(np.asarray(truncated.state_norms) > 0)


def test_a_model_with_embed_has_the_profile_and_bias_of_its_stack(classification):
  """The diagnostics run a cell's `embed` with its step: `with_embed` is the stack it
  stands for (the same parameters), its input layer's gradient included."""
  x, y = classification
  cell = tbptt_jax.with_head(tbptt_jax.elman(HIDDEN), nn.Dense(3))
  fast = tbptt_jax.with_embed(nn.Dense(2), cell)
  plain = tbptt_jax.stack(tbptt_jax.feedforward(nn.Dense(2)), cell)
  params = fast.init(jax.random.key(0), x[:, 0])
  got = diagnostics.lag_profile(fast, xent, params, x, y, max_lag=3)
  want = diagnostics.lag_profile(plain, xent, params, x, y, max_lag=3)
  chex_close(got, want, atol=1e-6)
  assert np.all(np.asarray(got.gradient[0]["params"]["kernel"]) != 0)
  got = diagnostics.truncation_bias(fast, xent, params, x, y, k2s=[2])
  want = diagnostics.truncation_bias(plain, xent, params, x, y, k2s=[2])
  np.testing.assert_allclose(got.relative_error, want.relative_error, rtol=1e-5)


def chex_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_truncation_bias_agrees_with_the_lag_decomposition_and_vanishes_at_t(linear_problem):
  W, U, x, y = linear_problem
  with jax.enable_x64(True):
    model = linear_rnn(W, U)
    params = model.init(None, None)
    bias = diagnostics.truncation_bias(model, squared_error, params, x, y, [2, TIME + 5])
    window = diagnostics.truncation_bias(
      model, squared_error, params, x, y, [3], k1=2, style="window"
    )
    truncated = diagnostics.lag_profile(model, squared_error, params, x, y, max_lag=1).gradient
    full = diagnostics.lag_profile(model, squared_error, params, x, y, max_lag=TIME - 1).gradient
    g_window = _window_gradient(model, params, x, y, k1=2, k2=3)
  flat = lambda g: np.concatenate([np.ravel(g["U"]), np.ravel(g["W"])])  # noqa: E731
  g, f = flat(truncated), flat(full)
  assert bias.k2.tolist() == [2, TIME + 5]
  assert bias.cosine[0] == pytest.approx(g @ f / (np.linalg.norm(g) * np.linalg.norm(f)), rel=1e-10)
  assert bias.relative_error[0] == pytest.approx(np.linalg.norm(g - f) / np.linalg.norm(f), 1e-10)
  assert bias.relative_error[0] > 0.1  # W's largest singular value is 1.3: far from negligible
  np.testing.assert_allclose(bias.relative_error[1:], 0.0, atol=1e-12)
  np.testing.assert_allclose(bias.cosine[1:], 1.0, atol=1e-12)
  gw = flat(g_window)
  assert window.relative_error[0] == pytest.approx(
    np.linalg.norm(gw - f) / np.linalg.norm(f), 1e-10
  )


def _window_gradient(model, params, x, y, k1, k2):
  """Window-style TBPTT(k1, k2)'s sequence gradient: its updates weighted by block size."""
  gradients = functools.partial(tbptt_jax.tbptt_gradients, model.apply, squared_error, k1=k1, k2=k2)
  grads, _ = jax.jit(gradients)(params, model.initial_carry(x[:, 0]), x, y)
  sizes = np.minimum(k1, TIME - k1 * np.arange(-(-TIME // k1)))
  return jax.tree.map(lambda g: np.tensordot(sizes / TIME, np.asarray(g), axes=1), grads)


def test_jacobian_products_of_a_language_model_exact_and_power_agree():
  """A stacked LSTM with an embedding (carry of 2 layers x (c, h)): the two methods agree."""
  model = tbptt_jax.lm.language_model(tbptt_jax.lm.LMConfig(vocab_size=11, hidden=3, layers=2))
  tokens = np.random.default_rng(0).integers(0, 11, (BATCH, TIME))
  params = model.init(jax.random.key(0), (tokens[:, 0], None))
  spectra = diagnostics.step_jacobian_spectra(model, params, (tokens, None))
  assert spectra.shape == (TIME, 12) and np.all(np.diff(spectra, axis=1) <= 0)
  exact = diagnostics.jacobian_product_norms(model, params, (tokens, None), max_lag=3)
  power = diagnostics.jacobian_product_norms(
    model, params, (tokens, None), max_lag=3, method="power", iterations=100
  )
  np.testing.assert_allclose(power, exact, rtol=1e-3)
  np.testing.assert_allclose(exact[0], spectra[-1, 0], rtol=1e-5)  # lag 1 is the last J_t


def test_bad_arguments_are_named(linear_problem, classification):
  W, U, x, y = linear_problem
  model = linear_rnn(W.astype(np.float32), U.astype(np.float32))
  params = model.init(None, None)
  profile = functools.partial(diagnostics.lag_profile, model, squared_error, params)
  bias = functools.partial(diagnostics.truncation_bias, model, squared_error, params, x, y)
  products = functools.partial(diagnostics.jacobian_product_norms, model, params, x)
  cases = [
    (lambda: profile(x, y, max_lag=TIME), "max_lag"),
    (lambda: profile(x, y, max_lag=-1), "max_lag"),
    (lambda: profile(x, y[:, :3], max_lag=1), "targets"),
    (lambda: profile(x, y, max_lag=1, loss_chunk=0), "loss_chunk"),
    (lambda: diagnostics.lag_profile(model.apply, squared_error, params, x, y, max_lag=1), "model"),
    (lambda: diagnostics.lag_profile(model, lambda o, t: o, params, x, y, max_lag=1), "loss_fn"),
    (lambda: products(max_lag=0), "max_lag"),
    (lambda: products(max_lag=2, method="svd"), "method"),
    (lambda: diagnostics.step_jacobian_spectra(model, params, x, stream=BATCH), "stream"),
    (lambda: bias([]), "k2s"),
    (lambda: bias([0]), "k2s"),
    (lambda: bias([2], k1=3, style="window"), "k2 >= k1"),
    (lambda: diagnostics.decay_rate([1.0, 0.0, 0.0]), "at least two"),
    (lambda: diagnostics.decay_rate(np.ones((2, 3))), "one-dimensional"),
    (lambda: diagnostics.suggest_k2(0.5, 0.0), "delta"),
    (lambda: diagnostics.suggest_k2(0.5, 0.1, k_min=5, k_max=4), "k_max"),
  ]  # fmt: skip
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()


def test_plots_draw_every_diagnostic(linear_problem):
  plt = pytest.importorskip("matplotlib.pyplot")
  W, U, x, y = linear_problem
  profile = diagnostics.LagProfile(
    state_norms=np.array([1.0, 0.5, 0.25, 0.0]),
    param_norms=np.array([2.0, 1.0, 0.5, 0.2]),
    losses=np.array(4),
    gradient=None,
  )
  fig, axes = plt.subplots(1, 3)
  plots.plot_lag_norms({"tanh": profile, "products": [1.0, 2.0]}, ax=axes[0])
  assert len(axes[0].lines) == 2 and np.isnan(axes[0].lines[0].get_ydata()[-1])
  bias = diagnostics.TruncationBias(
    np.array([1, 2, 4]), np.array([0.5, 0.9, 1.0]), np.array([1, 0.3, 0.0])
  )
  plots.plot_truncation_bias(bias, beta=0.5, suggested_k2=2, ax=axes[1])
  assert len(axes[1].lines) == 3
  metrics = tbptt_jax.UpdateMetrics(
    loss=np.ones(4), grad_norm=np.array([1.0, 8.0, np.nan, 2.0]), clipped_grad_norm=np.ones(4),
    clipped=np.array([False, True, False, False]), nonfinite=np.array([False, False, True, False]),
    k2=np.full(4, 5),
  )  # fmt: skip
  plots.plot_grad_norms(metrics, max_grad_norm=5.0, ax=axes[2])
  assert [line.get_label() for line in axes[2].lines][-1] == "NaN / inf gradient"
  with pytest.raises(ValueError, match="kind"):
    plots.plot_lag_norms({"a": profile}, kind="lags", ax=axes[0])
  plt.close(fig)
