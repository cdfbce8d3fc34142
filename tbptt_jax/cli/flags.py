"""The flags of `tbptt-jax`: the parser, the argument types and each task's defaults.

Every flag checks its argument (one line naming the flag, exit status 2) and
its help says its default; where the default depends on the task or the
language-model preset, the help gives each.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import optax

from tbptt_jax import __version__, lm
from tbptt_jax._checks import STYLES
from tbptt_jax.artbp import ARTBP
from tbptt_jax.cells import CELL_NAMES
from tbptt_jax.data import LEVELS

# --gradient: the trainer's `gradient` choices a command line can make ("online" is RTRL's
# form for --cell lru).
GRADIENTS = ("bptt", "rtrl")

PROG = "tbptt-jax"
TASKS = ("r2rt", "lm")
OPTIMIZERS = {
  "adam": optax.adam,
  "adamw": optax.adamw,
  "sgd": optax.sgd,
  "adagrad": optax.adagrad,
  "rmsprop": optax.rmsprop,
}
# Defaults of the r2rt task; the lm task takes its defaults from `--preset`.
R2RT_DEFAULTS = dict(
  cell="elman",
  hidden=16,
  layers=1,
  batch_size=200,
  k1=10,
  steps=2000,
  optimizer="adam",
  lr=0.01,
  clip=None,
)
LM_CELL = "optimized_lstm"
LM_OPTIMIZER = "sgd"
# Flags of the adaptive and ARTBP truncations: their defaults, used when the method is on.
ADAPT_EVERY, ADAPT_STREAMS, ARTBP_ALPHA = 10, 4, 4.0
MAX_SEED = 2**63  # jax.random.key takes a signed 64-bit seed


class ArgumentParser(argparse.ArgumentParser):
  """An argument parser whose errors are one line and exit status 2."""

  def error(self, message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parser() -> ArgumentParser:
  """The parser of `tbptt-jax train | eval | generate`."""
  parser = ArgumentParser(
    prog=PROG, description="Train recurrent networks with exact TBPTT(k1, k2)."
  )
  parser.add_argument(
    "--version", action="version", version=f"{PROG} {__version__}", help="print the version"
  )
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  train = commands.add_parser(
    "train",
    help="train a model (default: Elman state 16 on the r2rt synthetic task)",
    description=(
      "Train with TBPTT(k1, k2). Default: the r2rt synthetic task, Elman cell of state 16, "
      "batch 200, k1 = k2 = 10, Adam. --task lm trains a language model on --data DIR "
      "with a Zaremba et al. (2014) preset; flags given override the preset."
    ),
  )
  _add_model_flags(train)
  _add_truncation_flags(train)
  _add_run_flags(train)
  _add_output_flags(train)
  _add_device_flags(train)
  _add_lm_flags(train)
  _add_eval_command(commands)
  _add_generate_command(commands)
  return parser


def _default(value: Any) -> str:
  return "off" if value is False else "none" if value is None else str(value)


def _add(group: Any, *names: str, help: str, default_text: str | None = None, **kwargs) -> None:
  """`group.add_argument` with "(default: ...)" ending the help: the flag's default, or
  `default_text` where the task or the preset decides it; "(required)" for a required flag."""
  default = kwargs.get("default", False if kwargs.get("action") == "store_true" else None)
  text = _default(default) if default_text is None else default_text
  ending = "required" if kwargs.get("required") else f"default: {text}"
  group.add_argument(*names, help=f"{help} ({ending})", **kwargs)


def _presets(field: str) -> str:
  """Each language-model preset's value of `field`: "small 200, medium 650, large 1500"."""
  return ", ".join(f"{name} {getattr(p, field):.4g}" for name, p in lm.PRESETS.items())


def _by_task(name: str, field: str | None = None) -> str:
  """The default of a flag that the task decides: r2rt's, and each lm preset's (`field`)."""
  r2rt = f"r2rt {_default(R2RT_DEFAULTS.get(name))}"
  return r2rt if field is None else f"{r2rt}; lm --preset {_presets(field)}"


def _add_model_flags(train: argparse.ArgumentParser) -> None:
  pos_int = positive(int)
  _add(train, "--task", choices=TASKS, default="r2rt", help="the training task")
  _add(
    train,
    "--cell",
    choices=CELL_NAMES,
    help="the recurrent cell",
    default_text=f"r2rt {R2RT_DEFAULTS['cell']}; lm {LM_CELL}",
  )
  _add(
    train,
    "--hidden",
    type=pos_int,
    help="state size of each layer",
    default_text=_by_task("hidden", "hidden"),
  )
  _add(
    train,
    "--layers",
    type=pos_int,
    help="stacked recurrent layers",
    default_text=_by_task("layers", "layers"),
  )
  _add(
    train,
    "--batch-size",
    type=pos_int,
    help="parallel streams",
    default_text=_by_task("batch_size", "batch_size"),
  )


def _add_truncation_flags(train: argparse.ArgumentParser) -> None:
  pos_int, pos_float = positive(int), positive(float)
  _add(train, "--k1", type=pos_int, help="steps per update", default_text=_by_task("k1", "k"))
  _add(
    train,
    "--k2",
    type=k2_list,
    help="backprop steps; a list such as 10,20,50,100 with --delta (adaptive k2) or --artbp "
    "(the shortest window that holds the segments drawn)",
    default_text="k1",
  )
  _add(train, "--style", choices=STYLES, default="window", help="truncation style")
  _add(
    train,
    "--gradient",
    choices=GRADIENTS,
    default="bptt",
    help="how each update's gradient reaches back: bptt (truncated, as --k2 and --style say) or "
    "rtrl (real-time recurrent learning: through every past step, no truncation; with --cell "
    "lru its diagonal online form; --task r2rt)",
  )
  _add(
    train,
    "--delta",
    type=pos_float,
    help="adaptive truncation (Aicher et al. 2019): tolerated relative gradient bias; "
    "k2 is re-chosen from the --k2 list",
  )
  _add(
    train,
    "--adapt-every",
    type=pos_int,
    help="with --delta: calls between k2 choices (a call: --updates-per-call updates)",
    default_text=str(ADAPT_EVERY),
  )
  _add(
    train,
    "--adapt-streams",
    type=pos_int,
    help="with --delta: streams the gradient decay is measured on",
    default_text=str(ADAPT_STREAMS),
  )
  _add(
    train,
    "--artbp",
    type=pos_float,
    metavar="L0",
    help="unbiased random truncation (ARTBP, Tallec & Ollivier 2017) with mean segment length "
    "L0 > 1, inside windows of k2 > k1 steps",
  )
  _add(
    train,
    "--artbp-alpha",
    type=pos_float,
    help="ARTBP's tail exponent (> 2)",
    default_text=f"{ARTBP_ALPHA:g}",
  )


def _add_run_flags(train: argparse.ArgumentParser) -> None:
  pos_int, pos_float = positive(int), positive(float)
  _add(
    train,
    "--steps",
    type=pos_int,
    help="optimizer updates (r2rt only; with --resume, a larger value extends the run)",
    default_text=_by_task("steps"),
  )
  _add(
    train,
    "--updates-per-call",
    type=pos_int,
    default=100,
    help="updates made by one jitted call, a lax.scan over chunks",
  )
  _add(
    train,
    "--optimizer",
    choices=sorted(OPTIMIZERS),
    help="optax optimizer",
    default_text=f"r2rt {R2RT_DEFAULTS['optimizer']}; lm {LM_OPTIMIZER}",
  )
  _add(train, "--lr", type=pos_float, help="learning rate", default_text=_by_task("lr", "lr"))
  _add(
    train,
    "--clip",
    type=pos_float,
    help="max global gradient norm",
    default_text=_by_task("clip", "max_grad_norm"),
  )
  _add(train, "--unroll", type=pos_int, default=1, help="lax.scan unroll over time")
  _add(train, "--seed", type=seed, default=0, help="seed of data, initialisation and dropout")


def _add_output_flags(train: argparse.ArgumentParser) -> None:
  pos_int = positive(int)
  _add(train, "--out", help="folder for summary, update log, parameters and checkpoints")
  _add(
    train,
    "--resume",
    action="store_true",
    help="continue the run saved in --out from its last checkpoint, to a larger --steps or "
    "--epochs if given",
  )
  _add(train, "--save-every", type=pos_int, default=1000, help="updates between checkpoints")
  _add(train, "--keep", type=pos_int, default=3, help="step checkpoints kept")
  _add(
    train,
    "--max-nonfinite",
    type=pos_int,
    default=10,
    help="stop after this many updates in a row with NaN/inf gradients",
  )
  _add(train, "--json", action="store_true", help="end stdout with a JSON summary line")
  _add(
    train,
    "--tensorboard",
    metavar="DIR",
    help="also write the metrics of every update and epoch as TensorBoard event files in DIR "
    "(needs tbptt-jax[tensorboard]; view with `tensorboard --logdir DIR`)",
  )


def _add_lm_flags(train: argparse.ArgumentParser) -> None:
  pos_int, pos_float = positive(int), positive(float)
  flags = train.add_argument_group("language modelling (--task lm)")
  _add(flags, "--data", help="folder of train/valid/test text files")
  _add(flags, "--level", choices=LEVELS, default="word", help="tokens: words or chars")
  _add(
    flags, "--preset", choices=sorted(lm.PRESETS), default="small", help="Zaremba et al. settings"
  )
  _add(
    flags,
    "--epochs",
    type=pos_int,
    help="passes over the training text (with --resume, a larger value extends the run)",
    default_text=f"--preset {_presets('epochs')}",
  )
  for name, field, meaning, kind in (
    ("--decay-after", "decay_after", "epochs at the full learning rate", pos_int),
    ("--lr-decay", "lr_decay", "learning-rate factor per epoch after that", pos_float),
    ("--dropout", "dropout", "dropout on non-recurrent links", probability),
    ("--init-scale", "init_scale", "uniform initialisation range", pos_float),
  ):
    _add(flags, name, type=kind, help=meaning, default_text=f"--preset {_presets(field)}")
  _add(flags, "--tie", action="store_true", help="tie softmax and embedding weights")
  _add(
    flags,
    "--train-tokens",
    type=pos_int,
    help="use only the first N training tokens (quick runs)",
    default_text="all",
  )
  _add_eval_flags(flags, "valid and test")


def _add_eval_flags(group: Any, splits: str) -> None:
  _add(group, "--eval-batch-size", type=positive(int), default=10, help="streams in evaluation")
  _add(
    group,
    "--eval-tokens",
    type=positive(int),
    help=f"evaluate on the first N tokens of {splits} only",
    default_text="all",
  )


def _add_device_flags(train: argparse.ArgumentParser) -> None:
  flags = train.add_argument_group(
    "several devices and hosts",
    "the streams (--batch-size) are split over the devices of every process; only process 0 "
    "writes --out",
  )
  _add(
    flags,
    "--devices",
    type=device_count,
    default=1,
    metavar="N|all",
    help="devices of each process to split the streams over",
  )
  _add(
    flags,
    "--coordinator",
    metavar="HOST:PORT",
    help="process 0's address for jax.distributed (with --num-processes and --process-id)",
  )
  _add(flags, "--num-processes", type=positive(int), help="processes in the run")
  _add(flags, "--process-id", type=process_id, help="this process's number, 0..N-1")
  _add(
    flags,
    "--distributed",
    action="store_true",
    help="jax.distributed.initialize() from the cluster's environment (SLURM, Open MPI, TPU)",
  )


def _add_eval_command(commands: Any) -> None:
  evaluate = commands.add_parser(
    "eval",
    help="perplexity of a saved language model on a corpus",
    description="Evaluate a model file written by `train --task lm --out DIR` on --data DIR.",
  )
  _add(evaluate, "--data", required=True, help="folder of train/valid/test text files")
  _add_checkpoint_flag(evaluate)
  _add(evaluate, "--split", choices=("valid", "test"), default="test", help="which split")
  _add_eval_flags(evaluate, "the split")
  _add(evaluate, "--json", action="store_true", help="end stdout with a JSON summary line")


def _add_generate_command(commands: Any) -> None:
  generate = commands.add_parser(
    "generate",
    help="text from a saved language model",
    description=(
      "Sample text from a model file written by `train --task lm --out DIR`, one token at a "
      "time, the state carried from the prompt on."
    ),
  )
  _add_checkpoint_flag(generate)
  _add(generate, "--words", type=positive(int), default=100, help="tokens to generate")
  _add(
    generate,
    "--temperature",
    type=positive(float),
    default=1.0,
    help="logits are divided by it: below 1 greedier, above 1 more diverse",
  )
  _add(generate, "--seed", type=seed, default=0, help="seed of the sampling")
  _add(
    generate,
    "--prompt",
    help="text the generated text continues (its tokens must be in the model's vocabulary)",
    default_text="a line's end: <eos>, or a newline at char level",
  )


def _add_checkpoint_flag(command: argparse.ArgumentParser) -> None:
  _add(command, "--checkpoint", required=True, help="model.msgpack, or the --out folder holding it")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
  """The argument type of a positive (and finite) int or float."""

  def parse(text: str) -> Any:
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not 0 < value < float("inf"):
      raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
    return value

  return parse


def seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = -1
  if not 0 <= value < MAX_SEED:
    raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
  return value


def k2_list(text: str) -> int | list[int]:
  """`--k2 N`, or `--k2 N1,N2,...` for a compiled set of k2s (adaptive truncation)."""
  try:
    values = [int(part) for part in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(
      f"expected a positive int or a comma-separated list of them, got {text!r}"
    )
  return values[0] if len(values) == 1 and "," not in text else sorted(set(values))


def probability(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
  return value


def device_count(text: str) -> int | str:
  return text if text == "all" else positive(int)(text)


def process_id(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
  return int(text)


def pick(value: Any, default: Any) -> Any:
  """A flag's value, or the default (the task's, the preset's) where the flag was not given."""
  return default if value is None else value


def truncation(
  args: argparse.Namespace, k1: int
) -> tuple[int | tuple[int, ...] | None, ARTBP | None]:
  """The trainer's `k2` (an int, or the compiled set for --delta; None for --gradient rtrl)
  and its `artbp` from the flags."""
  if args.gradient == "rtrl":
    given = {"--k2": args.k2, "--artbp": args.artbp, "--delta": args.delta}
    given["--style"] = None if args.style == "window" else args.style
    for flag, value in given.items():
      if value is not None:
        raise ValueError(
          f"--gradient rtrl reaches every past step through the carried sensitivities, so "
          f"{flag} cannot be given with it"
        )
    return None, None
  k2 = k1 if args.k2 is None else args.k2
  if isinstance(k2, list):
    if args.delta is None and args.artbp is None:
      raise ValueError(
        f"--k2 {','.join(map(str, k2))} is a list: it needs --delta (adaptive k2) or --artbp "
        "(windows as long as the segments drawn)"
      )
    k2 = tuple(k2)
  elif args.delta is not None:
    raise ValueError(f"--delta needs --k2 to list the k2s to choose from, e.g. 10,20,50, got {k2}")
  if args.artbp is not None and args.delta is not None:
    raise ValueError("--artbp and --delta are two ways to choose truncation: give one")
  for flag, name, parent in (
    ("--adapt-every", "adapt_every", "delta"),
    ("--adapt-streams", "adapt_streams", "delta"),
    ("--artbp-alpha", "artbp_alpha", "artbp"),
  ):
    if getattr(args, name) is not None and getattr(args, parent) is None:
      raise ValueError(f"{flag} applies with --{parent}, which is not given")
  if args.delta is not None and jax.process_count() > 1:
    # Each process would measure its own streams and could choose another k2.
    raise ValueError(f"--delta runs on one process, got {jax.process_count()} processes")
  config = None if args.artbp is None else ARTBP(args.artbp, pick(args.artbp_alpha, ARTBP_ALPHA))
  return k2, config


@contextlib.contextmanager
def naming_truncation(args: argparse.Namespace, k1: int) -> Iterator[None]:
  """Turns the trainer's ValueErrors (which name its arguments) into ones naming the flags."""
  try:
    yield
  except ValueError as e:
    if args.gradient == "bptt":
      given = [f"--k1 {k1}", f"--k2 {_k2_text(args.k2, k1)}", f"--style {args.style}"]
    else:  # k2 and style are not its
      given = [f"--k1 {k1}", f"--gradient {args.gradient}"]
    if args.artbp is not None:
      given.append(f"--artbp {args.artbp:g}")
    if args.artbp_alpha is not None:
      given.append(f"--artbp-alpha {args.artbp_alpha:g}")
    raise ValueError(f"{', '.join(given)}: {e}") from None


def _k2_text(k2: Any, k1: int) -> str:
  if k2 is None:
    return str(k1)
  return ",".join(map(str, k2)) if isinstance(k2, list | tuple) else str(k2)
