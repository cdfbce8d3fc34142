"""Recurrent cells from Flax NNX, Equinox and Haiku, adapted once into a `Cell`.

Each adapter meets its library at the library's conventions and returns the
one contract of tbptt_jax, `Cell(init, initial_carry, apply)` on a batch:

  library   its cell                             adapted
  NNX       module(carry, x) -> (carry, y),      weights made at construction;
            batched, initialize_carry            nnx.Params a pure dict
  Equinox   cell(x, hidden) -> hidden,           vmapped over the batch; weights
            unbatched, no initial state          made at construction; zero carry
  Haiku     core(x, state) -> (y, state),        hk.transform-ed here; weights
            batched, core.initial_state(batch)   made from init's rng

In every case the trainable parameters are an ordinary pytree of plain arrays
(nested dicts), so optax, `tbptt_jax.checkpoint`, sharding and diagnostics
see them as they see a Flax cell's, and everything that is not trained stays
out of the gradient as a constant of the adapter. Stateless layers of the same
libraries (`nnx.Linear`, `eqx.nn.Linear`, `hk.transform(lambda x: hk.Linear(2)(x))`)
go straight into `tbptt_jax.feedforward`, `with_head`, `with_embed` and `stack`.

Equinox and Haiku are optional: this module never imports them itself, except
inside the adapter that is handed one of their objects.

Example: the r2rt task with an NNX LSTM.
  >>> from flax import nnx
  >>> cell = nnx_cell(nnx.LSTMCell(2, 16, rngs=nnx.Rngs(0)))
  >>> model = tbptt_jax.synthetic.model(cell)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import jax.numpy as jnp

from tbptt_jax import _layers
from tbptt_jax.cells import Carry, Cell, Params


def nnx_cell(module: Any) -> Cell:
  """Wraps a Flax NNX recurrent cell as a `Cell`.

  The cell's step is the module's call `module(carry, x_t) -> (carry, y_t)`,
  batched as every Flax cell is, on a fresh copy of the module built from the
  parameters it is given (`nnx.merge`), so nothing is kept on the module.

  Parameters are the module's `nnx.Param` variables as a pure dict
  (`nnx.to_pure_dict`, e.g. `{"ii": {"kernel": ...}, ...}` for
  `nnx.LSTMCell`): the weights the module was built with, since an NNX module
  initialises at construction (`rngs=nnx.Rngs(seed)` chose them); `init`
  ignores its rng and returns them. Every other variable (`nnx.BatchStat`,
  RNG state, ...) is a constant, its value in the module as given, out of the
  gradient; a module whose call would change it (a BatchNorm in training
  mode, a Dropout drawing a mask) is refused with a `ValueError` when the step
  is traced, as its updates would be lost. The carry is the module's own
  `initialize_carry(input_shape, rngs=nnx.Rngs(0))`, zeros for Flax's cells.

  Args:
    module: an NNX recurrent cell: `nnx.LSTMCell`, `nnx.OptimizedLSTMCell`,
      `nnx.GRUCell`, `nnx.SimpleCell`, or a user module with
      `initialize_carry(input_shape)` and `__call__(carry, x) -> (carry, y)`.

  Returns:
    A `Cell` whose parameters are the module's `nnx.Param`s as a pure dict.

  Example:
    >>> from flax import nnx
    >>> cell = nnx_cell(nnx.LSTMCell(3, 8, rngs=nnx.Rngs(0)))
    >>> x_t = jnp.ones((2, 3))
    >>> params = cell.init(jax.random.key(0), x_t)  # the module's own weights
    >>> (c, h), y_t = cell.apply(params, cell.initial_carry(x_t), x_t)

  References:
    Flax NNX, https://flax.readthedocs.io/en/latest/nnx_basics.html
  """
  where = "nnx_cell"
  if not _layers.is_nnx(module):
    _refuse_other_library(
      where, "module", module, "NNX", "an NNX recurrent cell, e.g. nnx.LSTMCell"
    )
  if not hasattr(module, "initialize_carry"):
    raise ValueError(
      f"{where}: module must be an NNX recurrent cell with initialize_carry, got "
      f"{type(module).__name__} (a layer without state goes in tbptt_jax.feedforward)"
    )
  graphdef, params, rest = _layers.nnx_split(module)
  return Cell(
    functools.partial(_given_weights, params),
    functools.partial(_nnx_initial_carry, graphdef, params, rest),
    functools.partial(_nnx_apply, where, graphdef, rest),
  )


def _given_weights(params: Params, rng: jax.Array, x_t: Any) -> Params:
  del rng, x_t  # the module initialised itself when it was built
  return params


def _nnx_initial_carry(graphdef: Any, params: dict, rest: dict, x_t: Any) -> Carry:
  from flax import nnx

  module = _layers.nnx_merge(graphdef, params, rest)
  shape = tuple(jax.tree.leaves(x_t)[0].shape)
  if "rngs" in inspect.signature(module.initialize_carry).parameters:
    return module.initialize_carry(shape, rngs=nnx.Rngs(_layers.CARRY_KEY))
  return module.initialize_carry(shape)


def _nnx_apply(where: str, graphdef: Any, rest: dict, params: dict, carry: Carry, x_t: Any):
  module = _layers.nnx_merge(graphdef, params, rest)
  carry, y_t = module(carry, x_t)
  _layers.refuse_nnx_updates(where, "module", module, rest)
  return carry, y_t


def equinox_cell(module: Any, *, initial_state: Any = None) -> Cell:
  """Wraps an Equinox recurrent cell as a `Cell`, vmapped over the batch.

  Equinox cells are unbatched and take `(input, hidden) -> hidden`; the step
  is `jax.vmap` of the cell over the streams, and y_t is the new hidden state
  or, when the state is a tuple such as `eqx.nn.LSTMCell`'s `(h, c)`, its
  first element h.

  Parameters are the module's floating-point arrays as a nested dict keyed by
  field name (`{"weight_ih": ..., "weight_hh": ..., "bias": ...}` for
  `eqx.nn.LSTMCell`; a list's entries keyed "0", "1", ...): the weights the
  module was built with, since an Equinox module initialises at construction
  (its `key=` chose them); `init` ignores its rng and returns them. Everything
  else in the module (integer arrays, static fields, functions) is a constant,
  as given, out of the gradient.

  Equinox has no initial state, so the carry starts from `initial_state`,
  broadcast over the streams: by default zeros of the cell's dtype, `(h, c)`
  for `eqx.nn.LSTMCell` and h for `eqx.nn.GRUCell`; leaves `[batch, hidden]`.

  Args:
    module: an `eqx.nn.LSTMCell`, `eqx.nn.GRUCell`, or any Equinox module
      with `__call__(input, hidden) -> hidden` on one example whose `key`, if
      any, is optional.
    initial_state: the state one stream starts from, a pytree of arrays
      without the batch axis; needed for cells other than Equinox's own.

  Returns:
    A `Cell` whose parameters are the module's float arrays as a nested dict.

  Example:
    >>> import equinox as eqx
    >>> cell = equinox_cell(eqx.nn.GRUCell(3, 8, key=jax.random.key(0)))
    >>> x_t = jnp.ones((2, 3))
    >>> params = cell.init(jax.random.key(0), x_t)  # the module's own weights
    >>> h, y_t = cell.apply(params, cell.initial_carry(x_t), x_t)

  References:
    Kidger & Garcia, "Equinox: neural networks in JAX via callable PyTrees
    and filtered transformations", 2021.
  """
  where = "equinox_cell"
  if not _layers.is_equinox(module):
    expected = "an Equinox recurrent cell, e.g. eqx.nn.LSTMCell"
    _refuse_other_library(where, "module", module, "Equinox", expected)
  if len(_layers.required_arguments(module.__call__)) < 2:
    raise ValueError(
      f"{where}: module must take (input, hidden) -> hidden, got {type(module).__name__} of "
      f"({', '.join(_layers.required_arguments(module.__call__))}): a layer without state "
      "goes in tbptt_jax.feedforward"
    )
  _layers.refuse_equinox_key(where, "module", module)
  if initial_state is None:
    state = _equinox_state(where, module)
  else:
    state = jax.tree.map(jnp.asarray, initial_state)
    if not jax.tree.leaves(state):
      raise ValueError(
        f"{where}: initial_state must hold one stream's state (arrays without the batch "
        f"axis), got {initial_state!r}"
      )
  params, rebuild = _layers.equinox_split(module)
  return Cell(
    functools.partial(_given_weights, params),
    functools.partial(_broadcast_state, state),
    functools.partial(_equinox_apply, rebuild),
  )


def _equinox_state(where: str, module: Any) -> Any:
  import equinox as eqx

  if isinstance(module, eqx.nn.LSTMCell):
    h = jnp.zeros(module.hidden_size, module.weight_hh.dtype)
    return h, jnp.zeros_like(h)
  if isinstance(module, eqx.nn.GRUCell):
    return jnp.zeros(module.hidden_size, module.weight_hh.dtype)
  raise ValueError(
    f"{where}: initial_state is needed for {type(module).__name__}, which is not one of "
    "Equinox's cells (LSTMCell, GRUCell): give one stream's state, e.g. jnp.zeros(hidden_size)"
  )


def _broadcast_state(state: Any, x_t: Any) -> Carry:
  batch = jax.tree.leaves(x_t)[0].shape[0]
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), state)


def _equinox_apply(rebuild: Callable[[dict], Any], params: dict, carry: Carry, x_t: Any):
  cell = rebuild(params)
  carry = jax.vmap(cell)(x_t, carry)  # Equinox cells take one example
  return carry, carry[0] if isinstance(carry, tuple) else carry


def haiku_cell(core: Any, *, initial_state: Callable[[int], Any] | None = None) -> Cell:
  """Wraps a Haiku recurrent core as a `Cell`, transformed here.

  Haiku modules exist only inside `hk.transform`, so the core is given as the
  function that builds it, as one would write it in a transformed function:
  `haiku_cell(lambda: hk.LSTM(16))`. The step transforms
  `core()(x_t, state) -> (y_t, state)` and swaps Haiku's return order into
  `(carry, y_t)`; the carry is `core().initial_state(batch)` (for `hk.LSTM`
  an `hk.LSTMState(hidden, cell)` of zeros).

  Alternatively `core` may be an `hk.Transformed` (`hk.transform(f)`, with or
  without `hk.without_apply_rng`) of a step `f(x_t, state) -> (y_t, state)`;
  then `initial_state` is required.

  Parameters are Haiku's own dict of dicts (`{"lstm/linear": {"w": ...,
  "b": ...}}`), made by `init` from its rng, as Haiku always initialises. The
  step gets no rng (a core that draws random numbers fails, as Haiku says),
  and state beyond the carry (`hk.transform_with_state`) is refused.

  Args:
    core: a function of no arguments returning an `hk.RNNCore` (`hk.LSTM`,
      `hk.GRU`, `hk.VanillaRNN`, `hk.DeepRNN`, ...), or an `hk.Transformed`
      step as above.
    initial_state: `initial_state(batch_size) -> state`, the carry a sequence
      starts from; run inside `hk.transform`, so it may build modules, but
      must not make parameters (a learned initial state cannot be a carry).
      Default: the core's own `initial_state`.

  Returns:
    A `Cell` whose parameters are the Haiku params of the core.

  Example:
    >>> import haiku as hk
    >>> cell = haiku_cell(lambda: hk.LSTM(8))
    >>> x_t = jnp.ones((2, 3))
    >>> params = cell.init(jax.random.key(0), x_t)
    >>> state, y_t = cell.apply(params, cell.initial_carry(x_t), x_t)

  References:
    Hennigan et al., "Haiku: Sonnet for JAX", 2020.
  """
  where = "haiku_cell"
  transformed = _layers.library_of(core) == "Haiku"
  if transformed:
    _layers.refuse_haiku_state(where, "core", core)
    if initial_state is None:
      raise ValueError(
        f"{where}: initial_state(batch_size) is needed with a transformed step; or pass "
        "the core's constructor, e.g. haiku_cell(lambda: hk.LSTM(16))"
      )
  else:
    _check_constructor(where, core)
  try:
    import haiku as hk
  except ImportError as e:
    raise ImportError(f"{where} needs dm-haiku: pip install 'tbptt-jax[haiku]'") from e

  step = core if transformed else hk.transform(functools.partial(_haiku_step, where, core))
  if initial_state is None:
    initial_state = functools.partial(_haiku_start, where, core)
  start = hk.transform(initial_state)
  initial_carry = functools.partial(_haiku_initial_carry, where, start)
  return Cell(
    functools.partial(_haiku_init, step, initial_carry),
    initial_carry,
    functools.partial(_haiku_apply, _layers.haiku_apply(step)),
  )


def _check_constructor(where: str, core: Any) -> None:
  """Refuses anything but a function of no arguments (what builds a core in Haiku)."""
  expected = "a function of no arguments returning an hk.RNNCore, e.g. lambda: hk.LSTM(16)"
  if _layers.library_of(core) is not None or not callable(core):
    _refuse_other_library(where, "core", core, "Haiku", expected)
  required = _layers.required_arguments(core)
  if required:
    raise ValueError(
      f"{where}: core must be {expected}, got {core!r} of ({', '.join(required)}); a step "
      "function f(x_t, state) -> (y_t, state) goes in as hk.transform(f) with initial_state="
    )


def _haiku_core(where: str, core: Callable[[], Any]) -> Any:
  module = core()
  if not callable(module):
    raise ValueError(f"{where}: core() must return an hk.RNNCore, got {module!r}")
  return module


def _haiku_step(where: str, core: Callable[[], Any], x_t: Any, state: Any):
  return _haiku_core(where, core)(x_t, state)


def _haiku_start(where: str, core: Callable[[], Any], batch_size: int) -> Any:
  module = _haiku_core(where, core)
  if not hasattr(module, "initial_state"):
    raise ValueError(
      f"{where}: core() returned {type(module).__name__}, which has no initial_state: "
      "pass initial_state=lambda batch_size: ..."
    )
  return module.initial_state(batch_size)


def _haiku_initial_carry(where: str, start: Any, x_t: Any) -> Carry:
  batch = jax.tree.leaves(x_t)[0].shape[0]
  try:
    return start.apply({}, None, batch)
  except ValueError as e:
    if "parameter" not in str(e):
      raise
    raise ValueError(
      f"{where}: the initial state has parameters ({e}); a carry cannot be trained: make a "
      "learned initial state part of the step instead"
    ) from e


def _haiku_init(step: Any, initial_carry: Callable[[Any], Carry], rng: jax.Array, x_t: Any):
  x_t = _layers.example(x_t)
  return step.init(rng, x_t, initial_carry(x_t))


def _haiku_apply(apply: Callable[..., Any], params: Any, carry: Carry, x_t: Any):
  y_t, carry = apply(params, x_t, carry)  # Haiku's order: (output, state)
  return carry, y_t


def _refuse_other_library(
  where: str, name: str, given: Any, library: str, expected: str
) -> NoReturn:
  """Raises a `ValueError` naming what was given and, where one exists, its adapter."""
  _layers.refuse_foreign_cell(where, name, given, library)
  raise ValueError(f"{where}: {name} must be {expected}, got {given!r}")
