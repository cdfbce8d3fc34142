"""Online TBPTT training: a jitted update that consumes many chunks per call.

`tbptt_trainer` is an optax-style factory: it closes over the configuration
(model, loss, optimizer, truncation) and returns a `Trainer` of pure functions;
all state is a `TrainState` passed in and returned.

One call of `update` takes `[batch, T, ...]` steps of every stream and makes
ceil(T / k1) optimizer updates in order, each with the TBPTT(k1, k2) gradient
of its block at the current parameters (see `tbptt_jax.truncation`). The
blocks run in a `jax.lax.scan` inside one jitted call, so Python dispatch is
paid once per call, not per update. The carry and the lookback (the last
k2 - 1 steps, which later windows re-run) pass from call to call, so T steps
in one call and the same steps split over several calls make the same
updates, as long as the split points are multiples of k1 (for deterministic
models: the per-step draws of `step_rngs`, and so dropout masks and ARTBP's
cuts, depend on how the steps are split into calls). Blocks start at
each call's first step: a call of T steps, T not a multiple of k1, ends with
an update of T mod k1 steps (its window still reaches k2 steps back), and the
next call starts a new block; so feed chunks of a multiple of k1 steps, the
last chunk of a sequence excepted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tbptt_jax import _checks, sharding
from tbptt_jax import artbp as _artbp
from tbptt_jax import rtrl as _rtrl
from tbptt_jax.cells import Carry, Cell, Params
from tbptt_jax.truncation import (
  Block,
  BlockResult,
  Lookback,
  LossFn,
  ScanOptions,
  StreamState,
  Truncation,
  block_gradients,
  scan_blocks,
  start_of_sequence,
)
from tbptt_jax.unroll import time_major


class TrainState(NamedTuple):
  """Everything that changes during training.

  `carry` and `lookback` are kept together: the lookback holds the states
  behind the carry, which later windows start from. Read them freely, but
  restart streams with `resets` or `Trainer.reset`, not by editing `carry`.
  """

  params: Params
  opt_state: optax.OptState
  carry: Carry  # leaves [batch, ...]: each stream's state after the last step seen
  lookback: Lookback  # the last max(k2) - 1 steps of every stream, time-major
  step: jax.Array  # shape=(), int32: optimizer updates made (skipped ones not counted)
  rng: jax.Array  # PRNG key: the source of per-step randomness (`step_rngs`)
  k2: jax.Array  # shape=(), int32: the next updates' k2, one of the trainer's (`Trainer.set_k2`)


class UpdateMetrics(NamedTuple):
  """Per-update metrics of one `update` call, each of shape [ceil(T / k1)].

  The monitoring fields come from the gradient's norm, which is computed
  anyway, and one more norm after clipping; they are how exploding gradients
  show up during training (see `tbptt_jax.diagnostics`).
  """

  loss: jax.Array  # the block objective: mean loss over the batch and block steps
  grad_norm: jax.Array  # global norm of the TBPTT gradient, before clipping
  clipped_grad_norm: jax.Array  # global norm of the gradient the optimizer received
  clipped: jax.Array  # bool: grad_norm exceeded max_grad_norm, so clipping scaled it down
  nonfinite: jax.Array  # bool: a NaN or inf in the gradient or the new parameters: skipped
  k2: jax.Array  # int32: the update's window (`TrainState.k2`, or ARTBP's choice from a set)


class Trainer(NamedTuple):
  """The pure functions of a TBPTT training run.

  Attributes:
    init: `init(rng, inputs) -> TrainState`, from an example chunk
      `[batch, T, ...]` (its first step sets parameter and carry shapes).
    update: `update(state, inputs, targets, resets=None) -> (state, metrics)`,
      jitted, donating `state` (do not reuse the state passed in): consumes
      `[batch, T, ...]` steps of every stream, making ceil(T / k1) updates,
      the last of T mod k1 steps when T is not a multiple of k1 (see the
      module docstring); `metrics` is an `UpdateMetrics`. Inputs must have
      the per-step shapes and dtypes of `init`'s.
    reset: `reset(state) -> state`: restarts every stream (carry back to the
      initial carry, lookback emptied), keeping parameters and optimizer
      state; call it when the streams jump, e.g. at the start of an epoch.
    set_k2: `set_k2(state, k2) -> state`: the state with the k2 of the next
      updates, one of the trainer's compiled k2s (`tbptt_trainer(k2=(...))`);
      changing it never recompiles `update`.
    k2s: the compiled k2s, ascending.
  """

  init: Callable[[jax.Array, Any], TrainState]
  update: Callable[..., tuple[TrainState, UpdateMetrics]]
  reset: Callable[[TrainState], TrainState]
  set_k2: Callable[[TrainState, int], TrainState]
  k2s: tuple[int, ...]


def tbptt_trainer(
  model: Cell,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  k1: int,
  k2: int | Sequence[int] | None = None,
  style: str = "window",
  max_grad_norm: float | None = None,
  unroll: int | bool = 1,
  step_rngs: bool = False,
  skip_nonfinite: bool = True,
  remat: int | None = None,
  artbp: _artbp.ARTBP | None = None,
  mesh: jax.sharding.Mesh | None = None,
  gradient: str = "bptt",
) -> Trainer:
  """Builds a jitted TBPTT(k1, k2) training step for a recurrent model.

  Args:
    model: a `Cell` whose `apply(params, carry, x_t) -> (carry, out_t)` maps an
      input step to the outputs `loss_fn` scores (e.g. logits), or to the
      inputs of its `head` if it has one; see `tbptt_jax.stack` and
      `tbptt_jax.with_head` to build one from embedding, cells and readout.
    loss_fn: `loss_fn(out_t, y_t) -> [batch]` per-example losses, e.g.
      `optax.softmax_cross_entropy_with_integer_labels`.
    optimizer: an optax optimizer.
    k1: steps per update.
    k2: steps each loss is backpropagated through; default k1 (chunked TBPTT).
      A sequence of k2s compiles one backward pass for each, chosen at run
      time by `TrainState.k2` (`Trainer.set_k2`; initially the smallest)
      through `jax.lax.switch`: a controller such as
      `tbptt_jax.adaptive.adaptive_k2` can change k2 between calls without
      recompiling. The lookback keeps the longest's k2 - 1 steps; each update
      runs only the chosen window.
    style: `"window"` or `"per_loss"` (see `tbptt_jax.truncation`).
    max_grad_norm: if set, each update's gradient is clipped to this global
      norm (`optax.clip_by_global_norm`) before the optimizer.
    unroll: passed to the `jax.lax.scan` over time.
    step_rngs: for stochastic models (dropout): if True, the model's input at
      step t is `(x_t, rng_t)`, `rng_t` being raw PRNG key data (`[batch, 2]`
      uint32, `jax.random.key_data`), fresh for every stream and step, drawn
      from `TrainState.rng`. The lookback keeps them with the inputs, so a
      window that re-runs a step replays the step's randomness exactly.
    skip_nonfinite: if True (the default), an update whose gradient holds a
      NaN or an infinity (its global norm is then not finite; so is a norm
      that overflows), or whose optimizer update does (a NaN learning rate:
      seen in the new parameters, which it reaches), is skipped: parameters,
      optimizer state and `step` stay
      as they were (the carry still moves on with the data), and the update's
      `UpdateMetrics.nonfinite` says so. If False, it is applied.
    remat: if set, backward windows run in `jax.checkpoint`-ed segments of
      this many steps: memory of about k2 / remat carries instead of k2 steps'
      intermediates, for one more forward pass (see `tbptt_gradients`).
    artbp: if set, an `ARTBP` schedule: unbiased random truncation (Tallec &
      Ollivier 2017, `tbptt_jax.artbp`) inside each backward window, instead
      of the fixed cut at its start; needs k2 > k1 in window style (segments
      of at most max(k2) - k1 + 1 steps) or a single k2 >= 2 in per-loss style
      (at most k2 steps). The model's carry becomes an `ARTBPCarry`. With a
      set of k2s (window style), each update runs the shortest window that
      reaches back to every stream's last cut (`TrainState.k2` is unused):
      at fixed parameters the same gradient as the longest window, for the
      cost of the segments drawn (while parameters move, the state entering
      the last cut is the stored forward pass's, not re-run from further back).
    mesh: if set, train data-parallel on this `jax.sharding.Mesh`: the streams
      are split over its "data" axis, parameters replicated, and host data are
      this process's streams (see `tbptt_jax.sharding`); batch must be a
      multiple of the axis size. None: one device, as without it.
    gradient: what each update's gradient is. `"bptt"` (the default): the
      truncated gradient that k2, style and artbp describe. `"rtrl"`: real-time
      recurrent learning (`tbptt_jax.rtrl`): the model is wrapped in
      `rtrl_cell`, whose carry holds the state's sensitivity to the
      parameters, and each loss's gradient reaches through every past step
      since the last reset: at fixed parameters full BPTT's gradient of the
      block's losses, with memory flat in the sequence length, for
      O(n^2 p) per step (state size n, parameter count p). `"online"`: the
      same, for a model whose carry already holds its sensitivities (an
      `rtrl_cell`, or `online_lru` layers, Zucchet et al.'s diagonal ones); it
      is trained as it is. Both take k1 (k1 = 1 included) and run each loss's
      reverse pass through its own step only (k2 = 1, per loss): k2, style,
      artbp and remat cannot be given with them.

  Returns:
    A `Trainer(init, update, reset, set_k2, k2s)`.

  Example:
    >>> trainer = tbptt_trainer(model, optax.softmax_cross_entropy_with_integer_labels,
    ...                         optax.adam(1e-3), k1=10, k2=20)
    >>> state = trainer.init(jax.random.key(0), inputs)
    >>> for x, y in iterate_chunks(streams, 100):  # 10 updates per call
    ...   state, metrics = trainer.update(state, x, y)
  """
  model, k2, style = _online(model, k2, style, artbp, remat, gradient)
  config = _configure(
    model, loss_fn, optimizer, k1, k2, style, max_grad_norm, unroll, step_rngs,
    skip_nonfinite, remat, artbp,
  )  # fmt: skip
  init: Callable[..., TrainState] = functools.partial(_init, config)
  update: Callable[..., Any] = functools.partial(_update, config)
  reset: Callable[..., TrainState] = functools.partial(_reset, config)
  if mesh is not None:  # the same update, its streams split over the mesh's devices
    init, jitted, reset = sharding.data_parallel(mesh, init, update, reset)
  else:
    jitted = jax.jit(update, donate_argnums=0)
  k2s = tuple(t.k2 for t in config.truncations)
  return Trainer(init, _LiveStateUpdate(jitted), reset, functools.partial(_set_k2, config), k2s)


class _LiveStateUpdate:
  """The jitted `update`, refusing, in one line, a state whose buffers an earlier call took.

  `update` donates its state (its buffers are reused for the new one), so a state passed to
  it once is gone; XLA's own error for it names neither the cause nor the fix. Everything
  else (`lower`, `_cache_size`, ...) is the jitted function's.
  """

  def __init__(self, jitted: Callable[..., Any]) -> None:
    self._jitted = jitted

  def __call__(self, state: TrainState, *args: Any, **kwargs: Any) -> Any:
    if any(_deleted(leaf) for leaf in jax.tree.leaves(state)):
      raise ValueError(
        "update: this state was already passed to update, which took its buffers (it donates "
        "them to the new state): use the state that call returned, "
        "`state, metrics = trainer.update(state, ...)`"
      )
    return self._jitted(state, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._jitted, name)


def _deleted(leaf: Any) -> bool:
  """Whether `leaf` is a concrete array whose buffer is gone (a tracer, inside a caller's own
  `jax.jit`, has none to lose)."""
  return isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.is_deleted()


class _Config(NamedTuple):
  """What `tbptt_trainer` closes over, checked: the functions below take it first."""

  model: Cell  # the model, wrapped by `artbp_cell` when training with ARTBP
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  truncations: tuple[Truncation, ...]  # one per compiled k2, ascending
  options: ScanOptions
  max_grad_norm: float | None
  step_rngs: bool  # the model's steps take (x_t, rng_t)
  skip_nonfinite: bool
  artbp: _artbp.ARTBP | None
  max_length: int  # ARTBP's longest segment (unused without ARTBP)

  @property
  def k1(self) -> int:
    return self.truncations[0].k1

  @property
  def lookback_k2(self) -> int:
    """The longest window, whose k2 - 1 steps the lookback keeps."""
    return self.truncations[-1].k2


GRADIENTS = ("bptt", "rtrl", "online")


def _online(model: Any, k2: Any, style: Any, artbp: Any, remat: Any, gradient: Any):
  """`(model, k2, style)` for `gradient`: as given for BPTT; for RTRL (the model wrapped in
  `rtrl_cell`) and online models, each loss's reverse pass through its own step only."""
  where = "tbptt_trainer"
  if gradient not in GRADIENTS:
    raise ValueError(f"{where}: gradient must be one of {GRADIENTS}, got {gradient!r}")
  if gradient == "bptt":
    return model, k2, style
  given = {"k2": k2, "style": None if style == "window" else style, "artbp": artbp, "remat": remat}
  for name, value in given.items():
    if value is not None:
      raise ValueError(
        f"{where}: gradient={gradient!r} reaches every past step through the carried "
        f"sensitivities, so {name} cannot be given with it, got {name}={value!r}"
      )
  if gradient == "rtrl" and isinstance(model, Cell):  # anything else: refused below
    model = _rtrl.rtrl_cell(model)
  return model, 1, "per_loss"


def _configure(
  model, loss_fn, optimizer, k1, k2, style, max_grad_norm, unroll, step_rngs,
  skip_nonfinite, remat, artbp,
) -> _Config:  # fmt: skip
  """`tbptt_trainer`'s arguments, checked once, as a `_Config`."""
  where = "tbptt_trainer"
  if not isinstance(model, Cell):
    raise ValueError(f"{where}: model must be a tbptt_jax.Cell, got {type(model).__name__}")
  _checks.cell_parts(where, "model", model)
  _checks.callable_arg(where, "loss_fn", loss_fn, "a function loss_fn(out, target) -> [batch]")
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(
      f"{where}: optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
    )
  _checks.callable_arg(where, "optimizer.init", optimizer.init, "a function")
  _checks.callable_arg(where, "optimizer.update", optimizer.update, "a function")
  k1 = _checks.positive_int(where, "k1", k1)
  k2s = _checks.k2_set(where, "k2", k1 if k2 is None else k2)
  truncations = tuple(Truncation(*_checks.truncation(where, k1, k, style)) for k in k2s)
  style, k2 = truncations[0].style, k2s[-1]
  max_length = k2 - k1 + 1 if style == "window" else k2
  if artbp is not None:
    artbp = _artbp.check(where, artbp)
    if (len(k2s) > 1 and style != "window") or max_length < 2:
      raise ValueError(
        f"{where}: artbp needs segments of >= 2 steps: k2 > k1 in window style, one "
        f"k2 >= 2 in per_loss style, got k1={k1}, k2={k2s if len(k2s) > 1 else k2}, "
        f"style={style!r}"
      )
    model = _artbp.artbp_cell(model, artbp, max_length=max_length, step_rngs=step_rngs)
    step_rngs = True  # the cut draws come with every step's inputs
  if max_grad_norm is not None and not max_grad_norm > 0:
    raise ValueError(f"{where}: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
  _checks.unroll(where, unroll)
  if remat is not None:
    _checks.positive_int(where, "remat", remat)
  return _Config(
    model, loss_fn, optimizer, truncations, ScanOptions(unroll, remat), max_grad_norm,
    bool(step_rngs), bool(skip_nonfinite), artbp, max_length,
  )  # fmt: skip


def _with_rngs(config: _Config, rng: jax.Array, inputs: Any) -> tuple[jax.Array, Any]:
  """`(rng, inputs)` or, with `step_rngs`, the next rng and `(inputs, rngs)`."""
  if not config.step_rngs:
    return rng, inputs
  batch, time = jax.tree.leaves(inputs)[0].shape[:2]
  rng, draw = jax.random.split(rng)
  rngs = jax.random.split(draw, (batch, time))
  if jax.dtypes.issubdtype(rngs.dtype, jax.dtypes.prng_key):
    rngs = jax.random.key_data(rngs)
  return rng, (inputs, rngs)


def _start(config: _Config, x_t: Any) -> StreamState:
  """Every stream at the start of a sequence: the initial carry, an empty lookback."""
  return start_of_sequence(config.model.initial_carry(x_t), x_t, config.lookback_k2)


def _init(config: _Config, rng: jax.Array, inputs: Any) -> TrainState:
  _checks.prng_key("init", "rng", rng)
  _checks.batch_time("init", "inputs", inputs)
  inputs = jax.tree.map(lambda a: jnp.asarray(a)[:, :1], inputs)
  rng, inputs = _with_rngs(config, rng, inputs)
  x_t = jax.tree.map(lambda a: a[:, 0], inputs)
  rng_params, rng = jax.random.split(rng)
  params = config.model.init(rng_params, x_t)
  streams = _start(config, x_t)
  state = TrainState(
    params=params,
    opt_state=config.optimizer.init(params),
    carry=streams.carry,
    lookback=streams.lookback,
    step=jnp.zeros((), jnp.int32),
    rng=rng,
    k2=jnp.asarray(config.truncations[0].k2, jnp.int32),
  )
  # `update` donates every buffer of the state: none may be shared with the
  # caller's arrays or appear twice (e.g. an initial carry of (h, h)).
  return jax.tree.map(jnp.copy, state)


def _update(config: _Config, state: TrainState, inputs: Any, targets: Any, resets: Any = None):
  """`Trainer.update`, before `jax.jit`: the call's blocks, one optimizer update each."""
  batch, time = _checks.batch_time("update", "inputs", inputs)
  _checks.same_batch_time("update", "targets", targets, batch, time)
  if resets is not None:
    _checks.resets("update", resets, batch, time)
  rng, inputs = _with_rngs(config, state.rng, inputs)
  state = state._replace(rng=rng)
  _checks.like_steps("update", "inputs", inputs, state.lookback.inputs)
  xs, ys, resets = time_major((inputs, targets, resets))
  reset_carry = config.model.initial_carry(jax.tree.map(lambda a: a[0], xs))
  one_update = functools.partial(_one_update, config, reset_carry)
  return scan_blocks(one_update, state, (xs, ys, resets), config.k1)


def _one_update(config: _Config, reset_carry: Carry, state: TrainState, block: Any):
  """One TBPTT update: the block's gradient, clipped, then the optimizer's step."""
  block = Block(*block)
  out, index = _gradients(config, reset_carry, state, block)
  grads = out.grads
  grad_norm = optax.tree.norm(grads)
  if config.max_grad_norm is not None:
    # Clipping runs before the optimizer but outside its state, so `opt_state`
    # is exactly the optimizer's and the gradient after clipping can be measured.
    clip = optax.clip_by_global_norm(config.max_grad_norm)
    grads, _ = clip.update(grads, clip.init(state.params))
  updates, opt_state = config.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A NaN or inf anywhere in the gradient makes its norm non-finite: no pass over the gradient.
  # One in the optimizer's update (a NaN learning rate, an overflowing moment) reaches the new
  # parameters, so checking them covers both; XLA fuses that check into apply_updates' loop.
  finite = jnp.isfinite(grad_norm) & _all_finite(params)
  if config.skip_nonfinite:
    # A NaN or inf never reaches the parameters: the update is skipped (params,
    # optimizer state and step unchanged); the streams still move on.
    params, opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old),
      (params, opt_state),
      (state.params, state.opt_state),
    )
  state = state._replace(
    params=params,
    opt_state=opt_state,
    carry=out.carry,
    lookback=out.lookback,
    step=state.step + (finite if config.skip_nonfinite else 1),
  )
  clipped = config.max_grad_norm is not None
  metrics = UpdateMetrics(
    loss=out.loss,
    grad_norm=grad_norm,
    clipped_grad_norm=optax.tree.norm(grads) if clipped else grad_norm,
    clipped=grad_norm > config.max_grad_norm if clipped else jnp.asarray(False),
    nonfinite=~finite,
    k2=jnp.asarray([t.k2 for t in config.truncations], jnp.int32)[index],
  )
  return state, metrics


def _all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point array of `tree` holds finite numbers only (a scalar bool)."""
  checks = [
    jnp.all(jnp.isfinite(leaf))
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  return functools.reduce(jnp.logical_and, checks, jnp.asarray(True))


def _gradients(config: _Config, reset_carry: Carry, state: TrainState, block: Block):
  """The block's `BlockResult` under the update's k2, and that k2's index in the set."""
  streams = StreamState(state.carry, state.lookback)
  gradients = functools.partial(
    block_gradients, config.model, config.loss_fn, reset_carry=reset_carry, options=config.options
  )
  if len(config.truncations) == 1:
    return gradients(config.truncations[0], state.params, streams, block), 0
  index = _k2_index(config, state, block)
  # One compiled backward pass per k2; only the chosen one runs.
  branches = [functools.partial(_branch, gradients, t) for t in config.truncations]
  return jax.lax.switch(index, branches, (state.params, streams, block)), index


def _branch(gradients, truncation: Truncation, operands) -> BlockResult:
  return gradients(truncation, *operands)


def _k2_index(config: _Config, state: TrainState, block: Block) -> jax.Array:
  """Which of the compiled k2s this update runs."""
  k2s = jnp.asarray([t.k2 for t in config.truncations])
  if config.artbp is None:
    return jnp.searchsorted(k2s, state.k2)
  # The block's losses reach back to each stream's last cut, `since` steps before the
  # block (none when the block's first step is cut for certain: since = 0 or max_length);
  # the shortest window that holds them all gives the same gradient.
  since = state.carry.since
  back = jnp.max(jnp.where(since < config.max_length, since, 0))
  return jnp.searchsorted(k2s, jax.tree.leaves(block.inputs)[0].shape[0] + back)


def _reset(config: _Config, state: TrainState) -> TrainState:
  # The lookback's inputs have the shape of one step of every stream.
  x_t = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state.lookback.inputs)
  streams = jax.tree.map(jnp.copy, _start(config, x_t))
  return state._replace(carry=streams.carry, lookback=streams.lookback)


def _set_k2(config: _Config, state: TrainState, k2: int) -> TrainState:
  k2s = tuple(t.k2 for t in config.truncations)
  if config.artbp is not None and len(k2s) > 1:
    raise ValueError("set_k2: with artbp and a set of k2s, each update picks its own window")
  if isinstance(k2, bool) or not isinstance(k2, (int, np.integer)) or k2 not in k2s:
    raise ValueError(f"set_k2: k2 must be one of the trainer's k2s {k2s}, got {k2!r}")
  return state._replace(k2=jnp.asarray(k2, jnp.int32))
