"""The library's training step against the chunked TBPTT a JAX user would write by hand.

For k1 = k2 = k, `tbptt_trainer(...).update` must cost no more than the minimal
hand-written version: a `lax.scan` over chunks whose body takes `value_and_grad`
of the chunk loss from the `stop_gradient`-ed carry and applies the optimizer.
The library also maintains its `Lookback` (which makes windows exact across
calls), so this measures what that and the rest of the abstraction cost.

Both steps are jitted with donated state, warmed up, then timed alternately,
call by call; the table reports medians and their ratio.

  python benchmarks/overhead.py [--repeats 9] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tbptt_jax as tj

# (cell, hidden, batch, k, vocab): the r2rt default, a mid-size and Zaremba's small LSTM.
CONFIGS = [
  ("elman", 16, 200, 10, 2),
  ("lstm", 128, 32, 20, 256),
  ("lstm", 200, 20, 20, 10_000),
]
BLOCKS_PER_CALL = 20


def build(cell, hidden, batch, k, vocab):
  """The library trainer and a hand-written equivalent, with their states and data."""
  model = tj.stack(
    tj.feedforward(nn.Embed(vocab, hidden)),
    tj.cell_by_name(cell, hidden),
    tj.feedforward(nn.Dense(vocab)),
  )
  loss_fn = optax.softmax_cross_entropy_with_integer_labels
  optimizer = optax.sgd(0.1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, vocab, (batch, BLOCKS_PER_CALL * k)))
  y = jnp.asarray(rng.integers(0, vocab, (batch, BLOCKS_PER_CALL * k)))
  trainer = tj.tbptt_trainer(model, loss_fn, optimizer, k1=k, k2=k)
  state = trainer.init(jax.random.key(0), x)

  def by_hand(params, opt_state, carry, x, y):
    blocks = lambda a: a.reshape(batch, BLOCKS_PER_CALL, k).transpose(1, 2, 0)  # noqa: E731

    def one_update(state, block):
      params, opt_state, carry = state
      x_block, y_block = block

      def chunk_loss(params):
        carry_in = jax.lax.stop_gradient(carry)  # chunked TBPTT: cut at the chunk border
        carry_out, logits = jax.lax.scan(
          lambda s, x_t: model.apply(params, s, x_t), carry_in, x_block
        )
        return jnp.mean(jax.vmap(loss_fn)(logits, y_block)), carry_out

      (loss, carry), grads = jax.value_and_grad(chunk_loss, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, carry), loss

    return jax.lax.scan(one_update, (params, opt_state, carry), (blocks(x), blocks(y)))

  hand_state = jax.tree.map(jnp.copy, (state.params, state.opt_state, state.carry))
  return trainer.update, state, jax.jit(by_hand, donate_argnums=(0, 1, 2)), hand_state, x, y


def measure(config, repeats):
  library, state, by_hand, hand_state, x, y = build(*config)
  state, _ = library(state, x, y)  # compile and warm up
  hand_state, _ = by_hand(*hand_state, x, y)
  jax.block_until_ready((state, hand_state))
  library_s, hand_s = [], []
  for _ in range(repeats):  # alternate, so both see the same machine load
    start = time.perf_counter()
    state, _ = library(state, x, y)
    jax.block_until_ready(state)
    library_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    hand_state, _ = by_hand(*hand_state, x, y)
    jax.block_until_ready(hand_state)
    hand_s.append(time.perf_counter() - start)
  cell, hidden, batch, k, vocab = config
  tokens = batch * k * BLOCKS_PER_CALL
  return {
    "cell": cell,
    "hidden": hidden,
    "batch": batch,
    "k": k,
    "vocab": vocab,
    "library_ms": 1e3 * float(np.median(library_s)),
    "by_hand_ms": 1e3 * float(np.median(hand_s)),
    "ratio": float(np.median(library_s) / np.median(hand_s)),
    "library_tokens_per_s": tokens / float(np.median(library_s)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=9, help="timed calls per step")
  parser.add_argument("--json", action="store_true", help="end stdout with a JSON line")
  args = parser.parse_args()
  rows = [measure(config, args.repeats) for config in CONFIGS]
  machine = common.machine()
  print(f"date {datetime.date.today()}, command: python {shlex.join(sys.argv)}")
  print(
    f"jax {machine['jax']} on {machine['devices']}, {machine['cpu_model']}, "
    f"{machine['cpu_count']} cpus, load average {common.load_average()}"
  )
  print(f"{BLOCKS_PER_CALL} updates per call, medians of {args.repeats} alternated calls")
  print("\n| cell | hidden | batch | k1 = k2 | vocab | library ms/call | by hand ms/call | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['cell']} | {r['hidden']} | {r['batch']} | {r['k']} | {r['vocab']} | "
      f"{r['library_ms']:.2f} | {r['by_hand_ms']:.2f} | {r['ratio']:.3f} |"
    )
  if args.json:
    print(json.dumps({"benchmark": "overhead", "argv": sys.argv, "machine": machine, "rows": rows}))


if __name__ == "__main__":
  main()
