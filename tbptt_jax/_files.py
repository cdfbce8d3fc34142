"""Writing files so that a crash never leaves a half-written one."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import msgpack

# Fault injection for tests: seconds to pause halfway through writing the temporary file.
_PAUSE = "TBPTT_JAX_TEST_WRITE_PAUSE"


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
  """Writes `data` to `path + ".tmp"`, flushes it to disk, then renames it over `path`.

  A crash before the rename leaves the previous file intact; the rename itself
  is atomic on POSIX file systems, and the folder is flushed after it so that
  the rename survives a power cut.
  """
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  data = data.encode("utf-8") if isinstance(data, str) else data
  with open(tmp, "wb") as f:
    pause = os.environ.get(_PAUSE)
    if pause:  # the tests' window for killing a process in the middle of a write
      f.write(data[: len(data) // 2])
      f.flush()
      time.sleep(float(pause))
      data = data[len(data) // 2 :]
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  sync_folder(os.path.dirname(path))


def sync_folder(folder: str) -> None:
  """Flushes a folder's entries to disk, so that a rename in it survives a power cut."""
  try:
    handle = os.open(folder or ".", os.O_RDONLY)
  except OSError:  # a platform without directory handles (Windows): the rename stands
    return
  try:
    os.fsync(handle)
  finally:
    os.close(handle)


def write_synced(path: str, data: str) -> None:
  """Writes `data` to `path` and flushes it to disk (no rename: for files in a staging folder)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def pause_for_tests() -> None:
  """Sleeps `$TBPTT_JAX_TEST_WRITE_PAUSE` seconds, if set: the tests' window to kill a save."""
  pause = os.environ.get(_PAUSE)
  if pause:
    time.sleep(float(pause))


def looks_like_msgpack_checkpoint(path: str, file_format: str) -> bool:
  """Whether `path` is a single-file msgpack checkpoint of `file_format` (an older tbptt_jax)."""
  try:
    with open(path, "rb") as f:
      content = msgpack.unpackb(f.read(), raw=False)
  except (
    OSError,
    ValueError,
    TypeError,
    msgpack.exceptions.ExtraData,
    msgpack.exceptions.UnpackException,
  ):
    return False
  return isinstance(content, dict) and content.get("format") == file_format


def read_format(
  where: str,
  path: str | os.PathLike[str],
  kind: str,
  file_format: str,
  version: int,
  unpack: Callable[[bytes], Any],
) -> dict:
  """Reads a msgpack file of ours: a dict whose "format" and "version" name what it holds.

  Every failure is a `ValueError` naming `where`, the file and what is wrong with it: missing
  or unreadable, not msgpack (e.g. truncated), another format, another version.

  Args:
    where: the caller, for the error messages.
    path: the file.
    kind: what the file is, in words ("checkpoint", "model file").
    file_format: the expected "format" field.
    version: the expected "version" field.
    unpack: bytes -> the msgpack content (`msgpack.unpackb` or flax's `msgpack_restore`).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ValueError(f"{where}: cannot read {kind} {path!r}: {e.strerror}") from None
  try:
    content = unpack(raw)
  except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException):
    raise ValueError(
      f"{where}: {path!r} is not a tbptt_jax {kind} (not msgpack; truncated?)"
    ) from None
  if not isinstance(content, dict) or content.get("format") != file_format:
    raise ValueError(f"{where}: {path!r} is not a tbptt_jax {kind}")
  if content.get("version") != version:
    raise ValueError(
      f"{where}: {path!r} has {kind} version {content.get('version')!r}, "
      f"this tbptt_jax reads version {version}"
    )
  return content
