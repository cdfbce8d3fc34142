"""The `tbptt-jax` command line: an application of the library, outside its core.

`tbptt-jax train` with no arguments trains the embedded default: an Elman
network (state 16) on the synthetic task of r2rt.com's "Recurrent Neural
Networks in Tensorflow I", batch 200, chunked TBPTT with k1 = k2 = 10, and
prints its final loss beside the task's three reference levels. `--task lm`
trains a language model; `eval` and `generate` use the model it saves.

Modules: `flags` (the parser), `loop` (the run loop every task shares),
`r2rt` and `lm` (the tasks), `session` (a run's files and resuming),
`devices` (devices and hosts), `report` (the summary), `eval`, `generate`.

Bad arguments print one line, `tbptt-jax: error: ...`, naming the flag, and
exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tbptt_jax.cli import devices, flags, loop, r2rt, session
from tbptt_jax.cli import eval as eval_command
from tbptt_jax.cli import generate as generate_command
from tbptt_jax.cli import lm as lm_task

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `tbptt-jax` with `argv` (default: the process's arguments); the exit status."""
  parser = flags.parser()
  try:
    args = parser.parse_args(argv)
    if args.command is None:
      parser.error("a command is required: train, eval or generate")
  except SystemExit as e:  # --help, --version, or a bad argument (reported)
    return e.code if isinstance(e.code, int) else 2
  commands = {"train": _train, "eval": eval_command.run, "generate": generate_command.run}
  try:
    return commands[args.command](args)
  except ValueError as e:
    print(f"{flags.PROG}: error: {e}", file=sys.stderr)
    return 2
  except loop.RunStopped as e:
    print(f"{flags.PROG}: error: {e.message}", file=sys.stderr)
    return e.status
  except KeyboardInterrupt:  # outside the training loop, which handles SIGINT itself
    print(f"\n{flags.PROG}: interrupted outside the training loop; no checkpoint", file=sys.stderr)
    return 130


def _train(args: argparse.Namespace) -> int:
  mesh = devices.data_mesh(args)  # first: jax.distributed must start before JAX's backends
  if args.data is not None:
    args.data = os.path.abspath(args.data)  # a run resumes from any working folder
  resume = session.resume_point(args)
  task = lm_task if args.task == "lm" else r2rt
  # Opened before anything slow, so that a folder it cannot write is refused at once.
  updates = 0 if resume is None else resume.meta["updates"]
  with loop.tensorboard(args.tensorboard, updates) as board:
    return task.train(args, resume, mesh, board)
