"""Where and how a benchmark ran: printed with every result, recorded in RESULTS.md."""

from __future__ import annotations

import os
import platform
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


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None
