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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tbptt_jax import _checks
from tbptt_jax.cells import Carry, HeadFn, Params, ScanFn, StepFn, map_steps
from tbptt_jax.unroll import masked_step, scan_steps, time_major, where_leading

LossFn = Callable[[Any, Any], jax.Array]


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


class BlockResult(NamedTuple):
  """The outcome of one TBPTT update's backward pass."""

  grads: Params  # the gradient of the block objective L_i
  loss: jax.Array  # shape=(), the block objective L_i
  carry: Carry  # leaves [batch, ...]: the carry after the block
  lookback: Lookback  # the k2 - 1 steps before the block's end


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


def block_gradients(
  step_fn: StepFn,
  loss_fn: LossFn,
  params: Params,
  carry: Carry,
  lookback: Lookback,
  inputs: Any,
  targets: Any,
  resets: jax.Array | None,
  *,
  style: str,
  reset_carry: Carry | None = None,
  unroll: int | bool = 1,
  head_fn: HeadFn | None = None,
  remat: int | None = None,
  k2: int | None = None,
  where: str = "block_gradients",
  embed_fn: HeadFn | None = None,
  scan_fn: ScanFn | None = None,
) -> BlockResult:
  """The gradient of one TBPTT update, for a block of r <= k1 steps (time-major).

  k2 defaults to the lookback's length plus one; a shorter `k2` backpropagates
  through the last k2 steps only while the returned lookback keeps its full
  length, so one lookback serves every k2 up to its own (the trainer's compiled
  set of k2, see `tbptt_trainer`). Other arguments are as in
  `tbptt_gradients`, except that `inputs`, `targets` and `resets` are
  time-major, `[r, batch, ...]`, and `carry` is the carry entering the block,
  the last state the lookback leads to. `where` names the caller in errors.

  The gradient re-runs each window from its stored entering state with the
  given `params`; the state carried on is the block run once from `carry`, so
  the forward pass does not depend on the truncation.
  """
  r = jax.tree.leaves(inputs)[0].shape[0]
  stored = lookback.valid.shape[0]  # k2 - 1 of the longest window the lookback serves
  k2 = stored + 1 if k2 is None else k2
  if not 1 <= k2 <= stored + 1:  # pragma: no cover - callers validate k2
    raise ValueError(f"{where}: k2 must be in [1, {stored + 1}], got {k2}")
  batch = lookback.resets.shape[1]
  if reset_carry is None:
    reset_carry = jax.tree.map(jnp.zeros_like, carry)

  def mean_loss(losses: jax.Array) -> jax.Array:
    _checks.per_example_losses(where, losses, r, batch)
    return jnp.mean(losses)

  def forward(carry: Carry) -> tuple[Carry, Carry]:
    """The block run from `carry`: the final carry and the carry after each step."""
    run = scan_steps(
      step_fn,
      params,
      carry,
      map_steps(embed_fn, params, inputs),
      resets=resets,
      reset_carry=reset_carry,
      unroll=unroll,
      keep_outputs=False,
      keep_carries=True,
      scan_fn=scan_fn,
    )
    return run.carry, run.carries

  def entering_states(block_carries: Carry) -> Carry:
    """The carry entering each of the lookback's and the block's steps."""
    after_block_steps = jax.tree.map(lambda a: a[:-1], block_carries)
    return _concat(lookback.states, _expand(carry), after_block_steps)

  # Padding steps (before step 1) leave the carry unchanged, but the cell still
  # runs on them: a real input keeps a cell undefined at zero (log, 1/x) from
  # putting 0 * inf = NaN into the backward pass.
  first_input = jax.tree.map(lambda x: x[:1], inputs)
  lookback_inputs = where_leading(lookback.valid, lookback.inputs, first_input)
  block_resets = jnp.zeros((r, batch), bool) if resets is None else resets
  # All steps at hand: the lookback's k2 - 1, then the block's r.
  all_inputs = _concat(lookback_inputs, inputs)
  all_resets = jnp.concatenate([lookback.resets, block_resets])
  all_valid = jnp.concatenate([lookback.valid, jnp.ones((r,), bool)])

  if style == "window":
    # The window is the last k2 of all steps: k2 - r lookback steps, then the block.
    n_back = k2 - r
    first = stored - n_back  # the lookback step the window starts at
    # A window that starts at the block starts from `carry`; one that reaches
    # back starts from the stored state entering its first step.
    anchor = carry if n_back == 0 else jax.tree.map(lambda s: s[first], lookback.states)

    def objective(params):
      # Window-style truncation (Williams & Peng): the state entering the k2-step
      # window is a constant, so no gradient reaches behind step e_i - k2 + 1.
      s = jax.lax.stop_gradient(anchor)
      if n_back:
        s = scan_steps(
          step_fn,
          params,
          s,
          map_steps(embed_fn, params, jax.tree.map(lambda a: a[first:], lookback_inputs)),
          resets=lookback.resets[first:],
          mask=lookback.valid[first:],
          reset_carry=reset_carry,
          unroll=unroll,
          keep_outputs=False,
          remat=remat,
        ).carry
      run = scan_steps(
        step_fn,
        params,
        s,
        map_steps(embed_fn, params, inputs),
        resets=resets,
        reset_carry=reset_carry,
        unroll=unroll,
        keep_carries=True,
        remat=remat,
        scan_fn=scan_fn,
      )
      outputs = map_steps(head_fn, params, run.outputs)
      loss = mean_loss(jax.vmap(loss_fn)(outputs, targets))
      return loss, (run.carry, run.carries)

    (loss, block_run), grads = jax.value_and_grad(objective, has_aux=True)(params)
    # Only a window that starts at `carry` ran the block as the forward pass does;
    # one that reaches back re-ran older steps with these params.
    new_carry, block_carries = block_run if n_back == 0 else forward(carry)
    entering = entering_states(block_carries)
  elif style == "per_loss":
    new_carry, block_carries = forward(carry)
    # Loss j (the block's step j) owns the window of all steps
    # skip + j .. skip + j + k2 - 1, entered by entering[skip + j]: the lookback's
    # first `skip` steps are beyond every window of this k2.
    skip = stored + 1 - k2
    entering = entering_states(block_carries)
    anchors = jax.tree.map(lambda a: a[skip : skip + r], entering)
    window_idx = skip + np.arange(r)[:, None] + np.arange(k2)[None, :]
    window_flags = (all_resets[window_idx], all_valid[window_idx])

    def window_output(params, anchor, window):
      # Per-loss truncation: l_t is differentiated through its own k2 steps
      # t - k2 + 1 .. t only; the state s_{t - k2} entering them is a constant.
      s = jax.lax.stop_gradient(anchor)
      xs, rs, vs = window
      s = scan_steps(
        step_fn,
        params,
        s,
        jax.tree.map(lambda a: a[:-1], xs),
        resets=rs[:-1],
        mask=vs[:-1],
        reset_carry=reset_carry,
        unroll=unroll,
        keep_outputs=False,
        remat=remat,
      ).carry
      # Step t itself is a block step, never padding.
      _, out_t = masked_step(
        step_fn,
        params,
        s,
        jax.tree.map(lambda a: a[-1], xs),
        reset_t=rs[-1],
        reset_carry=reset_carry,
      )
      return out_t

    def objective(params):
      # Every step is embedded once, before the windows that share it are cut out.
      embedded = map_steps(embed_fn, params, all_inputs)
      windows = (jax.tree.map(lambda a: a[window_idx], embedded), *window_flags)
      outputs = jax.vmap(window_output, in_axes=(None, 0, 0))(params, anchors, windows)
      outputs = map_steps(head_fn, params, outputs)
      return mean_loss(jax.vmap(loss_fn)(outputs, targets))

    loss, grads = jax.value_and_grad(objective)(params)
  else:  # pragma: no cover - callers validate `style`
    raise ValueError(f"{where}: unknown style {style!r}")

  # The lookback moves on by r steps; the states it keeps are the forward pass's.
  new_lookback = Lookback(
    states=jax.tree.map(lambda a: a[r:], entering),
    inputs=jax.tree.map(lambda a: a[r:], all_inputs),
    resets=all_resets[r:],
    valid=all_valid[r:],
  )
  return BlockResult(grads, loss, new_carry, new_lookback)


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
  r"""The gradients of every update of TBPTT(k1, k2) over a sequence, at fixed params.

  For update i (block (i k1, e_i], see the module docstring) the gradient is

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
      of this many steps (`unroll.scan_steps`): memory of about k2 / remat
      carries instead of k2 steps' intermediates, for one more forward pass,
      the same gradients. For long windows, e.g. full BPTT; s ~ sqrt(k2).
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
  k1, k2, style = _checks.truncation(where, k1, k2, style)
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

  # No window reaches behind step 1, so any k2 >= T is full backpropagation.
  k2 = min(k2, time)
  xs, ys, resets = time_major((inputs, targets, resets))
  lookback = empty_lookback(carry, jax.tree.map(lambda a: a[0], xs), k2)

  def block(state, blk):
    carry, lookback = state
    x, y, r = blk
    out = block_gradients(
      step_fn,
      loss_fn,
      params,
      carry,
      lookback,
      x,
      y,
      r,
      style=style,
      reset_carry=reset_carry,
      unroll=unroll,
      head_fn=head_fn,
      remat=remat,
      where=where,
      embed_fn=embed_fn,
      scan_fn=scan_fn,
    )
    return (out.carry, out.lookback), out.grads

  (carry, _), grads = scan_blocks(block, (carry, lookback), (xs, ys, resets), k1)
  return grads, carry


def _expand(tree: Any) -> Any:
  return jax.tree.map(lambda a: a[None], tree)


def _concat(*trees: Any) -> Any:
  return jax.tree.map(lambda *a: jnp.concatenate(a), *trees)
