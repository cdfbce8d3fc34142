"""Stateless layers from the JAX model libraries, as `(init, apply)` pairs.

`feedforward` (and so `stack`, `with_head` and `with_embed`) accepts a layer
from any library this module recognises; each is adapted here, once, to

    init(rng, x_t) -> params,    apply(params, x_t) -> y_t,

so that the layer's weights are an ordinary pytree in the model's parameters
and train like any other. A parameter-free function is a layer with empty
parameters `()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LayerInit = Callable[[jax.Array, Any], Any]
LayerApply = Callable[[Any, Any], Any]


def stateless(where: str, name: str, layer: Any) -> tuple[LayerInit, LayerApply]:
  """`layer`'s `(init, apply)`; a `ValueError` naming `where` and `name` if it is not a layer."""
  if isinstance(layer, nn.Module):
    return _linen(layer)
  if callable(layer):
    return _function(layer)
  raise ValueError(
    f"{where}: {name} must be a flax module or a function of the step, got {layer!r}"
  )


def _linen(layer: nn.Module) -> tuple[LayerInit, LayerApply]:
  def init(rng: jax.Array, x_t: Any) -> Any:
    return layer.init(rng, example(x_t))

  return init, layer.apply


def _function(fn: Callable[[Any], Any]) -> tuple[LayerInit, LayerApply]:
  def init(rng: jax.Array, x_t: Any) -> tuple:
    del rng, x_t
    return ()

  def apply(params: Any, x_t: Any) -> Any:
    del params
    return fn(x_t)

  return init, apply


def example(x_t: Any) -> Any:
  """Concrete zero arrays in place of the shape-only leaves of an example input."""
  return jax.tree.map(
    lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a, x_t
  )
