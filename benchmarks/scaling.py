"""Training throughput against the number of devices the streams are split over.

Strong scaling: the presets of `benchmarks/throughput.py` (the whole batch fixed) trained by
`tbptt_trainer(..., mesh=data_mesh(devices[:n]))` for each n, full update steps (forward,
backward, the gradient's all-reduce across devices, clipping, optimizer), against the trainer
without a mesh (`1*` in the table: today's single-device step). The configurations alternate
in rounds of the same tokens after a warm-up, in one process; the table reports medians.

  python benchmarks/scaling.py [--preset r2rt small] [--devices 1 2 4] [--seconds 30] [--json]

On a CPU, the devices are fake: XLA_FLAGS=--xla_force_host_platform_device_count=N, set here
before JAX starts, splits one machine into N devices that share its cores. There the figures
measure what splitting costs (partitioned programs, per-update all-reduces, smaller matrix
products), not a speed-up: n devices cannot be faster than the cores they share. On GPUs or
TPUs the real devices are used and the flag has no effect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", nargs="+", default=["r2rt", "small"], help="throughput.py's")
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--seconds", type=float, default=30, help="measuring time per preset")
  parser.add_argument("--json", action="store_true")
  return parser.parse_args(argv)


def _fake_cpu_devices(count: int) -> None:
  """Asks XLA's CPU backend for `count` devices; must run before JAX is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


if __name__ == "__main__":
  _fake_cpu_devices(max(_parse().devices))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402

import tbptt_jax as tj  # noqa: E402


def runner(preset: str, devices: int | None, tokens: np.ndarray):
  """One round (a call of `updates_per_round` updates) on `devices` devices; None: no mesh."""
  p = throughput.PRESETS[preset]
  mesh = None if devices is None else tj.data_mesh(jax.devices()[:devices])
  return throughput.jax_runner(p, tokens, mesh=mesh)


def measure(preset: str, counts: list[int], seconds: float, min_rounds: int = 5) -> dict:
  p = throughput.PRESETS[preset]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, p.vocab, (p.batch, p.k * p.updates_per_round + 1)).astype(np.int32)
  configs = {"1*": None, **{str(n): n for n in counts if p.batch % n == 0}}
  runners = {name: runner(preset, n, tokens) for name, n in configs.items()}
  times = common.alternate(runners, seconds, min_rounds, first="1*")
  tokens_per_round = p.batch * p.k * p.updates_per_round
  rates = {name: tokens_per_round / float(np.median(ts)) for name, ts in times.items()}
  return {
    "preset": preset,
    "settings": p._asdict(),
    "tokens_per_s": rates,
    "ratio_to_one_device": {name: rate / rates["1*"] for name, rate in rates.items()},
    "streams_per_device": {name: p.batch // (n or 1) for name, n in configs.items()},
    "rounds": {name: len(ts) for name, ts in times.items()},
    "round_seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
  }


def main(argv=None):
  args = _parse(argv)
  available = len(jax.devices())
  counts = [n for n in args.devices if n <= available]
  if counts != args.devices:
    print(f"only {available} devices: measuring {counts}", file=sys.stderr)
  results = [measure(name, counts, args.seconds) for name in args.preset]
  fake = jax.default_backend() == "cpu" and available > 1
  print(f"{'preset':8} {'devices':>8} {'streams/device':>15} {'tokens/s':>12} {'vs 1*':>6}  rounds")
  for r in results:
    for name, rate in r["tokens_per_s"].items():
      print(
        f"{r['preset']:8} {name:>8} {r['streams_per_device'][name]:>15} {rate:12,.0f} "
        f"{r['ratio_to_one_device'][name]:5.2f}x  {r['rounds'][name]}"
      )
  print("1*: one device, no mesh (the default)" + ("; CPU devices are fake" if fake else ""))
  summary = common.summary(
    "scaling", fake_cpu_devices=fake, xla_flags=os.environ.get("XLA_FLAGS"), results=results
  )
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
