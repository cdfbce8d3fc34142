"""Truncation styles side by side on Penn Treebank: r2rt's "Styles of Truncated Backpropagation".

r2rt.com (2016) compared "TensorFlow-style" TBPTT (chunks of n steps, each loss
backpropagated to its chunk's start) with "true" TBPTT (every loss backpropagated
n steps) on PTB word-level language modelling: a vanilla tanh RNN, embedding 50,
state 100, batch 32, dropout keep 0.8, Adam, 20 epochs, and reported the minimum
validation loss (nats per word). This script runs the same experiment with the
styles as tbptt_jax defines them:

  TF        window style, k1 = k2 = n        (chunked TBPTT)
  true      per_loss style, k1 = 1, k2 = n   (an update every step, each loss n steps back)
  per_loss  per_loss style, k1 = k2 = n      (an update every n steps, each loss n steps back)

and, in the same run, the time per training token of each style, as a ratio to TF
style, alternating the styles' jitted updates on the same data (medians).

  python benchmarks/truncation_styles.py --budget cpu [--json] [--out DIR]
  python benchmarks/truncation_styles.py --budget full            # an accelerator

`--budget cpu` (about 15 minutes on a 2-core CPU) trains n in {10, 20} at lr 0.001 for a
subset of the training text; `--budget full` is r2rt's grid: n in {5, 10, 20, 40} x lr in
{0.003, 0.001, 0.0003}, 20 epochs of the whole text. `--epochs`, `--n`, `--lr`,
`--styles` and `--train-tokens` override either.
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
from tbptt_jax import data, lm, synthetic

# r2rt's table: minimum validation loss, (n, style) -> {lr: loss}.
R2RT = {
  (5, "true"): {0.003: 5.12, 0.001: 5.01, 0.0003: 5.09},
  (5, "TF"): {0.003: 5.21, 0.001: 5.04, 0.0003: 5.04},
  (10, "true"): {0.003: 5.07, 0.001: 5.00, 0.0003: 5.12},
  (10, "TF"): {0.003: 5.15, 0.001: 5.03, 0.0003: 5.05},
  (20, "true"): {0.003: 5.05, 0.001: 5.00, 0.0003: 5.15},
  (20, "TF"): {0.003: 5.11, 0.001: 4.99, 0.0003: 5.08},
  (40, "TF"): {0.003: 5.05, 0.001: 4.99, 0.0003: 5.15},
}
R2RT_TIME_RATIO = 173 / 80.2  # naive true vs TF style, per gradient evaluation

STYLES = {  # name: n -> (k1, k2, style)
  "TF": lambda n: (n, n, "window"),
  "true": lambda n: (1, n, "per_loss"),
  "per_loss": lambda n: (n, n, "per_loss"),
}
BUDGETS = {
  "cpu": dict(n=[10, 20], lr=[0.001], epochs=2, train_tokens=300_000),
  "full": dict(n=[5, 10, 20, 40], lr=[0.003, 0.001, 0.0003], epochs=20, train_tokens=None),
}
BATCH = 32
CONFIG = dict(hidden=100, embedding_size=50, layers=1, cell="elman", dropout=0.2)
STEPS_PER_CALL = 400  # steps of every stream per jitted call


def make_trainer(vocab_size, k1, k2, style, lr):
  model = lm.language_model(lm.LMConfig(vocab_size=vocab_size, **CONFIG))
  trainer = tj.tbptt_trainer(
    model, lm.cross_entropy, optax.adam(lr), k1=k1, k2=k2, style=style, step_rngs=True
  )
  return model, trainer


def train(corpus, train_tokens, n, style_name, lr, epochs, seed=0):
  """Trains one configuration; returns the validation loss of every epoch."""
  k1, k2, style = STYLES[style_name](n)
  model, trainer = make_trainer(len(corpus.vocab), k1, k2, style, lr)
  streams = tj.batchify(train_tokens, BATCH)
  evaluate = lm.evaluator(model, batch_size=BATCH)
  state = trainer.init(jax.random.key(seed), streams[:, :k1])
  chunk = STEPS_PER_CALL // k1 * k1  # a multiple of k1: every block but the epoch's last is full
  losses = []
  for _ in range(epochs):
    state = trainer.reset(state)
    for inputs, targets in tj.iterate_chunks(streams, chunk):
      state, _ = trainer.update(state, inputs, targets)
    losses.append(evaluate(state.params, corpus.valid).loss)
  return losses


def median_call_seconds(trainers, inputs, targets, repeats):
  """Median seconds of each trainer's `update` on the same chunk, the trainers alternating.

  Alternating makes every trainer see the same machine load; a first call
  compiles and warms up and is not timed.
  """
  runs = {}
  for name, trainer in trainers.items():
    state = trainer.init(jax.random.key(0), inputs)
    state, metrics = trainer.update(state, inputs, targets)
    jax.block_until_ready(metrics)
    runs[name] = [state, []]
  for _ in range(repeats):
    for name, trainer in trainers.items():
      state, times = runs[name]
      start = time.perf_counter()
      state, metrics = trainer.update(state, inputs, targets)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      runs[name][0] = state
  return {name: float(np.median(times)) for name, (_, times) in runs.items()}


def time_styles(corpus, n, repeats, lr=0.001):
  """Seconds per training token of each style on the PTB model."""
  streams = tj.batchify(corpus.train, BATCH)
  inputs, targets = streams[:, :STEPS_PER_CALL], streams[:, 1 : STEPS_PER_CALL + 1]
  trainers = {
    name: make_trainer(len(corpus.vocab), *make(n), lr)[1] for name, make in STYLES.items()
  }
  seconds = median_call_seconds(trainers, inputs, targets, repeats)
  per_token = {name: s / inputs.size for name, s in seconds.items()}
  return {
    name: {"seconds_per_token": s, "ratio_to_TF": s / per_token["TF"]}
    for name, s in per_token.items()
  }


def time_r2rt_setting(repeats, n=20, batch=200, hidden=4, updates_per_call=50):
  """r2rt's timing setting on its synthetic task: seconds per gradient evaluation.

  r2rt timed a 4-unit tanh RNN, batch 200, n = 20, an unroll of num_steps = 40
  steps per gradient evaluation for "true" truncation against TF style. Their
  true style unrolled 2n = 40 steps and scored the last n, each loss reaching
  at least n steps back: TBPTT(n, 2n) in window style, whose ideal cost is
  k2 / k1 = 2 times TF style's TBPTT(n, n) per update. The exact per-loss
  truncation (every loss exactly n steps), per_loss(n, n), is timed too.
  Each configuration makes one update per n new steps.
  """
  xs, ys = synthetic.streams(0, batch, n * updates_per_call)
  configs = {
    "TF window(20, 20)": (n, n, "window"),
    "true window(20, 40)": (n, 2 * n, "window"),
    "exact per_loss(20, 20)": (n, n, "per_loss"),
  }
  trainers = {
    name: tj.tbptt_trainer(
      synthetic.model(tj.elman(hidden)),
      optax.softmax_cross_entropy_with_integer_labels,
      optax.adam(0.01),
      k1=k1,
      k2=k2,
      style=style,
    )
    for name, (k1, k2, style) in configs.items()
  }
  seconds = median_call_seconds(trainers, xs, ys, repeats)
  per_update = {name: s / updates_per_call for name, s in seconds.items()}
  base = per_update["TF window(20, 20)"]
  return {
    name: {
      "seconds_per_gradient_evaluation": per_update[name],
      "ratio_to_TF": per_update[name] / base,
    }
    for name in configs
  }


def markdown(results, lrs, ns):
  header = "| n | style | " + " | ".join(f"lr {lr:g}: ours / r2rt" for lr in lrs) + " |"
  lines = [header, "|---|---|" + "---|" * len(lrs)]
  for n in ns:
    for style in STYLES:
      cells = []
      for lr in lrs:
        ours = results.get(f"{n}/{style}/{lr:g}")
        theirs = R2RT.get((n, style), {}).get(lr)
        cells.append(
          f"{ours['min_valid_loss']:.2f} / {theirs:.2f}"
          if ours and theirs
          else f"{ours['min_valid_loss']:.2f} / -"
          if ours
          else "-"
        )
      lines.append(f"| {n} | {style} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
  parser.add_argument("--n", type=int, nargs="+", help="truncation lengths")
  parser.add_argument("--lr", type=float, nargs="+", help="Adam learning rates")
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--styles", nargs="+", choices=sorted(STYLES), default=list(STYLES))
  parser.add_argument("--train-tokens", type=int, help="train on the first N tokens only")
  parser.add_argument("--timing-repeats", type=int, default=7)
  parser.add_argument(
    "--timing-only", action="store_true", help="skip training; measure the styles' time only"
  )
  parser.add_argument(
    "--data",
    default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ptb"),
    help="the PTB folder",
  )
  parser.add_argument("--out", help="folder for results.json and table.md")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  budget = dict(BUDGETS[args.budget])
  for key in ("n", "lr", "epochs", "train_tokens"):
    if getattr(args, key) is not None:
      budget[key] = getattr(args, key)

  corpus = data.read_corpus(args.data, "word")
  train_tokens = corpus.train[: budget["train_tokens"]]
  print(
    f"PTB: {len(train_tokens):,} training tokens of {len(corpus.train):,}, "
    f"{len(corpus.valid):,} validation; budget {args.budget}: n {budget['n']}, "
    f"lr {budget['lr']}, {budget['epochs']} epochs, styles {args.styles}",
    flush=True,
  )
  results = {}
  for n in [] if args.timing_only else budget["n"]:
    for style in args.styles:
      for lr in budget["lr"]:
        start = time.perf_counter()
        losses = train(corpus, train_tokens, n, style, lr, budget["epochs"])
        key = f"{n}/{style}/{lr:g}"
        results[key] = {
          "n": n,
          "style": style,
          "lr": lr,
          "valid_loss_per_epoch": losses,
          "min_valid_loss": min(losses),
          "seconds": time.perf_counter() - start,
          "r2rt": R2RT.get((n, style), {}).get(lr),
        }
        print(
          f"n {n:3d} {style:8s} lr {lr:<7g} min valid loss {min(losses):.3f} nats "
          f"(r2rt {results[key]['r2rt']}) in {results[key]['seconds']:.0f} s",
          flush=True,
        )
  timing_n = 20
  timing = time_styles(corpus, timing_n, args.timing_repeats)
  table = markdown(results, budget["lr"], budget["n"])
  print()
  print(table)
  print()
  print(f"time per training token at n = {timing_n}, batch {BATCH}, ratio to TF style:")
  for name, t in timing.items():
    print(f"  {name:8s} {t['ratio_to_TF']:.2f}x  ({t['seconds_per_token'] * 1e6:.2f} us/token)")
  r2rt_timing = time_r2rt_setting(args.timing_repeats)
  print(
    "r2rt's timing setting (synthetic task, batch 200, state 4, n = 20, a 40-step unroll for "
    f"true style; r2rt: true {R2RT_TIME_RATIO:.2f}x TF per gradient evaluation):"
  )
  for name, t in r2rt_timing.items():
    seconds, ratio = t["seconds_per_gradient_evaluation"], t["ratio_to_TF"]
    print(f"  {name:22s} {ratio:.2f}x  ({seconds * 1e3:.3f} ms per evaluation)")
  summary = {
    "benchmark": "truncation_styles",
    "date": datetime.date.today().isoformat(),
    "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    "budget": args.budget,
    "settings": {**budget, "batch": BATCH, **CONFIG, "optimizer": "adam"},
    "results": results,
    "timing": {"n": timing_n, "batch": BATCH, "styles": timing},
    "timing_r2rt_setting": r2rt_timing,
    "r2rt_time_ratio_true_vs_tf": R2RT_TIME_RATIO,
    "machine": common.machine(),
    "load_average": common.load_average(),
  }
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
      f.write(table + "\n")
  if args.json:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
