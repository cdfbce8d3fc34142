"""Argument checks shared by the public functions.

Every check raises `ValueError` naming the function, the argument, what was
expected and what was given. The checks read only static shapes, so they cost
nothing under `jax.jit` (they run once, at trace time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

STYLES = ("window", "per_loss")


def _structure(tree: Any) -> Any:
  """`jax.tree.structure`, typed `Any`: the stubs of its `PyTreeDef` declare no `==`."""
  return jax.tree.structure(tree)


def positive_int(where: str, name: str, value: Any) -> int:
  """Returns `value` if it is an integer >= 1, else raises."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
  return int(value)


def unroll(where: str, value: Any) -> None:
  """Checks the `unroll` of `jax.lax.scan`: True, False or an integer >= 1."""
  if not isinstance(value, bool):
    positive_int(where, "unroll", value)


def truncation(where: str, k1: Any, k2: Any, style: Any) -> tuple[int, int, str]:
  """Validates a truncation TBPTT(k1, k2) in `style`; returns it normalised."""
  k1 = positive_int(where, "k1", k1)
  k2 = positive_int(where, "k2", k2)
  if style not in STYLES:
    raise ValueError(f"{where}: style must be one of {STYLES}, got {style!r}")
  if style == "window" and k2 < k1:
    raise ValueError(
      f"{where}: window style needs k2 >= k1 (each window must cover its whole "
      f"block of k1 steps), got k1={k1}, k2={k2}"
    )
  return k1, k2, style


def k2_set(where: str, name: str, k2: Any) -> tuple[int, ...]:
  """`k2`, an integer >= 1 or a non-empty sequence of them, as ascending distinct k2s."""
  if isinstance(k2, (int, np.integer)) and not isinstance(k2, bool):
    return (positive_int(where, name, k2),)
  if not isinstance(k2, Sequence) or isinstance(k2, str) or not k2:
    raise ValueError(
      f"{where}: {name} must be an integer >= 1 or a non-empty sequence of them, got {k2!r}"
    )
  return tuple(sorted({positive_int(where, name, k) for k in k2}))


def batch_time(where: str, name: str, tree: Any) -> tuple[int, int]:
  """Returns the shared leading [batch, time] sizes of every leaf of `tree`."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{where}: {name} must hold at least one array of shape [batch, time, ...]")
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) < 2:
      raise ValueError(
        f"{where}: {name} must have shape [batch, time, ...], got an array of shape {shape}"
      )
    sizes.add(tuple(shape[:2]))
  if len(sizes) > 1:
    raise ValueError(
      f"{where}: every array in {name} must share [batch, time], got {sorted(sizes)}"
    )
  batch, time = sizes.pop()
  if time == 0:
    raise ValueError(f"{where}: {name} must have at least one time step, got time size 0")
  if batch == 0:
    raise ValueError(f"{where}: {name} must have at least one sequence, got batch size 0")
  return batch, time


def same_batch_time(where: str, name: str, tree: Any, batch: int, time: int) -> None:
  """Checks that `tree` has the [batch, time] of the inputs."""
  got = batch_time(where, name, tree)
  if got != (batch, time):
    raise ValueError(
      f"{where}: {name} must have [batch, time] = [{batch}, {time}] like inputs, got {list(got)}"
    )


def leading_batch(where: str, name: str, tree: Any, batch: int) -> None:
  """Checks that every leaf of a carry has leading axis `batch`."""
  for leaf in jax.tree.leaves(tree):
    shape = np.shape(leaf)
    if len(shape) < 1 or shape[0] != batch:
      raise ValueError(
        f"{where}: every array in {name} must have leading batch size {batch} "
        f"(the batch of inputs), got an array of shape {shape}"
      )


def like(where: str, name: str, tree: Any, reference_name: str, reference: Any) -> None:
  """Checks that `tree` has the structure and leaf shapes of `reference`."""
  got, want = _structure(tree), _structure(reference)
  if got != want:
    raise ValueError(
      f"{where}: {name} must have the tree structure of {reference_name}, {want}, got {got}"
    )
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True):
    if np.shape(a) != np.shape(b):
      raise ValueError(
        f"{where}: {name} must have the shapes of {reference_name}, "
        f"{[np.shape(x) for x in jax.tree.leaves(reference)]}, "
        f"got {[np.shape(x) for x in jax.tree.leaves(tree)]}"
      )


def like_steps(where: str, name: str, tree: Any, steps: Any) -> None:
  """Checks that the steps of `tree`, leaves [batch, time, ...], match `steps`.

  `steps` is the state's record of earlier steps, leaves [time, batch, ...]:
  a step's shape (batch included) and dtype must not change between calls.
  """

  def step(a, time_axis):
    shape = list(np.shape(a))
    del shape[time_axis]
    return f"{shape} {np.dtype(a.dtype)}"

  got = [step(a, 1) for a in jax.tree.leaves(tree)]
  want = [step(a, 0) for a in jax.tree.leaves(steps)]
  if _structure(tree) != _structure(steps) or got != want:
    raise ValueError(
      f"{where}: each step of {name} must have the shape and dtype of those the state was "
      f"initialised with, {', '.join(want)}, got {', '.join(got)}"
    )


def per_example_losses(where: str, losses: Any, steps: int, batch: int) -> None:
  """Checks what a `loss_fn` vmapped over `steps` returned: per-example losses, [steps, batch]."""
  shape = np.shape(losses)
  if shape != (steps, batch):
    raise ValueError(
      f"{where}: loss_fn must return per-example losses of shape [batch] = [{batch}], "
      f"got shape {shape[1:]}"
    )


def resets(where: str, value: Any, batch: int, time: int) -> None:
  """Checks a resets mask: boolean, shape [batch, time]."""
  shape = np.shape(value)
  if shape != (batch, time):
    raise ValueError(
      f"{where}: resets must have shape [batch, time] = [{batch}, {time}], got {shape}"
    )
  dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
  if dtype != np.bool_:
    raise ValueError(f"{where}: resets must be boolean, got dtype {dtype}")


def callable_arg(where: str, name: str, value: Any, expected: str) -> None:
  """Raises unless `value` is callable; `expected` says what it should be."""
  if not callable(value):
    raise ValueError(f"{where}: {name} must be {expected}, got {type(value).__name__} {value!r}")


def cell_parts(where: str, name: str, cell: Any) -> None:
  """Raises unless every function of the Cell `cell` is callable (head, embed, scan: or None)."""
  for part in ("init", "initial_carry", "apply"):
    callable_arg(where, f"{name}.{part}", getattr(cell, part), "a function")
  for part in ("head", "embed", "scan"):
    if getattr(cell, part) is not None:
      callable_arg(where, f"{name}.{part}", getattr(cell, part), "a function or None")


def prng_key(where: str, name: str, value: Any) -> None:
  """Raises unless `value` is a PRNG key: a typed key (`jax.random.key`) of shape (), or the
  raw uint32 data of one (`jax.random.PRNGKey`, shape (2,) for the default generator)."""
  dtype, shape = getattr(value, "dtype", None), np.shape(value)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
    return
  if dtype == np.uint32 and len(shape) == 1:
    return
  given = f"{type(value).__name__} {value!r}" if dtype is None else f"{dtype}{list(shape)}"
  raise ValueError(
    f"{where}: {name} must be a PRNG key such as jax.random.key(0) (or the raw uint32 data "
    f"of one), got {given}"
  )
