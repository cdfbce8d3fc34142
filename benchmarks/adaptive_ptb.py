"""Adaptive k2 (Aicher et al. 2019) against fixed k2 on PTB, at equal compute.

Every method trains the same word-level LSTM language model on PTB for the
same wall-clock budget (`--seconds`, measurement included), then reports the
validation and test perplexity of its final parameters. Truncation is
TBPTT(k1 = 10, k2) in window style, so every method makes one update per 10
new steps of each stream and differs only in how far back each update reaches
(and so in its cost per update):

* fixed k2 in {10, 35, 100} (`--fixed`),
* adaptive: k2 in the compiled set {10, 20, 35, 50, 100}, re-chosen every
  `--adapt-every` calls with delta = `--delta` by `tbptt_jax.adaptive_k2`, on
  the chunk about to be trained (4 streams, without dropout).

The model follows Aicher et al.'s PTB setting scaled to this CPU: one LSTM
layer (`--hidden`, 200 here against their 900), tied embeddings, dropout 0.2,
batch 32, SGD (lr 1 on the loss summed over the block, Zaremba's units),
gradient norm clipped at 1 in those units.

    python benchmarks/adaptive_ptb.py --seconds 300 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

import tbptt_jax
from tbptt_jax import data, lm

sys.path.insert(0, os.path.dirname(__file__))
from common import load_average, machine  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ptb")
ADAPTIVE_K2S = (10, 20, 35, 50, 100)


def method_run(method, args, corpus):
  """Trains one method a call at a time: a generator that yields its record once compiled, then
  after every call (the record holding the latest parameters)."""
  config = lm.LMConfig(
    vocab_size=len(corpus.vocab),
    hidden=args.hidden,
    layers=1,
    dropout=0.2,
    tie_embeddings=True,
    init_scale=0.1,
  )
  model = lm.language_model(config)
  k1 = args.k1
  k2 = ADAPTIVE_K2S if method == "adaptive" else int(method)
  trainer = tbptt_jax.tbptt_trainer(
    model,
    lm.cross_entropy,
    lm.zaremba_sgd(k1, args.lr),
    k1=k1,
    k2=k2,
    max_grad_norm=args.clip / k1,
    step_rngs=True,
  )
  choose = None
  if method == "adaptive":
    choose = tbptt_jax.adaptive_k2(
      model, lm.cross_entropy, trainer.k2s, delta=args.delta, streams=4
    )
  streams = tbptt_jax.batchify(corpus.train, args.batch_size)
  chunk, window = args.updates_per_call * k1, 2 * max(ADAPTIVE_K2S)
  # Compile both chunk shapes (full, and an epoch's last) and the measurement outside the budget.
  tail = (streams.shape[1] - 1) % chunk or chunk
  for length in {chunk, tail}:
    warm = trainer.init(jax.random.key(args.seed), streams[:, :k1])
    jax.block_until_ready(trainer.update(warm, streams[:, :length], streams[:, 1 : length + 1]))
  if choose is not None:
    params = trainer.init(jax.random.key(0), streams[:, :k1]).params
    choose(params, (streams[:, :window], None), streams[:, 1 : window + 1])
  state = trainer.init(jax.random.key(args.seed), streams[:, :k1])
  record = dict(method=method, choices=[], updates=0, tokens=0, calls=0, seconds=0.0)
  yield record  # ready: the clock starts now
  while True:
    state = trainer.reset(state)  # a new epoch: every stream from its start
    for inputs, targets in tbptt_jax.iterate_chunks(streams, chunk):
      if (
        choose is not None and record["calls"] % args.adapt_every == 0 and inputs.shape[1] >= window
      ):
        choice = choose(
          state.params, (inputs[:, :window], None), targets[:, :window], carry=state.carry
        )
        state = trainer.set_k2(state, choice.k2)
        record["choices"].append(
          dict(update=record["updates"], k2=choice.k2, beta=round(choice.beta, 4))
        )
      state, metrics = trainer.update(state, inputs, targets)
      metrics = jax.device_get(metrics)
      record["calls"] += 1
      record["updates"] += len(metrics.loss)
      record["tokens"] += inputs.shape[0] * inputs.shape[1]
      record["k2_sum"] = record.get("k2_sum", 0) + int(np.sum(metrics.k2))
      record["params"] = state.params
      record["epochs"] = record["tokens"] / (streams.shape[0] * (streams.shape[1] - 1))
      yield record


def train_all(methods, args, corpus):
  """Round-robin: one call of each method in turn, each charged the time of its own calls, so
  that load from other processes falls on every method alike. Stops each at its budget."""
  runs = {m: method_run(m, args, corpus) for m in methods}
  records = {m: next(run) for m, run in runs.items()}
  active = list(methods)
  while active:
    for m in list(active):
      start = time.perf_counter()
      next(runs[m])
      records[m]["seconds"] += time.perf_counter() - start
      if records[m]["seconds"] >= args.seconds:
        active.remove(m)
  config = lm.LMConfig(
    vocab_size=len(corpus.vocab), hidden=args.hidden, layers=1, tie_embeddings=True
  )
  evaluate = lm.evaluator(lm.language_model(config), batch_size=10)
  out = []
  for m in methods:
    r = records[m]
    valid = evaluate(r["params"], corpus.valid)
    test = evaluate(r["params"], corpus.test)
    out.append(
      {
        "method": f"fixed k2={m}" if m != "adaptive" else f"adaptive delta={args.delta}",
        "updates": r["updates"],
        "tokens": r["tokens"],
        "epochs": round(r["epochs"], 3),
        "seconds": round(r["seconds"], 1),
        "valid_ppl": round(valid.perplexity, 2),
        "test_ppl": round(test.perplexity, 2),
        "k2_mean": round(r["k2_sum"] / r["updates"], 1),
        "choices": r["choices"],
      }
    )
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default=DATA, help="the PTB folder")
  parser.add_argument("--seconds", type=float, default=300.0, help="training budget per method")
  parser.add_argument("--fixed", default="10,35,100", help="fixed k2 values")
  parser.add_argument("--delta", type=float, default=0.1, help="adaptive tolerance")
  parser.add_argument("--adapt-every", type=int, default=10, help="calls between k2 choices")
  parser.add_argument("--hidden", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--k1", type=int, default=10)
  parser.add_argument("--lr", type=float, default=1.0)
  parser.add_argument("--clip", type=float, default=1.0)
  parser.add_argument("--updates-per-call", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  corpus = data.read_corpus(args.data, "word")
  methods = [m.strip() for m in args.fixed.split(",") if m.strip()] + ["adaptive"]
  print(f"PTB, {args.seconds:g} s of training per method; load {load_average()}", flush=True)
  records = train_all(methods, args, corpus)
  print("| method | updates | epochs | valid ppl | test ppl | mean k2 |")
  print("|---|---|---|---|---|---|")
  for r in records:
    print(
      f"| {r['method']} | {r['updates']:,} | {r['epochs']:.2f} | {r['valid_ppl']:.2f} | "
      f"{r['test_ppl']:.2f} | {r['k2_mean']:.1f} |"
    )
  result = {
    "benchmark": "adaptive_ptb",
    "seconds_per_method": args.seconds,
    "settings": {k: v for k, v in vars(args).items() if k not in ("json", "data")},
    "records": records,
    "machine": machine(),
    "load_average_end": load_average(),
  }
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
