"""Where a command-line run computes: --devices of each process, and the processes it joins.

The streams of the batch are split over the devices of every process
(`sharding.data_mesh`); each process keeps only its own block of streams.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import numpy as np

from tbptt_jax import sharding


def data_mesh(args: argparse.Namespace) -> Any:
  """Joins the run's other processes if asked, then the mesh of --devices; None for one device.

  Call it first: `jax.distributed` must start before JAX's backends.
  """
  _join_processes(args)
  local = jax.local_devices()
  per_process = len(local) if args.devices == "all" else args.devices
  if per_process > len(local):
    hint = ""
    if jax.default_backend() == "cpu":
      hint = " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices)"
    raise ValueError(
      f"--devices {args.devices}: this process has {len(local)} {jax.default_backend()} "
      f"device(s){hint}"
    )
  if jax.process_count() == 1 and per_process == 1:
    return None  # one device: the trainer without a mesh
  devices = []
  for process in range(jax.process_count()):
    own = [d for d in jax.devices() if d.process_index == process]
    if len(own) < per_process:
      raise ValueError(
        f"--devices {args.devices}: process {process} has {len(own)} device(s), fewer than "
        f"{per_process}"
      )
    devices += own[:per_process]
  return sharding.data_mesh(devices)


def _join_processes(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` from the cluster flags, or from the environment."""
  trio = {
    "--coordinator": args.coordinator,
    "--num-processes": args.num_processes,
    "--process-id": args.process_id,
  }
  given = [flag for flag, value in trio.items() if value is not None]
  if args.distributed and given:
    raise ValueError(f"--distributed reads the processes from the environment; drop {given[0]}")
  if given and len(given) < 3:
    raise ValueError(
      "--coordinator, --num-processes and --process-id go together, got only " + " and ".join(given)
    )
  if given:
    if args.process_id >= args.num_processes:
      raise ValueError(
        f"--process-id must be below --num-processes {args.num_processes}, got {args.process_id}"
      )
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
  if not (given or args.distributed):
    return
  config: Any = jax.config  # its options are attributes made at run time
  if config.jax_cpu_collectives_implementation is None:  # older JAX: none on CPU
    config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  except (RuntimeError, ValueError) as e:
    raise ValueError(f"jax.distributed.initialize failed: {str(e).splitlines()[0]}") from None


def own_streams(mesh: Any, streams: np.ndarray) -> np.ndarray:
  """This process's block of streams (all of them without a mesh)."""
  if mesh is None:
    return streams
  batch, count = streams.shape[0], mesh.shape[sharding.DATA]
  if batch % count:
    raise ValueError(
      f"--batch-size {batch} must be a multiple of the {count} devices the streams are split "
      f"over (--devices x processes)"
    )
  return streams[sharding.process_streams(mesh, batch)]


def global_batch(mesh: Any, chunk: np.ndarray) -> Any:
  """This process's streams as the global batch, whose shape the run's state is built for."""
  return chunk if mesh is None else sharding.shard_batch(chunk, mesh)


def on_one_device(mesh: Any, evaluate: Any) -> Any:
  """`evaluate` on this process's first device: a forward pass, the same on every process."""
  if mesh is None:
    return evaluate
  device = jax.local_devices()[0]
  return lambda params, tokens: evaluate(jax.device_put(sharding.to_host(params), device), tokens)


def summary(mesh: Any) -> dict:
  """The summary's keys for where the run computed."""
  return {"devices": 1 if mesh is None else mesh.size, "processes": jax.process_count()}
