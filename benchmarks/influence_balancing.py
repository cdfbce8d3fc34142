"""Influence balancing: fixed truncation diverges, ARTBP (unbiased truncation) converges.

The task of Tallec & Ollivier ("Unbiased Online Recurrent Optimization", 2017, and
"Unbiasing Truncated Backpropagation Through Time", arXiv 1705.08209): a linear
recurrence of n = 23 units driven by one scalar parameter theta,

    s_{t+1} = A s_t + theta b,    A = 0.5 I + 0.5 N  (N: ones on the superdiagonal),
    b = (+1 x 10, -1 x 13),       l_t = 1/2 (s_t[0] - 1)^2.

Unit 0 feels b's positive entries after short lags ((A^k b)_0 = 1 for k < 10) and the
negative ones only after 10 lags or more. At the fixed point s = (I - A)^-1 b theta the full
sensitivity is ds_0/dtheta = sum_k (A^k b)_0 = 2 sum(b) = -6, so the optimum is
theta* = -1/6 (s_0 = 1, loss 0). A truncated gradient that sees only short lags has the
wrong sign, and SGD on it pushes theta away from the optimum: the run diverges.

What each truncation sees is computed here first, on the quasi-static approximation
(theta moves slowly, the state stays at its fixed point, e = s_0 - 1 constant): the
gradient of l_t is e times the truncated sensitivity of s_0. Per loss, truncated at K
lags, that is sum_{k<K} (A^k b)_0; chunked TBPTT(K, K) backpropagates the loss at
position j of a block through j steps, so its update sees the mean over j = 1..K. SGD
then moves e at the rate 6 lr e times that sensitivity: it converges where the
sensitivity is negative and diverges where it is positive. The script checks the
chunked figure against the library (`cell_gradients` at the fixed point).

It measures, too, that ARTBP's gradient is unbiased: its mean over 100,000 steps at a
fixed theta (with an "optimizer" that only sums the gradients), against full BPTT's -6 e.

Then it trains the task as a `tbptt_jax.Cell` (params {"theta": scalar}, carry [1, 23],
one stream, a dummy zero input step, theta = 0 and s = 0 at the start: loss 0.5) with
`tbptt_trainer`:

* chunked TBPTT(K, K) for K in {10, 20, 50, 100, 200}, deterministic;
* ARTBP, `tbptt_trainer(..., k1=10, k2=409, artbp=ARTBP(L0, 4))`, segments capped at
  k2 - k1 + 1 = 400 steps, 20 seeds for each of L0 = 16 and L0 = 32: random cuts with
  segments of about L0 steps, shorter than the lags (>= 20) where the negative influence
  lives, reweighted to be unbiased. Its draws depend on the seed and on the call length;
* window TBPTT(10, 409), the same windows without the random cuts: the deterministic
  control at the same cost (every loss then sees at least 400 lags).

The learning rate is 1e-4 per step's loss, as in the papers. The trainer's objective is
the mean loss over the k1 steps of a block, so the optimizer is `optax.sgd(1e-4 * k1)`,
which applies 1e-4 to the block's summed loss. A run diverges when |theta| > 10 (checked
after every call of 200 steps) or an update's loss exceeds 1e3; it is stopped there.
Prints a table (final theta, final loss over the last 10% of steps, the step from which
the loss stayed below 1e-6, divergences) and the forced-cut odds of each schedule,
computed from it; writes a plot of the loss and theta against steps and a JSON.

  python benchmarks/influence_balancing.py [--steps 30000] [--seeds 0 1 ...]
      [--unbiased-steps 100000] [--ks 10 20 50 100 200] [--quick] [--out DIR] [--json]

`--quick` (about 30 s): 5000 steps, 2 seeds, K in {10, 200}, 10,000 fixed-theta steps.
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
import jax.numpy as jnp
import numpy as np
import optax

import tbptt_jax as tj
from tbptt_jax import artbp

N_UNITS, N_POSITIVE = 23, 10
LR = 1e-4  # per step's loss, as in Tallec & Ollivier
THETA_0 = 0.0
KS = (10, 20, 50, 100, 200)
ARTBP_K1, MAX_LENGTH = 10, 400
SCHEDULES = ((16.0, 4.0), (32.0, 4.0))  # ARTBP (L0, alpha)
UNBIASED_THETA = 0.1  # where the mean ARTBP gradient is measured
CALL_STEPS = 200  # steps per jitted call: 200 / k1 updates
THETA_BOUND, LOSS_BOUND = 10.0, 1e3
SETTLED_LOSS = 1e-6


def recurrence() -> tuple[np.ndarray, np.ndarray]:
  """A = 0.5 I + 0.5 N and b = (+1 x 10, -1 x 13), float64."""
  a = 0.5 * np.eye(N_UNITS) + 0.5 * np.eye(N_UNITS, k=1)
  b = np.r_[np.ones(N_POSITIVE), -np.ones(N_UNITS - N_POSITIVE)]
  return a, b


def influence_cell() -> tj.Cell:
  """The recurrence as a `Cell`: carry s [batch, 23], output s[:, 0], input ignored."""
  a, b = recurrence()
  a_t, b = jnp.asarray(a.T, jnp.float32), jnp.asarray(b, jnp.float32)

  def init(rng, x_t):
    del rng, x_t
    return {"theta": jnp.asarray(THETA_0, jnp.float32)}

  def initial_carry(x_t):
    return jnp.zeros((x_t.shape[0], N_UNITS), jnp.float32)

  def apply(params, s, x_t):
    del x_t  # a dummy step: the recurrence has no input
    s = s @ a_t + params["theta"] * b  # row convention: s_{t+1} = A s_t + theta b
    return s, s[:, 0]

  return tj.Cell(init=init, initial_carry=initial_carry, apply=apply)


def half_squared_error(out, target):
  return 0.5 * (out - target) ** 2  # [batch]


def lag_sensitivities(lags: int) -> np.ndarray:
  """(A^k b)_0 for k = 0..lags-1: how s_0 depends on theta's use k steps back."""
  a, b = recurrence()
  out, v = np.empty(lags), b.copy()
  for k in range(lags):
    out[k] = v[0]
    v = a @ v
  return out


def library_chunk_sensitivity(k: int, blocks: int = 4) -> float:
  """The chunked TBPTT(k, k) gradient at the fixed point of theta = 1, divided by e = s_0 - 1.

  From the library's `cell_gradients`, float32, so it checks the NumPy figure against
  what the trainer computes.
  """
  a, b = recurrence()
  theta = 1.0
  fixed_point = np.linalg.solve(np.eye(N_UNITS) - a, theta * b)
  cell = influence_cell()
  params = {"theta": jnp.asarray(theta, jnp.float32)}
  carry = jnp.asarray(fixed_point[None], jnp.float32)
  x, y = np.zeros((1, blocks * k, 1), np.float32), np.ones((1, blocks * k), np.float32)
  grads, _ = tj.cell_gradients(cell, half_squared_error, tj.Truncation(k), params, carry, x, y)
  return float(np.mean(grads["theta"])) / (fixed_point[0] - 1.0)


def forced_cut_odds(config: tj.ARTBP, max_length: int) -> tuple[float, float]:
  """P(a segment reaches max_length, a forced cut) and the mean segment length, exactly.

  After a cut the steps since it are d = 1, 2, ...; step d + 1 is cut with probability
  c(d) = (alpha - 1) / ((alpha - 2) L0 + d), and always at d = max_length.
  """
  since = np.arange(1, max_length)
  c = np.asarray(artbp.cut_probability(config, jnp.asarray(since, jnp.int32), max_length))
  survive = np.r_[1.0, np.cumprod(1.0 - c.astype(np.float64))]  # P(length >= 1 .. max_length)
  return float(survive[-1]), float(survive.sum())


def train(trainer: tj.Trainer, k1: int, steps: int, seed: int) -> dict:
  """Trains until `steps` or divergence; the per-update losses and theta after every call.

  The random draws of ARTBP come from the seed and the call length (`CALL_STEPS`).
  """
  x = np.zeros((1, CALL_STEPS, 1), np.float32)
  y = np.ones((1, CALL_STEPS), np.float32)
  state = trainer.init(jax.random.key(seed), x[:, :k1])
  losses, thetas, diverged_at = [], [(0, THETA_0)], None
  for call in range(steps // CALL_STEPS):
    state, metrics = trainer.update(state, x, y)
    loss = np.asarray(metrics.loss, np.float64)
    theta = float(state.params["theta"])
    thetas.append(((call + 1) * CALL_STEPS, theta))
    bad = np.flatnonzero(~np.isfinite(loss) | (loss > LOSS_BOUND))
    if bad.size:
      diverged_at = call * CALL_STEPS + (int(bad[0]) + 1) * k1
      losses.append(loss[: bad[0] + 1])
      break
    losses.append(loss)
    if not abs(theta) <= THETA_BOUND:
      diverged_at = (call + 1) * CALL_STEPS
      break
  losses = np.concatenate(losses)
  tail = losses[-max(1, len(losses) // 10) :]
  above = np.flatnonzero(~(losses < SETTLED_LOSS))
  settled = (int(above[-1]) + 1 if above.size else 0) * k1
  if diverged_at is not None or (above.size and above[-1] == len(losses) - 1):
    settled = None  # diverged, or still above at the end
  return {
    "seed": seed,
    "final_theta": thetas[-1][1],  # after the last call run (past the bound if it diverged)
    "final_loss": None if diverged_at is not None else float(tail.mean()),
    "diverged_at": diverged_at,
    "settled_at": settled,  # the step after which every update's loss was < SETTLED_LOSS
    "loss": losses.tolist(),
    "theta": thetas,
  }


def artbp_mean_gradient(config: tj.ARTBP, theta: float, steps: int) -> dict:
  """The ARTBP gradient averaged over `steps` at fixed theta, in units of e = s_0 - 1.

  Unbiasedness, measured: the trainer runs with an "optimizer" that never moves theta
  and sums the gradients it receives; at the fixed point the full-BPTT gradient of
  every loss is e * (-6). The standard error comes from the means over calls of 2000
  steps, nearly independent (segments rarely reach 400 steps) though updates are not.
  """

  sum_gradients = optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, total, params=None: (
      jax.tree.map(jnp.zeros_like, grads),
      jax.tree.map(jnp.add, total, grads),
    ),
  )
  k2 = ARTBP_K1 + MAX_LENGTH - 1
  trainer = tj.tbptt_trainer(
    influence_cell(), half_squared_error, sum_gradients, k1=ARTBP_K1, k2=k2, artbp=config
  )
  call_steps = 2000
  x = np.zeros((1, call_steps, 1), np.float32)
  y = np.ones((1, call_steps), np.float32)
  state = trainer.init(jax.random.key(0), x[:, :ARTBP_K1])
  state = state._replace(params={"theta": jnp.asarray(theta, jnp.float32)})
  a, b = recurrence()
  # Start at the fixed point, so that e is the same at every step.
  fixed_point = np.linalg.solve(np.eye(N_UNITS) - a, theta * b)
  state = state._replace(carry=state.carry._replace(carry=jnp.asarray(fixed_point[None])))
  e = fixed_point[0] - 1.0
  batch_sums, previous = [], 0.0
  for _ in range(steps // call_steps):
    state, _ = trainer.update(state, x, y)
    total = float(state.opt_state["theta"])
    batch_sums.append(total - previous)
    previous = total
  batch_means = np.asarray(batch_sums) / (call_steps // ARTBP_K1) / e
  return {
    "theta": theta,
    "e": float(e),
    "steps": steps,
    "mean": float(batch_means.mean()),
    "standard_error": float(batch_means.std(ddof=1) / np.sqrt(len(batch_means))),
  }


def plot(methods, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_theta) = plt.subplots(1, 2, figsize=(13, 4.8))
  fixed = [m for m in methods if not m["name"].startswith(("ARTBP", "window"))]
  fixed_colors = ["tab:orange", "tab:red", "tab:brown", "tab:pink", "tab:purple", "tab:olive"]
  artbp_colors = iter(["tab:blue", "tab:green", "tab:purple", "tab:cyan"])
  for method in methods:
    if method["name"].startswith("ARTBP"):
      color, alpha, lw = next(artbp_colors), 0.5, 0.8
    elif method["name"].startswith("window"):
      color, alpha, lw = "k", 1.0, 1.2
    else:
      color, alpha, lw = fixed_colors[fixed.index(method) % len(fixed_colors)], 1.0, 1.2
    for j, run in enumerate(method["runs"]):
      loss = np.asarray(run["loss"])
      loss = np.where(loss > 0, loss, np.nan)  # 0 in float32: s_0 = 1 exactly
      steps = np.arange(1, len(loss) + 1) * method["k1"]
      label = method["name"] if j == 0 else None
      ax_loss.semilogy(steps, loss, color=color, lw=lw, alpha=alpha, label=label)
      theta_steps, theta = zip(*run["theta"], strict=True)
      ax_theta.plot(theta_steps, theta, color=color, lw=lw, alpha=alpha, label=label)
  ax_loss.axhline(LOSS_BOUND, color="0.4", ls=":", lw=1)
  ax_loss.text(0, LOSS_BOUND * 2, "divergence bound", fontsize=8, color="0.3")
  ax_loss.axhspan(1e-16, 1e-12, color="0.9", zorder=0)
  ax_loss.text(0, 3e-16, "float32 rounding of s_0 near 1", fontsize=8, color="0.3")
  ax_loss.set(xlabel="step", ylabel="loss per update (mean over its k1 steps)", ylim=(1e-16, 1e4))
  ax_loss.set_title("influence balancing, SGD 1e-4 per step: loss")
  ax_theta.axhline(-1 / 6, color="k", ls="--", lw=1, label="θ* = −1/6")
  ax_theta.set(xlabel="step", ylabel="θ", ylim=(-0.6, 0.6))
  ax_theta.set_title(f"θ every {CALL_STEPS} steps (fixed TBPTT leaves the frame)")
  ax_theta.legend(fontsize=8, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=30000, help="steps per run, a multiple of 200")
  parser.add_argument("--seeds", type=int, nargs="+", default=list(range(20)), help="ARTBP")
  parser.add_argument(
    "--unbiased-steps", type=int, default=100000, help="steps of the fixed-theta ARTBP mean"
  )
  parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="chunked TBPTT(K, K)")
  parser.add_argument(
    "--quick",
    action="store_true",
    help="5000 steps, 2 seeds, K 10 and 200, 10000 fixed-theta steps",
  )
  parser.add_argument("--out", default="benchmarks/results", help="folder for the PNG and JSON")
  parser.add_argument("--json", action="store_true", help="end stdout with a JSON line")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.seeds, args.ks, args.unbiased_steps = 5000, args.seeds[:2], [10, 200], 10000
  start = time.perf_counter()

  # What each truncation sees, before any training.
  lags = lag_sensitivities(2000)
  full = float(lags.sum())
  print(f"full sensitivity ds0/dtheta = sum_k (A^k b)_0 = {full:.6f} (2 sum(b) = -6)")
  print(f"optimum theta* = 1 / {full:.3f} = {1 / full:.6f}")
  print(f"\n{'K':>4} {'per loss: sum_(k<K)':>20} {'chunked mean':>13} {'library':>9}  prediction")
  sensitivities = []
  for k in sorted(set(args.ks) | {1, 2, 5, 10, 20, 30, 40, 50, 100, 150, 200}):
    per_loss, chunked = float(lags[:k].sum()), float(np.cumsum(lags[:k]).mean())
    library = library_chunk_sensitivity(k)
    verdict = "diverges" if chunked > 0 else "converges"
    print(f"{k:4d} {per_loss:20.3f} {chunked:13.3f} {library:9.3f}  chunked {verdict}")
    sensitivities.append(
      {"k": k, "per_loss": per_loss, "chunked": chunked, "chunked_library": library}
    )
    # The library's gradient is the NumPy figure, to float32 rounding.
    assert abs(library - chunked) <= 1e-3 * max(1.0, abs(chunked)), (k, library, chunked)
  first_convergent = next(k for k in range(1, 1000) if np.cumsum(lags[:k]).mean() < 0)
  print(f"chunked TBPTT(K, K) has the right sign from K = {first_convergent}")

  k2 = ARTBP_K1 + MAX_LENGTH - 1
  schedules = [tj.ARTBP(mean_length=l0, alpha=alpha) for l0, alpha in SCHEDULES]
  print(
    f"\nARTBP, k1 = {ARTBP_K1}, k2 = {k2}: segments of at most max_length = {MAX_LENGTH} "
    f"steps. Its mean gradient over {args.unbiased_steps} steps at theta = {UNBIASED_THETA} "
    f"(fixed), in units of e = s_0 - 1 (full BPTT: {full:.3f}; chunked TBPTT(10, 10): "
    f"{float(np.cumsum(lags[:10]).mean()):.3f}):"
  )
  artbp_checks = []
  for config in schedules:
    p_forced, mean_segment = forced_cut_odds(config, MAX_LENGTH)
    check = artbp_mean_gradient(config, UNBIASED_THETA, args.unbiased_steps)
    check.update(
      mean_length=config.mean_length,
      alpha=config.alpha,
      mean_segment=mean_segment,
      p_forced_segment=p_forced,
      forced_per_step=p_forced / mean_segment,
      forced_expected_per_run=p_forced / mean_segment * args.steps,
    )
    artbp_checks.append(check)
    print(
      f"  L0 = {config.mean_length:g}, alpha = {config.alpha:g}: mean gradient / e = "
      f"{check['mean']:.3f} +- {check['standard_error']:.3f}; mean segment "
      f"{mean_segment:.2f} steps; P(a segment is forced at max_length) = {p_forced:.2e}, "
      f"{check['forced_per_step']:.2e} per step, {check['forced_expected_per_run']:.2f} "
      f"expected per run of {args.steps} steps"
    )

  configs = [(f"TBPTT({k}, {k})", k, dict(k1=k, k2=k), [0]) for k in args.ks]
  configs.append((f"window TBPTT({ARTBP_K1}, {k2})", ARTBP_K1, dict(k1=ARTBP_K1, k2=k2), [0]))
  for config in schedules:
    name = f"ARTBP(L0={config.mean_length:g}, α={config.alpha:g}), k1={ARTBP_K1}, k2={k2}"
    configs.append((name, ARTBP_K1, dict(k1=ARTBP_K1, k2=k2, artbp=config), args.seeds))
  methods = []
  print(
    f"\n{'method':36} {'seed':>4} {'final theta':>12} {'final loss':>11} {'result':>24} {'s':>5}"
  )
  for name, k1, kwargs, seeds in configs:
    trainer = tj.tbptt_trainer(influence_cell(), half_squared_error, optax.sgd(LR * k1), **kwargs)
    runs = []
    for seed in seeds:
      run_start = time.perf_counter()
      run = train(trainer, k1, args.steps, seed)
      run["seconds"] = time.perf_counter() - run_start
      runs.append(run)
      final = "-" if run["final_loss"] is None else f"{run['final_loss']:.2e}"
      diverged = run["diverged_at"] is not None
      result = f"diverged at step {run['diverged_at']}" if diverged else "did not diverge"
      print(
        f"{name:36} {seed:4d} {run['final_theta']:12.5f} {final:>11} {result:>24} "
        f"{run['seconds']:5.1f}",
        flush=True,
      )
    methods.append({"name": name, "k1": k1, "k2": kwargs["k2"], "runs": runs})

  print(
    f"\n| method | runs | final θ | final loss (last 10% of steps) | loss < {SETTLED_LOSS:g} "
    "from step (median, max) | diverged |"
  )
  print("|---|---|---|---|---|---|")
  for method in methods:
    runs = method["runs"]
    kept = [r for r in runs if r["diverged_at"] is None]
    lost = [r["diverged_at"] for r in runs if r["diverged_at"] is not None]
    theta = ", ".join(sorted({f"{r['final_theta']:.4f}" for r in kept})) or "-"
    worst = max((r["final_loss"] for r in kept), default=None)
    loss = "-" if worst is None else "0" if worst == 0 else f"{worst:.1e}"
    if len(kept) > 1 and worst:
      loss = "≤ " + loss  # the largest over the runs that did not diverge
    diverged = f"{len(lost)} of {len(runs)}" + (
      f" (at step {', '.join(map(str, lost))})" if lost else ""
    )
    settled = [r["settled_at"] for r in kept]
    settled = (
      "-"
      if not settled
      else f"{settled[0]}"
      if len(settled) == 1
      else f"{int(np.median(settled))}, {max(settled)}"
    )
    print(f"| {method['name']} | {len(runs)} | {theta} | {loss} | {settled} | {diverged} |")

  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, "influence_balancing.png")
  plot(methods, png)
  wall = time.perf_counter() - start
  print(f"wrote {png}; wall time {wall:.0f} s")
  summary = {
    "benchmark": "influence_balancing",
    "date": datetime.date.today().isoformat(),
    "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    "settings": {
      "units": N_UNITS,
      "positive": N_POSITIVE,
      "lr_per_step": LR,
      "theta_0": THETA_0,
      "steps": args.steps,
      "steps_per_call": CALL_STEPS,
      "artbp": {"k1": ARTBP_K1, "max_length": MAX_LENGTH, "schedules": SCHEDULES},
      "theta_bound": THETA_BOUND,
      "loss_bound": LOSS_BOUND,
    },
    "full_sensitivity": full,
    "theta_star": 1 / full,
    "sensitivities": sensitivities,
    "artbp_unbiasedness": artbp_checks,
    "methods": [
      {**m, "runs": [{k: v for k, v in r.items() if k not in ("loss", "theta")} for r in m["runs"]]}
      for m in methods
    ],
    "wall_seconds": wall,
    "machine": common.machine(),
    "load_average": common.load_average(),
  }
  with open(os.path.join(args.out, "influence_balancing.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
