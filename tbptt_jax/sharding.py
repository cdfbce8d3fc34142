"""Data-parallel TBPTT over devices and hosts: which axis of what is split, and where.

The streams of a batch are independent TBPTT runs over parts of one sequence
(`tbptt_jax.streams`), so they split over devices with nothing exchanged
inside the recurrence: with D devices on the mesh's "data" axis, device d
holds streams [d B/D, (d + 1) B/D), a contiguous block of the batch, each
stream whole in time, and runs their forward passes and backward windows.
Only an update's objective, a mean over all streams, spans devices: XLA
inserts the all-reduce of its gradient (and of the loss) that the sharded
mean implies. JAX is the distributed engine here: a `jax.sharding.Mesh`,
`NamedSharding`s that split the streams axis and replicate the rest, and
`jax.distributed.initialize` to join the processes of several hosts. Nothing
in this module writes a collective or a process group by hand.

What is split over the mesh's "data" axis, and along which array axis:

  chunk inputs, targets, resets              [batch, T, ...]       axis 0
  TrainState.carry                           [batch, ...]          axis 0
  TrainState.lookback.states/inputs/resets   [k2 - 1, batch, ...]  axis 1
  params, opt_state, step, rng, lookback.valid, UpdateMetrics      replicated

Several processes (hosts): every process runs the same program on its own
devices and feeds only its own streams. `data_mesh` orders devices process by
process, so each process's devices, and the streams they hold, form one
contiguous block of the batch (`process_streams`); host data given to a
sharded trainer are that block, assembled into the global batch by
`jax.make_array_from_process_local_data`. On one process that block is the
whole batch, so the same code runs on 1 device, 8 GPUs or a pod.

Sequence parallelism, splitting time rather than streams, does not apply:
s_t = f(s_{t-1}, x_t) is a nonlinear recurrence, so step t cannot start
before step t - 1 ends (associative scans parallelise linear recurrences
only); and TBPTT's windows are short by design.

Parameters stay replicated (no "model" axis): the recurrent models trained
here are small next to a device's memory, and a replicated update is what
makes 1 and D devices compute the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"  # the mesh axis the streams are split over


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh, `("data",)`, over `devices`, grouped by process.

  Devices are ordered by process (stably: the given order within a process),
  so each process's devices hold one contiguous block of streams.

  Args:
    devices: the devices to split the streams over; default all devices of
      all processes, `jax.devices()`.

  Returns:
    A `jax.sharding.Mesh` with one axis, "data".

  Example: the first 4 local devices; then `tbptt_trainer(..., mesh=mesh)`.
    >>> mesh = data_mesh(jax.local_devices()[:4])
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices or not all(isinstance(d, jax.Device) for d in devices):
    raise ValueError(f"data_mesh: devices must be a non-empty list of jax devices, got {devices!r}")
  if len(set(devices)) != len(devices):
    raise ValueError(f"data_mesh: devices must be distinct, got {devices!r}")
  devices.sort(key=lambda d: d.process_index)
  return Mesh(np.array(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of `[batch, ...]` arrays: the streams axis split over "data"."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of arrays every device holds whole (parameters, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """The `NamedSharding` of every array of a `TrainState` on `mesh`.

  Args:
    state: a `TrainState`, or its shapes (`jax.eval_shape(trainer.init, ...)`).
    mesh: a mesh with a "data" axis.

  Returns:
    A `TrainState` of `NamedSharding`s, one per array: `carry` split on its
    streams axis (0); `lookback.states`, `.inputs` and `.resets`, which are
    time-major, on axis 1; all else replicated.
  """
  _check_mesh("state_shardings", mesh)
  streams, time_major = batch_sharding(mesh), NamedSharding(mesh, PartitionSpec(None, DATA))
  whole = replicated(mesh)
  lookback = state.lookback

  def every(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda _: sharding, tree)

  return state._replace(
    params=every(state.params, whole),
    opt_state=every(state.opt_state, whole),
    carry=every(state.carry, streams),
    lookback=lookback._replace(
      states=every(lookback.states, time_major),
      inputs=every(lookback.inputs, time_major),
      resets=every(lookback.resets, time_major),
      valid=every(lookback.valid, whole),
    ),
    step=every(state.step, whole),
    rng=every(state.rng, whole),
    k2=every(state.k2, whole),
  )


def process_streams(mesh: Mesh, batch: int) -> slice:
  """Which of the `batch` streams this process holds: a contiguous block.

  A process loads and passes only these streams (`shard_batch`); on one
  process they are all of them. E.g. 2 processes of 4 devices each and batch
  64: process 0 holds streams 0..31, process 1 streams 32..63.

  Raises:
    ValueError: if `batch` is not divisible by the size of the "data" axis.
  """
  where = "process_streams"
  first, count = _process_block(where, mesh)
  size = mesh.shape[DATA]
  if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch % size:
    raise ValueError(
      f"{where}: batch must be a multiple of the mesh's data axis ({size} devices), "
      f"got batch {batch!r}"
    )
  per_device = int(batch) // size
  return slice(first * per_device, (first + count) * per_device)


def shard_batch(tree: Any, mesh: Mesh, *, where: str = "shard_batch", name: str = "data") -> Any:
  """This process's streams, `[local batch, ...]`, as global arrays split over "data".

  Each leaf is taken to be this process's contiguous block of streams
  (`process_streams`; on one process, the whole batch) and becomes one array
  of the global batch with `jax.make_array_from_process_local_data`. Arrays
  already split over the mesh's "data" axis pass unchanged; so do tracers
  (`jax.eval_shape`), which are taken as global.

  Args:
    tree: arrays `[streams, ...]` (NumPy or JAX), or None.
    mesh: a mesh with a "data" axis.
    where: the caller, for errors.
    name: the argument, for errors.

  Returns:
    The same tree of `jax.Array`s, each `[global batch, ...]`.
  """
  _check_mesh(where, mesh)
  target = batch_sharding(mesh)
  _, count = _process_block(where, mesh)

  def one(leaf: Any) -> Any:
    if isinstance(leaf, jax.core.Tracer):
      return leaf
    if isinstance(leaf, jax.Array) and (_placed(leaf, target) or not leaf.is_fully_addressable):
      return _place(leaf, target)
    shape = np.shape(leaf)
    if not shape or shape[0] % count:
      raise ValueError(
        f"{where}: the batch of {name} (axis 0, the streams) must be a multiple of the "
        f"{count} devices of this process on the mesh's data axis (mesh {dict(mesh.shape)}), "
        f"got shape {shape}"
      )
    return jax.make_array_from_process_local_data(target, np.asarray(leaf))

  return jax.tree.map(one, tree)


def place_state(state: Any, mesh: Mesh) -> Any:
  """A `TrainState` on `mesh`, each array with its `state_shardings` sharding.

  Arrays already placed pass unchanged. Others hold the whole state (on the
  host, one device or a differently sized mesh, e.g. from `load_checkpoint`),
  the same on every process; they are copied into place. This is how a
  checkpoint saved on one device count resumes on another.
  """
  _check_mesh("place_state", mesh)
  return jax.tree.map(_place, state, state_shardings(state, mesh))


def to_host(tree: Any) -> Any:
  """Every array of `tree` whole on the host (NumPy), gathered from all processes.

  Call it on every process: an array split across processes is gathered with
  `jax.experimental.multihost_utils.process_allgather`, a collective. Typed
  PRNG keys come back as typed keys (they are replicated).
  """

  def one(leaf: Any) -> Any:
    if not isinstance(leaf, jax.Array):
      return np.asarray(leaf)
    if leaf.is_fully_addressable or leaf.is_fully_replicated:
      return jax.device_get(leaf)
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

  return jax.tree.map(one, tree)


def data_parallel(
  mesh: Mesh,
  init: Callable[..., Any],
  update: Callable[..., Any],
  reset: Callable[[Any], Any],
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[[Any], Any]]:
  """A trainer's `(init, update, reset)` run data-parallel on `mesh`.

  The same `update`, jitted once with its state donated; only where its
  arrays live changes. Its state comes in and goes out with `state_shardings`
  (a `TrainState` of another placement, e.g. a loaded checkpoint, is placed
  first); its chunk inputs are this process's streams (`shard_batch`); its
  metrics come out replicated. The gradient's mean over the streams is then
  a sum across devices, which XLA inserts.

  Args:
    mesh: a mesh with a "data" axis.
    init: a trainer's `init` on one device.
    update: its `update` on one device, not jitted (see `tbptt_trainer`).
    reset: its `reset` on one device.

  Returns:
    `(init, update, reset)` with the signatures of `Trainer`'s.
  """
  _check_mesh("tbptt_trainer", mesh)
  whole = replicated(mesh)

  def constrained(state: Any, inputs: Any, targets: Any, resets: Any) -> Any:
    state, metrics = update(state, inputs, targets, resets)
    state = jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))
    return state, jax.lax.with_sharding_constraint(metrics, jax.tree.map(lambda _: whole, metrics))

  step = jax.jit(constrained, donate_argnums=0)

  def sharded_init(rng: jax.Array, inputs: Any) -> Any:
    inputs = shard_batch(inputs, mesh, where="init", name="inputs")
    shardings = state_shardings(jax.eval_shape(init, rng, inputs), mesh)
    return jax.jit(init, out_shardings=shardings)(rng, inputs)

  def sharded_update(state: Any, inputs: Any, targets: Any, resets: Any = None) -> Any:
    batch = dict(where="update", name="inputs, targets and resets")
    inputs, targets, resets = shard_batch((inputs, targets, resets), mesh, **batch)
    return step(place_state(state, mesh), inputs, targets, resets)

  def sharded_reset(state: Any) -> Any:
    return place_state(reset(state), mesh)

  return sharded_init, sharded_update, sharded_reset


def _check_mesh(where: str, mesh: Any) -> None:
  if not isinstance(mesh, Mesh) or DATA not in mesh.axis_names:
    raise ValueError(
      f"{where}: mesh must be a jax.sharding.Mesh with a {DATA!r} axis (see "
      f"tbptt_jax.sharding.data_mesh), got {mesh!r}"
    )


def _process_block(where: str, mesh: Mesh) -> tuple[int, int]:
  """(first, count): the positions on the "data" axis of this process's devices."""
  _check_mesh(where, mesh)
  axis = mesh.axis_names.index(DATA)
  here = jax.process_index()
  positions = sorted(
    {index[axis] for index, d in np.ndenumerate(mesh.devices) if d.process_index == here}
  )
  if not positions:
    raise ValueError(f"{where}: mesh has no device of this process ({here}), got {mesh!r}")
  if positions != list(range(positions[0], positions[-1] + 1)):
    raise ValueError(
      f"{where}: this process's devices must be adjacent on the mesh's data axis (so that it "
      f"holds a contiguous block of streams), got positions {positions}; build the mesh with "
      "tbptt_jax.sharding.data_mesh"
    )
  return positions[0], len(positions)


def _place(leaf: Any, sharding: NamedSharding) -> Any:
  """`leaf` with `sharding`: as it is, resharded if global, else copied from its whole value."""
  if isinstance(leaf, jax.core.Tracer) or _placed(leaf, sharding):
    return leaf
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    # Placed as raw key data: device_put cannot send a typed key to other processes' devices.
    data = _place(jax.random.key_data(leaf), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return jax.device_put(leaf, sharding)
  if not sharding.is_fully_addressable:
    leaf = np.asarray(leaf)  # the whole value, the same on every process
  return jax.device_put(leaf, sharding)


def _placed(leaf: Any, sharding: NamedSharding) -> bool:
  """Whether `leaf` is an array laid out as `sharding` (equal, or equivalent: same devices)."""
  return isinstance(leaf, jax.Array) and (
    leaf.sharding == sharding or leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  )
