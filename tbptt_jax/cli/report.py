"""What a command-line run reports: the summary's shared keys, its text, its files."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import numpy as np

from tbptt_jax import _files
from tbptt_jax.artbp import ARTBP
from tbptt_jax.cli.flags import PROG
from tbptt_jax.train import TrainState, UpdateMetrics


def gradients(metrics: UpdateMetrics) -> dict:
  """What the updates' gradients did: their median norm, how often clipping and NaN/inf hit."""
  return {
    "grad_norm_median": float(np.median(metrics.grad_norm)),
    "clipped_fraction": round(float(np.mean(metrics.clipped)), 6),
    "nonfinite_updates": int(np.sum(metrics.nonfinite)),
    "k2_mean": round(float(np.mean(metrics.k2)), 3) if len(metrics.k2) else None,
  }


def truncation(
  args: argparse.Namespace, state: TrainState, choices: int | None, artbp: ARTBP | None
) -> dict:
  """The summary's keys for adaptive truncation (`choices` made, None without) and ARTBP."""
  return {
    "delta": args.delta,
    "k2_final": int(state.k2) if artbp is None else None,  # ARTBP picks each window
    "k2_choices": choices,
    "artbp": None if artbp is None else artbp._asdict(),
  }


def truncation_text(k1: int, k2: Any, style: str, artbp: ARTBP | None, delta: Any) -> str:
  if k2 is None:  # --gradient rtrl
    return f"RTRL(k1={k1}, every past step)"
  if delta is not None:
    return f"adaptive TBPTT(k1={k1}, k2 in {list(k2)}, delta={delta:g}, {style})"
  if artbp is not None:
    return f"ARTBP(k1={k1}, k2={k2}, L0={artbp.mean_length:g}, alpha={artbp.alpha:g}, {style})"
  return f"TBPTT(k1={k1}, k2={k2}, {style})"


def timing(seconds: float, tokens: int, first_call: float | None, after: float | None) -> dict:
  """The summary's keys for time: the whole run's, and without the first call (None when the
  run made one call or none, so that nothing was measured after it)."""
  return {
    "seconds": round(seconds, 3),
    "first_call_seconds": None if first_call is None else round(first_call, 3),
    "tokens_per_s": round(tokens / seconds, 1),
    "tokens_per_s_after_first_call": after,
  }


def final_loss(losses: Any) -> float:
  """The mean training loss over the last 10% of updates (`losses`: one per update)."""
  losses = np.asarray(losses)
  return float(losses[-max(1, len(losses) // 10) :].mean())


def write_summary(out: str, summary: dict) -> None:
  _files.atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))


# The exit status of a run that finished but diverged; everything is written as usual.
DIVERGED_STATUS = 3


def divergence(final_loss: float, classes: int) -> dict:
  """The summary's keys for divergence: `diverged` is true when the final training loss is not
  finite or is above `uniform_loss` = log(classes), the loss of a uniform prediction, which a
  classifier starts near and any training should go below."""
  uniform = math.log(classes)
  return {
    "diverged": bool(not math.isfinite(final_loss) or final_loss > uniform),
    "uniform_loss": round(uniform, 5),
  }


def exit_status(summary: dict) -> int:
  """0, or `DIVERGED_STATUS` after a warning on stderr when the run diverged."""
  if not summary["diverged"]:
    return 0
  print(
    f"{PROG}: warning: the run diverged: its final loss, {summary['final_loss']} nats, is above "
    f"{summary['uniform_loss']} nats, a uniform prediction's; exit status {DIVERGED_STATUS}",
    file=sys.stderr,
  )
  return DIVERGED_STATUS


# Above this fraction of tokens outside the vocabulary, a perplexity is not comparable.
UNKNOWN_WARNING = 0.05


def vocabulary_coverage(unknown: dict[str, float], unk: str | None) -> dict:
  """The summary's `unknown_fraction` of each split evaluated (`unknown`: split -> the fraction
  of its tokens the vocabulary does not hold as written, `Corpus.unknown`), also on stderr,
  with a warning for a split above `UNKNOWN_WARNING`."""
  for split, fraction in unknown.items():
    print(
      f"{PROG}: {split}: {fraction:.2%} of the tokens are not in the vocabulary (read as {unk})",
      file=sys.stderr,
    )
    if fraction > UNKNOWN_WARNING:
      print(
        f"{PROG}: warning: {fraction:.1%} of the {split} split's tokens are not in the "
        f"vocabulary (over {UNKNOWN_WARNING:.0%}): its perplexity is not comparable with others'",
        file=sys.stderr,
      )
  return {"unknown_fraction": {split: round(f, 6) for split, f in unknown.items()}}
