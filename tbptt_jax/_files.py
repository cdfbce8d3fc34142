"""Writing files so that a crash never leaves a half-written one."""

from __future__ import annotations

import os
import time

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
  try:
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
  except OSError:  # a platform without directory handles (Windows): the rename stands
    return
  try:
    os.fsync(folder)
  finally:
    os.close(folder)
