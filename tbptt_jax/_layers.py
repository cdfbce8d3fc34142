"""Stateless layers from the JAX model libraries, as `(init, apply)` pairs.

`feedforward` (and so `stack`, `with_head` and `with_embed`) accepts a layer
from any library this module recognises; each is adapted here, once, to

    init(rng, x_t) -> params,    apply(params, x_t) -> y_t,

so that the layer's weights are an ordinary pytree in the model's parameters
and train like any other. A parameter-free function is a layer with empty
parameters `()`. The layers recognised:

  flax.linen   a module, its variables as `Module.init` makes them
  flax.nnx     a module, its `nnx.Param`s as a pure dict (`nnx.to_pure_dict`)
  equinox      a module, its float arrays as a nested dict; unbatched, so vmapped
  haiku        an `hk.transform`-ed function, its params as Haiku makes them

The NNX and Equinox helpers here serve `tbptt_jax.interop` too, which adapts
the same libraries' recurrent cells. Equinox and Haiku are optional: an object
is recognised as theirs only if the library is already imported (`sys.modules`),
so nothing here imports them. Objects whose weights JAX cannot see (a PyTorch
module, a callable object holding arrays, an untransformed Haiku function) are
refused with a `ValueError` rather than run with their weights frozen.
"""

from __future__ import annotations

import functools
import inspect
import operator
import sys
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LayerInit = Callable[[jax.Array, Any], Any]
LayerApply = Callable[[Any, Any], Any]

# The fixed key of NNX `initialize_carry` calls: carries start from zeros, and a fixed
# key keeps any other `carry_init` reproducible (as `cells.flax_cell` does).
CARRY_KEY = 0


def stateless(where: str, name: str, layer: Any) -> tuple[LayerInit, LayerApply]:
  """`layer`'s `(init, apply)`; a `ValueError` naming `where` and `name` if it is not a layer."""
  if isinstance(layer, nn.Module):
    if hasattr(layer, "initialize_carry"):
      raise ValueError(
        f"{where}: {name} is a recurrent flax.linen cell ({type(layer).__name__}); a layer "
        "here has no state: use tbptt_jax.flax_cell(module) for it"
      )
    return _linen(layer)
  if is_nnx(layer):
    return _nnx(where, name, layer)
  if is_equinox(layer):
    return _equinox(where, name, layer)
  if _haiku_transformed(layer):
    return _haiku(where, name, layer)
  refuse_hidden_weights(where, name, layer)
  if callable(layer):
    return _function(where, name, layer)
  raise ValueError(
    f"{where}: {name} must be a flax module or a function of the step (or an NNX or "
    f"Equinox module, or a Haiku transform), got {layer!r}"
  )


def _linen(layer: nn.Module) -> tuple[LayerInit, LayerApply]:
  def init(rng: jax.Array, x_t: Any) -> Any:
    return layer.init(rng, example(x_t))

  return init, layer.apply


def _function(where: str, name: str, fn: Callable[[Any], Any]) -> tuple[LayerInit, LayerApply]:
  def init(rng: jax.Array, x_t: Any) -> tuple:
    del rng, x_t
    return ()

  def apply(params: Any, x_t: Any) -> Any:
    del params
    try:
      return fn(x_t)
    except ValueError as e:
      refuse_untransformed_haiku(where, name, e)
      raise

  return init, apply


def example(x_t: Any) -> Any:
  """Concrete zero arrays in place of the shape-only leaves of an example input."""
  return jax.tree.map(
    lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a, x_t
  )


# --- Which library an object comes from, without importing any. ---


def _imported(library: str) -> types.ModuleType | None:
  return sys.modules.get(library)


def is_nnx(obj: Any) -> bool:
  """Whether `obj` is a Flax NNX module."""
  nnx = _imported("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.Module)


def is_equinox(obj: Any) -> bool:
  """Whether `obj` is an Equinox module."""
  eqx = _imported("equinox")
  return eqx is not None and isinstance(obj, eqx.Module)


def _haiku_transformed(obj: Any) -> bool:
  hk = _imported("haiku")
  return hk is not None and isinstance(obj, (hk.Transformed, hk.TransformedWithState))


def is_to_linen(obj: Any) -> bool:
  """Whether `obj` is an NNX module wrapped as a linen one (`flax.nnx.bridge.to_linen`)."""
  bridge = _imported("flax.nnx.bridge")
  return bridge is not None and isinstance(obj, bridge.ToLinen)


def _torch(obj: Any) -> bool:
  torch = _imported("torch")
  return torch is not None and isinstance(obj, torch.nn.Module)


# The adapter of each library's recurrent cells.
CELL_ADAPTERS = {
  "flax.linen": "tbptt_jax.flax_cell(module)",
  "NNX": "tbptt_jax.interop.nnx_cell(module)",
  "Equinox": "tbptt_jax.interop.equinox_cell(module)",
  "Haiku": "tbptt_jax.interop.haiku_cell(core)",
}


def refuse_foreign_cell(where: str, name: str, module: Any, library: str = "flax.linen") -> None:
  """Raises a `ValueError` if `module` is a model of another library than `library`.

  The message names the adapter of the library it comes from; an object
  whose weights JAX cannot see (a PyTorch module, ...) has none. Called by
  `cells.flax_cell` and by `tbptt_jax.interop`'s adapters on what they are given.
  """
  if is_to_linen(module):
    raise ValueError(
      f"{where}: {name} is an NNX module ({module.nnx_class.__name__}) wrapped by "
      "flax.nnx.bridge.to_linen: pass the NNX module itself to tbptt_jax.interop.nnx_cell"
    )
  found = library_of(module)
  if found != library and found in CELL_ADAPTERS:
    raise ValueError(
      f"{where}: {name} is a model of {found} ({type(module).__name__}), not of {library}: "
      f"use {CELL_ADAPTERS[found]}"
    )
  if found not in CELL_ADAPTERS:
    refuse_hidden_weights(where, name, module)


def library_of(obj: Any) -> str | None:
  """The model library `obj` comes from, in words ("NNX", "Equinox", "Haiku", ...), or None."""
  if is_to_linen(obj) or isinstance(obj, nn.Module):
    return "flax.linen"
  if is_nnx(obj):
    return "NNX"
  if is_equinox(obj):
    return "Equinox"
  if _haiku_transformed(obj):
    return "Haiku"
  if _torch(obj):
    return "PyTorch"
  return None


def refuse_hidden_weights(where: str, name: str, obj: Any) -> None:
  """Raises a `ValueError` if `obj` holds weights JAX cannot see, which would never train.

  A PyTorch module, anything with torch- or Keras-style weight attributes, a
  bound method of an NNX or Equinox module, and a callable object (not a
  function) holding float arrays. Functions and `functools.partial`s are
  taken as parameter-free: arrays they close over are the caller's constants.
  """
  what = _hidden_weights(obj)
  if what is not None:
    raise ValueError(
      f"{where}: {name} is {what}, whose weights tbptt_jax cannot see, so they would never "
      "train: pass a flax.linen or NNX module, an Equinox module, a Haiku transform "
      "(tbptt_jax.interop for recurrent ones) or a parameter-free function"
    )


def _hidden_weights(obj: Any) -> str | None:
  if _torch(obj):
    return f"a PyTorch module ({type(obj).__name__})"
  if isinstance(obj, types.MethodType):
    owner = library_of(obj.__self__)
    if owner in ("NNX", "Equinox"):
      return f"a bound method of an {owner} module ({type(obj.__self__).__name__})"
    return _hidden_weights(obj.__self__)
  plain = (types.FunctionType, types.BuiltinFunctionType, functools.partial, type, jax.Array)
  if isinstance(obj, plain) or not hasattr(obj, "__dict__"):
    return None
  if callable(getattr(obj, "parameters", None)) or hasattr(obj, "trainable_variables"):
    return (
      f"a {type(obj).__name__}, another framework's model (parameters() or trainable_variables)"
    )
  floats = [
    a for a in jax.tree.leaves(vars(obj)) if isinstance(a, jax.Array | np.ndarray) and _inexact(a)
  ]
  if floats:
    return f"an object of type {type(obj).__name__} holding {len(floats)} float array(s)"
  return None


def _inexact(a: Any) -> bool:
  return jnp.issubdtype(a.dtype, jnp.inexact)


def refuse_untransformed_haiku(where: str, name: str, error: ValueError) -> None:
  """Re-raises Haiku's error for a function called outside `hk.transform` as ours."""
  if _imported("haiku") is not None and "hk.transform" in str(error):
    raise ValueError(
      f"{where}: {name} is a Haiku function that is not transformed ({error}): pass "
      "hk.transform(fn) (a recurrent core: tbptt_jax.interop.haiku_cell(lambda: core))"
    ) from error


# --- NNX: the module's nnx.Params as a pure dict, everything else a constant. ---


def nnx_split(module: Any) -> tuple[Any, dict, dict]:
  """`(graphdef, params, rest)` of an NNX module: its `nnx.Param`s and its other state, as
  pure dicts (`nnx.to_pure_dict`)."""
  from flax import nnx

  graphdef, *states = nnx.split(module, nnx.Param, ...)
  params, rest = states
  return graphdef, _pure_dict(params), _pure_dict(rest)


def _pure_dict(state: Any) -> dict:
  from flax import nnx

  if hasattr(nnx, "to_pure_dict"):  # flax >= 0.12, where State.to_pure_dict is deprecated
    return nnx.to_pure_dict(state)
  return state.to_pure_dict()


def nnx_merge(graphdef: Any, params: dict, rest: dict) -> Any:
  """A fresh module from `nnx_split`'s parts, `params` in place of the module's own."""
  from flax import nnx

  return nnx.merge(graphdef, params, rest)


def refuse_nnx_updates(where: str, name: str, module: Any, rest: dict) -> None:
  """Raises a `ValueError` if calling `module` changed its non-trainable state.

  The adapters hold that state (batch statistics, RNG counts) fixed, so an
  update would be lost on every step: a BatchNorm in training mode, or a
  Dropout drawing the same mask each step.
  """
  from flax import nnx

  given = dict(jax.tree_util.tree_leaves_with_path(rest))
  after = _pure_dict(nnx.state(module, nnx.Not(nnx.Param)))
  # An unchanged variable still holds the very array it was given.
  changed = [
    jax.tree_util.keystr(path)
    for path, leaf in jax.tree_util.tree_leaves_with_path(after)
    if given.get(path) is not leaf
  ]
  if changed:
    raise ValueError(
      f"{where}: {name} changes its non-trainable state when called ({', '.join(changed)}), "
      "which the adapter holds fixed: use BatchNorm(use_running_average=True) and "
      "Dropout(deterministic=True), or take per-step randomness from "
      "tbptt_trainer(step_rngs=True)"
    )


def _nnx(where: str, name: str, layer: Any) -> tuple[LayerInit, LayerApply]:
  if hasattr(layer, "initialize_carry"):
    raise ValueError(
      f"{where}: {name} is a recurrent NNX module ({type(layer).__name__}); a layer here has "
      "no state: use tbptt_jax.interop.nnx_cell(module) for it"
    )
  graphdef, params, rest = nnx_split(layer)

  def init(rng: jax.Array, x_t: Any) -> dict:
    del rng, x_t  # the module's own weights, made when it was built
    return params

  def apply(params: dict, x_t: Any) -> Any:
    module = nnx_merge(graphdef, params, rest)
    y_t = module(x_t)
    refuse_nnx_updates(where, name, module, rest)
    return y_t

  return init, apply


# --- Equinox: the module's float arrays as a nested dict, the rest static. ---


def equinox_split(module: Any) -> tuple[dict, Callable[[dict], Any]]:
  """`(params, rebuild)`: the float arrays of an Equinox module as a nested dict of plain
  arrays (keyed by field name and index), and `rebuild(params)`, the module with them.

  Everything else (integer arrays, static fields, functions) stays in the
  module as given, a constant of `rebuild`.
  """
  import equinox as eqx

  arrays, static = eqx.partition(module, eqx.is_inexact_array)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(arrays)
  paths = [tuple(_key_name(k) for k in path) for path, _ in leaves]
  params: dict = {}
  for path, (_, leaf) in zip(paths, leaves, strict=True):
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf

  def rebuild(params: dict) -> Any:
    found = [functools.reduce(operator.getitem, path, params) for path in paths]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, found), static)

  return params, rebuild


def _key_name(key: Any) -> str:
  for field in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def refuse_equinox_key(where: str, name: str, module: Any) -> None:
  """Raises a `ValueError` if the Equinox `module`'s call needs a `key` the adapters lack."""
  needs = inspect.signature(module.__call__).parameters.get("key")
  if needs is not None and needs.default is inspect.Parameter.empty:
    raise ValueError(
      f"{where}: {name} is an Equinox module ({type(module).__name__}) whose call needs a key, "
      "which tbptt_jax does not pass: give key a default (e.g. key=None, inference mode "
      "via eqx.nn.inference_mode) or draw randomness from tbptt_trainer(step_rngs=True)"
    )


def _equinox(where: str, name: str, layer: Any) -> tuple[LayerInit, LayerApply]:
  import equinox as eqx

  recurrent = isinstance(layer, (eqx.nn.LSTMCell, eqx.nn.GRUCell))
  if recurrent or len(required_arguments(layer.__call__)) > 1:
    raise ValueError(
      f"{where}: {name} is an Equinox module taking (input, state) ({type(layer).__name__}); "
      "a layer here has no state: use tbptt_jax.interop.equinox_cell(module) for a "
      "recurrent cell (Equinox's stateful layers, eqx.nn.State, are not supported)"
    )
  refuse_equinox_key(where, name, layer)
  params, rebuild = equinox_split(layer)

  def init(rng: jax.Array, x_t: Any) -> dict:
    del rng, x_t  # the module's own weights, made when it was built
    return params

  def apply(params: dict, x_t: Any) -> Any:
    return jax.vmap(rebuild(params))(x_t)  # Equinox layers take one example

  return init, apply


def required_arguments(fn: Callable[..., Any]) -> list[str]:
  """The names of `fn`'s positional parameters without a default ([] if it has no signature)."""
  try:
    parameters = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return []
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return [p.name for p in parameters if p.default is p.empty and p.kind in positional]


# --- Haiku: a transformed function, initialised from the rng. ---


def haiku_apply(transformed: Any) -> Callable[..., Any]:
  """`apply(params, *args)` of an `hk.Transformed`, with or without its rng argument."""
  if "rng" in inspect.signature(transformed.apply).parameters:
    return functools.partial(_apply_without_rng, transformed.apply)
  return transformed.apply


def _apply_without_rng(apply: Callable[..., Any], params: Any, *args: Any) -> Any:
  return apply(params, None, *args)


def refuse_haiku_state(where: str, name: str, transformed: Any) -> None:
  """Raises a `ValueError` for `hk.transform_with_state`: its state would be lost."""
  import haiku as hk

  if isinstance(transformed, hk.TransformedWithState):
    raise ValueError(
      f"{where}: {name} is hk.transform_with_state(...), whose state (batch statistics, "
      "counters) tbptt_jax cannot carry: use hk.transform, or keep the state in the "
      "recurrent carry of a core (tbptt_jax.interop.haiku_cell)"
    )


def _haiku(where: str, name: str, layer: Any) -> tuple[LayerInit, LayerApply]:
  refuse_haiku_state(where, name, layer)

  def init(rng: jax.Array, x_t: Any) -> Any:
    return layer.init(rng, example(x_t))

  return init, haiku_apply(layer)
