"""The public surface, fuzzed: command lines and API calls drawn from valid and invalid values.

Every invalid case must end in one clear error (a `ValueError` naming the argument; on the
command line, one line naming the flag and status 2); every valid case must run and give
finite results; no case may end in a traceback from inside JAX or optax, or in a silent answer.
Hypothesis draws the cases with a fixed seed (`derandomize=True`). The valid values are few, so
that few programs compile: the cost is the invalid cases, which fail before compiling.

`TBPTT_JAX_FUZZ_REPORT=1 python -m pytest -n 0 -s tests/test_fuzz.py` prints how many cases of
each kind were tried and how each ended.
"""

import atexit
import collections
import contextlib
import functools
import io
import json
import math
import os

import jax
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tbptt_jax
from tbptt_jax import cli

EXAMPLES = 200
OUTCOMES: collections.Counter = collections.Counter()
if os.environ.get("TBPTT_JAX_FUZZ_REPORT"):
  atexit.register(lambda: print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items()))))

FUZZ = settings(
  max_examples=EXAMPLES,
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- The command line. ---

# A run small enough to be quick: 2 updates of k1 = 2 steps on 2 streams of state 2.
BASE = ["train", "--steps", "2", "--updates-per-call", "2", "--hidden", "2", "--batch-size", "2"]
BASE += ["--k1", "2", "--optimizer", "sgd", "--lr", "0.01", "--json"]
# flag -> (valid values, values invalid whatever the other flags are). The valid values are
# few and leave the model's shapes alone, so that the valid runs compile few programs.
FLAGS = {
  "--k1": (["2"], ["0", "-3", "x", "1.5", ""]),
  "--k2": (["2"], ["0", "-2", "2,0", "a", "2,3"]),
  "--style": (["window", "per_loss"], ["tf", "WINDOW", ""]),
  "--cell": (["elman"], ["rnn", "LSTM"]),
  "--hidden": (["2"], ["0", "-1", "2.5", "x"]),
  "--batch-size": (["2"], ["0", "-4", "b"]),
  "--steps": (["2"], ["0", "-2", "1e3"]),
  "--updates-per-call": (["2"], ["0", "x"]),
  "--optimizer": (["sgd"], ["sgdd", "Adam"]),
  "--lr": (["0.01"], ["0", "-0.1", "nan", "inf", "lr"]),
  "--clip": (["1.0"], ["0", "-1", "nan", "inf"]),
  "--seed": (["0", "3"], ["-1", "s", "1.5", str(2**63)]),
  "--unroll": (["1"], ["0", "-1"]),
  "--max-nonfinite": (["5"], ["0", "-1"]),
  "--save-every": (["10"], ["0"]),
  "--keep": (["2"], ["0"]),
  "--devices": (["1"], ["0", "x"]),
  "--task": (["r2rt"], ["lmm", ""]),
  "--epochs": ([], ["2"]),  # --task lm only
  "--dropout": ([], ["0.1", "1.5"]),  # --task lm only
  "--delta": ([], ["-0.1", "x"]),
  "--artbp-alpha": ([], ["6"]),  # needs --artbp
  "--adapt-every": ([], ["3"]),  # needs --delta
  "--tensorboard": ([], ["/proc/tbptt_jax_fuzz"]),
  "--bogus": ([], [""]),
}


@st.composite
def command_lines(draw):
  """`(argv, invalid flags)`: BASE with up to 4 flags set, each to a valid or invalid value."""
  flags = draw(st.lists(st.sampled_from(sorted(FLAGS)), unique=True, max_size=4))
  argv, invalid = list(BASE), []
  for flag in flags:
    valid, bad = FLAGS[flag]
    if valid and draw(st.booleans()):
      argv += [flag, draw(st.sampled_from(valid))]
    else:
      invalid.append(flag)
      value = draw(st.sampled_from(bad))
      argv += [flag] if flag == "--bogus" else [f"{flag}={value}"]
  return argv, invalid


def run_cli(argv):
  """`(status, stdout, stderr, exception)`: `cli.main(argv)` in-process."""
  out, err = io.StringIO(), io.StringIO()
  exception = None
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      status = cli.main(argv)
    except SystemExit as e:
      status = e.code
    except Exception as e:  # a traceback: what this test exists to catch
      status, exception = None, e
  return status, out.getvalue(), err.getvalue(), exception


@FUZZ
@given(case=command_lines())
def test_every_command_line_runs_or_is_refused_in_one_line_naming_a_flag(case):
  argv, invalid = case
  status, stdout, stderr, exception = run_cli(argv)
  if exception is not None:
    OUTCOMES["cli traceback"] += 1
    raise AssertionError(f"{argv}: {exception!r}") from exception
  if invalid:
    lines = stderr.splitlines()
    ok = status == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("tbptt-jax:")
    named = any(flag in stderr for flag in invalid)
    OUTCOMES["cli invalid: one line naming the flag" if ok and named else "cli invalid: other"] += 1
    assert ok, (argv, status, stdout, stderr)
    assert named, (argv, invalid, stderr)
  else:
    summary = json.loads(stdout.strip().splitlines()[-1]) if status in (0, 3) else {}
    finite = math.isfinite(summary.get("final_loss", math.nan))
    OUTCOMES["cli valid: ran, finite" if finite else "cli valid: other"] += 1
    assert status in (0, 3) and finite, (argv, status, stderr)  # 3: diverged, said so


# --- The Python API: tbptt_gradients on random shapes, truncations and masks. ---

HIDDEN, IN, CLASSES, BATCH, TIME = 2, 2, 2, 2, 4
loss_fn = optax.softmax_cross_entropy_with_integer_labels


def step(params, s_tm1, x_t):
  """An Elman step with a readout to logits."""
  s_t = jax.numpy.tanh(x_t @ params["U"] + s_tm1 @ params["W"])
  return s_t, s_t @ params["V"]


@functools.cache
def compiled(k1, k2, style):
  """The valid calls' programs: one per truncation drawn."""
  return jax.jit(
    functools.partial(tbptt_jax.tbptt_gradients, step, loss_fn, k1=k1, k2=k2, style=style)
  )


# argument -> (valid values, invalid values)
TRUNCATION = {
  "k1": ([1, 2], [0, -1, 2.0, "2", None, True]),
  "k2": ([2, 4], [0, -2, 1.5, "x", True]),
  "style": (["window", "per_loss"], ["tf", None, 3]),
}
# argument -> invalid shapes (the valid shape is the first)
SHAPES = {
  "inputs": ((BATCH, TIME, IN), [(BATCH,), (BATCH, 0, IN), (0, TIME, IN)]),
  "targets": ((BATCH, TIME), [(BATCH, TIME - 1), (BATCH + 1, TIME), (BATCH,)]),
  "carry": ((BATCH, HIDDEN), [(BATCH + 1, HIDDEN), ()]),
  "resets": ((BATCH, TIME), [(BATCH, TIME - 1), (TIME,)]),
}


@st.composite
def api_calls(draw):
  """`(arguments, invalid names)`: each argument valid, or (at random) invalid."""
  arguments, invalid = {}, []
  for name, (valid, bad) in TRUNCATION.items():
    if draw(st.integers(0, 3)) == 0:
      invalid.append(name)
      arguments[name] = draw(st.sampled_from(bad))
    else:
      arguments[name] = draw(st.sampled_from(valid))
  for name, (good, bad) in SHAPES.items():
    if draw(st.integers(0, 4)) == 0:
      invalid.append(name)
      arguments[name] = draw(st.sampled_from(bad))
    else:
      arguments[name] = good
  arguments["float_resets"] = draw(st.integers(0, 9)) == 0  # resets of the wrong dtype
  if arguments["float_resets"]:
    invalid.append("resets")
  arguments["seed"] = draw(st.integers(0, 2**16))
  return arguments, invalid


@FUZZ
@given(call=api_calls())
def test_every_api_call_runs_finite_or_raises_one_value_error_naming_the_argument(call):
  arguments, invalid = call
  rng = np.random.default_rng(arguments["seed"])
  params = {
    "U": rng.standard_normal((IN, HIDDEN)).astype(np.float32),
    "W": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
    "V": rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32),
  }
  inputs = rng.standard_normal(arguments["inputs"]).astype(np.float32)
  targets = rng.integers(0, CLASSES, arguments["targets"]).astype(np.int32)
  carry = np.zeros(arguments["carry"], np.float32)
  resets = rng.random(arguments["resets"]) < 0.3
  if arguments["float_resets"]:
    resets = resets.astype(np.float32)
  k1, k2, style = arguments["k1"], arguments["k2"], arguments["style"]
  try:
    if invalid:  # refused before anything is compiled
      tbptt_jax.tbptt_gradients(
        step, loss_fn, params, carry, inputs, targets, k1=k1, k2=k2, style=style, resets=resets
      )
    else:
      grads, final = compiled(k1, k2, style)(params, carry, inputs, targets, resets=resets)
  except ValueError as e:
    named = any(name in str(e) for name in invalid)
    OUTCOMES["api invalid: ValueError naming it" if named else "api: other ValueError"] += 1
    assert invalid and named, (arguments, invalid, str(e))
    return
  except Exception as e:
    OUTCOMES["api traceback"] += 1
    raise AssertionError(f"{arguments}: {e!r}") from e
  OUTCOMES["api invalid: accepted (silent)" if invalid else "api valid: ran, finite"] += 1
  assert not invalid, f"accepted: {arguments}"
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((grads, final)))
