"""Tests of the LRU cell: its parallel scan is the sequential scan of its step, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tbptt_jax
from tbptt_jax import linear_rnn
from tbptt_jax.unroll import masked_step

STATE, FEATURES, BATCH, TIME = 3, 2, 2, 7


def half_squared_error(out, target):
  return 0.5 * jnp.sum((out - target) ** 2, axis=-1)


def float64_case(seed=0, scan="associative"):
  """The cell at float64 with random parameters, carry, inputs and targets."""
  cell = tbptt_jax.lru(STATE, r_min=0.5, r_max=0.99, param_dtype=jnp.float64, scan=scan)
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((BATCH, TIME, FEATURES))
  params = cell.init(jax.random.key(seed), jnp.asarray(xs[:, 0]))
  carry = tuple(0.3 * rng.standard_normal((BATCH, STATE)) for _ in range(2))
  targets = rng.standard_normal((BATCH, TIME, FEATURES))
  return cell, params, carry, xs, targets


@pytest.mark.parametrize(
  "scan,with_resets", [("associative", False), ("associative", True), ("sequential", True)]
)
def test_its_scan_is_the_sequential_scan_of_its_step_float64(scan, with_resets):
  """Values, and gradients with respect to parameters, carry and inputs, to 1e-12, of the
  parallel scan and of the hoisted loop; with resets (one at the first step, so that the carry
  handed in is dropped) the scan of the step restarts from the reset carry as the engine's
  generic path does (`unroll.masked_step`)."""
  with jax.enable_x64(True):
    cell, params, carry, xs, _ = float64_case(scan=scan)
    xs = jnp.asarray(xs.transpose(1, 0, 2))  # time-major, as the engine hands a window over
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((TIME, BATCH, FEATURES)))
    resets = reset_carry = None
    if with_resets:
      resets = np.zeros((TIME, BATCH), bool)
      resets[0, 1] = resets[3, 0] = resets[4, 0] = resets[5, 1] = True
      reset_carry = tuple(jnp.full((BATCH, STATE), v) for v in (0.2, -0.1))

    def sequential(params, carry, xs):
      def step(c, step):
        x_t, reset_t = step
        return masked_step(cell.apply, params, c, x_t, reset_t=reset_t, reset_carry=reset_carry)

      return jax.lax.scan(step, carry, (xs, resets))

    def parallel(params, carry, xs):
      resetting = {} if resets is None else dict(resets=resets, reset_carry=reset_carry)
      final, outputs, _ = cell.scan(params, carry, xs, **resetting)
      return final, outputs

    def scalar(run):  # a function of every output and of the final carry
      def f(params, carry, xs):
        final, outputs = run(params, carry, xs)
        return jnp.sum(weights * outputs) + jnp.sum(final[0] ** 2) - jnp.sum(final[1])

      return f

    want, got = sequential(params, carry, xs), parallel(params, carry, xs)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)
    for a, b in zip(got[0], want[0], strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    resetting = {} if resets is None else dict(resets=resets, reset_carry=reset_carry)
    _, _, carries = cell.scan(params, carry, xs, **resetting)
    np.testing.assert_allclose(carries[0][-1], want[0][0], rtol=0, atol=1e-12)
    grads = [
      jax.grad(scalar(run), argnums=(0, 1, 2))(params, carry, xs) for run in (parallel, sequential)
    ]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k1,k2,style", [(2, 3, "window"), (2, 3, "per_loss"), (7, 7, "window")])
@pytest.mark.parametrize("with_resets", [False, True])
def test_the_engine_gives_its_step_by_steps_gradients(k1, k2, style, with_resets):
  """Through `cell_gradients`, the parallel scan's TBPTT(k1, k2) gradients and carry are the
  step-by-step engine's (the same cell without `scan`), the state restarting at each reset
  inside the parallel scan."""
  calls = []

  def counted_scan(*args, **resetting):
    calls.append(bool(resetting))
    return linear_rnn._scan("associative", *args, **resetting)

  with jax.enable_x64(True):
    cell, params, carry, xs, targets = float64_case(seed=2)
    resets = np.random.default_rng(3).random((BATCH, TIME)) < 0.3 if with_resets else None
    truncation = tbptt_jax.Truncation(k1, k2, style)
    results = [
      tbptt_jax.cell_gradients(
        model, half_squared_error, truncation, params, carry, xs, targets, resets=resets
      )
      for model in (cell._replace(scan=counted_scan), cell._replace(scan=None))
    ]
  assert calls and any(calls) == with_resets  # the parallel scan ran, and was handed the resets
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_initialisation_is_uniform_on_the_ring_and_normalised():
  cell = tbptt_jax.lru(4000, r_min=0.4, r_max=0.9, max_phase=1.0)
  params = cell.init(jax.random.key(0), jnp.ones((1, 3)))
  modulus = np.exp(-np.exp(np.asarray(params.nu_log, np.float64)))
  phase = np.exp(np.asarray(params.theta_log, np.float64))
  assert 0.4 - 1e-6 <= modulus.min() and modulus.max() <= 0.9 + 1e-6
  assert 0 < phase.min() and phase.max() <= 1.0 + 1e-6
  # |lambda|^2 uniform on [0.16, 0.81]: mean 0.485, standard error 0.19 / sqrt(4000) = 0.003.
  assert abs(np.mean(modulus**2) - 0.485) < 0.015
  np.testing.assert_allclose(np.exp(params.gamma_log), np.sqrt(1 - modulus**2), rtol=1e-5)


def test_trains_the_synthetic_task_as_a_cell_of_a_stack():
  """An LRU between an input projection and a readout learns the r2rt task's first dependency."""
  import optax
  from flax import linen as nn

  model = tbptt_jax.stack(
    tbptt_jax.feedforward(lambda x: jax.nn.one_hot(x, 2)),
    tbptt_jax.feedforward(nn.Dense(8)),
    tbptt_jax.lru(16, r_min=0.5, r_max=0.99),
    tbptt_jax.feedforward(nn.Dense(2)),
  )
  trainer = tbptt_jax.tbptt_trainer(
    model, optax.softmax_cross_entropy_with_integer_labels, optax.adam(1e-2), k1=10
  )
  xs, ys = tbptt_jax.synthetic.streams(0, 64, 4000)
  state = trainer.init(jax.random.key(0), xs[:, :10])
  state, metrics = trainer.update(state, xs, ys)
  final = float(np.mean(metrics.loss[-40:]))
  assert final < tbptt_jax.synthetic.reference_losses().lag3 + 0.02, final


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(state_size=0), "lru: state_size must be an integer >= 1, got 0"),
    (dict(state_size=4, r_min=0.9, r_max=0.5), r"0 <= r_min < r_max <= 1, got r_min=0.9"),
    (dict(state_size=4, r_max=1.5), r"r_max=1.5"),
    (dict(state_size=4, max_phase=0.0), "max_phase must be > 0, got 0.0"),
    (dict(state_size=4, scan="fast"), r"scan must be one of \('auto', 'associative', 'sequ"),
  ],
)
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tbptt_jax.lru(**kwargs)
