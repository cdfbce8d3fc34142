"""Which truncation learns which dependency of the r2rt synthetic task.

Trains the task's model (one-hot -> Elman -> Dense(2), batch 200, Adam) with
chunked TBPTT k1 = k2 in (3, 5, 10) and with TBPTT(3, 10), for several seeds
and two states: 5 units with Glorot-uniform weights (little memory of its own
at the start, like r2rt's 4-unit network) and the library default, 16 units
with orthogonal recurrent weights. Prints each run's final loss (mean over the
last 10% of updates) beside the reference levels 0.6616 / 0.5192 / 0.4545.

  python benchmarks/r2rt_truncations.py [--updates 3000] [--seeds 0,1,2] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time

import common
import jax
import numpy as np
import optax

import tbptt_jax as tj
from tbptt_jax import synthetic

TRUNCATIONS = [(3, 3), (5, 5), (10, 10), (3, 10)]  # (k1, k2), window style
GLOROT = jax.nn.initializers.glorot_uniform()


def small_cell():
  return tj.elman(5, input_init=GLOROT, recurrent_init=GLOROT)


STATES = {  # name: (cell, Adam learning rate)
  "state 5, Glorot, Adam 0.03": (small_cell, 0.03),
  "state 16, default init, Adam 0.01": (lambda: tj.elman(16), 0.01),
}


def final_loss(make_cell, lr, k1, k2, updates, seed):
  trainer = tj.tbptt_trainer(
    synthetic.model(make_cell()),
    optax.softmax_cross_entropy_with_integer_labels,
    optax.adam(lr),
    k1=k1,
    k2=k2,
  )
  xs, ys = synthetic.streams(seed, 200, updates * k1)
  state = trainer.init(jax.random.key(seed), xs[:, :k1])
  losses = []
  for inputs, targets in tj.iterate_chunks(xs, 500 * k1, targets=ys):
    state, metrics = trainer.update(state, inputs, targets)
    losses.append(np.asarray(metrics.loss))
  losses = np.concatenate(losses)
  return float(losses[-max(1, len(losses) // 10) :].mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--updates", type=int, default=3000, help="optimizer updates per run")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--json", action="store_true", help="end stdout with a JSON line")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  start = time.perf_counter()
  rows = []
  for name, (make_cell, lr) in STATES.items():
    for k1, k2 in TRUNCATIONS:
      losses = [final_loss(make_cell, lr, k1, k2, args.updates, seed) for seed in seeds]
      rows.append({"model": name, "k1": k1, "k2": k2, "final_losses": losses})
      print(f"{name}: TBPTT({k1}, {k2}) {[round(x, 4) for x in losses]}", flush=True)
  machine = common.machine()
  levels = synthetic.reference_losses()
  print(f"\ndate {datetime.date.today()}, command: python {shlex.join(sys.argv)}")
  wall = time.perf_counter() - start
  print(f"jax {machine['jax']}, {machine['cpu_model']}, {machine['cpu_count']} cpus")
  print(f"{args.updates} updates per run; wall time {wall:.0f} s")
  print(f"reference: {levels.neither:.4f} none | {levels.lag3:.4f} X(t-3) | {levels.both:.4f} both")
  print(f"\n| model | TBPTT(k1, k2) | final loss, seeds {args.seeds} |")
  print("|---|---|---|")
  for r in rows:
    losses = ", ".join(f"{x:.4f}" for x in r["final_losses"])
    print(f"| {r['model']} | ({r['k1']}, {r['k2']}) | {losses} |")
  if args.json:
    print(json.dumps({"benchmark": "r2rt_truncations", "argv": sys.argv, "rows": rows}))


if __name__ == "__main__":
  main()
