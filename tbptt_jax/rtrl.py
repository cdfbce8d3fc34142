r"""Real-time recurrent learning (RTRL): the untruncated gradient, online, as a `Cell`.

RTRL (Williams & Zipser 1989) carries the sensitivity of the state to the parameters,
M_t = ds_t / dtheta, forward in time with the state:

    s_t = f(theta, s_{t-1}, x_t),      M_t = df/dtheta + (df/ds_{t-1}) M_{t-1},    M_0 = 0,

so that the gradient of a loss at step t through *every* earlier step (since the last reset)
is dl_t/dtheta = (dl_t/dy_t)(dy_t/dtheta + (dy_t/ds_{t-1}) M_{t-1}), with memory that does not
grow with the sequence: M has n x p numbers per stream (state size n, parameter count p), and
each step costs O(n^2 p), the product (df/ds) M, plus n reverse passes of the step for the two
Jacobians. It is affordable for small states, and it is the exact reference every
truncation's bias is measured against.

`rtrl_cell(cell)` makes it a cell of the library: its carry is `(s, M)`, M an [n, p] matrix per
stream over the flattened state and parameters; its step computes df/dtheta and df/ds by
reverse mode (`jax.jacrev`, n vector-Jacobian products) and carries M forward. The step's
output is computed at the state s_{t-1} + M_{t-1}(theta - theta_0), whose shift is zero in
value and whose derivative carries M_{t-1}, so that the reverse pass of one step gives the
whole history's gradient. Trained as

    tbptt_trainer(model, loss_fn, optimizer, k1=k1, gradient="rtrl")

(which wraps the model in `rtrl_cell` and runs each loss's reverse pass through its own step
only, k2 = 1 per loss), each update's gradient is the mean, over its block's k1 losses, of
each loss's gradient through every past step: the gradient RTRL gives online (updates every k1
steps, k1 = 1 included), equal to full BPTT's gradient of the same losses at fixed parameters.
Everything else is the trainer's: checkpoints, resets (the carry restarts at (s_0, 0)),
sharding, metrics.

For a diagonal linear recurrence the sensitivity is diagonal too: `linear_rnn.online_lru`
carries it at the cost of the forward pass (Zucchet et al. 2023).

References:
  R. J. Williams and D. Zipser, "A Learning Algorithm for Continually Running Fully Recurrent
  Neural Networks", Neural Computation 1(2), 1989.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from tbptt_jax import _checks
from tbptt_jax.cells import Cell, full_step


class RTRLCarry(NamedTuple):
  """The carry of an `rtrl_cell`: the cell's carry and its sensitivity to the parameters."""

  state: Any  # the cell's carry, leaves [batch, ...]
  # ds/dtheta, [batch, n, p]: the state and the parameters each flattened (ravel_pytree order)
  sensitivity: Any


# The default bound on the sensitivity of all streams together (`rtrl_cell`).
MAX_SENSITIVITY_BYTES = 2**30


def rtrl_cell(cell: Cell, *, max_sensitivity_bytes: int = MAX_SENSITIVITY_BYTES) -> Cell:
  """`cell` trained by real-time recurrent learning: see the module docstring.

  Args:
    cell: any `Cell` with an `init` (its parameter shapes size the
      sensitivity); its `head` is kept, its `embed` runs inside the step, its
      `scan` is not used.
    max_sensitivity_bytes: the carry's sensitivity, batch x n x p numbers, may
      not exceed this (default 1 GiB): `initial_carry` refuses a larger one
      with a `ValueError` that says its size, rather than running out of
      memory mid-run. For a diagonal linear recurrence, `online_lru` needs
      only O(n H) per stream.

  Returns:
    A `Cell` with carry `RTRLCarry(state, sensitivity)`; train it with
    `k2=1, style="per_loss"` for the RTRL gradient.
  """
  if not isinstance(cell, Cell):
    raise ValueError(f"rtrl_cell: cell must be a tbptt_jax.Cell, got {type(cell).__name__}")
  _checks.cell_parts("rtrl_cell", "cell", cell)
  _checks.positive_int("rtrl_cell", "max_sensitivity_bytes", max_sensitivity_bytes)
  # The embed joins the step: the state depends on its parameters through x_t, so the
  # sensitivity must see it. The head reads the state out, and stays after the scan.
  return Cell(
    init=cell.init,
    initial_carry=functools.partial(_initial_carry, cell, max_sensitivity_bytes),
    apply=functools.partial(_step, full_step(cell)),
    head=cell.head,
    head_steps=cell.head_steps,
  )


def _initial_carry(cell: Cell, max_bytes: int, x_t: Any) -> RTRLCarry:
  """The cell's initial carry and a zero sensitivity: nothing is known before the first step."""
  state = cell.initial_carry(x_t)
  params = jax.eval_shape(cell.init, jax.random.key(0), x_t)  # shapes only, nothing drawn
  state_size, param_count, itemsize = _sensitivity_shape(state, params)
  needed = state_size * param_count * itemsize
  if needed > max_bytes:
    raise ValueError(
      f"rtrl_cell: the sensitivity would take {needed:,} bytes ({state_size:,} state numbers "
      f"over all streams x {param_count:,} parameters x {itemsize} bytes), above "
      f"max_sensitivity_bytes={max_bytes:,}: raise it with rtrl_cell(model, "
      "max_sensitivity_bytes=...) and gradient='online', or use fewer streams, a smaller "
      "state or online_lru's diagonal sensitivities"
    )

  batch = jax.tree.leaves(state)[0].shape[0]
  dtype = jax.tree.leaves(state)[0].dtype
  return RTRLCarry(state, jnp.zeros((batch, state_size // batch, param_count), dtype))


def sensitivity_bytes(cell: Cell, x_t: Any) -> int:
  """The bytes `rtrl_cell(cell)`'s sensitivity takes for a batch like `x_t`: every stream's
  state numbers times the parameter count times the state's item size. Nothing is computed."""
  state = jax.eval_shape(cell.initial_carry, x_t)
  params = jax.eval_shape(cell.init, jax.random.key(0), x_t)
  return math.prod(_sensitivity_shape(state, params))


def _sensitivity_shape(state: Any, params: Any) -> tuple[int, int, int]:
  """(state numbers over all streams, parameter count, the state's item size)."""
  state_size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
  param_count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  itemsize = max((jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state)), default=4)
  return state_size, param_count, itemsize


def _step(apply: Any, params: Any, carry: RTRLCarry, x_t: Any) -> tuple[RTRLCarry, Any]:
  """One step of every stream: the cell's step, and the sensitivity carried forward."""
  frozen = jax.lax.stop_gradient(params)
  old = jax.lax.stop_gradient(carry)
  theta_0, unravel_params = ravel_pytree(frozen)

  def one_stream(params: Any, state: Any, x: Any) -> tuple[Any, Any]:
    batch_of_one = functools.partial(jax.tree.map, lambda a: a[None])
    new_state, y = apply(params, batch_of_one(state), batch_of_one(x))
    return jax.tree.map(lambda a: a[0], (new_state, y))

  def shifted(params: Any, state: Any, sensitivity: jax.Array, x: Any) -> tuple[Any, Any]:
    # The step at s + M (theta - theta_0): its value is the step's; its derivative in the
    # parameters is the total one, df/dtheta + df/ds M, which the engine's reverse pass reads.
    s_0, unravel_state = ravel_pytree(state)
    moved = s_0 + sensitivity @ (ravel_pytree(params)[0] - theta_0)
    return one_stream(params, unravel_state(moved), x)

  def carried(state: Any, sensitivity: jax.Array, x: Any) -> jax.Array:
    # M_t = df/dtheta + (df/ds) M_{t-1}. Both Jacobians by reverse mode, n vector-Jacobian
    # products of the step (forward mode would push p tangents, a p x p basis, through it);
    # the product with M is RTRL's O(n^2 p).
    s_0, unravel_state = ravel_pytree(state)

    def flat_step(theta: jax.Array, s: jax.Array) -> jax.Array:
      return ravel_pytree(one_stream(unravel_params(theta), unravel_state(s), x)[0])[0]

    d_theta, d_state = jax.jacrev(flat_step, argnums=(0, 1))(theta_0, s_0)
    return d_theta + d_state @ sensitivity

  state, y = jax.vmap(shifted, in_axes=(None, 0, 0, 0))(params, old.state, old.sensitivity, x_t)
  sensitivity = jax.vmap(carried)(old.state, old.sensitivity, x_t)
  return RTRLCarry(state, jax.lax.stop_gradient(sensitivity)), y
