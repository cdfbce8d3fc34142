"""Writing files so that a crash never leaves a half-written one."""

from __future__ import annotations

import os


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
  """Writes `data` to `path + ".tmp"`, flushes it to disk, then renames it over `path`.

  A crash before the rename leaves the previous file intact; the rename itself
  is atomic on POSIX file systems, and the folder is flushed after it so that
  the rename survives a power cut.
  """
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  try:
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
  except OSError:  # a platform without directory handles (Windows): the rename stands
    return
  try:
    os.fsync(folder)
  finally:
    os.close(folder)
