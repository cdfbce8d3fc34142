"""Figures of the gradient through time, drawn from `tbptt_jax.diagnostics` and training metrics.

matplotlib is an optional dependency (`pip install matplotlib`); it is imported
when a function here is first called. Each function draws on the `ax` it is
given (a new figure's otherwise) and returns that `matplotlib.axes.Axes`, so
figures compose: `fig, (a, b) = plt.subplots(1, 2); plot_lag_norms(..., ax=a)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tbptt_jax.diagnostics import LagProfile, TruncationBias, estimated_bias
from tbptt_jax.train import UpdateMetrics


def plot_lag_norms(
  curves: Mapping[str, LagProfile | Any], *, kind: str = "state", ax: Any = None
) -> Any:
  """Gradient norm against time lag, on a log scale, one line per label.

  A straight falling line is geometric vanishing (its slope is log beta); a
  rising one is exploding gradients.

  Args:
    curves: label -> a `LagProfile` or an array of per-lag norms (e.g. from
      `jacobian_product_norms`, whose entry 0 is lag 1).
    kind: which norms of a `LagProfile`: `"state"` (||d l_t / d s_{t-k}||)
      or `"params"` (step t - k's contribution to d l_t / d theta).
    ax: the axes to draw on.
  """
  if kind not in ("state", "params"):
    raise ValueError(f"plot_lag_norms: kind must be 'state' or 'params', got {kind!r}")
  ax = _axes(ax)
  for label, curve in curves.items():
    if isinstance(curve, LagProfile):
      norms = np.asarray(curve.state_norms if kind == "state" else curve.param_norms)
      lags = np.arange(len(norms))
    else:
      norms = np.asarray(curve)
      lags = np.arange(1, len(norms) + 1)
    ax.semilogy(lags, _positive(norms), label=label)
  ax.set_xlabel("lag k")
  ax.set_ylabel(
    "mean ||d l_t / d s_{t-k}||" if kind == "state" else "mean ||step t-k's part of d l_t / dθ||"
  )
  ax.legend()
  return ax


def plot_truncation_bias(
  biases: TruncationBias | Mapping[str, TruncationBias],
  *,
  beta: float | None = None,
  suggested_k2: int | None = None,
  ax: Any = None,
) -> Any:
  """Relative error of TBPTT's gradient against full BPTT's, against k2 (log scale).

  Args:
    biases: a `TruncationBias`, or label -> one.
    beta: if given, the estimate beta^k2 / (1 - beta) is drawn dashed beside
      the measured error.
    suggested_k2: if given, marked with a vertical line.
    ax: the axes to draw on.
  """
  ax = _axes(ax)
  if isinstance(biases, TruncationBias):
    biases = {"measured": biases}
  for label, bias in biases.items():
    ax.semilogy(bias.k2, _positive(bias.relative_error), "o-", label=label)
  if beta is not None:
    k2 = np.unique(np.concatenate([b.k2 for b in biases.values()]))
    ax.semilogy(k2, estimated_bias(beta, k2), "--", label=f"β^k2 / (1 - β), β = {beta:.3f}")
  if suggested_k2 is not None:
    ax.axvline(suggested_k2, color="gray", linestyle=":", label=f"suggested k2 = {suggested_k2}")
  ax.set_xlabel("k2")
  ax.set_ylabel("||g_k2 - g_full|| / ||g_full||")
  ax.legend()
  return ax


def plot_grad_norms(
  metrics: UpdateMetrics | Any, *, max_grad_norm: float | None = None, ax: Any = None
) -> Any:
  """The global gradient norm of every update during training (log scale).

  Updates whose gradient held a NaN or an infinity are marked at the top.

  Args:
    metrics: the `UpdateMetrics` of a run (fields concatenated over calls),
      or an array of gradient norms.
    max_grad_norm: the clipping norm, drawn as a horizontal line.
    ax: the axes to draw on.
  """
  ax = _axes(ax)
  norms = np.asarray(metrics.grad_norm if isinstance(metrics, UpdateMetrics) else metrics, float)
  updates = np.arange(1, len(norms) + 1)
  finite = np.isfinite(norms)
  ax.semilogy(updates[finite], _positive(norms[finite]), label="gradient norm")
  if max_grad_norm is not None:
    ax.axhline(max_grad_norm, color="gray", linestyle="--", label=f"clip at {max_grad_norm:g}")
  if not finite.all():
    top = np.nanmax(norms[finite]) if finite.any() else 1.0
    ax.plot(updates[~finite], np.full((~finite).sum(), top), "rx", label="NaN / inf gradient")
  ax.set_xlabel("update")
  ax.set_ylabel("||g||")
  ax.legend()
  return ax


def _axes(ax: Any) -> Any:
  if ax is not None:
    return ax
  try:
    import matplotlib.pyplot as plt
  except ImportError:
    raise ImportError("tbptt_jax.plots needs matplotlib: pip install matplotlib") from None
  return plt.subplots()[1]


def _positive(values: Any) -> np.ndarray:
  """Zeros (underflow) as NaN, which a log axis leaves out rather than failing on."""
  values = np.asarray(values, float)
  return np.where(values > 0, values, np.nan)
