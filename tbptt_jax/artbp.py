r"""Unbiased truncation: Anticipated Reweighted TBPTT (Tallec & Ollivier 2017).

Fixed truncation drops every path from a loss l_t back to steps before its
window, so the gradient is biased towards short dependencies. ARTBP truncates
at random instead and reweights what it keeps. During the forward pass, before
step t, it draws whether to cut the backward pass there,

    eps_t ~ Bernoulli(c_t),    c_t = (alpha - 1) / ((alpha - 2) L0 + delta_t),

delta_t being the steps since the last cut, so the probability is known when
the step runs ("anticipated"). In the backward pass the gradient that crosses
step t's incoming state is

    0                          if eps_t = 1 (a cut: `jax.lax.stop_gradient`),
    1 / (1 - c_t) times itself  otherwise.

A path from l_t back to step j survives with probability prod_{j<i<=t}
(1 - c_i) and, when it does, carries the weight 1 / prod (1 - c_i): its
expected contribution is its full-BPTT contribution, so the gradient is an
unbiased estimate of the full-BPTT gradient (at fixed parameters), for the
price of some variance. With this schedule segments average L0 steps; their
lengths have a tail P(length >= n) ~ n^-(alpha - 1), so the gradient's
variance is finite for alpha > 3 (the paper uses alpha = 4 or 6).

Here the truncation is a cell transformation, `artbp_cell`: its carry holds
delta_t beside the model's carry, its input the step's random draw, and its
step applies the cut and the reweighting to the incoming carry. The library's
window engine then does the rest: a window re-run replays the same draws, so
`tbptt_trainer(..., artbp=ARTBP(L0))` trains with ARTBP while making its
updates every k1 steps (the paper updates at every cut; at fixed parameters
the two sum to the same gradient). Given a set of k2s, the trainer runs for
each update the shortest window that reaches back to every stream's last cut
(at fixed parameters the same gradient as the longest window), so the backward
pass costs the segments drawn, as in the paper, and not the longest window.
Memory bounds what is exact: a window of k2 steps holds segments of at most
`max_length` = k2 - k1 + 1 steps, so the cell cuts unconditionally (c_t = 1)
once a segment reaches that length. The estimate is unbiased as long as no
segment reaches it; with alpha = 4 the chance that one does is about
((alpha - 2) L0 / ((alpha - 2) L0 + n))^3 per segment for n = max_length:
0.4% for L0 = 10 and n = 100, 0.005% for n = 500.

References:
  Tallec & Ollivier, "Unbiasing Truncated Backpropagation Through Time",
  arXiv 1705.08209, 2017.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tbptt_jax import _checks
from tbptt_jax.cells import Carry, Cell, Params


class ARTBP(NamedTuple):
  """The truncation schedule of ARTBP: c_t = (alpha - 1) / ((alpha - 2) L0 + delta_t).

  Attributes:
    mean_length: L0 > 1, the typical segment length between cuts.
    alpha: the tail exponent, > 2 (finite variance needs alpha > 3; the paper
      uses 4 or 6).
  """

  mean_length: float
  alpha: float = 4.0


class ARTBPCarry(NamedTuple):
  """The carry of an `artbp_cell`: the model's carry and the segment's age."""

  carry: Carry  # the wrapped model's carry
  since: jax.Array  # shape=[batch], int32: steps since the last cut (0 before step 1)


def check(where: str, config: Any) -> ARTBP:
  """Validates an `ARTBP` schedule; returns it with float fields."""
  if not isinstance(config, ARTBP):
    raise ValueError(f"{where}: artbp must be a tbptt_jax.ARTBP, got {type(config).__name__}")
  mean_length, alpha = float(config.mean_length), float(config.alpha)
  if not mean_length > 1:
    raise ValueError(f"{where}: ARTBP mean_length must be > 1, got {config.mean_length!r}")
  if not alpha > 2:
    raise ValueError(f"{where}: ARTBP alpha must be > 2, got {config.alpha!r}")
  return ARTBP(mean_length, alpha)


def cut_probability(config: ARTBP, since: jax.Array, max_length: int) -> jax.Array:
  """c_t, `since` steps after the last cut: 1 at the stream's start and at `max_length`."""
  mean_length, alpha = config
  c = (alpha - 1) / ((alpha - 2) * mean_length + jnp.maximum(since, 1).astype(jnp.float32))
  return jnp.where((since == 0) | (since >= max_length), 1.0, c)


@jax.custom_vjp
def _scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
  return x


def _scale_gradient_fwd(x, scale):
  return x, scale


def _scale_gradient_bwd(scale, g):
  return g * scale.reshape(scale.shape + (1,) * (g.ndim - scale.ndim)).astype(g.dtype), None


_scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def artbp_cell(model: Cell, config: ARTBP, *, max_length: int, step_rngs: bool = False) -> Cell:
  r"""`model` with ARTBP's random cuts and reweighting on its incoming carry.

  The returned cell's input at step t is `(x_t, rng_t)`, `rng_t` being raw
  PRNG key data `[batch, 2]` uint32 fresh for every stream and step (the
  trainer's `step_rngs`); its carry is an `ARTBPCarry`. Each stream draws its
  own cuts. Before step t it draws eps_t ~ Bernoulli(c_t) and feeds the model

      stop_gradient(s_{t-1})                  if eps_t (the cut), else
      s_{t-1}, its gradient times 1 / (1 - c_t).

  The forward pass is unchanged: only the backward pass sees the cuts.

  Args:
    model: the cell to train.
    config: the schedule, an `ARTBP`.
    max_length: the longest segment: a segment that reaches it is cut (c_t = 1).
      Under `tbptt_trainer` it is k2 - k1 + 1 (window style) or k2 (per-loss
      style), so every surviving path lies inside the backward window; with
      `tbptt_gradients(k1=k2=T)` on T steps, T makes the estimate exactly unbiased.
    step_rngs: whether `model` itself takes `(x_t, rng_t)` (e.g. dropout); it
      then gets keys independent of the cut draws.

  Returns:
    A `Cell` with the same parameters, head and embed as `model`.

  References:
    Tallec & Ollivier 2017, arXiv 1705.08209, section 3 (ARTBP).
  """
  where = "artbp_cell"
  config = check(where, config)
  max_length = _checks.positive_int(where, "max_length", max_length)
  settings = _Settings(model, config, max_length, bool(step_rngs))
  return Cell(
    init=functools.partial(_init, settings),
    initial_carry=functools.partial(_initial_carry, settings),
    apply=functools.partial(_apply, settings),
    head=model.head,
    embed=None if model.embed is None else functools.partial(_embed, settings),
    head_steps=model.head_steps,
  )


class _Settings(NamedTuple):
  """What an `artbp_cell` closes over."""

  model: Cell  # the wrapped cell
  config: ARTBP
  max_length: int  # the longest segment
  step_rngs: bool  # the model itself takes (x_t, rng_t)


def _split(settings: _Settings, inputs: Any) -> tuple[Any, jax.Array]:
  """The model's input and the cut draw u_t ~ U[0, 1) of every stream."""
  x, rng = inputs
  keys = jax.random.wrap_key_data(rng)
  u = jax.vmap(jax.random.uniform)(keys)
  if settings.step_rngs:
    x = (x, jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 1)))
  return x, u


def _model_input(settings: _Settings, inputs: Any) -> Any:
  """The model's share of `(x_t, rng_t)`, for shapes only (init, initial carry)."""
  return inputs if settings.step_rngs else inputs[0]


def _init(settings: _Settings, rng: jax.Array, inputs: Any) -> Params:
  return settings.model.init(rng, _model_input(settings, inputs))


def _initial_carry(settings: _Settings, inputs: Any) -> ARTBPCarry:
  batch = inputs[1].shape[0]
  model_carry = settings.model.initial_carry(_model_input(settings, inputs))
  return ARTBPCarry(model_carry, jnp.zeros((batch,), jnp.int32))


def _apply(settings: _Settings, params: Params, carry: ARTBPCarry, inputs: Any):
  x, u = _split(settings, inputs)
  c = cut_probability(settings.config, carry.since, settings.max_length)
  cut = u < c  # always when c = 1; u < 1 always
  keep = jnp.where(cut, 1.0, 1.0 - c)  # never 0: the scale stays finite where it is unused
  scale = jnp.where(cut, 0.0, 1.0 / keep)

  def reweight(s: jax.Array) -> jax.Array:
    mask = cut.reshape(cut.shape + (1,) * (s.ndim - 1))
    # ARTBP's truncation: a cut step's incoming state is a constant, so no
    # gradient reaches behind it; a kept one passes 1 / (1 - c_t) times its gradient.
    return jnp.where(mask, jax.lax.stop_gradient(s), _scale_gradient(s, scale))

  s_in = jax.tree.map(reweight, carry.carry)
  if settings.model.embed is not None:  # the model's input arrives embedded, the draws beside it
    x = inputs[0]
  s_out, y = settings.model.apply(params, s_in, x)
  since = jnp.where(cut, 1, carry.since + 1)
  return ARTBPCarry(s_out, since), y


def _embed(settings: _Settings, params: Params, inputs: Any) -> Any:
  embed = settings.model.embed
  assert embed is not None  # only a model with an embed gets this one
  return embed(params, _split(settings, inputs)[0]), inputs[1]
