"""What each technique is worth on r2rt and on the small language model, side by side.

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

With `--preset small` (2 x LSTM 200, vocabulary 10,000, batch 20, k 20, SGD), three trainers of
the same language model alternate, the window's scan rolled:

  stepwise          `lax.scan` of the model's step (embedding, both LSTM layers, dropout),
                    differentiated by JAX, and the softmax layer vmapped over the window (the
                    model's own `scan` and `head_steps` removed)
  gated scans       the model's own `scan`: the embedding of all steps at once, then each layer
                    over the window with its LSTM scan (`tbptt_jax.gated`: the input projection
                    of all steps in one product, the weight gradients after the loop); the
                    softmax layer still vmapped
  + window head     the model as it is: also its `head_steps`, the softmax layer over the window
                    with its own backward pass (the weight gradient without a transposed copy of
                    the logits' gradient, the bias gradient as a product)

  python benchmarks/hoisting.py [--preset r2rt|small] [--seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import json

import common
import numpy as np
import throughput

import tbptt_jax as tj
from tbptt_jax import lm, synthetic


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=60, help="measuring time")
  parser.add_argument("--preset", choices=("r2rt", "small"), default="r2rt")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  p = throughput.PRESETS[args.preset]
  steps = p.k * p.updates_per_round
  tokens = np.random.default_rng(0).integers(0, p.vocab, (p.batch, steps + 1)).astype(np.int32)
  if args.preset == "r2rt":
    models = {
      "stepwise": synthetic.model(tj.elman(p.hidden))._replace(scan=None),
      "hoisted": throughput.r2rt_model(p.hidden)._replace(scan=None),
      "hoisted + scan": throughput.r2rt_model(p.hidden),
    }
    unrolls = (1, True)
  else:
    model = lm.language_model(lm.LMConfig(p.vocab, p.hidden, p.layers, "optimized_lstm"))
    vmapped_head = model._replace(head_steps=None)
    models = {
      "stepwise": vmapped_head._replace(scan=None),
      "gated scans": vmapped_head,
      "+ window head": model,
    }
    unrolls = (1,)
  runners = {
    f"{name} unroll={'full' if unroll is True else unroll}": throughput.jax_runner(
      p, tokens, unroll, model=model
    )
    for name, model in models.items()
    for unroll in unrolls
  }
  first = next(iter(runners))
  times = common.alternate(runners, args.seconds, min_rounds=5, first=first)
  rates = {name: p.batch * steps / float(np.median(ts)) for name, ts in times.items()}
  base = rates[first]
  print(f"{args.preset + ' trainer':30} {'tokens/s':>12} {'vs ' + first:>22}  rounds")
  for name, rate in rates.items():
    print(f"{name:30} {rate:12,.0f} {rate / base:21.2f}x  {len(times[name])}")
  summary = common.summary(
    "hoisting",
    preset=args.preset,
    tokens_per_s=rates,
    relative={name: rate / base for name, rate in rates.items()},
    rounds={name: len(ts) for name, ts in times.items()},
  )
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
