"""Training throughput of tbptt_jax against idiomatic PyTorch, side by side in one process.

Each preset is one model trained with chunked TBPTT(k, k) on random tokens (the
speed does not depend on the data), full update steps: forward, backward,
gradient clipping and the optimizer. The PyTorch baseline is written the way
its users write it (pytorch/examples word_language_model): `nn.LSTM` / `nn.RNN`
over a `[k, batch]` chunk, the hidden state `.detach()`-ed between chunks,
`clip_grad_norm_`, the same optimizer. The two alternate in rounds of the same
number of tokens after a warm-up; the table reports the medians of the rounds.

  small   2-layer LSTM 200, vocabulary 10,000, batch 20, k 20, SGD, clip (Zaremba small)
  medium  2-layer LSTM 650, vocabulary 10,000, batch 20, k 35, SGD, clip, dropout 0.5
  r2rt    Elman state 16, 2 classes, batch 200, k 10, Adam (latency-bound)

  python benchmarks/throughput.py --preset small [--seconds 60] [--unroll 1|N|full] [--json]

r2rt's window is unrolled in full (`tbptt_trainer(unroll=True)`), the LSTM presets' is not;
`--unroll` overrides the preset's choice.

PyTorch is optional (`pip install torch`); without it the baseline is reported
as missing, never estimated.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import NamedTuple

import common
import jax
import numpy as np
import optax
from flax import linen as nn

import tbptt_jax as tj
from tbptt_jax import lm


class Preset(NamedTuple):
  cell: str  # "lstm" or "elman"
  hidden: int
  layers: int
  vocab: int
  batch: int
  k: int
  dropout: float
  optimizer: str  # "sgd" (Zaremba units: lr and clip on the loss summed over k) or "adam"
  lr: float
  clip: float | None
  updates_per_round: int
  unroll: int | bool  # tbptt_trainer's `unroll`: True unrolls the k-step window in full


# Unrolling the 10-step window of r2rt, which is latency-bound, is worth 1.2-1.3x (RESULTS.md
# section 7); it is worth nothing measurable on the LSTM presets, whose windows stay rolled.
PRESETS = {
  "small": Preset("lstm", 200, 2, 10_000, 20, 20, 0.0, "sgd", 1.0, 5.0, 50, 1),
  "medium": Preset("lstm", 650, 2, 10_000, 20, 35, 0.5, "sgd", 1.0, 5.0, 10, 1),
  "r2rt": Preset("elman", 16, 1, 2, 200, 10, 0.0, "adam", 0.01, None, 200, True),
}


def r2rt_model(hidden: int) -> tj.Cell:
  """r2rt's network, `synthetic.model(elman(hidden))`, with the one-hot encoding before the
  scan (`with_embed`) and the readout after it (`with_head`): the same function, its loop
  over time holding the Elman cell only, differentiated by its own `scan` (RESULTS.md section 7)."""
  one_hot = functools.partial(jax.nn.one_hot, num_classes=2)
  return tj.with_head(tj.with_embed(one_hot, tj.elman(hidden)), nn.Dense(2))


def jax_trainer(
  p: Preset, unroll: int | bool | None = None, mesh=None, model: tj.Cell | None = None
) -> tj.Trainer:
  """The preset's tbptt_jax trainer (`unroll` is passed to the scan over time, default the
  preset's; `mesh` splits the streams over devices, see `benchmarks/scaling.py`; `model`
  replaces the preset's network by an equivalent one, see `benchmarks/hoisting.py`)."""
  unroll = p.unroll if unroll is None else unroll
  if p.cell == "elman":
    model = r2rt_model(p.hidden) if model is None else model
    optimizer = optax.adam(p.lr)
    loss_fn = optax.softmax_cross_entropy_with_integer_labels
    step_rngs = False
  else:
    config = lm.LMConfig(p.vocab, p.hidden, p.layers, "optimized_lstm", p.dropout)
    model = lm.language_model(config) if model is None else model
    optimizer = lm.zaremba_sgd(p.k, p.lr, p.clip)
    loss_fn = lm.cross_entropy
    step_rngs = True
  return tj.tbptt_trainer(
    model, loss_fn, optimizer, k1=p.k, step_rngs=step_rngs, unroll=unroll, mesh=mesh
  )


def jax_runner(
  p: Preset,
  tokens: np.ndarray,
  unroll: int | bool | None = None,
  mesh=None,
  model: tj.Cell | None = None,
):
  """A function running one round of `updates_per_round` updates with tbptt_jax."""
  trainer = jax_trainer(p, unroll, mesh=mesh, model=model)
  steps = p.k * p.updates_per_round
  inputs, targets = tokens[:, :steps], tokens[:, 1 : steps + 1]
  state = trainer.init(jax.random.key(0), inputs[:, : p.k])

  def round_():
    nonlocal state
    state, metrics = trainer.update(state, inputs, targets)
    jax.block_until_ready(metrics.loss)

  return round_


def torch_model(torch, p: Preset):
  """The preset's network in idiomatic PyTorch: `nn.RNN` (r2rt's Elman on one-hot inputs) or
  `nn.LSTM` after an embedding, dropout on the non-recurrent connections, a linear readout."""
  nn = torch.nn

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      if p.cell == "elman":
        self.embed = lambda x: nn.functional.one_hot(x, p.vocab).float()
        self.rnn = nn.RNN(p.vocab, p.hidden, p.layers, nonlinearity="tanh")
      else:
        self.embed = nn.Embedding(p.vocab, p.hidden)
        self.rnn = nn.LSTM(p.hidden, p.hidden, p.layers, dropout=p.dropout)
      self.drop = nn.Dropout(p.dropout)
      self.out = nn.Linear(p.hidden, p.vocab)

    def forward(self, x, h):
      y, h = self.rnn(self.drop(self.embed(x)), h)
      return self.out(self.drop(y)), h

  return Model()


def torch_optimizer(torch, model, p: Preset):
  """`(optimizer, clip)` for `model`: the preset's optimizer, and the norm to clip at or None."""
  if p.optimizer == "sgd":
    # Zaremba's lr and clip are for the loss summed over k steps; on the mean loss
    # that is lr * k and clip / k (as pytorch/examples uses lr 20, clip 0.25).
    return torch.optim.SGD(model.parameters(), lr=p.lr * p.k), p.clip / p.k
  return torch.optim.Adam(model.parameters(), lr=p.lr), None


def torch_runner(p: Preset, tokens: np.ndarray):
  """The same round in idiomatic PyTorch, or None without PyTorch."""
  try:
    import torch
    from torch import nn
  except ImportError:
    return None
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  model = torch_model(torch, p)
  optimizer, clip = torch_optimizer(torch, model, p)
  criterion = nn.CrossEntropyLoss()
  data = torch.from_numpy(tokens.T.astype(np.int64).copy())  # [time, batch], time-major
  zeros = torch.zeros(p.layers, p.batch, p.hidden)
  hidden = zeros if p.cell == "elman" else (zeros, zeros.clone())

  def round_():
    nonlocal hidden
    model.train()
    for i in range(p.updates_per_round):
      x, y = data[i * p.k : (i + 1) * p.k], data[i * p.k + 1 : (i + 1) * p.k + 1]
      # Truncation: the carried state enters the chunk as a constant.
      hidden = hidden.detach() if p.cell == "elman" else tuple(h.detach() for h in hidden)
      optimizer.zero_grad()
      logits, hidden = model(x, hidden)
      loss = criterion(logits.reshape(-1, p.vocab), y.reshape(-1))
      loss.backward()
      if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
      optimizer.step()

  return round_, torch.__version__


def measure(
  preset_name: str, seconds: float, min_rounds: int = 5, unroll: int | bool | None = None
):
  p = PRESETS[preset_name]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, p.vocab, (p.batch, p.k * p.updates_per_round + 1)).astype(np.int32)
  runners = {"tbptt_jax": jax_runner(p, tokens, unroll)}
  baseline = torch_runner(p, tokens)
  torch_version = None
  if baseline is not None:
    runners["pytorch"], torch_version = baseline
  times = common.alternate(runners, seconds, min_rounds, first="tbptt_jax")
  tokens_per_round = p.batch * p.k * p.updates_per_round
  rates = {name: tokens_per_round / float(np.median(ts)) for name, ts in times.items()}
  result = {
    "preset": preset_name,
    "settings": p._asdict(),
    "device": str(jax.devices()[0]),
    "unroll": p.unroll if unroll is None else unroll,
    "tokens_per_s": rates["tbptt_jax"],
    "baseline": f"pytorch {torch_version}" if torch_version else None,
    "baseline_tokens_per_s": rates.get("pytorch"),
    "ratio": rates["tbptt_jax"] / rates["pytorch"] if "pytorch" in rates else None,
    "rounds": {name: len(ts) for name, ts in times.items()},
    "round_seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
  }
  return result


def _unroll(text: str) -> int | bool:
  """`--unroll`: a positive integer, or 'full' (True)."""
  if text == "full":
    return True
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'full', got {text!r}")
  return int(text)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=["small"])
  parser.add_argument("--seconds", type=float, default=60, help="measuring time per preset")
  parser.add_argument(
    "--unroll",
    type=_unroll,
    default=None,
    help="tbptt_jax's lax.scan unroll over time, an integer or 'full' (default: the preset's)",
  )
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  results = [measure(name, args.seconds, unroll=args.unroll) for name in args.preset]
  print(f"{'preset':8} {'tbptt_jax tokens/s':>19} {'pytorch tokens/s':>17} {'ratio':>6}  rounds")
  for r in results:
    base = "missing" if r["baseline_tokens_per_s"] is None else f"{r['baseline_tokens_per_s']:,.0f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(f"{r['preset']:8} {r['tokens_per_s']:19,.0f} {base:>17} {ratio:>6}  {r['rounds']}")
  summary = common.summary("throughput", results=results)
  if args.json:
    print(json.dumps(summary if len(results) > 1 else {**results[0], **summary}))


if __name__ == "__main__":
  main()
