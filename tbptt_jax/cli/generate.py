"""`tbptt-jax generate`: text from a saved language model, its state carried throughout.

As PyTorch's word_language_model `generate.py`: the model reads the prompt,
then draws each next token from softmax(logits / --temperature) and reads it
in turn, the state carried from the prompt on (`lm.sample`). Word-level text
is printed with `<eos>` as the end of a line.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from tbptt_jax import lm
from tbptt_jax.cli.eval import read_model
from tbptt_jax.data import EOS, Vocabulary


def run(args: argparse.Namespace) -> int:
  """Prints --words tokens after --prompt from the model of --checkpoint; the exit status."""
  _, config, params, vocab = read_model(args.checkpoint)
  prompt = _prompt(args.prompt, vocab)
  model = lm.language_model(config)
  ids = lm.sample(
    model, params, prompt, args.words, jax.random.key(args.seed), temperature=args.temperature
  )
  shown = [] if args.prompt is None else vocab.decode(prompt)  # the prompt, then its sequel
  print(text(shown + vocab.decode(ids), vocab.level), flush=True)
  return 0


def _prompt(prompt: str | None, vocab: Vocabulary) -> np.ndarray:
  """The ids of --prompt's tokens; by default, the end of a line (or the commonest token)."""
  if prompt is None:
    start = EOS if vocab.level == "word" else "\n"
    return np.asarray([vocab.tokens.index(start) if start in vocab.tokens else 0], np.int32)
  # Words split on whitespace, without the <eos> that ends a line of a corpus.
  tokens = prompt.split() if vocab.level == "word" else list(prompt)
  if not tokens:
    raise ValueError(f"--prompt {prompt!r} holds no {vocab.level}s")
  known = set(vocab.tokens)
  unknown = [token for token in tokens if token not in known]
  if unknown:
    raise ValueError(
      f"--prompt: {unknown[0]!r} is not in the model's vocabulary of {len(vocab):,} {vocab.level}s"
    )
  return vocab.encode(tokens)


def text(tokens: list[str], level: str) -> str:
  """Tokens as text: characters joined, or words joined by spaces with `<eos>` ending lines."""
  if level == "char":
    return "".join(tokens)
  lines: list[str] = []
  line: list[str] = []
  for token in tokens:
    if token == EOS:
      lines.append(" ".join(line))
      line = []
    else:
      line.append(token)
  return "\n".join([*lines, " ".join(line)])
