"""What ARTBP's backward pass costs with one window and with a set of windows.

`tbptt_trainer(..., artbp=ARTBP(L0))` with one k2 runs every update's backward pass over the
whole k2-step window; with a set of k2s it runs the shortest window of the set that reaches back
to every stream's last cut, which gives the same gradient (tests/test_artbp.py checks it update
by update). This measures both on the influence-balancing task of `influence_balancing.py` (one
stream, k1 = 10, segments capped at 400 steps, L0 = 16, alpha = 4), alternated in one process,
medians of the rounds:

    python benchmarks/artbp_cost.py --seconds 20 --json
"""

from __future__ import annotations

import argparse
import json

import common
import influence_balancing
import jax
import numpy as np
import optax

import tbptt_jax as tj

K1, STEPS = 10, 2000  # steps per round: one jitted call of 200 updates
WINDOWS = {
  "one window, k2 = 409": 409,
  "a set, k2 in (20, 50, 110, 210, 409)": (20, 50, 110, 210, 409),
}


def runner(k2, windows: list[float]):
  trainer = tj.tbptt_trainer(
    influence_balancing.influence_cell(),
    influence_balancing.half_squared_error,
    optax.sgd(1e-4 * K1),
    k1=K1,
    k2=k2,
    artbp=tj.ARTBP(16.0, 4.0),
  )
  x, y = np.zeros((1, STEPS, 1), np.float32), np.ones((1, STEPS), np.float32)
  state = trainer.init(jax.random.key(0), x[:, :K1])

  def round_():
    nonlocal state
    state, metrics = trainer.update(state, x, y)
    windows.append(float(np.mean(jax.device_get(metrics.k2))))  # waits for the call

  return round_


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  windows = {name: [] for name in WINDOWS}
  runners = {name: runner(k2, windows[name]) for name, k2 in WINDOWS.items()}
  first = next(iter(WINDOWS))
  times = common.alternate(runners, args.seconds, min_rounds=5, first=first)
  result = {"benchmark": "artbp_cost", "machine": common.machine(), "rows": []}
  print(f"{'':40s} {'us per step':>12s} {'mean window':>12s} {'rounds':>7s}")
  for name, ts in times.items():
    row = {
      "method": name,
      "us_per_step": float(np.median(ts)) / STEPS * 1e6,
      "mean_window": float(np.mean(windows[name])),
      "rounds": len(ts),
    }
    result["rows"].append(row)
    print(f"{name:40s} {row['us_per_step']:12.1f} {row['mean_window']:12.1f} {row['rounds']:7d}")
  one, many = (r["us_per_step"] for r in result["rows"])
  result["speedup"] = one / many
  print(f"the set is {one / many:.2f}x faster per step")
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
