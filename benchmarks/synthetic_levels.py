"""Which truncation length learns which dependency of the r2rt synthetic task, in both styles.

The task (r2rt.com, "Recurrent Neural Networks in Tensorflow I"): X_t ~ Bernoulli(0.5),
Y_t ~ Bernoulli(0.5 + 0.5 X_{t-3} - 0.25 X_{t-8}). A model that learns neither
dependency reaches a cross-entropy of 0.6616 nats, one that learns X_{t-3} only
0.5192, one that learns both 0.4545 (computed in `tbptt_jax.synthetic`).

For k in {1, 2, 3, 4, 5, 8, 9, 10, 15, 20} this trains the CLI default model (one-hot ->
Elman state 16 -> Dense(2), batch 200, Adam 0.01) with TBPTT(k, k) in window style
(chunked) and in per_loss style (the same k updates per block, each loss
backpropagated exactly k steps), several seeds each, and records the final loss
(mean over the last 10% of updates) and the time per update. Writes a PNG of
both against k with the three levels drawn in.

  python benchmarks/synthetic_levels.py [--updates 2000] [--seeds 0 1 2] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time

import common
import jax
import numpy as np
import optax

import tbptt_jax as tj
from tbptt_jax import synthetic

KS = [1, 2, 3, 4, 5, 8, 9, 10, 15, 20]
STYLES = ("window", "per_loss")
BATCH, HIDDEN, LR = 200, 16, 0.01
UPDATES_PER_CALL = 100


def run(k, style, updates, seed):
  """Final loss and median seconds per update of TBPTT(k, k) in `style`."""
  trainer = tj.tbptt_trainer(
    synthetic.model(tj.elman(HIDDEN)),
    optax.softmax_cross_entropy_with_integer_labels,
    optax.adam(LR),
    k1=k,
    k2=k,
    style=style,
  )
  xs, ys = synthetic.streams(seed, BATCH, updates * k)
  state = trainer.init(jax.random.key(seed), xs[:, :k])
  losses, call_seconds = [], []
  for inputs, targets in tj.iterate_chunks(xs, UPDATES_PER_CALL * k, targets=ys):
    start = time.perf_counter()
    state, metrics = trainer.update(state, inputs, targets)
    losses.append(np.asarray(metrics.loss))
    call_seconds.append((time.perf_counter() - start) / len(losses[-1]))
  losses = np.concatenate(losses)
  # The first call compiles: time the others.
  return float(losses[-max(1, len(losses) // 10) :].mean()), float(np.median(call_seconds[1:]))


def plot(results, levels, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
  for style, marker in zip(STYLES, "os", strict=True):
    rows = [r for r in results if r["style"] == style]
    ks = [r["k"] for r in rows]
    ax_loss.errorbar(
      ks,
      [np.mean(r["final_losses"]) for r in rows],
      yerr=[np.std(r["final_losses"]) for r in rows],
      marker=marker,
      capsize=3,
      label=f"{style} TBPTT(k, k)",
    )
    ax_time.plot(ks, [r["seconds_per_update"] * 1e3 for r in rows], marker=marker, label=style)
  for value, name, color in zip(
    levels, ("learns neither", "learns X(t-3)", "learns both"), "rgb", strict=True
  ):
    ax_loss.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{value:.4f} {name}")
  ax_loss.set(xlabel="k (k1 = k2)", ylabel="final cross-entropy (nats)", title="What is learned")
  ax_loss.legend(fontsize=8)
  ax_time.set(xlabel="k (k1 = k2)", ylabel="ms per update", title="Cost of one update")
  ax_time.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--updates", type=int, default=2000)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--ks", type=int, nargs="+", default=KS)
  parser.add_argument("--out", default="benchmarks/results", help="folder for the PNG and JSON")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  levels = synthetic.reference_losses()
  results = []
  print(f"{'k':>3} {'style':8} {'final loss per seed':32} ms/update")
  for style in STYLES:
    for k in args.ks:
      finals, seconds = [], []
      for seed in args.seeds:
        final, per_update = run(k, style, args.updates, seed)
        finals.append(final)
        seconds.append(per_update)
      results.append(
        {
          "k": k,
          "style": style,
          "final_losses": finals,
          "seconds_per_update": float(np.median(seconds)),
        }
      )
      print(
        f"{k:3d} {style:8} {' '.join(f'{f:.4f}' for f in finals):32} "
        f"{np.median(seconds) * 1e3:.2f}",
        flush=True,
      )
  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, "synthetic_levels.png")
  plot(results, levels, png)
  print(f"levels: {levels.neither:.4f} / {levels.lag3:.4f} / {levels.both:.4f}; wrote {png}")
  summary = {
    "benchmark": "synthetic_levels",
    "date": datetime.date.today().isoformat(),
    "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    "settings": {"batch": BATCH, "hidden": HIDDEN, "lr": LR, "updates": args.updates},
    "levels": levels._asdict(),
    "results": results,
    "machine": common.machine(),
    "load_average": common.load_average(),
  }
  with open(os.path.join(args.out, "synthetic_levels.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
