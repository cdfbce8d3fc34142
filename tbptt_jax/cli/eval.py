"""`tbptt-jax eval`: the perplexity of a saved language model on a corpus."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from tbptt_jax import checkpoint, lm
from tbptt_jax.cli import report
from tbptt_jax.cli.lm import check_eval_split
from tbptt_jax.data import Vocabulary, read_corpus


def read_model(path: str) -> tuple[str, lm.LMConfig, Any, Vocabulary]:
  """The model file at `path` (model.msgpack, or the --out folder holding it), checked.

  Returns:
    `(path, config, params, vocabulary)`, the path being the file's.
  """
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, checkpoint.MANIFEST)):
      raise ValueError(
        f"--checkpoint {path!r} is a training checkpoint, not a model file: give the run's --out "
        "folder or its model.msgpack"
      )
    path = os.path.join(path, "model.msgpack")
  try:
    config, params, extra = lm.load_model(path)
  except ValueError as e:
    raise ValueError(f"--checkpoint: {e}") from None
  saved = extra.get("vocabulary") if isinstance(extra, dict) else None
  if not saved:
    raise ValueError(f"--checkpoint {path!r} holds no vocabulary")
  try:
    vocab = Vocabulary(tuple(saved["tokens"]), saved["level"], saved["unk"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"--checkpoint {path!r} holds a malformed vocabulary: {e!r}") from None
  if len(vocab) != config.vocab_size:
    raise ValueError(
      f"--checkpoint {path!r}: vocabulary of {len(vocab)} tokens does not match the model's "
      f"{config.vocab_size}"
    )
  return path, config, params, vocab


def run(args: argparse.Namespace) -> int:
  """Evaluates --checkpoint on --split of --data; the exit status."""
  path, config, params, vocab = read_model(args.checkpoint)
  try:
    corpus = read_corpus(args.data, vocab.level, vocab=vocab)
  except ValueError as e:
    raise ValueError(f"--data: {e}") from None
  tokens = getattr(corpus, args.split)[: args.eval_tokens]
  split_unknown = corpus.unknown[("train", "valid", "test").index(args.split)]
  coverage = report.vocabulary_coverage({args.split: split_unknown}, vocab.unk)
  check_eval_split(tokens, args.eval_batch_size, args.split)
  start = time.perf_counter()
  result = lm.evaluator(lm.language_model(config), batch_size=args.eval_batch_size)(params, tokens)
  seconds = time.perf_counter() - start
  summary = {
    "checkpoint": os.path.abspath(path),
    "data": os.path.abspath(args.data),
    "split": args.split,
    "tokens": result.tokens,
    "loss": result.loss,
    "ppl": result.perplexity,
    "bits_per_token": result.bits_per_token,
    "eval_batch_size": args.eval_batch_size,
    "seconds": round(seconds, 3),
    **coverage,
  }
  print(
    f"{args.split}: perplexity {result.perplexity:.2f} ({result.bits_per_token:.4f} bits per "
    f"token) over {result.tokens:,} tokens, {args.eval_batch_size} streams, {seconds:.1f} s"
  )
  if args.json:
    print(json.dumps(summary))
  return 0
