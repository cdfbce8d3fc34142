"""How close the training step comes to the machine's matrix-multiply throughput.

For one preset of `benchmarks/throughput.py` (the same model, optimizer and jitted
`tbptt_trainer(...).update` rounds, imported from it) this prints

* the FLOPs of one training token: forward, backward and optimizer of a full
  update step divided by its batch * k tokens, counted analytically per layer
  (matrix products exactly, elementwise work estimated, the optimizer's
  per-parameter work spread over the update's tokens) and, as a cross-check,
  by XLA (`jax.jit(update).lower(...).compile().cost_analysis()["flops"]`);
* the machine's fp32 matmul throughput: a square `n x n` GEMM (default 2048),
  jitted by XLA and through NumPy's BLAS, timed in the same process; each
  round's peak is the faster of the two;
* the library's training tokens/s, and PyTorch's (`throughput.torch_runner`,
  if PyTorch is installed) on the same model and data;
* the fraction of peak: tokens/s * FLOPs/token / GEMM FLOP/s, and the ratio to
  PyTorch;
* for the LSTM presets, where one update's time goes (`profile`): the
  readout's three products alone, the readout and the loss forward and
  backward, the whole window's gradient, and the whole update.

GEMMs and training alternate in rounds (a few calls of each GEMM, then one
training round of each library), so all see the same load on a shared
machine; the table reports the medians of the rounds, and the median over
rounds of each round's own fraction.

XLA's cost analysis counts the body of a `while` loop (a `lax.scan`) once,
whatever its trip count. So the cross-check compiles the same update with
the scan over time fully unrolled (`tbptt_trainer(..., unroll=True)`) for
exactly one update of k steps; the count of the rolled program, which is
what runs, is printed too to show the difference.

  python benchmarks/roofline.py --preset small [--seconds 60] [--gemm-size 2048] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
import throughput

import tbptt_jax as tj
from tbptt_jax import lm

# Elementwise FLOPs per unit, forward + backward (estimates: activations and
# their derivatives count 1 each; the matrix products, counted exactly, dominate).
_LSTM_ELEMENTWISE = 36  # per state unit: bias, 5 activations, c and h updates; x3 for backward
_ELMAN_ELEMENTWISE = 6  # per state unit: bias and tanh; x3 for backward
_SOFTMAX_ELEMENTWISE = 10  # per class: bias, max, exp, sum, log, softmax - onehot, bias grad
_DROPOUT_ELEMENTWISE = 5  # per unit and site: compare, scale, select; backward scale, select
# Optimizer FLOPs per parameter and update. The trainer adds 4 for sgd: the
# gradient norm it reports (2), the finite check (1) and the select that skips
# a non-finite update (1); for adam the select covers params and both moments.
_OPTIMIZER = {
  "sgd": 4 + 1 + 3 + 2,  # trainer; scale by k; clip (norm 2, scale 1); lr and add
  "adam": 6 + 14,  # trainer; moments (7), bias corrections (2), sqrt, eps, divide, lr, add
}


def analytic_flops(p: throughput.Preset) -> dict[str, Any]:
  """FLOPs of one training token, per component: forward + backward + optimizer.

  A matrix product of an m-vector by an [m, n] matrix is 2mn FLOPs forward and
  twice that backward (the gradients for its input and for its weights). The
  integer work of drawing dropout masks (threefry) is not counted; XLA counts it.
  """
  rows: list[tuple[str, float, int]] = []  # (component, flops per token, parameters)
  if p.cell == "elman":
    fan_in = p.vocab  # one-hot input: a dense [vocab, hidden] product
    params = fan_in * p.hidden + p.hidden * p.hidden + p.hidden
    mm = 2 * p.hidden * (fan_in + p.hidden)
    rows.append(("elman layer 1", 3 * mm + _ELMAN_ELEMENTWISE * p.hidden, params))
  else:
    # The gather is free; its backward adds each token's gradient row into the table.
    drop = _DROPOUT_ELEMENTWISE * p.hidden if p.dropout > 0 else 0
    rows.append(("embedding", float(p.hidden + drop), p.vocab * p.hidden))
    for layer in range(p.layers):
      params = 4 * p.hidden * (p.hidden + p.hidden) + 4 * p.hidden
      mm = 2 * 4 * p.hidden * (p.hidden + p.hidden)
      rows.append((f"lstm layer {layer + 1}", 3 * mm + _LSTM_ELEMENTWISE * p.hidden + drop, params))
  params = p.hidden * p.vocab + p.vocab
  mm = 2 * p.hidden * p.vocab
  rows.append(
    (f"readout {p.hidden}x{p.vocab} + loss", 3 * mm + _SOFTMAX_ELEMENTWISE * p.vocab, params)
  )
  n_params = sum(n for _, _, n in rows)
  tokens_per_update = p.batch * p.k
  rows.append(("optimizer", _OPTIMIZER[p.optimizer] * n_params / tokens_per_update, 0))
  return {
    "components": [{"component": c, "flops_per_token": f, "parameters": n} for c, f, n in rows],
    "parameters": n_params,
    "flops_per_token": sum(f for _, f, _ in rows),
  }


def xla_flops(p: throughput.Preset, tokens: np.ndarray) -> dict[str, float]:
  """XLA's FLOPs per token of one update of k steps, scan unrolled and rolled."""
  out = {}
  for name, unroll in (("unrolled", True), ("rolled", 1)):
    trainer = throughput.jax_trainer(p, unroll)
    inputs, targets = tokens[:, : p.k], tokens[:, 1 : p.k + 1]
    state = trainer.init(jax.random.key(0), inputs)
    compiled = trainer.update.lower(state, inputs, targets).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per device
      cost = cost[0]
    out[name] = float(cost["flops"]) / (p.batch * p.k)
  return out


def gemm_runner(n: int, library: str = "xla"):
  """A function timing one fp32 `n x n` GEMM, jitted XLA or NumPy's BLAS; returns its seconds."""
  keys = jax.random.split(jax.random.key(1))
  a = jax.random.normal(keys[0], (n, n), jnp.float32)
  b = jax.random.normal(keys[1], (n, n), jnp.float32)
  if library == "numpy":
    a, b = np.asarray(a), np.asarray(b)
    matmul = np.matmul
  else:
    matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))

  def run() -> float:
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    return time.perf_counter() - start

  return run


def _median_ms(fn, *args, repeats: int = 15) -> float:
  """The median wall time of `fn(*args)` in milliseconds, after two warm-up calls."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def profile(p: throughput.Preset, tokens: np.ndarray) -> dict[str, float]:
  """Where one update's time goes, ms: the readout's three products, the readout and the
  loss (forward and backward), the window's gradient, and the whole update; the loop over
  time (recurrent layers and embedding) and the optimizer are what separates them."""
  trainer = throughput.jax_trainer(p)
  inputs, targets = tokens[:, : p.k], tokens[:, 1 : p.k + 1]
  state = trainer.init(jax.random.key(0), inputs)
  box = [state]

  def update():
    box[0], metrics = trainer.update(box[0], inputs, targets)
    return metrics.loss

  rows = p.batch * p.k
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((rows, p.hidden)), jnp.float32)
  weights = jnp.asarray(0.05 * rng.standard_normal((p.vocab, p.hidden)), jnp.float32)
  bias = jnp.zeros((p.vocab,), jnp.float32)
  g = jnp.asarray(rng.standard_normal((rows, p.vocab)), jnp.float32)
  y = jnp.asarray(targets.T.reshape(-1))

  def readout_loss(h, weights, bias):
    return jnp.mean(lm.cross_entropy(h @ weights.T + bias, y))

  products = (
    _median_ms(jax.jit(lambda h, w: h @ w.T), h, weights)
    + _median_ms(jax.jit(lambda g, w: g @ w), g, weights)
    + _median_ms(jax.jit(lambda g, h: g.T @ h), g, h)
  )
  readout = _median_ms(
    jax.jit(jax.value_and_grad(readout_loss, argnums=(0, 1, 2))), h, weights, bias
  )
  model, params = trainer_model(p), box[0].params
  carry = model.initial_carry(_step_example(p, inputs))
  window = jax.jit(
    lambda params, carry, xs: tj.cell_gradients(
      model, lm.cross_entropy, tj.Truncation(p.k, p.k), params, carry, xs, targets
    )[0]
  )
  gradient = _median_ms(window, params, carry, _step_inputs(p, inputs))
  whole = _median_ms(update)
  return {
    "readout_products_ms": products,
    "readout_and_loss_ms": readout,
    "window_gradient_ms": gradient,
    "update_ms": whole,
    "loop_ms": gradient - readout,
    "optimizer_and_checks_ms": whole - gradient,
  }


def trainer_model(p: throughput.Preset) -> tj.Cell:
  """The language model `throughput.jax_trainer` trains for an LSTM preset."""
  return lm.language_model(lm.LMConfig(p.vocab, p.hidden, p.layers, "optimized_lstm", p.dropout))


def _step_inputs(p: throughput.Preset, inputs: np.ndarray):
  """The model's inputs `[batch, k]`: token ids, and per-step keys where it has dropout."""
  if p.dropout == 0:
    return jnp.asarray(inputs)
  keys = np.random.default_rng(1).integers(0, 2**32, inputs.shape + (2,), dtype=np.uint32)
  return (jnp.asarray(inputs), jnp.asarray(keys))


def _step_example(p: throughput.Preset, inputs: np.ndarray):
  return jax.tree.map(lambda a: a[:, 0], _step_inputs(p, inputs))


def measure(
  preset_name: str,
  seconds: float,
  gemm_size: int,
  gemm_calls: int,
  min_rounds: int = 5,
  with_profile: bool = True,
) -> dict[str, Any]:
  p = throughput.PRESETS[preset_name]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, p.vocab, (p.batch, p.k * p.updates_per_round + 1)).astype(np.int32)
  analytic = analytic_flops(p)
  xla = xla_flops(p, tokens)
  breakdown = profile(p, tokens) if with_profile and p.cell != "elman" else None
  gemms = {library: gemm_runner(gemm_size, library) for library in ("xla", "numpy")}
  runners = {"tbptt_jax": throughput.jax_runner(p, tokens)}
  baseline = throughput.torch_runner(p, tokens)
  torch_version = None
  if baseline is not None:
    runners["pytorch"], torch_version = baseline
  for run in (*runners.values(), *runners.values(), *gemms.values()):  # warm-up
    run()
  gemm_flops = 2.0 * gemm_size**3
  tokens_per_round = p.batch * p.k * p.updates_per_round
  peaks: dict[str, list[float]] = {library: [] for library in gemms}
  rates: dict[str, list[float]] = {name: [] for name in runners}
  start = time.perf_counter()
  # Each round: the GEMMs, then each runner's training round, so all see the same load.
  while time.perf_counter() - start < seconds or len(rates["tbptt_jax"]) < min_rounds:
    for library, gemm in gemms.items():
      peaks[library].append(gemm_flops / statistics.median(gemm() for _ in range(gemm_calls)))
    for name, run in runners.items():
      time.sleep(common.SETTLE_SECONDS)
      t = time.perf_counter()
      run()
      rates[name].append(tokens_per_round / (time.perf_counter() - t))
  # The peak of each round: the faster of XLA's and NumPy's GEMM.
  peak_rounds = [max(pair) for pair in zip(*peaks.values(), strict=True)]
  gemm_rate, train_rate = statistics.median(peak_rounds), statistics.median(rates["tbptt_jax"])
  flops = analytic["flops_per_token"]

  def paired(per_token: float) -> float:
    return statistics.median(
      t * per_token / g for t, g in zip(rates["tbptt_jax"], peak_rounds, strict=True)
    )

  torch_rate = statistics.median(rates["pytorch"]) if "pytorch" in rates else None
  return {
    "preset": preset_name,
    "settings": p._asdict(),
    "device": str(jax.devices()[0]),
    "analytic": analytic,
    "flops_per_token": flops,
    "xla_flops_per_token": xla["unrolled"],
    "xla_flops_per_token_rolled_scan": xla["rolled"],
    "gemm_size": gemm_size,
    "gemm_flops_per_s": gemm_rate,
    "gemm_flops_per_s_by_library": {k: statistics.median(v) for k, v in peaks.items()},
    "tokens_per_s": train_rate,
    "train_flops_per_s": train_rate * flops,
    "fraction_of_gemm": train_rate * flops / gemm_rate,
    "fraction_of_gemm_xla": train_rate * xla["unrolled"] / gemm_rate,
    "paired_fraction_of_gemm": paired(flops),
    "baseline": f"pytorch {torch_version}" if torch_version else None,
    "baseline_tokens_per_s": torch_rate,
    "ratio_to_pytorch": train_rate / torch_rate if torch_rate else None,
    "paired_ratio_to_pytorch": statistics.median(
      a / b for a, b in zip(rates["tbptt_jax"], rates["pytorch"], strict=True)
    )
    if torch_rate
    else None,
    "profile_ms_per_update": breakdown,
    "rounds": len(rates["tbptt_jax"]),
    "gemm_flops_per_s_rounds": {k: [round(r / 1e9, 2) for r in v] for k, v in peaks.items()},
    "tokens_per_s_rounds": {k: [round(r, 1) for r in v] for k, v in rates.items()},
  }


def _print(r: dict[str, Any]) -> None:
  print(f"# roofline: preset {r['preset']} on {r['device']}")
  print(f"{'component':26} {'parameters':>12} {'MFLOP/token':>12}")
  for c in r["analytic"]["components"]:
    print(f"{c['component']:26} {c['parameters']:12,} {c['flops_per_token'] / 1e6:12.4f}")
  print(
    f"{'total (analytic)':26} {r['analytic']['parameters']:12,} {r['flops_per_token'] / 1e6:12.4f}"
  )
  print(f"{'XLA cost_analysis':26} {'':12} {r['xla_flops_per_token'] / 1e6:12.4f}")
  print(
    f"{'  (rolled scan)':26} {'':12} {r['xla_flops_per_token_rolled_scan'] / 1e6:12.4f}"
    "  <- the loop body counted once"
  )
  print()
  print(
    f"{'GEMM GFLOP/s':>13} {'tokens/s':>12} {'train GFLOP/s':>14} {'fraction':>9} "
    f"{'(XLA flops)':>12} {'paired':>7} {'rounds':>7}"
  )
  print(
    f"{r['gemm_flops_per_s'] / 1e9:13.1f} {r['tokens_per_s']:12,.0f} "
    f"{r['train_flops_per_s'] / 1e9:14.1f} {r['fraction_of_gemm']:9.1%} "
    f"{r['fraction_of_gemm_xla']:12.1%} {r['paired_fraction_of_gemm']:7.1%} {r['rounds']:7}"
  )
  by_library = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r["gemm_flops_per_s_by_library"].items())
  print(
    f"GEMM: fp32 {r['gemm_size']}x{r['gemm_size']} (GFLOP/s: {by_library}), the faster in each "
    "round; fraction = tokens/s * analytic FLOPs/token / GEMM FLOP/s (medians); "
    "paired = median over rounds of the same ratio within a round."
  )
  if r["baseline_tokens_per_s"] is None:
    print("PyTorch: not installed, no baseline")
  else:
    print(
      f"{r['baseline']}: {r['baseline_tokens_per_s']:,.0f} tokens/s; tbptt_jax / PyTorch "
      f"{r['ratio_to_pytorch']:.2f}x (medians), {r['paired_ratio_to_pytorch']:.2f}x paired"
    )
  if r["profile_ms_per_update"]:
    print("one update, ms (medians of 15 calls, measured before the rounds):")
    for name, ms in r["profile_ms_per_update"].items():
      print(f"  {name.removesuffix('_ms'):26} {ms:8.2f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(throughput.PRESETS), default="small")
  parser.add_argument("--seconds", type=float, default=60, help="measuring time (default 60)")
  parser.add_argument("--gemm-size", type=int, default=2048, help="GEMM side n (default 2048)")
  parser.add_argument("--gemm-calls", type=int, default=3, help="GEMM calls per round (default 3)")
  parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
  args = parser.parse_args(argv)
  load_before = common.load_average()
  result = measure(args.preset, args.seconds, args.gemm_size, args.gemm_calls)
  _print(result)
  load_after = common.load_average()
  print(f"load average before {load_before}, after {load_after}")
  if args.json:
    summary = {
      "benchmark": "roofline",
      "date": datetime.date.today().isoformat(),
      "command": "python " + shlex.join(sys.argv),
      **result,
      "machine": common.machine(),
      "load_average": {"before": load_before, "after": load_after},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
