r"""Adaptive truncation: choose k2 for a tolerated gradient bias (Aicher et al. 2019).

Which k2? Too short and the gradient misses the dependencies that matter (and
TBPTT may not converge); too long and compute is wasted, and the noise of
distant lags can hurt. Aicher, Foti & Fox turn the choice of a lag into the
choice of a tolerated relative bias delta. For many RNNs the per-lag norms of
the backpropagated gradient decay geometrically,

    phi_k = mean_t || d l_t / d s_{t-k} ||  ~  C beta^k,

so truncating at k2 drops about beta^k2 / (1 - beta) of the gradient, in units
of phi_0. Every so many updates `adaptive_k2`'s controller measures phi_k on
the data at hand (`diagnostics.lag_profile`), fits beta on a log scale
(`diagnostics.decay_rate`), and picks the smallest k2 whose estimated bias is
<= delta (`diagnostics.suggest_k2`).

Shapes are static under `jax.jit`, so k2 cannot be any integer without a new
compile. The trainer compiles one backward pass for each k2 of a small set,
`tbptt_trainer(k2=(10, 20, 50, 100))`, selected at run time with
`jax.lax.switch` by `TrainState.k2`; the controller rounds its k2 up to the
set (never below the tolerance). We chose a compiled set over one longest
window with masking because a masked window costs the longest k2 at every
update, which is the waste adaptive truncation exists to avoid; the set costs
compile time once per k2 and runs only the chosen window.

Example:
  >>> trainer = tbptt_trainer(model, loss_fn, opt, k1=10, k2=(10, 20, 50, 100))
  >>> choose = adaptive_k2(model, loss_fn, trainer.k2s, delta=0.1)
  >>> for i, (x, y) in enumerate(chunks):
  ...   if i % 10 == 0:  # measure on the chunk about to be trained on
  ...     choice = choose(state.params, x, y, carry=state.carry)
  ...     state = trainer.set_k2(state, choice.k2)
  ...   state, metrics = trainer.update(state, x, y)

References:
  Aicher, Foti & Fox, "Adaptively Truncating Backpropagation Through Time to
  Control Gradient Bias", UAI 2019 (arXiv 1905.07473).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from tbptt_jax import _checks, diagnostics
from tbptt_jax.cells import Carry, Cell, Params
from tbptt_jax.truncation import LossFn


class K2Choice(NamedTuple):
  """One decision of the adaptive controller."""

  k2: int  # the k2 to train with: the smallest compiled k2 >= `suggested`
  suggested: int  # the smallest k2 in [min(k2s), max(k2s)] with estimated bias <= delta
  beta: float  # the fitted geometric decay rate of the per-lag norms
  bias: float  # the estimated relative bias at `k2`, beta^k2 / (1 - beta)
  norms: np.ndarray  # shape=[max_lag + 1]: the measured per-lag state-gradient norms


def adaptive_k2(
  model: Cell,
  loss_fn: LossFn,
  k2s: Sequence[int],
  *,
  delta: float,
  max_lag: int | None = None,
  fit_from: int | None = None,
  streams: int | None = None,
  loss_chunk: int | None = None,
) -> Callable[..., K2Choice]:
  r"""The adaptive-truncation controller of Aicher, Foti & Fox (2019).

  Returns `choose(params, inputs, targets, carry=None) -> K2Choice`, which
  measures the per-lag norms phi_k = mean || d l_t / d s_{t-k} || for
  k <= max_lag on `inputs` (`[batch, T, ...]`, T > max_lag) from `carry`,
  fits beta on lags fit_from..max_lag and returns the smallest k2 of `k2s`
  whose estimated relative bias beta^k2 / (1 - beta) is <= delta, or the
  largest if none is (beta near or above 1). Each call is one jitted
  `lag_profile` (compiled once per input shape), about T (max_lag + 1) cell
  steps forward and backward per stream; call it every so many updates.

  Args:
    model: the `Cell` being trained, or one with the same parameters and no
      randomness (e.g. the same model without dropout), so the measurement
      sees the gradient's decay and not the noise.
    loss_fn: `loss_fn(out_t, y_t) -> [batch]`, as given to the trainer.
    k2s: the trainer's compiled k2s (`Trainer.k2s`).
    delta: the tolerated relative bias, > 0 (Aicher et al. use 0.1 to 0.5).
    max_lag: the largest lag measured; default max(k2s), which needs chunks
      of more than max(k2s) steps.
    fit_from: the first lag of the fit; default min(k2s): the bias of every
      k2 on offer is made of lags >= min(k2s), and norms often fall faster
      over the first lags than later, which a fit from lag 1 would mistake for
      a fast decay.
    streams: measure on the first `streams` streams only (cheaper); default all.
    loss_chunk: passed to `lag_profile` (losses vmapped at once).

  Returns:
    `choose(params, inputs, targets, carry=None) -> K2Choice`.

  References:
    Aicher, Foti & Fox, UAI 2019, section 4 (Algorithm 1).
  """
  where = "adaptive_k2"
  k2s = _checks.k2_set(where, "k2s", k2s)
  if not delta > 0:
    raise ValueError(f"{where}: delta must be > 0, got {delta!r}")
  max_lag = k2s[-1] if max_lag is None else _checks.positive_int(where, "max_lag", max_lag)
  fit_from = min(k2s[0], max_lag - 1) if fit_from is None else fit_from
  if isinstance(fit_from, bool) or not isinstance(fit_from, (int, np.integer)):
    raise ValueError(f"{where}: fit_from must be an integer, got {fit_from!r}")
  if not 0 <= fit_from < max_lag:
    raise ValueError(
      f"{where}: fit_from must be in [0, max_lag - 1] = [0, {max_lag - 1}], got {fit_from}"
    )
  if streams is not None:
    streams = _checks.positive_int(where, "streams", streams)
  settings = _Settings(model, loss_fn, k2s, delta, max_lag, fit_from, streams, loss_chunk)
  return functools.partial(_choose, settings)


class _Settings(NamedTuple):
  """`adaptive_k2`'s arguments, checked."""

  model: Cell
  loss_fn: LossFn
  k2s: tuple[int, ...]
  delta: float
  max_lag: int
  fit_from: int
  streams: int | None
  loss_chunk: int | None


def _choose(
  settings: _Settings, params: Params, inputs: Any, targets: Any, carry: Carry | None = None
) -> K2Choice:
  """One decision: measure the per-lag norms, fit beta, pick the k2."""
  if settings.streams is not None:
    inputs, targets = jax.tree.map(lambda a: a[: settings.streams], (inputs, targets))
    carry = None if carry is None else jax.tree.map(lambda a: a[: settings.streams], carry)
  profile = diagnostics.lag_profile(
    settings.model,
    settings.loss_fn,
    params,
    inputs,
    targets,
    max_lag=settings.max_lag,
    carry=carry,
    loss_chunk=settings.loss_chunk,
    parameters=False,  # the state norms are all the choice needs
  )
  norms = np.asarray(profile.state_norms, np.float64)
  beta = diagnostics.decay_rate(norms, min_lag=settings.fit_from)
  k2s = settings.k2s
  suggested = diagnostics.suggest_k2(beta, settings.delta, k_min=k2s[0], k_max=k2s[-1])
  k2 = next(k for k in k2s if k >= suggested)
  bias = float(diagnostics.estimated_bias(beta, k2))
  return K2Choice(k2=k2, suggested=suggested, beta=beta, bias=bias, norms=norms)
