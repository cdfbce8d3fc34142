"""Checkpoints of a whole TBPTT run: its `TrainState` and where it stood, written atomically.

A TBPTT run carries more than parameters: the optimizer state, the hidden
state of every stream and the lookback of steps that later windows re-run
(`TrainState.carry`, `TrainState.lookback`), the step count that drives the
learning-rate schedule, and the PRNG key of the per-step randomness. A
checkpoint holds all of it, bit for bit, plus `meta`: a JSON-able dict for
what the caller needs to continue (its position in the data, configuration,
vocabulary, best validation loss). Restoring it and continuing gives exactly
the run that did not stop.

The file is msgpack (`flax.serialization`), readable without tbptt_jax:

    {"format": "tbptt_jax.checkpoint", "version": 1,
     "sha256": hex digest of "payload", "payload": msgpack bytes of
     {"state": the TrainState as nested dicts, "meta": meta}}

The checksum catches a file damaged after it was written; the write itself
goes to a temporary name, is flushed to disk, then renamed over the target
(`_files.atomic_write`), so a crash mid-save leaves the previous checkpoint
intact. `save_checkpoint` keeps the last `keep` step checkpoints of a folder;
`save_checkpoint(..., name="best")` writes one that pruning never removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from tbptt_jax import _files, sharding
from tbptt_jax.train import TrainState

FORMAT = "tbptt_jax.checkpoint"
VERSION = 2  # 2: TrainState.k2 (the k2 of the next updates); version 1 had no such field
SUFFIX = ".ckpt"
_STEP_FILE = re.compile(r"^step_(\d+)\.ckpt$")


class Checkpoint(NamedTuple):
  """A checkpoint read back: the state, the caller's metadata and the file it came from."""

  state: TrainState
  meta: dict
  path: str


def save_checkpoint(
  directory: str | os.PathLike[str],
  state: TrainState,
  meta: dict | None = None,
  *,
  keep: int = 3,
  name: str | None = None,
) -> str:
  """Writes `state` and `meta` to `directory`, atomically; returns the file's path.

  A state split over devices (`tbptt_trainer(..., mesh=...)`) is gathered
  whole, so the file does not depend on the device count. On several
  processes, call it on every process (the gather is a collective); only
  process 0 writes.

  Args:
    directory: the checkpoint folder (created if missing).
    state: the `TrainState` to save (read, not donated).
    meta: JSON-able data for the caller, e.g. `{"epoch": 3, "chunk": 120}`.
    keep: how many step checkpoints (`step_<n>.ckpt`, n = `state.step`) to keep;
      older ones are removed once the new one is safely on disk.
    name: write `<name>.ckpt` instead of a step checkpoint (e.g. "best"); it is
      never pruned.
  """
  where = "save_checkpoint"
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"{where}: keep must be an integer >= 1, got {keep!r}")
  if name is not None and (not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name)):
    raise ValueError(f"{where}: name must be a plain file name, got {name!r}")
  meta = {} if meta is None else meta
  try:
    json.dumps(meta)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: meta must be JSON-able, got {e}") from None
  # Every process gathers (a collective when the streams are split across hosts); one writes.
  state = sharding.to_host(state)
  step = int(state.step)
  file = f"step_{step:010d}{SUFFIX}" if name is None else f"{name}{SUFFIX}"
  path = os.path.join(os.fspath(directory), file)
  if jax.process_index() != 0:
    return path
  os.makedirs(directory, exist_ok=True)
  rng_impl = None  # a typed PRNG key is saved as its raw data and the name of its generator
  if jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key):
    rng_impl = str(jax.random.key_impl(state.rng))
    state = state._replace(rng=jax.random.key_data(state.rng))
  payload = flax.serialization.msgpack_serialize(
    {
      "state": flax.serialization.to_state_dict(jax.tree.map(np.asarray, state)),
      "rng_impl": rng_impl,
      "meta": json.dumps(meta),
    }
  )
  header = {
    "format": FORMAT,
    "version": VERSION,
    "sha256": hashlib.sha256(payload).hexdigest(),
    "payload": payload,
  }
  _files.atomic_write(path, msgpack.packb(header, use_bin_type=True))
  if name is None:
    for old in step_checkpoints(directory)[:-keep]:
      os.remove(old)
  return path


def step_checkpoints(directory: str | os.PathLike[str]) -> list[str]:
  """The step checkpoints in `directory`, oldest first (none if it does not exist)."""
  try:
    files = os.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return []
  steps = sorted((int(m.group(1)), f) for f in files if (m := _STEP_FILE.match(f)))
  return [os.path.join(os.fspath(directory), f) for _, f in steps]


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
  """The newest step checkpoint in `directory`, or None."""
  found = step_checkpoints(directory)
  return found[-1] if found else None


def read_meta(path: str | os.PathLike[str]) -> dict:
  """The `meta` of a checkpoint file, without restoring its state (to rebuild the run first)."""
  return json.loads(_read_payload("read_meta", path)["meta"])


def load_checkpoint(path: str | os.PathLike[str], like: TrainState) -> Checkpoint:
  """Reads a checkpoint into the structure of `like`, checking every array against it.

  Args:
    path: a file written by `save_checkpoint`.
    like: a `TrainState` of the run to continue (e.g. `trainer.init(...)`, or
      `jax.eval_shape` of it): the restored arrays must have its tree structure,
      shapes and dtypes. They are restored whole, on the default device; a
      sharded trainer places them on its mesh, of any size, at its next
      `update` (or `sharding.place_state`).

  Returns:
    A `Checkpoint(state, meta, path)`.

  Raises:
    ValueError: naming `path`, if the file is missing, not a checkpoint,
      corrupt (checksum), of another version, or made by a different run
      configuration (another model, optimizer, batch, k2 or input shape).
  """
  where = "load_checkpoint"
  payload = _read_payload(where, path)
  typed_key = jax.dtypes.issubdtype(like.rng.dtype, jax.dtypes.prng_key)
  template = like._replace(
    rng=jax.eval_shape(jax.random.key_data, like.rng) if typed_key else like.rng
  )
  try:
    state = flax.serialization.from_state_dict(template, payload["state"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{where}: {os.fspath(path)!r} was written by a run of another configuration: {e}"
    ) from None
  mismatched = [
    f"{jax.tree_util.keystr(key)}: {np.shape(got)} {np.asarray(got).dtype} here, "
    f"{want.shape} {want.dtype} in the run"
    for (key, got), want in zip(
      jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(template), strict=True
    )
    if np.shape(got) != tuple(want.shape) or np.asarray(got).dtype != want.dtype
  ]
  if mismatched:
    raise ValueError(
      f"{where}: {os.fspath(path)!r} was written by a run of another configuration "
      f"(model, optimizer, batch, k2 or input shape): {'; '.join(mismatched[:3])}"
    )
  state = jax.tree.map(jnp.asarray, state)
  if typed_key:
    impl = payload.get("rng_impl")
    if not isinstance(impl, str):
      raise ValueError(
        f"{where}: {os.fspath(path)!r} holds a raw PRNG key; the run uses a typed one"
      )
    rng = jax.random.wrap_key_data(state.rng, impl=impl)
    if rng.dtype != like.rng.dtype:
      raise ValueError(
        f"{where}: {os.fspath(path)!r} holds a {rng.dtype} PRNG key; the run uses {like.rng.dtype}"
      )
    state = state._replace(rng=rng)
  return Checkpoint(state, json.loads(payload["meta"]), os.fspath(path))


def _read_payload(where: str, path: str | os.PathLike[str]) -> dict:
  header = _files.read_format(
    where, path, "checkpoint", FORMAT, VERSION, lambda raw: msgpack.unpackb(raw, raw=False)
  )
  payload = header.get("payload")
  if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
    raise ValueError(
      f"{where}: {os.fspath(path)!r} is corrupt (its checksum does not match its contents)"
    )
  return flax.serialization.msgpack_restore(payload)
