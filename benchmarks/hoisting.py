"""What each technique is worth on the latency-bound r2rt preset, side by side in one process.

r2rt (Elman state 16, 2 classes, batch 200, k 10, Adam) spends its time in the loop over time,
whose steps are too small to keep a core busy: every operation left in the loop is paid k times
per update. Six tbptt_jax trainers of the same network alternate, rounds of equal tokens after
warm-up, medians of the rounds:

  stepwise          `synthetic.model(elman(16))` differentiated through `lax.scan`: one-hot
                    encoding, Elman cell and readout all in the step (Elman's own `scan`
                    removed)
  hoisted           `with_head(with_embed(one_hot, elman(16)), nn.Dense(2))`: the encoding
                    before the loop, the readout after it (Elman's own `scan` removed)
  hoisted + scan    the same with Elman's own `scan`, whose backward pass computes the weight
                    gradients after its loop (`throughput.r2rt_model`, the preset's model)

each with the window's scan rolled (`unroll=1`) and unrolled in full (`unroll=True`, the
preset's setting).

  python benchmarks/hoisting.py [--seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import json

import common
import numpy as np
import throughput

import tbptt_jax as tj
from tbptt_jax import synthetic


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=60, help="measuring time")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  p = throughput.PRESETS["r2rt"]
  steps = p.k * p.updates_per_round
  tokens = np.random.default_rng(0).integers(0, p.vocab, (p.batch, steps + 1)).astype(np.int32)
  models = {
    "stepwise": synthetic.model(tj.elman(p.hidden))._replace(scan=None),
    "hoisted": throughput.r2rt_model(p.hidden)._replace(scan=None),
    "hoisted + scan": throughput.r2rt_model(p.hidden),
  }
  runners = {
    f"{name} unroll={'full' if unroll is True else unroll}": throughput.jax_runner(
      p, tokens, unroll, model=model
    )
    for name, model in models.items()
    for unroll in (1, True)
  }
  first = next(iter(runners))
  times = common.alternate(runners, args.seconds, min_rounds=5, first=first)
  rates = {name: p.batch * steps / float(np.median(ts)) for name, ts in times.items()}
  base = rates[first]
  print(f"{'r2rt trainer':30} {'tokens/s':>12} {'vs ' + first:>22}  rounds")
  for name, rate in rates.items():
    print(f"{name:30} {rate:12,.0f} {rate / base:21.2f}x  {len(times[name])}")
  summary = common.summary(
    "hoisting",
    tokens_per_s=rates,
    relative={name: rate / base for name, rate in rates.items()},
    rounds={name: len(ts) for name, ts in times.items()},
  )
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
