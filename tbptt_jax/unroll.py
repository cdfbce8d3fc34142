"""Unrolling a cell over time with `jax.lax.scan`: carry in, carry out.

`unroll` is the public, batch-major entry point. `scan_steps` is the time-major
core that it and the truncation engine share; it adds the two per-step masks
the engine needs:

* `resets[t, b]`: before step t, stream b's carry is replaced by `reset_carry`
  (a document or episode boundary). The replaced carry is a constant, so the
  gradient through it is zero: a reset cuts the backward pass as well.
* `mask[t]`: when False, step t leaves the carry unchanged (padding that the
  truncation engine puts before the first step of a sequence).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tbptt_jax import _checks
from tbptt_jax.cells import Carry, Cell, Params, StepFn, where_leading


class Unrolled(NamedTuple):
  """What `scan_steps` returns; fields not asked for are None."""

  carry: Carry  # leaves [batch, ...]: the carry after the last step
  outputs: Any  # leaves [time, batch, ...]: y_t of every step
  carries: Carry  # leaves [time, batch, ...]: the carry after every step


def masked_step(
  step_fn: StepFn,
  params: Params,
  carry: Carry,
  x_t: Any,
  *,
  reset_t: jax.Array | None = None,
  mask_t: jax.Array | None = None,
  reset_carry: Carry | None = None,
) -> tuple[Carry, Any]:
  """One step of the cell with an optional reset before it and padding mask.

  Args:
    step_fn: `step_fn(params, carry, x_t) -> (carry, y_t)`.
    params: the cell's parameters.
    carry: the carry entering the step, leaves `[batch, ...]`.
    x_t: the step's input, leaves `[batch, ...]`.
    reset_t: `[batch]` bool; where True the step starts from `reset_carry`.
    mask_t: `[]` or `[batch]` bool; where False the carry passes through.
    reset_carry: the carry a reset restores (required with `reset_t`).

  Returns:
    `(carry, y_t)`.
  """
  carry_in = carry if reset_t is None else where_leading(reset_t, reset_carry, carry)
  new_carry, y_t = step_fn(params, carry_in, x_t)
  if mask_t is not None:
    new_carry = where_leading(mask_t, new_carry, carry)
  return new_carry, y_t


def scan_steps(
  cell: Cell | StepFn,
  params: Params,
  carry: Carry,
  inputs: Any,
  *,
  resets: jax.Array | None = None,
  mask: jax.Array | None = None,
  reset_carry: Carry | None = None,
  unroll: int | bool = 1,
  remat: int | None = None,
  keep_outputs: bool = True,
  keep_carries: bool = False,
) -> Unrolled:
  """Runs a cell's `apply` over the leading (time) axis of `inputs`: the time-major core.

  The cell's `embed` and `head` are not applied: `inputs` are what `apply`
  takes (embedded already, if the cell has an `embed`), and `outputs` are
  `apply`'s y_t. A run without mask or remat uses the cell's own `scan` if it
  has one (the same function, with its own backward pass), and a run with
  resets does so if that scan takes them (`Cell.scan_resets`).

  Args:
    cell: a `Cell`, or a bare step function `step_fn(params, carry, x_t) ->
      (carry, y_t)`.
    params: the cell's parameters.
    carry: the initial carry, leaves `[batch, ...]`.
    inputs: leaves `[time, batch, ...]`.
    resets: optional `[time, batch]` bool, see the module docstring.
    mask: optional `[time]` or `[time, batch]` bool, see the module docstring.
    reset_carry: the carry a reset restores; default zeros shaped like `carry`.
    unroll: passed to `jax.lax.scan`.
    remat: if set, a segment length s: the steps run in segments of s, each a
      `jax.checkpoint`-ed scan, so that differentiating the run stores only
      the carry entering each segment (and the outputs asked for) and re-runs
      each segment forward during the backward pass: for T steps, memory of
      about T / s carries plus one segment's intermediates instead of T steps'
      intermediates, for one more forward pass (Gruslys et al., "Memory-
      Efficient Backpropagation Through Time", NeurIPS 2016; s ~ sqrt(T) is
      the classic choice). The values and gradients are the same.
    keep_outputs: stack and return y_t (else `outputs` is None, and XLA drops
      whatever only fed them).
    keep_carries: stack and return the carry after every step.

  Returns:
    `Unrolled(carry, outputs, carries)`.
  """
  step_fn, scan_fn = (cell.apply, cell.scan) if isinstance(cell, Cell) else (cell, None)
  if resets is not None and reset_carry is None:
    reset_carry = jax.tree.map(jnp.zeros_like, carry)
  time = jax.tree.leaves(inputs)[0].shape[0]
  one_segment = remat is None or remat >= time
  takes_resets = resets is None or (isinstance(cell, Cell) and cell.scan_resets)
  if scan_fn is not None and takes_resets and mask is None and one_segment:
    resetting = {} if resets is None else dict(resets=resets, reset_carry=reset_carry)
    carry, outputs, carries = scan_fn(params, carry, inputs, unroll, **resetting)
    return Unrolled(carry, outputs if keep_outputs else None, carries if keep_carries else None)
  body = functools.partial(
    _scan_body, step_fn, params, reset_carry, keep_outputs=keep_outputs, keep_carries=keep_carries
  )
  if remat is None or one_segment:
    carry, (outputs, carries) = jax.lax.scan(body, carry, (inputs, resets, mask), unroll=unroll)
    return Unrolled(carry, outputs, carries)
  return _scan_in_segments(body, carry, (inputs, resets, mask), remat, unroll)


def _scan_body(step_fn, params, reset_carry, carry, step, *, keep_outputs, keep_carries):
  x_t, reset_t, mask_t = step
  carry, y_t = masked_step(
    step_fn, params, carry, x_t, reset_t=reset_t, mask_t=mask_t, reset_carry=reset_carry
  )
  return carry, (y_t if keep_outputs else None, carry if keep_carries else None)


def _scan_in_segments(body, carry: Carry, steps: Any, remat: int, unroll: int | bool) -> Unrolled:
  """`lax.scan` of `body` over `steps = (inputs, resets, mask)` in checkpointed segments."""
  inputs, resets, mask = steps
  time = jax.tree.leaves(inputs)[0].shape[0]
  # Segments of `remat` steps; the last one is padded with steps that leave the carry
  # unchanged (mask False) and repeat the last input, so that the cell sees real values.
  n_segments = -(-time // remat)
  pad = n_segments * remat - time
  mask = jnp.ones((time,), bool) if mask is None else mask
  mask = jnp.concatenate([mask, jnp.zeros((pad,) + mask.shape[1:], bool)])
  if resets is not None:
    resets = jnp.concatenate([resets, jnp.zeros((pad,) + resets.shape[1:], bool)])
  inputs = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), inputs)
  segments = jax.tree.map(
    lambda a: a.reshape((n_segments, remat) + a.shape[1:]), (inputs, resets, mask)
  )

  @jax.checkpoint
  def segment(carry, steps):
    return jax.lax.scan(body, carry, steps, unroll=unroll)

  carry, stacked = jax.lax.scan(segment, carry, segments)
  outputs, carries = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:time], stacked)
  return Unrolled(carry, outputs, carries)


def unroll(
  step_fn: StepFn,
  params: Params,
  carry: Carry,
  inputs: Any,
  *,
  resets: jax.typing.ArrayLike | None = None,
  reset_carry: Carry | None = None,
  unroll: int | bool = 1,
) -> tuple[Carry, Any]:
  """Runs a cell over a batch of sequences: carry in, carry out.

  The recurrence is (carry_t, y_t) = step_fn(params, carry_{t-1}, x_t) for
  t = 1..T, with carry_{t-1} replaced by `reset_carry` wherever `resets` marks
  step t. Chunks chain exactly: unrolling x_{1..T} equals unrolling x_{1..m}
  and then x_{m+1..T} from the carry the first call returned.

  Args:
    step_fn: `step_fn(params, carry, x_t) -> (carry, y_t)` on a batch, e.g. a
      `Cell`'s `apply` or a Flax cell's `.apply`.
    params: the cell's parameters.
    carry: the carry entering step 1, leaves `[batch, ...]`.
    inputs: leaves `[batch, time, ...]`.
    resets: optional `[batch, time]` bool: where True, the sequence restarts at
      that step (a document or episode boundary).
    reset_carry: the carry a reset restores, leaves `[batch, ...]`; default
      zeros, the initial carry of the Elman cell and of every Flax cell.
    unroll: how many steps `jax.lax.scan` unrolls per loop iteration.

  Returns:
    `(carry, outputs)`: the carry after step T, and y_t with leaves
    `[batch, time, ...]`.

  Example:
    >>> cell = elman(8)
    >>> x = jnp.ones((4, 10, 3))
    >>> params = cell.init(jax.random.key(0), x[:, 0])
    >>> carry, ys = unroll(cell.apply, params, cell.initial_carry(x[:, 0]), x)
    >>> ys.shape
    (4, 10, 8)
  """
  where = "unroll"
  batch, time = _checks.batch_time(where, "inputs", inputs)
  _checks.leading_batch(where, "carry", carry, batch)
  if resets is not None:
    _checks.resets(where, resets, batch, time)
  if reset_carry is not None:
    _checks.like(where, "reset_carry", reset_carry, "carry", carry)
  _checks.unroll(where, unroll)
  xs, time_major_resets = time_major((inputs, resets))
  result = scan_steps(
    step_fn, params, carry, xs, resets=time_major_resets, reset_carry=reset_carry, unroll=unroll
  )
  return result.carry, batch_major(result.outputs)


def time_major(tree: Any) -> Any:
  """`[batch, time, ...]` leaves to `[time, batch, ...]`."""
  return jax.tree.map(lambda a: jnp.swapaxes(jnp.asarray(a), 0, 1), tree)


def batch_major(tree: Any) -> Any:
  """`[time, batch, ...]` leaves to `[batch, time, ...]`."""
  return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), tree)
