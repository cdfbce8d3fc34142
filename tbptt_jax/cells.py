"""Recurrent cells: the one contract every recurrence in tbptt_jax meets.

A cell's step function is

    apply(params, carry, x_t) -> (carry, y_t)

on a batch: `x_t` is one time step of the inputs, `[batch, ...]`, and every
array in `carry` has a leading batch axis. This is exactly the signature of a
`jax.lax.scan` body and of every Flax linen recurrent cell's `.apply`, so a Flax
cell is used unchanged: `nn.LSTMCell(128).apply` *is* a step function.

`Cell` bundles a step function with the two things a training loop also needs:
how to make parameters and how to make the carry a sequence starts from. The
combinators `feedforward` and `stack` build whole models (embedding, layers of
cells, readout) as one `Cell`, whose `apply` then maps inputs to logits.

A cell may also have a `head`: a stateless map applied to every step's output
after the scan, y_t = head(params, apply(params, carry, x_t)[1]). It is the
same function as a readout inside the step, computed as one large matrix
product over all steps instead of T small ones; for a language model's
vocabulary-sized readout that is most of the work (`with_head`).

Symmetrically, a cell may have an `embed`: a stateless map applied to every
step's input before the scan, so that the step is
apply(params, carry, embed(params, x_t)) (`with_embed`): work that does not
depend on the carry leaves the loop over time, whose steps a small network
pays for one by one (RESULTS.md, section 7). `full_step` and `output` are the
step on the cell's own inputs, whatever it hoists.

A cell may also bring its own `scan`: the same function as `jax.lax.scan` of
its `apply` over a window, with a backward pass written for it. `elman`'s,
and those `flax_cell` gives Flax's LSTMs and GRU (`gated`), project the
inputs of all steps before the loop, run the chain rule back through the
states alone and compute the weight gradients of all steps after the loop,
one matrix product each, where differentiating the scan accumulates them step
by step inside the loop. The engine uses a cell's `scan` wherever a run has
no resets or padding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tbptt_jax import _checks, _layers, gated

Params = Any
Carry = Any
StepFn = Callable[[Params, Carry, Any], tuple[Carry, Any]]
HeadFn = Callable[[Params, Any], Any]
# scan(params, carry, inputs, unroll) -> (carry, outputs, carries), see `Cell.scan`.
ScanFn = Callable[[Params, Carry, Any, int | bool], tuple[Carry, Any, Carry]]

# `initial_carry` is deterministic: cells initialise their carry with zeros
# (every Flax cell's default `carry_init`), and a fixed key keeps any other
# `carry_init` reproducible.
_CARRY_KEY = 0


class Cell(NamedTuple):
  """A recurrent cell as three pure functions (optax-style: no hidden state).

  Attributes:
    init: `init(rng, x_t) -> params`, from an example input step `[batch, ...]`.
    initial_carry: `initial_carry(x_t) -> carry`, the state a sequence starts
      from; only the shape of `x_t` (an array or `jax.ShapeDtypeStruct`) is read.
    apply: the step function `apply(params, carry, x_t) -> (carry, y_t)`.
    head: optional `head(params, y_t) -> out_t`, stateless; when set, the
      cell's output at step t is `head` of `apply`'s y_t, and the engine
      applies it to all steps of a window at once, after the scan.
    embed: optional `embed(params, x_t) -> e_t`, stateless; when set, `apply`
      consumes e_t instead of x_t, and the engine applies `embed` to all
      steps of a window at once, before the scan. `init` and `initial_carry`
      still take x_t.
    scan: optional `scan(params, carry, inputs, unroll) -> (carry, outputs,
      carries)`, the same function as `jax.lax.scan` of `apply` over the
      leading (time) axis of `inputs` (embedded, if the cell has `embed`):
      the carry after the last step, and y_t and the carry after every step
      stacked on a leading time axis. `unroll` is `jax.lax.scan`'s. The
      engine calls it for runs without padding, and without resets unless
      `scan_resets`.
    scan_resets: True when `scan` also takes `resets=` (`[time, batch]` bool)
      and `reset_carry=` keywords, with `unroll.masked_step`'s meaning: where
      `resets[t, b]`, stream b's carry is replaced by `reset_carry` before step
      t, and no gradient crosses it. The engine then hands it windows that hold
      resets as well.
    head_steps: optional `head_steps(params, ys) -> outs`, set with `head`: the
      same function as `jax.vmap` of `head` over the leading (time) axis of
      `ys`, with a backward pass of its own (e.g. a weight gradient taken as
      one product over all steps, laid out for a faster kernel than vmap's
      transpose picks). The engine calls it where it applies `head` to a window.
  """

  init: Callable[[jax.Array, Any], Params]
  initial_carry: Callable[[Any], Carry]
  apply: StepFn
  head: HeadFn | None = None
  embed: HeadFn | None = None
  scan: ScanFn | None = None
  scan_resets: bool = False
  head_steps: HeadFn | None = None


def map_steps(fn: HeadFn | None, params: Params, steps: Any) -> Any:
  """A stateless `fn` (a cell's `head` or `embed`) applied to every step of `steps`.

  `steps` has leaves `[time, ...]`; None for `fn` is the identity.
  """
  if fn is None:
    return steps
  # vmap over time turns T products [batch, h] x [h, out] into one [T batch, h] x [h, out].
  return jax.vmap(fn, in_axes=(None, 0))(params, steps)


def map_head(cell: Cell, params: Params, ys: Any) -> Any:
  """The cell's `head` on every step of `ys` (leaves `[time, ...]`): its `head_steps` where it
  has one, else `map_steps` of `head`."""
  if cell.head_steps is not None:
    if cell.head is None:  # the step (sampling, diagnostics) would skip what windows apply
      raise ValueError("Cell: head_steps is set without head; set head, its step form, too")
    return cell.head_steps(params, ys)
  return map_steps(cell.head, params, ys)


def full_step(cell: Cell) -> StepFn:
  """The step on the cell's own inputs: `apply` after `embed`, without the head.

  The function a loop written step by step calls; equal to `cell.apply` for a
  cell without `embed`.
  """
  embed = cell.embed
  if embed is None:
    return cell.apply
  return lambda params, carry, x_t: cell.apply(params, carry, embed(params, x_t))


def from_step(
  step_fn: StepFn,
  *,
  head: HeadFn | None = None,
  embed: HeadFn | None = None,
  scan: ScanFn | None = None,
) -> Cell:
  """A `Cell` from a bare step function and, optionally, its head, embed and scan.

  For functions that take the pieces of a model one by one (`tbptt_gradients`,
  `unroll`): the engine takes a `Cell`, and the pieces travel together in it.
  The cell has no initialiser: its parameters and carry come from the caller,
  and its `init` and `initial_carry` raise.

  Args:
    step_fn: `step_fn(params, carry, x_t) -> (carry, y_t)` on a batch.
    head: optional stateless readout `head(params, y_t) -> out_t` (`Cell.head`).
    embed: optional stateless input map `embed(params, x_t) -> e_t`; `step_fn`
      then takes e_t (`Cell.embed`).
    scan: optional scan of `step_fn` with a backward pass of its own (`Cell.scan`).
  """
  if not callable(step_fn):
    raise ValueError(f"from_step: step_fn must be a function (params, carry, x_t), got {step_fn!r}")
  return Cell(_no_init, _no_initial_carry, step_fn, head, embed, scan)


def _no_init(rng: jax.Array, x_t: Any) -> Params:
  raise ValueError("from_step: this cell has no init; pass its parameters explicitly")


def _no_initial_carry(x_t: Any) -> Carry:
  raise ValueError("from_step: this cell has no initial carry; pass the carry explicitly")


class ElmanParams(NamedTuple):
  """Parameters of the Elman cell, named as in the equation."""

  U: jax.Array  # shape=[in_features, hidden], input weights
  W: jax.Array  # shape=[hidden, hidden], recurrent weights
  b: jax.Array  # shape=[hidden], bias


def elman_step(
  params: ElmanParams,
  s_tm1: jax.Array,
  x_t: jax.Array,
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
) -> tuple[jax.Array, jax.Array]:
  """One step of the Elman network: s_t = tanh(U x_t + W s_{t-1} + b).

  Batched, so the products are written row-wise: `x_t @ U + s_tm1 @ W + b`.

  Args:
    params: the weights `U`, `W`, `b`.
    s_tm1: the previous state, `[batch, hidden]`.
    x_t: the input, `[batch, in_features]`.
    activation: the nonlinearity (tanh in Elman's network).

  Returns:
    `(s_t, s_t)`: the new state is both the carry and the output.

  References:
    Elman, "Finding Structure in Time", Cognitive Science 14, 1990.
  """
  # Checked at trace time, free under jit: a [batch] step (no feature axis) would
  # otherwise broadcast through the product as one feature vector shared by all streams.
  in_features, hidden = params.U.shape
  if jnp.ndim(x_t) != 2 or jnp.shape(x_t)[1] != in_features:
    raise ValueError(
      f"elman: each input step must have shape [batch, in_features={in_features}], "
      f"got {jnp.shape(x_t)}"
    )
  if jnp.shape(s_tm1) != (jnp.shape(x_t)[0], hidden):
    raise ValueError(
      f"elman: the state must have shape [batch, hidden] = {[jnp.shape(x_t)[0], hidden]}, "
      f"got {list(jnp.shape(s_tm1))}"
    )
  s_t = activation(x_t @ params.U + s_tm1 @ params.W + params.b)
  return s_t, s_t


def elman(
  hidden_size: int,
  *,
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
  input_init: jax.nn.initializers.Initializer = jax.nn.initializers.lecun_normal(),
  recurrent_init: jax.nn.initializers.Initializer = jax.nn.initializers.orthogonal(),
  param_dtype: Any = jnp.float32,
) -> Cell:
  """The classic Elman cell s_t = tanh(U x_t + W s_{t-1} + b), as a `Cell`.

  Initialisation follows `flax.linen.SimpleCell` (LeCun-normal `U`, orthogonal
  `W`, zero `b`); the carry starts at zero.

  Args:
    hidden_size: the size of the state s_t.
    activation: the nonlinearity; tanh is Elman's.
    input_init: initialiser of `U`.
    recurrent_init: initialiser of `W`.
    param_dtype: dtype of the parameters (and of the carry).

  Returns:
    A `Cell` whose `apply` is `elman_step`; input steps are `[batch, in_features]`.

  Example:
    >>> cell = elman(16)
    >>> x_t = jnp.ones((4, 3))
    >>> params = cell.init(jax.random.key(0), x_t)
    >>> s_t, y_t = cell.apply(params, cell.initial_carry(x_t), x_t)
    >>> s_t.shape
    (4, 16)
  """
  hidden_size = _checks.positive_int("elman", "hidden_size", hidden_size)

  def init(rng: jax.Array, x_t: Any) -> ElmanParams:
    in_features = x_t.shape[-1]
    k_u, k_w = jax.random.split(rng)
    return ElmanParams(
      U=input_init(k_u, (in_features, hidden_size), param_dtype),
      W=recurrent_init(k_w, (hidden_size, hidden_size), param_dtype),
      b=jnp.zeros((hidden_size,), param_dtype),
    )

  def initial_carry(x_t: Any) -> jax.Array:
    return jnp.zeros((x_t.shape[0], hidden_size), param_dtype)

  def apply(params: ElmanParams, s_tm1: jax.Array, x_t: jax.Array):
    return elman_step(params, s_tm1, x_t, activation)

  def scan(params: ElmanParams, s_0: jax.Array, xs: jax.Array, unroll: int | bool = 1):
    jax.eval_shape(apply, params, s_0, xs[0])  # elman_step's checks of the shapes
    s_T, states = _elman_scan(activation, unroll)(params, s_0, xs)
    return s_T, states, states

  return Cell(init, initial_carry, apply, scan=scan)


def _elman_scan(activation: Callable[[jax.Array], jax.Array], unroll: int | bool):
  r"""`elman_step` over the leading time axis of `xs`, with its backward pass written out.

  Forward, with the input projection of all steps done first:

      a_t = x_t U + b + s_{t-1} W,    s_t = f(a_t),    t = 1..T.

  Backward, given g_t = dL/ds_t from the outputs (and from the final carry at
  t = T), the loop carries only the state's cotangent:

      dz_t = f'(a_t) * (g_t + dz_{t+1} W^T),    dL/ds_0 = dz_1 W^T,

  and the weight gradients are sums over all steps, each one matrix product
  over the T * batch rows once the loop is done (differentiating a scan of
  `elman_step` would accumulate them step by step inside the loop):

      dW = sum_t s_{t-1}^T dz_t,  dU = sum_t x_t^T dz_t,  db = sum_t 1^T dz_t,  dx_t = dz_t U^T.
  """

  forward = functools.partial(_elman_forward, activation, unroll)

  @jax.custom_vjp
  def run(params: ElmanParams, s_0: jax.Array, xs: jax.Array):
    s_T, _, states = forward(params, s_0, xs)
    return s_T, states

  def run_forward(params, s_0, xs):
    s_T, pre, states = forward(params, s_0, xs)
    return (s_T, states), (params, s_0, xs, pre, states)

  run.defvjp(run_forward, functools.partial(_elman_backward, activation, unroll))
  return run


def _elman_forward(activation, unroll, params: ElmanParams, s_0: jax.Array, xs: jax.Array):
  """The states of `_elman_scan` and their pre-activations a_t, `[T, batch, hidden]` each."""
  projected = xs @ params.U + params.b  # [T, batch, hidden]: one product for all steps

  def step(s_tm1, p_t):
    a_t = p_t + s_tm1 @ params.W
    s_t = activation(a_t)
    return s_t, (a_t, s_t)

  s_T, (pre, states) = jax.lax.scan(step, s_0, projected, unroll=unroll)
  return s_T, pre, states


def _elman_backward(activation, unroll, residuals, cotangents):
  """The backward pass of `_elman_scan`: dz_t back through the states, then the weights."""
  params, s_0, xs, pre, states = residuals
  ds_T, dstates = cotangents

  def step(ds_t, step_in):  # ds_t: the cotangent s_t gets from step t + 1 (and the carry)
    a_t, g_t = step_in
    _, activation_vjp = jax.vjp(activation, a_t)
    (dz_t,) = activation_vjp(ds_t + g_t)
    return dz_t @ params.W.T, dz_t

  ds_0, dz = jax.lax.scan(step, ds_T, (pre, dstates), reverse=True, unroll=unroll)
  s_prev = jnp.concatenate([s_0[None], states[:-1]])
  dz_rows = _rows(dz)
  # db as a product too: XLA splits a sum over the steps of an unrolled loop into one
  # reduction per step.
  ones = jnp.ones((1, dz_rows.shape[0]), dz_rows.dtype)
  grads = ElmanParams(U=_rows(xs).T @ dz_rows, W=_rows(s_prev).T @ dz_rows, b=(ones @ dz_rows)[0])
  return grads, ds_0, dz @ params.U.T


def _rows(a: jax.Array) -> jax.Array:
  """`[T, batch, n]` -> `[T * batch, n]`: the steps of a window as one batch."""
  return a.reshape(-1, a.shape[-1])


def flax_cell(module: nn.RNNCellBase) -> Cell:
  """Wraps a Flax linen recurrent cell, unchanged, as a `Cell`.

  `apply` is the module's own `.apply`; parameters are the module's variables
  (`{"params": ...}`), and the carry is the module's `initialize_carry`.
  `nn.LSTMCell`, `nn.OptimizedLSTMCell` and `nn.GRUCell` as Flax defines them
  also get a `scan`, the same function with a cuDNN-style backward pass
  (`gated.flax_scan`).

  Args:
    module: any `flax.linen` recurrent cell: `nn.SimpleCell`, `nn.LSTMCell`,
      `nn.OptimizedLSTMCell`, `nn.GRUCell`, `nn.MGUCell`, or a user cell with
      `initialize_carry(rng, input_shape)` and `__call__(carry, x) -> (carry, y)`.

  Example:
    >>> cell = flax_cell(nn.LSTMCell(features=8))
    >>> x_t = jnp.ones((2, 3))
    >>> variables = cell.init(jax.random.key(0), x_t)
    >>> (c, h), y = cell.apply(variables, cell.initial_carry(x_t), x_t)
  """
  _layers.refuse_foreign_cell("flax_cell", "module", module)
  if not isinstance(module, nn.Module) or not hasattr(module, "initialize_carry"):
    raise ValueError(
      "flax_cell: module must be a flax.linen recurrent cell with initialize_carry "
      f"(e.g. nn.LSTMCell(features=128)), got {module!r}"
    )

  def init(rng: jax.Array, x_t: Any) -> Params:
    x_t = _example(x_t)
    return module.init(rng, module.initialize_carry(rng, x_t.shape), x_t)

  def initial_carry(x_t: Any) -> Carry:
    return module.initialize_carry(jax.random.key(_CARRY_KEY), x_t.shape)

  # Flax's LSTMs and GRU get a window scan with a cuDNN-style backward pass (`gated`).
  return Cell(init, initial_carry, module.apply, scan=gated.flax_scan(module))


def feedforward(layer: nn.Module | Callable[[jax.Array], jax.Array]) -> Cell:
  """A layer without state (embedding, readout, nonlinearity) as a `Cell`.

  Its carry is empty, `()`, so it composes with recurrent cells in `stack`.

  Args:
    layer: a Flax linen module applied to each step (`nn.Dense`, `nn.Embed`,
      ...), or a parameter-free function of the step such as
      `functools.partial(jax.nn.one_hot, num_classes=2)`.
  """
  layer_init, layer_apply = _layers.stateless("feedforward", "layer", layer)

  def apply(params: Params, carry: tuple, x_t: Any):
    return carry, layer_apply(params, x_t)

  return Cell(layer_init, lambda x_t: (), apply)


def stack(*cells: Cell) -> Cell:
  """Composes cells in depth: layer l's output is layer l+1's input.

  Parameters and carry are tuples with one entry per layer. A layer's `head`
  is applied inside the step, except the last layer's, which becomes the
  stack's head (applied after the scan); likewise a layer's `embed`, except
  the first layer's, which becomes the stack's embed (applied before it).
  The stack has a `scan` when one of its layers has one: it then runs the
  window layer by layer, each layer with its own scan; that scan takes resets
  when every layer's own scan does.

  Example: a two-layer LSTM language model over a 1000-word vocabulary.
    >>> model = stack(
    ...     feedforward(nn.Embed(1000, 64)),
    ...     flax_cell(nn.LSTMCell(128)),
    ...     flax_cell(nn.LSTMCell(128)),
    ...     feedforward(nn.Dense(1000)),
    ... )
  """
  if not cells or not all(isinstance(c, Cell) for c in cells):
    raise ValueError(f"stack: expected one or more Cell, got {cells!r}")
  first, last = cells[0], cells[-1]
  head = None if last.head is None else functools.partial(_last_head, last.head)
  head_steps = None if last.head_steps is None else functools.partial(_last_head, last.head_steps)
  embed = None if first.embed is None else functools.partial(_first_embed, first.embed)
  # Only a stack holding a layer with its own scan has one; others scan the stacked step.
  has_scan = any(c.scan is not None for c in cells)
  scan_resets = has_scan and all(c.scan_resets for c in cells if c.scan is not None)
  return Cell(
    init=functools.partial(_stack_init, cells),
    initial_carry=functools.partial(_stack_initial_carry, cells),
    apply=functools.partial(_stack_apply, cells),
    head=head,
    embed=embed,
    scan=functools.partial(_stack_scan, cells) if has_scan else None,
    scan_resets=scan_resets,
    head_steps=head_steps,
  )


def _last_head(head: HeadFn, params: tuple, y_t: Any) -> Any:
  return head(params[-1], y_t)


def _first_embed(embed: HeadFn, params: tuple, x_t: Any) -> Any:
  return embed(params[0], x_t)


def _stack_init(cells: tuple[Cell, ...], rng: jax.Array, x_t: Any) -> tuple:
  params = []
  for cell, key in zip(cells, jax.random.split(rng, len(cells)), strict=True):
    x_t = _example(x_t)
    layer_params = cell.init(key, x_t)
    params.append(layer_params)
    x_t = jax.eval_shape(
      lambda x, c=cell, p=layer_params: output(c, p, c.initial_carry(x), x)[1], x_t
    )
  return tuple(params)


def _stack_initial_carry(cells: tuple[Cell, ...], x_t: Any) -> tuple:
  carries = []
  for cell in cells:
    carry = cell.initial_carry(x_t)
    carries.append(carry)
    # Only shapes are needed to size the next layer, so nothing is computed.
    x_t = jax.eval_shape(
      lambda x, c=cell, h=carry: output(c, c.init(jax.random.key(_CARRY_KEY), x), h, x)[1], x_t
    )
  return tuple(carries)


def _stack_apply(cells: tuple[Cell, ...], params: tuple, carry: tuple, x_t: Any):
  new_carry = []
  for i, (cell, layer_params, layer_carry) in enumerate(zip(cells, params, carry, strict=True)):
    if i > 0 and cell.embed is not None:  # the first layer's embed is the stack's
      x_t = cell.embed(layer_params, x_t)
    layer_carry, x_t = cell.apply(layer_params, layer_carry, x_t)
    if i < len(cells) - 1 and cell.head is not None:  # the last layer's head is the stack's
      x_t = cell.head(layer_params, x_t)
    new_carry.append(layer_carry)
  return tuple(new_carry), x_t


def _stack_scan(
  cells: tuple[Cell, ...],
  params: tuple,
  carry: tuple,
  inputs: Any,
  unroll: int | bool = 1,
  **resetting: Any,
):
  # Layer by layer over the whole window: layer l at step t reads only layer l - 1's
  # output at step t, so this is the step-by-step stack, and each layer runs its own scan.
  # `resetting` is empty, or `resets` and the stack's `reset_carry` (one entry per layer).
  finals, carries, xs = [], [], inputs
  layers = zip(cells, params, carry, strict=True)
  for i, (cell, layer_params, layer_carry) in enumerate(layers):
    if i > 0:
      xs = map_steps(cell.embed, layer_params, xs)
    layer_resetting = resetting and dict(resetting, reset_carry=resetting["reset_carry"][i])
    layer_carry, xs, layer_carries = _layer_scan(
      cell, layer_params, layer_carry, xs, unroll, **layer_resetting
    )
    if i < len(cells) - 1:
      xs = map_head(cell, layer_params, xs)
    finals.append(layer_carry)
    carries.append(layer_carries)
  return tuple(finals), xs, tuple(carries)


def _layer_scan(
  cell: Cell, params: Params, carry: Carry, xs: Any, unroll: int | bool, **resetting: Any
):
  """One layer of a stack over a window: its own scan, one vmap if stateless, else lax.scan."""
  if cell.scan is not None:
    return cell.scan(params, carry, xs, unroll, **resetting)
  if not jax.tree.leaves(carry):  # stateless: every step at once, no loop
    return carry, jax.vmap(lambda x_t: cell.apply(params, (), x_t)[1])(xs), carry
  if not resetting:
    carry, (ys, carries) = jax.lax.scan(
      lambda c, x_t: _with_carry(cell.apply(params, c, x_t)), carry, xs, unroll=unroll
    )
    return carry, ys, carries

  def step(c: Carry, step: tuple[Any, jax.Array]) -> tuple[Carry, tuple[Any, Carry]]:
    x_t, reset_t = step
    return _with_carry(cell.apply(params, where_leading(reset_t, resetting["reset_carry"], c), x_t))

  carry, (ys, carries) = jax.lax.scan(step, carry, (xs, resetting["resets"]), unroll=unroll)
  return carry, ys, carries


def where_leading(flag: jax.Array, on_true: Any, on_false: Any) -> Any:
  """`jnp.where` over two pytrees, `flag` indexing the leading axes of every leaf.

  E.g. a per-stream flag `[batch]` against a carry `[batch, ...]`, or a
  per-step flag `[time]` against inputs `[time, batch, ...]`; leaves of
  `on_false` may be 1 on those axes and broadcast.
  """

  def leaf(a, b):
    f = jnp.reshape(flag, jnp.shape(flag) + (1,) * (a.ndim - jnp.ndim(flag)))
    return jnp.where(f, a, b)

  return jax.tree.map(leaf, on_true, on_false)


def with_head(cell: Cell, layer: nn.Module | Callable[[jax.Array], jax.Array]) -> Cell:
  """`cell` followed by a stateless readout `layer`, applied after the scan.

  The model is the same as `stack(cell, feedforward(layer))`, computed faster:
  the engine applies `layer` to all steps of a window in one call (one
  `[steps * batch, hidden] x [hidden, out]` matrix product for a Dense layer).
  Parameters are `(cell_params, layer_params)`.

  Args:
    cell: the recurrent part; its outputs are `layer`'s inputs.
    layer: a Flax linen module (e.g. `nn.Dense(vocab_size)`) or a
      parameter-free function.

  Example:
    >>> model = with_head(stack(feedforward(nn.Embed(1000, 64)), flax_cell(nn.LSTMCell(128))),
    ...                   nn.Dense(1000))
  """
  if not isinstance(cell, Cell):
    raise ValueError(f"with_head: cell must be a Cell, got {cell!r}")
  readout = feedforward(layer)
  return stack(cell, readout._replace(apply=_identity_step, head=_carry_free(readout.apply)))


def with_embed(layer: nn.Module | Callable[[jax.Array], jax.Array], cell: Cell) -> Cell:
  """A stateless `layer` followed by `cell`, the layer applied before the scan.

  The model is the same as `stack(feedforward(layer), cell)`, computed faster:
  the engine applies `layer` to all steps of a window in one call, so the loop
  over time holds only the cell. Parameters are `(layer_params, cell_params)`,
  and `apply` takes the layer's output (`full_step` takes the raw input).

  Args:
    layer: a Flax linen module (e.g. `nn.Embed(vocab, features)`) or a
      parameter-free function (e.g. a one-hot encoding).
    cell: the recurrent part; the layer's outputs are its inputs.

  Example: r2rt's network, one-hot encoding before the scan and readout after it.
    >>> one_hot = functools.partial(jax.nn.one_hot, num_classes=2)
    >>> model = with_head(with_embed(one_hot, elman(16)), nn.Dense(2))
  """
  if not isinstance(cell, Cell):
    raise ValueError(f"with_embed: cell must be a Cell, got {cell!r}")
  stem = feedforward(layer)
  return stack(stem._replace(apply=_identity_step, embed=_carry_free(stem.apply)), cell)


def output(cell: Cell, params: Params, carry: Carry, x_t: Any) -> tuple[Carry, Any]:
  """One step of `cell` on its own inputs, embed and head included: `(carry, out_t)`."""
  carry, y_t = full_step(cell)(params, carry, x_t)
  return carry, (y_t if cell.head is None else cell.head(params, y_t))


def _with_carry(step_out: tuple[Carry, Any]) -> tuple[Carry, tuple[Any, Carry]]:
  """A step's `(carry, y_t)` as a scan body's `(carry, (y_t, carry))`: keeps every carry."""
  carry, y_t = step_out
  return carry, (y_t, carry)


def _identity_step(params: Params, carry: Carry, x_t: Any) -> tuple[Carry, Any]:
  del params
  return carry, x_t


def _carry_free(apply: StepFn) -> HeadFn:
  return lambda params, y_t: apply(params, (), y_t)[1]


_example = _layers.example


# The cells the command line and the presets can name.
_FLAX_CELLS = {
  "simple": nn.SimpleCell,
  "lstm": nn.LSTMCell,
  "optimized_lstm": nn.OptimizedLSTMCell,
  "gru": nn.GRUCell,
  "mgu": nn.MGUCell,
}
CELL_NAMES = ("elman", "lru", *_FLAX_CELLS)


def cell_by_name(name: str, hidden_size: int) -> Cell:
  """A cell from its name: `"elman"` (this module), `"lru"` (`linear_rnn.lru_block`) or a
  Flax cell's short name.

  Args:
    name: one of `CELL_NAMES`: elman, lru, simple, lstm, optimized_lstm, gru, mgu.
    hidden_size: the state size (`features` of a Flax cell; the LRU's width and
      number of complex units).
  """
  hidden_size = _checks.positive_int("cell_by_name", "hidden_size", hidden_size)
  if name == "elman":
    return elman(hidden_size)
  if name == "lru":
    from tbptt_jax import linear_rnn  # noqa: PLC0415 (it builds on this module)

    return linear_rnn.lru_block(hidden_size)
  if name not in _FLAX_CELLS:
    raise ValueError(f"cell_by_name: name must be one of {CELL_NAMES}, got {name!r}")
  return flax_cell(_FLAX_CELLS[name](features=hidden_size))
