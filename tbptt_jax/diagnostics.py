r"""See the gradient through time: per-lag norms, Jacobian products, truncation bias.

Why truncation works, and when it fails, is how a loss's gradient decays with
the time lag. For the Elman network s_t = tanh(U x_t + W s_{t-1}), the chain
rule through time is

    d l_t / d s_{t-k} = d l_t / d s_t  J_t J_{t-1} ... J_{t-k+1},
    J_j = d s_j / d s_{j-1} = diag(1 - s_j^2) W,

and the contribution of step t - k to the parameter gradient is that row
vector times d s_{t-k} / d theta (theta as used at step t - k only). The
product of Jacobians shrinks geometrically when the largest singular value of
W is below 1 / gamma (gamma bounds the activation's derivative: 1 for tanh,
1/4 for the sigmoid), so distant steps contribute little (vanishing
gradients), and can grow without bound when it is far above (exploding
gradients, which norm clipping tames): Pascanu, Mikolov & Bengio 2013, "On the
difficulty of training recurrent neural networks". TBPTT with truncation k2
drops every lag k >= k2; how much that changes the gradient is its bias.

This module measures all of it for any model the library trains (a `Cell`,
with its `head` if it has one), with the state written s_t for the cell's
carry after step t, steps numbered 0..T-1 here:

* `lag_profile`: for lags k = 0..K, the norm of d l_t / d s_{t-k} and of step
  t - k's contribution to d l_t / d theta, averaged over t and streams, in one
  jitted call: every loss's backward chain is a `lax.scan` over lags, vmapped
  over losses. Lag 0 is the output: d l_t / d y_t, which is d l_t / d s_t when
  the output is the state (Elman) or part of it (h of an LSTM or GRU).
* `step_jacobian_spectra`, `jacobian_product_norms`: singular values of the
  one-step Jacobians J_t along a trajectory, and the spectral norms
  ||d s_T / d s_{T-k}||_2, exactly (dense Jacobians) or by power iteration
  (Jacobian-vector products only, for large states).
* `truncation_bias`: the cosine and relative error between the library's own
  TBPTT gradient (`tbptt_gradients`) and the full-BPTT gradient of the same
  sequence and parameters, for a range of k2.
* `decay_rate`, `estimated_bias`, `suggest_k2`: the geometric decay rate beta
  of the per-lag norms, fitted on a log scale, and the smallest k2 whose
  estimated relative bias beta^k2 / (1 - beta) is below a tolerance delta
  (Aicher, Foti & Fox, UAI 2019, "Adaptively Truncating Backpropagation
  Through Time to Control Gradient Bias").

Training-time monitoring (gradient norm before and after clipping, clipping
and non-finite counts) is part of every update's `UpdateMetrics`; the plots
are in `tbptt_jax.plots`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from tbptt_jax import _checks
from tbptt_jax.cells import Carry, Cell, Params, full_step, map_steps
from tbptt_jax.truncation import LossFn, Truncation, block_sizes, cell_gradients
from tbptt_jax.unroll import scan_steps, time_major


class LagProfile(NamedTuple):
  """How the gradient of the loss at step t depends on step t - k, for k = 0..K.

  The norms average over the losses t >= K, which reach back all K lags, so
  every lag averages the same losses (and, for `state_norms`, over streams);
  `gradient` sums over all losses.
  """

  state_norms: jax.Array  # shape=[K + 1]: mean of ||d l_t^b / d s_{t-k}^b|| (lag 0: d y_t^b)
  param_norms: jax.Array  # shape=[K + 1]: mean of ||step t-k's part of d mean_b l_t^b / d theta||
  losses: jax.Array  # shape=(), int32: how many loss steps t the norms average over, T - K
  gradient: Params  # the per-lag contributions summed over k <= K, averaged over all T losses
  # (None with parameters=False)


def lag_profile(
  model: Cell,
  loss_fn: LossFn,
  params: Params,
  inputs: Any,
  targets: Any,
  *,
  max_lag: int,
  carry: Carry | None = None,
  loss_chunk: int | None = None,
  parameters: bool = True,
) -> LagProfile:
  r"""Per-lag gradient norms of a model on a batch of sequences, in one jitted call.

  With l_t^b the per-example loss of stream b at step t, l_t = mean_b l_t^b,
  and c_{t,k} the part of d l_t / d theta that flows through theta's use at
  step t - k, for k = 0..K:

      state_norms[k] = mean_{t >= K, b} || d l_t^b / d s_{t-k}^b ||,
      param_norms[k] = mean_{t >= K} || c_{t,k} ||,

  with lag 0 taken at the output y_t (and the head's parameters counted in
  c_{t,0}). The norms average over the same losses at every lag, those that
  reach back K steps, so a geometric decay shows as a straight line on a log
  scale. Since d l_t / d theta = sum_k c_{t,k}, `gradient` = mean_t
  sum_{k <= min(t, K)} c_{t,k}, over all T losses, is the gradient of the mean
  loss with every l_t backpropagated through its last K + 1 steps: per-loss
  TBPTT with k2 = K + 1, and full BPTT once K >= T - 1. Streams are assumed
  independent (as in every cell of this library): d (sum_b l_t^b) / d s^b is
  then stream b's own gradient.

  How: one forward pass stores the carry entering every step; then, for each
  loss, a `lax.scan` over lags walks the chain rule backwards, one vector-
  Jacobian product of the cell per lag (d l_t / d s_{t-k-1} and c_{t,k} from
  d l_t / d s_{t-k}); the losses are vmapped, `loss_chunk` at a time. The cost
  is T (K + 1) cell steps forward and backward.

  Args:
    model: a `Cell` (its `head`, if any, is applied to y_t before `loss_fn`).
    loss_fn: `loss_fn(out_t, y_t) -> [batch]`, the per-example losses.
    params: the model's parameters.
    inputs: leaves `[batch, T, ...]`.
    targets: leaves `[batch, T, ...]`.
    max_lag: K, the largest lag, 0 <= K < T.
    carry: the carry entering step 0; default the model's initial carry.
    loss_chunk: losses vmapped at once (memory grows with it); default all T.
    parameters: if False, only `state_norms` are computed (`param_norms` are
      zeros, `gradient` is None), from the T - K losses they average over, with
      no parameter cotangents: far cheaper for large parameters (an LM's
      embedding), e.g. for `adaptive_k2`.

  Returns:
    A `LagProfile`.

  Example:
    >>> profile = lag_profile(model, loss_fn, params, x, y, max_lag=30)
    >>> beta = decay_rate(profile.state_norms)
  """
  where = "lag_profile"
  _check_model(where, model)
  batch, time = _checks.batch_time(where, "inputs", inputs)
  _checks.same_batch_time(where, "targets", targets, batch, time)
  if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)):
    raise ValueError(f"{where}: max_lag must be an integer, got {max_lag!r}")
  if not 0 <= max_lag < time:
    raise ValueError(
      f"{where}: max_lag must be in [0, T - 1] = [0, {time - 1}] for T = {time} steps, "
      f"got {max_lag}"
    )
  chunk = time if loss_chunk is None else _checks.positive_int(where, "loss_chunk", loss_chunk)
  carry = _initial_carry(where, model, inputs, carry, batch)
  static = (model, loss_fn, int(max_lag), min(chunk, time), bool(parameters))
  return _lag_profile(*static, params, carry, inputs, targets)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _lag_profile(
  model, loss_fn, max_lag, chunk, with_params, params, carry, inputs, targets
) -> LagProfile:
  """`lag_profile`; with_params=False computes the state norms only (param_norms and
  gradient zero), for the losses t >= K only: no parameter cotangents at all."""
  xs, ys = time_major((inputs, targets))
  time, batch = jax.tree.leaves(xs)[0].shape[:2]
  run = scan_steps(full_step(model), params, carry, xs, keep_carries=True)
  # The carry entering step tau: s_{tau - 1}, the initial carry for tau = 0.
  entering = jax.tree.map(lambda c, cs: jnp.concatenate([c[None], cs[:-1]]), carry, run.carries)
  trajectory = _Trajectory(xs, ys, entering, run.outputs)
  one_loss = functools.partial(_one_loss, model, loss_fn, max_lag, with_params, params, trajectory)
  # Losses in chunks of `chunk`, the last chunk padded with repeats of step T - 1, masked.
  # Without parameters only the losses that reach back K steps are needed.
  first = 0 if with_params else max_lag
  chunk = min(chunk, time - first)  # no chunk longer than the losses it covers
  n_chunks = -(-(time - first) // chunk)
  ts = first + jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)
  dtype = jnp.result_type(*jax.tree.leaves(carry)) if jax.tree.leaves(carry) else jnp.float32
  totals = (
    jnp.zeros((max_lag + 1,), dtype),
    jnp.zeros((max_lag + 1,), dtype),
    jax.tree.map(jnp.zeros_like, params) if with_params else (),
  )
  chunk_step = functools.partial(_chunk_step, one_loss, time, max_lag)
  (state_sum, param_sum, grad), _ = jax.lax.scan(chunk_step, totals, ts)
  losses = time - max_lag
  return LagProfile(
    state_norms=state_sum / (losses * batch),
    param_norms=param_sum / losses,
    losses=jnp.asarray(losses, jnp.int32),
    gradient=jax.tree.map(lambda g: g / time, grad) if with_params else None,
  )


class _Trajectory(NamedTuple):
  """One forward pass of `lag_profile`, time-major."""

  xs: Any  # leaves [T, batch, ...]: the raw inputs
  ys: Any  # leaves [T, batch, ...]: the targets
  entering: Carry  # leaves [T, batch, ...]: the carry entering each step
  outputs: Any  # leaves [T, batch, ...]: y_t before the head


def _chunk_step(one_loss, time, max_lag, totals, ts):
  """Adds a chunk of losses' per-lag norms and gradient contributions to the totals."""
  real = ts < time
  (state_norms, param_norms), grad_sums = jax.vmap(one_loss)(jnp.minimum(ts, time - 1))
  complete = real & (ts >= max_lag)  # the losses whose every lag exists
  state_sum, param_sum, grad = totals
  state_sum += jnp.sum(jnp.where(complete[:, None, None], state_norms, 0.0), axis=(0, 2))
  param_sum += jnp.sum(jnp.where(complete[:, None], param_norms, 0.0), axis=0)
  grad = jax.tree.map(
    lambda acc, g: acc + jnp.tensordot(real.astype(g.dtype), g, axes=1), grad, grad_sums
  )
  return (state_sum, param_sum, grad), None


def _loss_gradients(model, loss_fn, with_params, params, trajectory, t):
  """d (sum_b l_t^b) / d y_t, per stream, and the head's part of d l_t / d theta."""
  y_t = _at(trajectory.outputs, t)
  batch = jax.tree.leaves(y_t)[0].shape[0]

  def summed_loss(params, y_t):
    out_t = map_steps(model.head, params, _at(y_t, None))
    losses = jax.vmap(loss_fn)(out_t, _at(_at(trajectory.ys, t), None))
    _checks.per_example_losses("lag_profile", losses, 1, batch)
    return jnp.sum(losses)

  if not with_params:
    return None, jax.grad(summed_loss, argnums=1)(params, y_t)
  head_grads, dy = jax.grad(summed_loss, argnums=(0, 1))(params, y_t)
  return jax.tree.map(lambda g: g / batch, head_grads), dy


def _one_loss(model, loss_fn, max_lag, with_params, params, trajectory, t):
  """Walks the chain rule back from l_t over lags 0..K: norms per lag and sum_k c_{t,k}."""
  head_grads, dy = _loss_gradients(model, loss_fn, with_params, params, trajectory, t)
  lag_step = functools.partial(_lag_step, model, with_params, params, trajectory, t, head_grads, dy)
  ds0 = jax.tree.map(jnp.zeros_like, _at(trajectory.entering, 0))
  zeros = jax.tree.map(jnp.zeros_like, params) if with_params else ()
  (_, grad_sum), per_lag = jax.lax.scan(lag_step, (ds0, zeros), jnp.arange(max_lag + 1))
  return per_lag, grad_sum


def _lag_step(model, with_params, params, trajectory, t, head_grads, dy, state, k):
  """One lag back: from d l_t / d s_{t-k} to d l_t / d s_{t-k-1}, and c_{t,k}."""
  ds, grad_sum = state  # ds = d (sum_b l_t^b) / d s_{t-k} (zero at k = 0: l_t reads y_t)
  batch = jax.tree.leaves(dy)[0].shape[0]
  step = full_step(model)  # the step on raw inputs: the per-step VJPs take x_tau
  tau = t - k
  exists = tau >= 0
  tau = jnp.maximum(tau, 0)
  s_in, x_tau = _at(trajectory.entering, tau), _at(trajectory.xs, tau)
  dy_k = jax.tree.map(lambda a: jnp.where(k == 0, a, jnp.zeros_like(a)), dy)
  state_norm = jnp.where(k == 0, _stream_norms(dy), _stream_norms(ds))
  if not with_params:
    _, state_vjp = jax.vjp(lambda s: step(params, s, x_tau), s_in)
    (ds_in,) = state_vjp((ds, dy_k))
    return (ds_in, grad_sum), (state_norm, jnp.zeros((), state_norm.dtype))
  _, step_vjp = jax.vjp(lambda p, s: step(p, s, x_tau), params, s_in)
  dparams, ds_in = step_vjp((ds, dy_k))
  # c_{t,k}: the batch mean's gradient, the head's part at lag 0.
  c = jax.tree.map(
    lambda g, h: g / batch + jnp.where(k == 0, h, jnp.zeros_like(h)), dparams, head_grads
  )
  param_norm = optax.tree.norm(c)
  c = jax.tree.map(lambda a: jnp.where(exists, a, jnp.zeros_like(a)), c)
  grad_sum = jax.tree.map(jnp.add, grad_sum, c)
  return (ds_in, grad_sum), (state_norm, param_norm)


def step_jacobian_spectra(
  model: Cell,
  params: Params,
  inputs: Any,
  *,
  carry: Carry | None = None,
  stream: int = 0,
) -> jax.Array:
  r"""Singular values of the one-step Jacobians J_t = d s_t / d s_{t-1} along a trajectory.

  The state s_t is the whole carry of one stream, flattened (for an LSTM both
  c_t and h_t), so J_t is n x n for a carry of n numbers. For the Elman cell,
  J_t = diag(tanh'(a_t)) W^T in the batched row convention s_t = tanh(x U + s W).

  Args:
    model: a `Cell`.
    params: its parameters.
    inputs: leaves `[batch, T, ...]`; the trajectory is the model run on them.
    carry: the carry entering step 0; default the model's initial carry.
    stream: which stream's trajectory (streams do not interact).

  Returns:
    `[T, n]`: row t holds the singular values of J_t, largest first.
  """
  carry, xs = _one_stream("step_jacobian_spectra", model, inputs, carry, stream)
  return jnp.linalg.svd(_step_jacobians(model, params, carry, xs), compute_uv=False)


def jacobian_product_norms(
  model: Cell,
  params: Params,
  inputs: Any,
  *,
  max_lag: int,
  carry: Carry | None = None,
  stream: int = 0,
  method: str = "exact",
  iterations: int = 50,
) -> jax.Array:
  r"""Spectral norms ||d s_T / d s_{T-k}||_2 = ||J_T ... J_{T-k+1}||_2 for k = 1..K.

  The products end at the last step of `inputs` (pass a prefix to end
  earlier) and follow one stream's trajectory, its carry flattened as in
  `step_jacobian_spectra`.

  Args:
    model: a `Cell`.
    params: its parameters.
    inputs: leaves `[batch, T, ...]`.
    max_lag: K, 1 <= K <= T.
    carry: the carry entering step 0; default the model's initial carry.
    stream: which stream's trajectory.
    method: `"exact"` forms the n x n Jacobians and takes the largest singular
      value of each product (O(K n^3)); `"power"` never forms a matrix: it runs
      `iterations` steps of power iteration on P_k^T P_k with Jacobian-vector
      and vector-Jacobian products through the k steps, all k at once (O(K^2)
      cell steps per iteration), a lower bound that converges to the norm.
    iterations: power-iteration steps (`method="power"`).

  Returns:
    `[K]`: entry k - 1 is ||d s_T / d s_{T-k}||_2.
  """
  where = "jacobian_product_norms"
  _, time = _checks.batch_time(where, "inputs", inputs)
  if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)):
    raise ValueError(f"{where}: max_lag must be an integer, got {max_lag!r}")
  if not 1 <= max_lag <= time:
    raise ValueError(f"{where}: max_lag must be in [1, T] = [1, {time}], got {max_lag}")
  if method not in ("exact", "power"):
    raise ValueError(f"{where}: method must be 'exact' or 'power', got {method!r}")
  iterations = _checks.positive_int(where, "iterations", iterations)
  carry, xs = _one_stream(where, model, inputs, carry, stream)
  if method == "exact":
    return _exact_product_norms(model, int(max_lag), params, carry, xs)
  return _power_product_norms(model, int(max_lag), iterations, params, carry, xs)


class TruncationBias(NamedTuple):
  """How far TBPTT's gradient is from full BPTT's, for each k2."""

  k2: np.ndarray  # shape=[n], int: the truncation lengths
  cosine: np.ndarray  # shape=[n]: cos(g_k2, g_full)
  relative_error: np.ndarray  # shape=[n]: ||g_k2 - g_full|| / ||g_full||


def truncation_bias(
  model: Cell,
  loss_fn: LossFn,
  params: Params,
  inputs: Any,
  targets: Any,
  k2s: Sequence[int],
  *,
  k1: int | None = None,
  style: str = "per_loss",
  carry: Carry | None = None,
) -> TruncationBias:
  r"""The bias of TBPTT(k1, k2) against full BPTT, on one sequence at fixed parameters.

  g_k2 is the gradient the library's TBPTT makes over the sequence
  (`cell_gradients`), its updates' gradients weighted by their block sizes,
  so that it estimates the same quantity as full BPTT's g_full, the gradient
  of the mean loss over all T steps (k1 = k2 = T). Then

      cosine = <g_k2, g_full> / (||g_k2|| ||g_full||),
      relative_error = ||g_k2 - g_full|| / ||g_full||,

  computed in float64 on the host. At k2 >= T the two are the same gradient.

  Args:
    model: a `Cell` (with its `head`, if any).
    loss_fn: `loss_fn(out_t, y_t) -> [batch]`.
    params: the parameters.
    inputs: leaves `[batch, T, ...]`.
    targets: leaves `[batch, T, ...]`.
    k2s: the truncation lengths to measure, each >= 1.
    k1: steps per update; default k2 for each k2 in window style (chunked
      TBPTT), and T in per-loss style, whose gradient does not depend on k1
      (T compiles one block shape per k2, not two).
    style: `"per_loss"` (each l_t through exactly its last k2 steps) or
      `"window"` (see `tbptt_jax.truncation`).
    carry: the carry entering step 1; default the model's initial carry.

  Returns:
    A `TruncationBias` with one entry per k2, in the order given. Each k2
    compiles its own gradient (the lookback's length is static).
  """
  where = "truncation_bias"
  _check_model(where, model)
  batch, time = _checks.batch_time(where, "inputs", inputs)
  _checks.same_batch_time(where, "targets", targets, batch, time)
  k2s = [_checks.positive_int(where, "k2s[]", k) for k in np.atleast_1d(np.asarray(k2s)).tolist()]
  if not k2s:
    raise ValueError(f"{where}: k2s must hold at least one truncation length, got []")
  carry = _initial_carry(where, model, inputs, carry, batch)
  for k2 in k2s:
    _checks.truncation(where, k2 if k1 is None else k1, k2, style)
  if k1 is None and style == "per_loss":
    k1 = time

  def flat(k1, k2, style):
    grads = _sequence_gradient(model, loss_fn, k1, k2, style, params, carry, inputs, targets)
    return np.asarray(ravel_pytree(grads)[0], np.float64)

  full = flat(time, time, "window")
  full_norm = np.linalg.norm(full)
  cosine, error = [], []
  for k2 in k2s:
    g = flat(min(k2 if k1 is None else k1, time), min(k2, time), style)
    cosine.append(float(g @ full / (np.linalg.norm(g) * full_norm)))
    error.append(float(np.linalg.norm(g - full) / full_norm))
  return TruncationBias(np.asarray(k2s), np.asarray(cosine), np.asarray(error))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sequence_gradient(model, loss_fn, k1, k2, style, params, carry, inputs, targets):
  """TBPTT's gradient of the whole sequence: its updates' gradients, weighted by block size."""
  truncation = Truncation(k1, k2, style)
  grads, _ = cell_gradients(model, loss_fn, truncation, params, carry, inputs, targets)
  time = jax.tree.leaves(inputs)[0].shape[1]
  weights = jnp.asarray(block_sizes(time, k1) / time)
  return jax.tree.map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), grads)


def decay_rate(norms: Any, *, min_lag: int = 1, max_lag: int | None = None) -> float:
  r"""The geometric decay rate beta of per-lag norms: norms[k] ~ C beta^k.

  A least-squares line through (k, log norms[k]) for min_lag <= k <= max_lag;
  beta = exp(slope). Lag 0 is left out by default: at the output the loss's
  gradient has a direct path the later lags do not share. Non-positive or
  non-finite norms (underflow) are left out of the fit.

  Args:
    norms: `[K + 1]` per-lag norms, e.g. `LagProfile.state_norms`.
    min_lag: the first lag fitted.
    max_lag: the last lag fitted; default K.

  Returns:
    beta, a Python float (beta < 1: the norms vanish with the lag).
  """
  where = "decay_rate"
  norms = np.asarray(norms, np.float64)
  if norms.ndim != 1:
    raise ValueError(f"{where}: norms must be one-dimensional [K + 1], got shape {norms.shape}")
  last = norms.size - 1 if max_lag is None else max_lag
  lags = np.arange(norms.size)
  use = (lags >= min_lag) & (lags <= last) & np.isfinite(norms) & (norms > 0)
  if np.count_nonzero(use) < 2:
    raise ValueError(
      f"{where}: needs at least two positive, finite norms at lags {min_lag}..{last}, "
      f"got {np.count_nonzero(use)}"
    )
  slope = np.polyfit(lags[use], np.log(norms[use]), 1)[0]
  return float(np.exp(slope))


def estimated_bias(beta: float, k2: Any) -> Any:
  r"""The estimated relative bias of truncating at k2: beta^k2 / (1 - beta).

  With per-lag norms phi_k = phi_0 beta^k, truncation at k2 drops the lags
  k >= k2, whose total is phi_0 sum_{k >= k2} beta^k = phi_0 beta^k2 / (1 - beta)
  (Aicher, Foti & Fox 2019): the bias in units of the lag-0 norm. For the
  norms of the parameter contributions (`LagProfile.param_norms`) decaying
  exactly so, the triangle inequality makes it a bound on
  ||g_k2 - g_full|| / phi_0; in practice it is usually loose: the dropped
  contributions partly cancel, and real norms often fall faster over the
  first lags than one fitted beta says
  (`notebooks/vanishing_exploding.ipynb` measures both on a PTB model).
  Infinite when beta >= 1: nothing decays.
  """
  k2 = np.asarray(k2, np.float64)
  if not beta < 1:
    return np.full_like(k2, np.inf)[()]
  return (beta**k2 / (1 - beta))[()]


def suggest_k2(beta: float, delta: float, *, k_min: int = 1, k_max: int = 1000) -> int:
  """The smallest k2 in [k_min, k_max] whose estimated relative bias is <= delta.

  k_max when none is (beta close to or above 1: long dependencies or
  exploding gradients, which no truncation length makes unbiased).

  Args:
    beta: the decay rate, e.g. from `decay_rate`.
    delta: the tolerated relative bias, > 0.
    k_min: the shortest truncation allowed.
    k_max: the longest truncation allowed.
  """
  where = "suggest_k2"
  k_min = _checks.positive_int(where, "k_min", k_min)
  k_max = _checks.positive_int(where, "k_max", k_max)
  if k_max < k_min:
    raise ValueError(f"{where}: k_max must be >= k_min = {k_min}, got {k_max}")
  if not delta > 0:
    raise ValueError(f"{where}: delta must be > 0, got {delta!r}")
  if beta <= 0:
    return k_min  # nothing reaches back even one step
  if beta >= 1:
    return k_max
  # beta^k / (1 - beta) <= delta  <=>  k >= log(delta (1 - beta)) / log(beta)
  k = math.ceil(math.log(delta * (1 - beta)) / math.log(beta) - 1e-12)
  return int(min(max(k, k_min), k_max))


def _one_stream(where, model, inputs, carry, stream):
  """The carry and inputs of one stream (batch axis kept, of size 1), inputs time-major."""
  _check_model(where, model)
  batch, _ = _checks.batch_time(where, "inputs", inputs)
  if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)):
    raise ValueError(f"{where}: stream must be an integer, got {stream!r}")
  if not 0 <= stream < batch:
    raise ValueError(f"{where}: stream must be in [0, {batch - 1}], got {stream}")
  carry = _initial_carry(where, model, inputs, carry, batch)
  one = lambda a: jnp.asarray(a)[stream : stream + 1]  # noqa: E731
  carry, inputs = jax.tree.map(one, carry), jax.tree.map(one, inputs)
  if not jax.tree.leaves(carry):
    raise ValueError(f"{where}: the model has no state (its carry is empty)")
  return carry, time_major(inputs)


def _flat_trajectory(model, params, carry, xs):
  """`step(s, x_t) -> s'` on the flattened carry, and the flat carry entering each step."""
  s0, unravel = ravel_pytree(carry)
  model_step = full_step(model)

  def step(s, x_t):
    new_carry, _ = model_step(params, unravel(s), x_t)
    return ravel_pytree(new_carry)[0]

  def body(s, x_t):
    return step(s, x_t), s

  return step, jax.lax.scan(body, s0, xs)[1]


@functools.partial(jax.jit, static_argnums=0)
def _step_jacobians(model, params, carry, xs):
  step, entering = _flat_trajectory(model, params, carry, xs)
  return jax.vmap(jax.jacfwd(step))(entering, xs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _exact_product_norms(model, max_lag, params, carry, xs):
  step, entering = _flat_trajectory(model, params, carry, xs)
  first = entering.shape[0] - max_lag
  last = jax.vmap(jax.jacfwd(step))(entering[first:], _at(xs, slice(first, None)))

  def body(product, jacobian):
    # d s_T / d s_{T-k} = (d s_T / d s_{T-k+1}) J_{T-k+1}
    product = product @ jacobian
    return product, jnp.linalg.norm(product, ord=2)

  eye = jnp.eye(entering.shape[1], dtype=entering.dtype)
  return jax.lax.scan(body, eye, last, reverse=True)[1][::-1]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _power_product_norms(model, max_lag, iterations, params, carry, xs):
  step, entering = _flat_trajectory(model, params, carry, xs)
  time, n = entering.shape
  window = _at(xs, slice(time - max_lag, None))
  norm_at_lag = functools.partial(_norm_at_lag, step, entering, window, iterations)
  v0 = jax.random.normal(jax.random.key(0), (max_lag, n), entering.dtype)
  return jax.vmap(norm_at_lag)(jnp.arange(1, max_lag + 1), v0)


def _product_map(step, window, k, s):
  """s_{T-k} -> s_T: the last K steps of `window`, the first K - k of them passing s through."""
  max_lag = jax.tree.leaves(window)[0].shape[0]

  def body(s, step_in):
    j, x_t = step_in
    return jnp.where(j >= max_lag - k, step(s, x_t), s), None

  return jax.lax.scan(body, s, (jnp.arange(max_lag), window))[0]


def _norm_at_lag(step, entering, window, iterations, k, v):
  """||d s_T / d s_{T-k}||_2 by power iteration on P^T P from the start vector `v`."""
  start = entering[entering.shape[0] - k]
  _, jvp = jax.linearize(functools.partial(_product_map, step, window, k), start)
  vjp = jax.linear_transpose(jvp, start)

  def iterate(v, _):
    w = vjp(jvp(v))[0]
    return w / jnp.linalg.norm(w), None

  v = jax.lax.scan(iterate, v / jnp.linalg.norm(v), None, length=iterations)[0]
  return jnp.linalg.norm(jvp(v))


def _check_model(where: str, model: Any) -> None:
  if not isinstance(model, Cell):
    raise ValueError(f"{where}: model must be a tbptt_jax.Cell, got {type(model).__name__}")


def _initial_carry(where: str, model: Cell, inputs: Any, carry: Carry | None, batch: int) -> Carry:
  if carry is None:
    return model.initial_carry(jax.tree.map(lambda a: jnp.asarray(a)[:, 0], inputs))
  _checks.leading_batch(where, "carry", carry, batch)
  return carry


def _at(tree: Any, index: Any) -> Any:
  """Every leaf indexed on its leading axis (None adds one)."""
  return jax.tree.map(lambda a: a[index], tree)


def _stream_norms(tree: Any) -> jax.Array:
  """The norm of each stream's slice of a pytree with leaves [batch, ...]."""
  squares = [jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1) for a in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))
