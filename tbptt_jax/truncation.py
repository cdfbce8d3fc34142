r"""Truncated backpropagation through time, TBPTT(k1, k2), with exact semantics.

Steps are numbered 1..T. TBPTT(k1, k2) makes one update every k1 steps: update
i = 0..N-1, N = ceil(T / k1), covers the block of steps (i k1, e_i] with
e_i = min((i+1) k1, T), and its objective is the mean of the per-step losses
l_t over the batch and over the block,

    L_i = 1 / (B |block_i|) * sum_{t in block_i} sum_b l_t^b.

The truncation says through which steps each l_t is differentiated:

* `style="window"` (Williams & Peng 1990): every l_t of block i through the
  steps max(1, e_i - k2 + 1) .. e_i, the state s_{e_i - k2} entering that
  window being a constant. Needs k2 >= k1.
* `style="per_loss"`: each l_t through exactly the steps max(1, t - k2 + 1)..t,
  s_{t - k2} being a constant (the per-output `bptt_truncate` of the
  literature; with k1 = 1 both styles are "true" TBPTT).

k1 = k2 = T is full BPTT and k1 = k2 = k is the chunked ("TensorFlow-style")
TBPTT; neither is special-cased. The forward pass is never cut: the carry
always equals the plain forward pass over all steps.

How it is computed: every backward pass is a *window re-run* from a stored
state made constant with `jax.lax.stop_gradient`. A window ends at the last
step of its block (window style) or of its loss (per-loss style) and is k2 steps
long, so it reaches up to k2 - 1 steps behind the block; those steps are kept
in a `Lookback`. Steps before step 1 are padding that leaves the carry
unchanged, which implements the `max(1, .)` above. Window style costs about
k2 / k1 times chunked TBPTT; per-loss style runs one window per loss, k2 times
the forward and backward work of its block, vectorised over the block.

References:
  Williams & Peng, "An Efficient Gradient-Based Algorithm for On-Line Training
  of Recurrent Network Trajectories", Neural Computation 2(4), 1990.
  Sutskever, "Training Recurrent Neural Networks", PhD thesis, Toronto, 2013,
  section 2.8.6.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tbptt_jax import _checks
from tbptt_jax.cells import (
  Carry,
  Cell,
  HeadFn,
  Params,
  ScanFn,
  StepFn,
  from_step,
  map_head,
  map_steps,
)
from tbptt_jax.unroll import masked_step, scan_steps, time_major, where_leading

LossFn = Callable[[Any, Any], jax.Array]


class _TruncationFields(NamedTuple):
  k1: int  # steps per update (the block length)
  k2: int  # steps each loss is backpropagated through
  style: str  # "window" or "per_loss"


class Truncation(_TruncationFields):
  """TBPTT(k1, k2) in a style: which steps each update's losses are differentiated through.

  Validated where it is made: k1 >= 1 and k2 >= 1 integers, `style` one of
  `"window"` (needs k2 >= k1) and `"per_loss"`; k2 defaults to k1 (chunked
  TBPTT). `Truncation(T, T)` is full BPTT over T steps. See the module
  docstring for the exact semantics of each style.

  Example:
    >>> Truncation(k1=5, k2=20)              # window style, Williams & Peng
    >>> Truncation(1, 10, style="per_loss")  # "true" TBPTT
  """

  __slots__ = ()

  def __new__(cls, k1: int, k2: int | None = None, style: str = "window") -> Truncation:
    k1, k2, style = _checks.truncation("Truncation", k1, k1 if k2 is None else k2, style)
    return super().__new__(cls, k1, k2, style)

  def _replace(self, **changes: Any) -> Truncation:  # validated like a new one
    return Truncation(**{**self._asdict(), **changes})


class ScanOptions(NamedTuple):
  """How the steps of a window are run (`unroll.scan_steps`)."""

  unroll: int | bool = 1  # passed to jax.lax.scan
  remat: int | None = None  # if set, jax.checkpoint-ed segments of this many steps


class Lookback(NamedTuple):
  """The last k2 - 1 steps before the current position, for windows to re-run.

  A window of k2 steps that ends r >= 1 steps ahead starts k2 - r steps back,
  so it re-runs the last k2 - r of these steps from the state that entered the
  first of them. Padding steps (before step 1 of a sequence) are not `valid`.
  """

  states: Carry  # leaves [k2 - 1, batch, ...]: the carry entering each step
  inputs: Any  # leaves [k2 - 1, batch, ...]: the step's input x_t
  resets: jax.Array  # shape=[k2 - 1, batch], bool: the step's reset flag
  valid: jax.Array  # shape=[k2 - 1], bool: False for padding before step 1


class StreamState(NamedTuple):
  """Where every stream stands: its carry and the lookback behind it.

  The two always travel together: the lookback holds the steps that lead to
  the carry, which later windows re-run.
  """

  carry: Carry  # leaves [batch, ...]: the carry after the last step seen
  lookback: Lookback  # the last k2 - 1 steps, time-major


class Block(NamedTuple):
  """The r <= k1 steps of one update, time-major."""

  inputs: Any  # leaves [r, batch, ...]
  targets: Any  # leaves [r, batch, ...]
  resets: jax.Array | None  # shape=[r, batch], bool, or None: no resets


class BlockResult(NamedTuple):
  """The outcome of one TBPTT update's backward pass."""

  grads: Params  # the gradient of the block objective L_i
  loss: jax.Array  # shape=(), the block objective L_i
  streams: StreamState  # the carry after the block and the lookback up to it

  @property
  def carry(self) -> Carry:
    return self.streams.carry

  @property
  def lookback(self) -> Lookback:
    return self.streams.lookback


def empty_lookback(carry: Carry, x_t: Any, k2: int) -> Lookback:
  """The lookback at the start of a sequence: k2 - 1 padding steps.

  Args:
    carry: the carry entering step 1, leaves `[batch, ...]`.
    x_t: an example input step, leaves `[batch, ...]` (only shapes are read).
    k2: the truncation length.
  """
  n = k2 - 1
  batch = jax.tree.leaves(x_t)[0].shape[0]
  return Lookback(
    states=jax.tree.map(lambda c: jnp.broadcast_to(c, (n,) + c.shape), carry),
    inputs=jax.tree.map(lambda x: jnp.zeros((n,) + x.shape, x.dtype), x_t),
    resets=jnp.zeros((n, batch), bool),
    valid=jnp.zeros((n,), bool),
  )


def start_of_sequence(carry: Carry, x_t: Any, k2: int) -> StreamState:
  """The streams at step 1: `carry` and an empty lookback for windows of up to k2 steps."""
  return StreamState(carry, empty_lookback(carry, x_t, k2))


class _Steps(NamedTuple):
  """Every step at hand for one block: the lookback's k2 - 1, then the block's r."""

  inputs: Any  # leaves [k2 - 1 + r, batch, ...]; padding steps hold the block's first input
  resets: jax.Array  # shape=[k2 - 1 + r, batch], bool
  valid: jax.Array  # shape=[k2 - 1 + r], bool


def block_gradients(
  cell: Cell,
  loss_fn: LossFn,
  truncation: Truncation,
  params: Params,
  streams: StreamState,
  block: Block,
  reset_carry: Carry,
  options: ScanOptions,
) -> BlockResult:
  """The gradient of one TBPTT update, for a block of r <= k1 steps (time-major).

  `truncation.k2` may be shorter than the lookback's windows (its length plus
  one): the update then backpropagates through the last k2 steps only while
  the returned lookback keeps its full length, so one lookback serves every
  k2 up to its own (the trainer's compiled set of k2s, see `tbptt_trainer`).
  The gradient re-runs each window from its stored entering state with the
  given `params`; the state carried on is the block run once from
  `streams.carry`, so the forward pass does not depend on the truncation.

  Inputs are not checked here: `cell_gradients` and `tbptt_trainer` check them
  on entry.

  Args:
    cell: the model; its `embed`, `head` and `scan` are used where it has them.
    loss_fn: `loss_fn(out_t, y_t) -> [batch]`, the per-example losses l_t.
    truncation: the k2 and style of this update (k1 is the caller's blocking).
    params: the parameters.
    streams: the carry entering the block and the lookback behind it.
    block: the block's inputs, targets and resets, `[r, batch, ...]`.
    reset_carry: the carry a reset restores.
    options: how windows are scanned (unroll, remat).

  Returns:
    A `BlockResult`: the gradient and objective of the block, and the streams after it.
  """
  if truncation.style == "window":
    grads, loss, new_carry, entering = _window_gradients(
      cell, loss_fn, truncation.k2, params, streams, block, reset_carry, options
    )
  else:
    grads, loss, new_carry, entering = _per_loss_gradients(
      cell, loss_fn, truncation.k2, params, streams, block, reset_carry, options
    )
  # The lookback moves on by r steps; the states it keeps are the forward pass's.
  steps, r = _steps_at_hand(streams.lookback, block), _length(block.inputs)
  new_lookback = Lookback(
    states=jax.tree.map(lambda a: a[r:], entering),
    inputs=jax.tree.map(lambda a: a[r:], steps.inputs),
    resets=steps.resets[r:],
    valid=steps.valid[r:],
  )
  return BlockResult(grads, loss, StreamState(new_carry, new_lookback))


def _window_gradients(cell, loss_fn, k2, params, streams, block, reset_carry, options):
  """Window style: all the block's losses through the last k2 steps, ending at the block's end."""
  carry, lookback = streams
  stored, r = lookback.valid.shape[0], _length(block.inputs)
  steps = _steps_at_hand(lookback, block)
  # The window is the last k2 of all steps: k2 - r lookback steps, then the block.
  n_back = k2 - r
  first = stored - n_back  # the lookback step the window starts at
  # A window that starts at the block starts from `carry`; one that reaches
  # back starts from the stored state entering its first step.
  anchor = carry if n_back == 0 else jax.tree.map(lambda s: s[first], lookback.states)
  scan = functools.partial(scan_steps, cell, reset_carry=reset_carry, **options._asdict())

  def objective(params):
    # Window-style truncation (Williams & Peng): the state entering the k2-step
    # window is a constant, so no gradient reaches behind step e_i - k2 + 1.
    s = jax.lax.stop_gradient(anchor)
    if n_back:
      back = jax.tree.map(lambda a: a[first:stored], steps.inputs)
      s = scan(
        params, s, map_steps(cell.embed, params, back), resets=lookback.resets[first:],
        mask=lookback.valid[first:], keep_outputs=False,
      ).carry  # fmt: skip
    run = scan(params, s, map_steps(cell.embed, params, block.inputs), resets=block.resets,
               keep_carries=True)  # fmt: skip
    loss = _mean_loss(loss_fn, map_head(cell, params, run.outputs), block.targets)
    return loss, (run.carry, run.carries)

  (loss, block_run), grads = jax.value_and_grad(objective, has_aux=True)(params)
  # Only a window that starts at `carry` ran the block as the forward pass does;
  # one that reaches back re-ran older steps with these params.
  if n_back:
    block_run = _forward(cell, params, carry, block, reset_carry, options)
  new_carry, block_carries = block_run
  return grads, loss, new_carry, _entering_states(streams, block_carries)


def _per_loss_gradients(cell, loss_fn, k2, params, streams, block, reset_carry, options):
  """Per-loss style: each loss l_t through its own last k2 steps, vectorised over the block."""
  stored, r = streams.lookback.valid.shape[0], _length(block.inputs)
  steps = _steps_at_hand(streams.lookback, block)
  new_carry, block_carries = _forward(cell, params, streams.carry, block, reset_carry, options)
  entering = _entering_states(streams, block_carries)
  # Loss j (the block's step j) owns the window of all steps skip + j .. skip + j + k2 - 1,
  # entered by entering[skip + j]: the lookback's first `skip` steps are beyond every window.
  skip = stored + 1 - k2
  anchors = jax.tree.map(lambda a: a[skip : skip + r], entering)
  window_idx = skip + np.arange(r)[:, None] + np.arange(k2)[None, :]
  window = functools.partial(_window_output, cell, reset_carry, options)

  def objective(params):
    # Every step is embedded once, before the windows that share it are cut out.
    embedded = map_steps(cell.embed, params, steps.inputs)
    windows = (
      jax.tree.map(lambda a: a[window_idx], embedded),
      steps.resets[window_idx],
      steps.valid[window_idx],
    )
    outputs = jax.vmap(window, in_axes=(None, 0, 0))(params, anchors, windows)
    return _mean_loss(loss_fn, map_head(cell, params, outputs), block.targets)

  loss, grads = jax.value_and_grad(objective)(params)
  return grads, loss, new_carry, entering


def _window_output(cell, reset_carry, options, params, anchor, window):
  """y_t of one per-loss window: its k2 steps run from the state entering them."""
  # Per-loss truncation: l_t is differentiated through its own k2 steps
  # t - k2 + 1 .. t only; the state s_{t - k2} entering them is a constant.
  s = jax.lax.stop_gradient(anchor)
  xs, resets, valid = window
  s = scan_steps(
    cell, params, s, jax.tree.map(lambda a: a[:-1], xs), resets=resets[:-1], mask=valid[:-1],
    reset_carry=reset_carry, keep_outputs=False, **options._asdict(),
  ).carry  # fmt: skip
  # Step t itself is a block step, never padding.
  x_t = jax.tree.map(lambda a: a[-1], xs)
  _, out_t = masked_step(cell.apply, params, s, x_t, reset_t=resets[-1], reset_carry=reset_carry)
  return out_t


def _forward(cell, params, carry, block, reset_carry, options) -> tuple[Carry, Carry]:
  """The block run from `carry`: the final carry and the carry after each step."""
  run = scan_steps(
    cell, params, carry, map_steps(cell.embed, params, block.inputs), resets=block.resets,
    reset_carry=reset_carry, unroll=options.unroll, keep_outputs=False, keep_carries=True,
  )  # fmt: skip
  return run.carry, run.carries


def _steps_at_hand(lookback: Lookback, block: Block) -> _Steps:
  """The lookback's steps followed by the block's."""
  r, batch = _length(block.inputs), lookback.resets.shape[1]
  # Padding steps (before step 1) leave the carry unchanged, but the cell still
  # runs on them: a real input keeps a cell undefined at zero (log, 1/x) from
  # putting 0 * inf = NaN into the backward pass.
  first_input = jax.tree.map(lambda x: x[:1], block.inputs)
  lookback_inputs = where_leading(lookback.valid, lookback.inputs, first_input)
  block_resets = jnp.zeros((r, batch), bool) if block.resets is None else block.resets
  return _Steps(
    inputs=_concat(lookback_inputs, block.inputs),
    resets=jnp.concatenate([lookback.resets, block_resets]),
    valid=jnp.concatenate([lookback.valid, jnp.ones((r,), bool)]),
  )


def _entering_states(streams: StreamState, block_carries: Carry) -> Carry:
  """The carry entering each of the lookback's and the block's steps."""
  after_block_steps = jax.tree.map(lambda a: a[:-1], block_carries)
  return _concat(streams.lookback.states, _expand(streams.carry), after_block_steps)


def _mean_loss(loss_fn: LossFn, outputs: Any, targets: Any) -> jax.Array:
  """The block objective: the mean of the per-example losses over the block and the batch."""
  losses = jax.vmap(loss_fn)(outputs, targets)
  leaf = jax.tree.leaves(targets)[0]
  _checks.per_example_losses("block_gradients", losses, leaf.shape[0], leaf.shape[1])
  return jnp.mean(losses)


def block_sizes(time: int, k1: int) -> np.ndarray:
  """The steps of each of the ceil(T / k1) blocks: k1, ..., k1, then the rest, T mod k1."""
  return np.minimum(k1, time - k1 * np.arange(-(-time // k1)))


def scan_blocks(
  block_fn: Callable[[Any, Any], tuple[Any, Any]],
  state: Any,
  sequences: Any,
  k1: int,
) -> tuple[Any, Any]:
  """Runs `block_fn` over the consecutive blocks of k1 steps of `sequences`.

  The full blocks go through one `jax.lax.scan`; a last, shorter block of
  T mod k1 steps follows it, so no step is dropped.

  Args:
    block_fn: `block_fn(state, block) -> (state, out)`, `block` being
      `sequences` cut to the block's steps.
    state: the initial state.
    sequences: leaves `[T, ...]`, time-major.
    k1: the block length.

  Returns:
    `(state, outs)`, each leaf of `outs` stacked on a leading axis of length
    ceil(T / k1), one entry per block.
  """
  time = jax.tree.leaves(sequences)[0].shape[0]
  n_full, tail = divmod(time, k1)
  outs = []
  if n_full:
    full = jax.tree.map(lambda a: a[: n_full * k1].reshape((n_full, k1) + a.shape[1:]), sequences)
    state, out = jax.lax.scan(block_fn, state, full)
    outs.append(out)
  if tail:
    state, out = block_fn(state, jax.tree.map(lambda a: a[n_full * k1 :], sequences))
    outs.append(_expand(out))
  return state, _concat(*outs)


def cell_gradients(
  cell: Cell,
  loss_fn: LossFn,
  truncation: Truncation,
  params: Params,
  carry: Carry,
  inputs: Any,
  targets: Any,
  *,
  resets: jax.typing.ArrayLike | None = None,
  reset_carry: Carry | None = None,
  unroll: int | bool = 1,
  remat: int | None = None,
) -> tuple[Params, Carry]:
  r"""The gradients of every update of a truncation over a sequence, at fixed params.

  For update i (block (i k1, e_i], see the module docstring) the gradient is

      g_i = 1 / (B |block_i|) * sum_{t in block_i} sum_b d l_t^b / d theta,

  where l_t is differentiated through the steps max(1, e_i - k2 + 1)..e_i
  (window style) or max(1, t - k2 + 1)..t (per-loss style) only.

  Args:
    cell: the model, a `Cell`: its `apply`, and its `embed`, `head` and
      `scan` where it has them, travel together.
    loss_fn: `loss_fn(out_t, y_t) -> [batch]`, the per-example losses l_t.
    truncation: a `Truncation(k1, k2, style)`.
    params: the parameters, fixed for every update.
    carry: the carry entering step 1, leaves `[batch, ...]`.
    inputs: leaves `[batch, T, ...]`.
    targets: leaves `[batch, T, ...]`.
    resets: optional `[batch, T]` bool: where True the stream restarts from
      `reset_carry` before that step, which also cuts the backward pass there.
    reset_carry: the carry a reset restores; default zeros shaped like `carry`.
    unroll: passed to the inner `jax.lax.scan` over time.
    remat: if set, each backward window runs in `jax.checkpoint`-ed segments
      of this many steps (`unroll.scan_steps`): memory of about k2 / remat
      carries instead of k2 steps' intermediates, for one more forward pass,
      the same gradients. For long windows, e.g. full BPTT; s ~ sqrt(k2).

  Returns:
    `(grads, final_carry)`: `grads` is the pytree of `params` with a new leading
    axis of length ceil(T / k1), the gradient of each update; `final_carry` is
    the carry after step T, the same whatever the truncation.

  Example: chunked TBPTT with k = 10, then full BPTT over T steps.
    >>> grads, carry = cell_gradients(model, loss_fn, Truncation(10), params, carry, x, y)
    >>> grads, carry = cell_gradients(model, loss_fn, Truncation(T, T), params, carry, x, y)

  References:
    Williams & Peng 1990; Sutskever 2013 (thesis, section 2.8.6).
  """
  where = "cell_gradients"
  if not isinstance(cell, Cell):
    raise ValueError(f"{where}: cell must be a tbptt_jax.Cell, got {type(cell).__name__}")
  if not isinstance(truncation, Truncation):
    raise ValueError(
      f"{where}: truncation must be a tbptt_jax.Truncation(k1, k2, style), got {truncation!r}"
    )
  _check_sequence(where, carry, inputs, targets, resets, reset_carry, unroll, remat)
  return _gradients(cell, loss_fn, truncation, params, carry, (inputs, targets, resets),
                    reset_carry, ScanOptions(unroll, remat))  # fmt: skip


def _check_sequence(where, carry, inputs, targets, resets, reset_carry, unroll, remat) -> None:
  """The checks of a whole sequence's arguments, once, at a public entry point."""
  batch, time = _checks.batch_time(where, "inputs", inputs)
  _checks.same_batch_time(where, "targets", targets, batch, time)
  _checks.leading_batch(where, "carry", carry, batch)
  if resets is not None:
    _checks.resets(where, resets, batch, time)
  if reset_carry is not None:
    _checks.like(where, "reset_carry", reset_carry, "carry", carry)
  _checks.unroll(where, unroll)
  if remat is not None:
    _checks.positive_int(where, "remat", remat)


def _gradients(cell, loss_fn, truncation, params, carry, sequences, reset_carry, options):
  """`cell_gradients` on checked arguments: the blocks of the sequence, one after another."""
  xs, ys, resets = time_major(sequences)
  time = _length(xs)
  # No window reaches behind step 1, so any k2 >= T is full backpropagation.
  truncation = truncation._replace(k1=min(truncation.k1, time), k2=min(truncation.k2, time))
  if reset_carry is None:
    reset_carry = jax.tree.map(jnp.zeros_like, carry)
  streams = start_of_sequence(carry, jax.tree.map(lambda a: a[0], xs), truncation.k2)
  block_fn = functools.partial(_block_step, cell, loss_fn, truncation, params, reset_carry, options)
  streams, grads = scan_blocks(block_fn, streams, (xs, ys, resets), truncation.k1)
  return grads, streams.carry


def _block_step(cell, loss_fn, truncation, params, reset_carry, options, streams, block):
  """`block_gradients` as a `scan_blocks` body: streams in, streams and gradient out."""
  out = block_gradients(cell, loss_fn, truncation, params, streams, Block(*block), reset_carry,
                        options)  # fmt: skip
  return out.streams, out.grads


def tbptt_gradients(
  step_fn: StepFn,
  loss_fn: LossFn,
  params: Params,
  carry: Carry,
  inputs: Any,
  targets: Any,
  *,
  k1: int,
  k2: int,
  style: str = "window",
  resets: jax.typing.ArrayLike | None = None,
  reset_carry: Carry | None = None,
  unroll: int | bool = 1,
  head_fn: HeadFn | None = None,
  remat: int | None = None,
  embed_fn: HeadFn | None = None,
  scan_fn: ScanFn | None = None,
) -> tuple[Params, Carry]:
  r"""`cell_gradients` for a model given as loose functions: TBPTT(k1, k2) at fixed params.

  The same gradients as `cell_gradients(from_step(step_fn, head=head_fn,
  embed=embed_fn, scan=scan_fn), loss_fn, Truncation(k1, k2, style), ...)`:
  for update i (block (i k1, e_i], see the module docstring)

      g_i = 1 / (B |block_i|) * sum_{t in block_i} sum_b d l_t^b / d theta,

  where l_t is differentiated through the steps max(1, e_i - k2 + 1)..e_i
  (window style) or max(1, t - k2 + 1)..t (per-loss style) only.

  Args:
    step_fn: `step_fn(params, carry, x_t) -> (carry, out_t)` on a batch.
    loss_fn: `loss_fn(out_t, y_t) -> [batch]`, the per-example losses l_t.
    params: the parameters, fixed for every update.
    carry: the carry entering step 1, leaves `[batch, ...]`.
    inputs: leaves `[batch, T, ...]`.
    targets: leaves `[batch, T, ...]`.
    k1: steps per update (the block length), >= 1.
    k2: steps each loss is backpropagated through, >= 1 (>= k1 in window style).
    style: `"window"` or `"per_loss"`.
    resets: optional `[batch, T]` bool: where True the stream restarts from
      `reset_carry` before that step, which also cuts the backward pass there.
    reset_carry: the carry a reset restores; default zeros.
    unroll: passed to the inner `jax.lax.scan` over time.
    head_fn: optional `head_fn(params, y_t) -> out_t`, a stateless readout
      applied to every step's output after the scan (a `Cell`'s `head`);
      `loss_fn` then scores `out_t`.
    remat: if set, each backward window runs in `jax.checkpoint`-ed segments
      of this many steps (see `cell_gradients`).
    embed_fn: optional `embed_fn(params, x_t) -> e_t`, a stateless map applied
      to every step's input before the scan (a `Cell`'s `embed`); `step_fn`
      then takes e_t.
    scan_fn: optional, the same function as `jax.lax.scan` of `step_fn` with
      a backward pass of its own (a `Cell`'s `scan`), run instead of the
      scan wherever a window has no resets and no padding.

  Returns:
    `(grads, final_carry)`: `grads` is the pytree of `params` with a new leading
    axis of length ceil(T / k1), the gradient of each update; `final_carry` is
    the carry after step T, the same whatever k1, k2 and style.

  Example: chunked TBPTT with k = 10 is `k1=k2=10`; full BPTT is `k1=k2=T`.
    >>> step = jax.jit(functools.partial(tbptt_gradients, cell.apply, loss_fn,
    ...                                  k1=5, k2=10, style="window"))
    >>> grads, carry = step(params, carry, inputs, targets)

  References:
    Williams & Peng 1990; Sutskever 2013 (thesis, section 2.8.6).
  """
  where = "tbptt_gradients"
  truncation = Truncation(*_checks.truncation(where, k1, k2, style))
  _check_sequence(where, carry, inputs, targets, resets, reset_carry, unroll, remat)
  cell = from_step(step_fn, head=head_fn, embed=embed_fn, scan=scan_fn)
  return _gradients(cell, loss_fn, truncation, params, carry, (inputs, targets, resets),
                    reset_carry, ScanOptions(unroll, remat))  # fmt: skip


def _length(tree: Any) -> int:
  """The leading (time) size of a time-major tree."""
  return jax.tree.leaves(tree)[0].shape[0]


def _expand(tree: Any) -> Any:
  return jax.tree.map(lambda a: a[None], tree)


def _concat(*trees: Any) -> Any:
  return jax.tree.map(lambda *a: jnp.concatenate(a), *trees)
