"""Where and how a benchmark ran: printed with every result, recorded in RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jaxlib
import optax


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
  return {
    "devices": [str(d) for d in jax.devices()],
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
    "cpu_model": cpu_model(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
  }


def summary(benchmark: str, **fields: Any) -> dict[str, Any]:
  """A benchmark's JSON record: its name, today's date and its exact command, `fields`, then
  the machine and its load average."""
  return {
    "benchmark": benchmark,
    "date": datetime.date.today().isoformat(),
    "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    **fields,
    "machine": machine(),
    "load_average": load_average(),
  }


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


# An untimed pause before every round. A runtime's worker threads keep spinning for a while
# after its round ends (PyTorch's OpenMP pool, XLA's thread pool); without the pause they take
# a core from the next runner's round. Measured on r2rt (section 7 of RESULTS.md): tbptt_jax
# after a PyTorch round ran at 6.7 M tokens/s with no pause, 8.2 M with 20 ms, as fast as alone.
SETTLE_SECONDS = 0.02


def alternate(
  runners: dict[str, Callable[[], Any]],
  seconds: float,
  min_rounds: int,
  first: str,
  settle: float = SETTLE_SECONDS,
) -> dict[str, list[float]]:
  """Each runner's round times, the runners taking turns after two warm-up rounds each.

  Taking turns makes every runner see the same machine load (these machines are shared); the
  measurement lasts `seconds` and at least `min_rounds` rounds of the runner `first`. Each
  round starts after an untimed pause of `settle` seconds, so that the threads of the runner
  before it are idle (`SETTLE_SECONDS`).
  """
  for run in runners.values():  # warm-up: compilation, allocator, caches
    run()
    run()
  times: dict[str, list[float]] = {name: [] for name in runners}
  start = time.perf_counter()
  while time.perf_counter() - start < seconds or len(times[first]) < min_rounds:
    for name, run in runners.items():
      time.sleep(settle)
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return times
