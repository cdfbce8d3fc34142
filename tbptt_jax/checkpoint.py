"""Checkpoints of a whole TBPTT run through orbax: its `TrainState` and where it stood.

A TBPTT run carries more than parameters: the optimizer state, the hidden
state of every stream and the lookback of steps that later windows re-run
(`TrainState.carry`, `TrainState.lookback`), the step count that drives the
learning-rate schedule, the PRNG key of the per-step randomness and the k2 of
the next updates. A checkpoint holds all of it, bit for bit, plus `meta`: a
JSON-able dict for what the caller needs to continue (its position in the
data, configuration, vocabulary, best validation loss). Restoring it and
continuing gives exactly the run that did not stop.

A checkpoint is a folder written by orbax-checkpoint, so any JAX code base
reads it with orbax alone (`ocp.args.Composite(state=StandardRestore(...),
meta=JsonRestore())`):

    step_0000000100.ckpt/
      state/           the TrainState (orbax `StandardSave`; a typed PRNG key as its raw data)
      meta/            the caller's meta (orbax `JsonSave`)
      tbptt_jax.json   format, version, the key's generator, every array's path, shape and
                       dtype, and the SHA-256 of every file the folder holds

The state is saved as it lies: a state split over devices
(`tbptt_trainer(..., mesh=...)`) is written shard by shard, each process
writing its own shards, with no gather onto one host. It is written to
`<name>.tmp` first, checksummed, then renamed into place, so a crash
mid-save leaves the previous checkpoints intact; the checksums catch a folder
damaged after it was written. `save_checkpoint` keeps the last `keep` step
checkpoints of a folder; `save_checkpoint(..., name="best")` writes one that
pruning never removes, replaced atomically (a symbolic link swapped to the
newest `best-<step>` folder).

The language model's `model` file (`lm.save_model`) stays a single msgpack
file: it holds parameters and a vocabulary only, for `eval` and `generate`,
which read it without any run state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from tbptt_jax import _files
from tbptt_jax.train import TrainState

FORMAT = "tbptt_jax.checkpoint"
VERSION = 3  # 3: orbax folders; 2: one msgpack file with TrainState.k2; 1: no k2
SUFFIX = ".ckpt"
MANIFEST = "tbptt_jax.json"
_STEP = re.compile(r"^step_(\d+)\.ckpt$")


class Checkpoint(NamedTuple):
  """A checkpoint read back: the state, the caller's metadata and the folder it came from."""

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
  """Writes `state` and `meta` to a checkpoint in `directory`, atomically; returns its path.

  On several processes, call it on every process: each writes its own shards
  of the state (an orbax collective), and process 0 commits the checkpoint.

  Args:
    directory: the checkpoint folder (created if missing).
    state: the `TrainState` to save (read, not donated).
    meta: JSON-able data for the caller, e.g. `{"epoch": 3, "chunk": 120}`.
    keep: how many step checkpoints (`step_<n>.ckpt`, n = `state.step`) to keep;
      older ones are removed once the new one is committed.
    name: write `<name>.ckpt` instead of a step checkpoint (e.g. "best"); it is
      never pruned, and each save replaces it atomically.

  Returns:
    The checkpoint's path, `directory/step_<n>.ckpt` or `directory/<name>.ckpt`.
  """
  where = "save_checkpoint"
  if not isinstance(state, TrainState):
    raise ValueError(
      f"{where}: state must be the tbptt_jax.TrainState of a run (trainer.init or "
      f"trainer.update), got {type(state).__name__}"
    )
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"{where}: keep must be an integer >= 1, got {keep!r}")
  if name is not None and (not re.fullmatch(r"[A-Za-z0-9_.]+", name) or _STEP.match(name + SUFFIX)):
    raise ValueError(
      f"{where}: name must be a plain file name (letters, digits, _ .), got {name!r}"
    )
  meta = {} if meta is None else meta
  try:
    json.dumps(meta)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: meta must be JSON-able, got {e}") from None
  directory = os.path.abspath(os.fspath(directory))  # orbax takes absolute paths only
  step = int(state.step)
  final = os.path.join(directory, f"step_{step:010d}{SUFFIX}" if name is None else name + SUFFIX)
  folder = final if name is None else os.path.join(directory, f"{name}-{step:010d}{SUFFIX}")
  _write(folder, state, meta)
  if jax.process_index() == 0:
    if name is None:
      for old in step_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    else:
      _point(final, folder)
  multihost_utils.sync_global_devices(f"tbptt_jax.checkpoint.pruned:{final}")
  return final


def _write(folder: str, state: TrainState, meta: dict) -> None:
  """The orbax save to `folder.tmp`, its manifest, then the rename that commits it."""
  import orbax.checkpoint as ocp  # noqa: PLC0415 - orbax is slow to import; only saving needs it

  tmp = folder + ".tmp"
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed before
  multihost_utils.sync_global_devices(f"tbptt_jax.checkpoint.start:{folder}")
  rng_impl = None  # a typed PRNG key is saved as its raw data and the name of its generator
  if jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key):
    rng_impl = str(jax.random.key_impl(state.rng))
    state = state._replace(rng=jax.random.key_data(state.rng))
  saved = ocp.args.StandardSave(_without_empty(state))
  args = ocp.args.Composite(state=saved, meta=ocp.args.JsonSave(meta))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(tmp, args=args)  # every process writes its own shards
  if jax.process_index() == 0:
    manifest = {"format": FORMAT, "version": VERSION, "rng_impl": rng_impl}
    manifest["leaves"] = _leaves(state)
    manifest["files"] = _checksums(tmp)
    _files.write_synced(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    _files.pause_for_tests()  # the tests' window for killing a process mid-save
    if os.path.lexists(folder):  # the same step saved again: the new one replaces it
      shutil.rmtree(folder)
    os.replace(tmp, folder)
    _files.sync_folder(os.path.dirname(folder))
  multihost_utils.sync_global_devices(f"tbptt_jax.checkpoint.committed:{folder}")


def _point(link: str, folder: str) -> None:
  """Makes `link` a symbolic link to `folder`, atomically; removes what it pointed to before."""
  before = os.path.realpath(link) if os.path.islink(link) else None
  tmp = link + ".tmp"
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(os.path.basename(folder), tmp)
  os.replace(tmp, link)
  _files.sync_folder(os.path.dirname(link))
  if before is not None and before != os.path.realpath(folder) and os.path.isdir(before):
    shutil.rmtree(before)


def step_checkpoints(directory: str | os.PathLike[str]) -> list[str]:
  """The committed step checkpoints in `directory`, oldest first (none if it does not exist)."""
  try:
    names = os.listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return []
  steps = sorted((int(m.group(1)), f) for f in names if (m := _STEP.match(f)))
  return [os.path.join(os.fspath(directory), f) for _, f in steps]


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
  """The newest step checkpoint in `directory`, or None."""
  found = step_checkpoints(directory)
  return found[-1] if found else None


def read_meta(path: str | os.PathLike[str]) -> dict:
  """The `meta` of a checkpoint, without restoring its state (to rebuild the run first)."""
  path = os.fspath(path)
  _read_manifest("read_meta", path)
  with open(os.path.join(path, "meta", "metadata"), encoding="utf-8") as f:
    return json.load(f)


def load_checkpoint(path: str | os.PathLike[str], like: TrainState) -> Checkpoint:
  """Reads a checkpoint into the structure of `like`, checking every array against it.

  Args:
    path: a checkpoint written by `save_checkpoint` (its folder, or a named
      checkpoint's link).
    like: a `TrainState` of the run to continue (e.g. `trainer.init(...)`, or
      `jax.eval_shape` of it): the restored arrays must have its tree structure,
      shapes and dtypes. They are restored whole, on the default device,
      whatever the device count they were saved from; a sharded trainer places
      them on its mesh, of any size, at its next `update` (or
      `sharding.place_state`).

  Returns:
    A `Checkpoint(state, meta, path)`.

  Raises:
    ValueError: naming `path`, if it is missing, not a checkpoint, corrupt
      (checksums), of another version, or made by a different run
      configuration (another model, optimizer, batch, k2 or input shape).
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415 - orbax is slow to import

  where = "load_checkpoint"
  path = os.fspath(path)
  manifest = _read_manifest(where, path)
  path = os.path.abspath(path)  # orbax takes absolute paths only
  if not isinstance(like, TrainState):
    raise ValueError(f"{where}: like must be a tbptt_jax.TrainState, got {type(like).__name__}")
  typed_key = jax.dtypes.issubdtype(like.rng.dtype, jax.dtypes.prng_key)
  template = like._replace(
    rng=jax.eval_shape(jax.random.key_data, like.rng) if typed_key else like.rng
  )
  _check_leaves(where, path, manifest["leaves"], _leaves(template))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), template)
  args = ocp.args.Composite(
    state=ocp.args.StandardRestore(_without_empty(target)), meta=ocp.args.JsonRestore()
  )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, args=args)
  state = jax.tree.map(_refilled, target, TrainState(*restored.state))
  if typed_key:
    state = state._replace(rng=_typed_key(where, path, manifest, state.rng, like.rng))
  return Checkpoint(state, dict(restored.meta), path)


def _without_empty(tree: Any) -> Any:
  """`tree` with its arrays of no elements as None: orbax refuses to save them (a k2 = 1
  trainer's lookback holds no step), and they hold nothing to save."""
  return jax.tree.map(lambda a: a if math.prod(a.shape) else None, tree)


def _refilled(target: jax.ShapeDtypeStruct, restored: Any) -> Any:
  """A restored array, or the empty array that `_without_empty` left out."""
  if restored is None:
    return jax.device_put(jnp.zeros(target.shape, target.dtype), target.sharding)
  return restored


def _typed_key(where: str, path: str, manifest: dict, data: jax.Array, like: Any) -> jax.Array:
  impl = manifest.get("rng_impl")
  if not isinstance(impl, str):
    raise ValueError(f"{where}: {path!r} holds a raw PRNG key; the run uses a typed one")
  rng = jax.random.wrap_key_data(data, impl=impl)
  if rng.dtype != like.dtype:
    raise ValueError(f"{where}: {path!r} holds a {rng.dtype} PRNG key; the run uses {like.dtype}")
  return rng


def _leaves(state: Any) -> list[list]:
  """Every array of `state` as `[path, shape, dtype]`, in tree order."""
  return [
    [jax.tree_util.keystr(key), list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
    for key, leaf in jax.tree_util.tree_leaves_with_path(state)
  ]


def _check_leaves(where: str, path: str, saved: list, wanted: list) -> None:
  if [p for p, _, _ in saved] != [p for p, _, _ in wanted]:
    raise ValueError(
      f"{where}: {path!r} was written by a run of another configuration: its state holds "
      f"{len(saved)} arrays, the run's {len(wanted)}"
      + _first_difference([p for p, _, _ in saved], [p for p, _, _ in wanted])
    )
  mismatched = [
    f"{p}: {tuple(s)} {d} here, {tuple(ws)} {wd} in the run"
    for (p, s, d), (_, ws, wd) in zip(saved, wanted, strict=True)
    if (list(s), d) != (list(ws), wd)
  ]
  if mismatched:
    raise ValueError(
      f"{where}: {path!r} was written by a run of another configuration "
      f"(model, optimizer, batch, k2 or input shape): {'; '.join(mismatched[:3])}"
    )


def _first_difference(saved: list[str], wanted: list[str]) -> str:
  for a, b in zip(saved, wanted, strict=False):
    if a != b:
      return f" (first difference: {a} here, {b} in the run)"
  return ""


def _read_manifest(where: str, path: str) -> dict:
  """The manifest of a committed checkpoint, its files' checksums verified."""
  if not os.path.exists(path):
    raise ValueError(f"{where}: cannot read checkpoint {path!r}: no such file or folder")
  if not os.path.isdir(path):
    old = _files.looks_like_msgpack_checkpoint(path, FORMAT)
    hint = " (a single-file checkpoint of tbptt_jax before orbax)" if old else ""
    raise ValueError(f"{where}: {path!r} is not a tbptt_jax checkpoint folder{hint}")
  try:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    raise ValueError(
      f"{where}: {path!r} is not a tbptt_jax checkpoint (no readable {MANIFEST})"
    ) from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{where}: {path!r} is not a tbptt_jax checkpoint")
  if manifest.get("version") != VERSION:
    raise ValueError(
      f"{where}: {path!r} has checkpoint version {manifest.get('version')!r}, "
      f"this tbptt_jax reads version {VERSION}"
    )
  if _checksums(path) != manifest.get("files"):
    raise ValueError(f"{where}: {path!r} is corrupt (its files do not match their checksums)")
  return manifest


def _checksums(folder: str) -> dict[str, str]:
  """SHA-256 of every file under `folder` but the manifest, by path relative to it."""
  sums = {}
  for root, _, names in os.walk(folder):
    for name in names:
      full = os.path.join(root, name)
      relative = os.path.relpath(full, folder)
      if relative == MANIFEST:
        continue
      with open(full, "rb") as f:
        sums[relative] = hashlib.file_digest(f, "sha256").hexdigest()
  return dict(sorted(sums.items()))
