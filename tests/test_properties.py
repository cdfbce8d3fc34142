"""Hostile input, tried: random shapes, truncations, styles and stream counts either work and
agree with the NumPy oracle, or raise the documented `ValueError`; never a silent wrong answer.

Each distinct shape compiles, so the examples are few and tiny; hypothesis picks them.
"""

import functools

import jax
import numpy as np
import numpy_oracle
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tbptt_jax

loss_fn = optax.softmax_cross_entropy_with_integer_labels
HIDDEN, IN, CLASSES = 3, 2, 3


def seed_step(params, s_tm1, x_t):
  """The oracle's network: the library's Elman cell with a readout to logits."""
  elman = tbptt_jax.ElmanParams(params["U"], params["W"], params["b"])
  s_t, _ = tbptt_jax.elman_step(elman, s_tm1, x_t)
  return s_t, s_t @ params["V"] + params["c"]


@functools.cache
def compiled(k1, k2, style):
  return jax.jit(
    functools.partial(tbptt_jax.tbptt_gradients, seed_step, loss_fn, k1=k1, k2=k2, style=style)
  )


@settings(max_examples=12, deadline=None)
@given(
  batch=st.integers(1, 3),
  time=st.integers(1, 8),
  k1=st.integers(1, 9),
  k2=st.integers(1, 10),
  style=st.sampled_from(["window", "per_loss"]),
  with_resets=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_any_truncation_agrees_with_the_oracle_or_is_refused(
  batch, time, k1, k2, style, with_resets, seed
):
  rng = np.random.default_rng(seed)
  shapes = {"U": (IN, HIDDEN), "W": (HIDDEN, HIDDEN), "b": (HIDDEN,), "V": (HIDDEN, CLASSES)}
  params = {name: 0.6 * rng.standard_normal(shape) for name, shape in shapes.items()}
  params["c"] = 0.1 * rng.standard_normal(CLASSES)
  s0 = 0.5 * rng.standard_normal((batch, HIDDEN))
  x = rng.standard_normal((batch, time, IN))
  y = rng.integers(0, CLASSES, (batch, time))
  resets = rng.random((batch, time)) < 0.3 if with_resets else None
  if style == "window" and k2 < k1:
    with pytest.raises(ValueError, match="window style needs k2 >= k1"):
      tbptt_jax.tbptt_gradients(seed_step, loss_fn, params, s0, x, y, k1=k1, k2=k2, style=style)
    return
  with jax.enable_x64(True):
    grads, carry = compiled(k1, k2, style)(params, s0, x, y, resets=resets)
  want, want_carry = numpy_oracle.tbptt_gradients(params, s0, x, y, k1, k2, style, resets=resets)
  assert grads["W"].shape[0] == -(-time // k1)
  for name in numpy_oracle.NAMES:
    np.testing.assert_allclose(grads[name], want[name], rtol=1e-8, atol=1e-12, err_msg=name)
  np.testing.assert_allclose(carry, want_carry, rtol=1e-12, atol=1e-12)


NOT_A_TRUNCATION = st.one_of(
  st.integers(max_value=0),
  st.floats(allow_nan=True),
  st.booleans(),
  st.none(),
  st.text(max_size=3),
)


@settings(max_examples=40, deadline=None)
@given(
  k1=st.one_of(st.integers(1, 5), NOT_A_TRUNCATION),
  k2=st.one_of(st.integers(1, 5), NOT_A_TRUNCATION),
  style=st.one_of(st.sampled_from(["window", "per_loss"]), st.text(max_size=8)),
)
def test_the_trainer_accepts_exactly_the_valid_truncations(k1, k2, style):
  """Anything but integers >= 1 and a known style is a ValueError naming the argument."""

  def valid(k):
    return isinstance(k, int) and not isinstance(k, bool) and k >= 1

  model = tbptt_jax.elman(2)
  make = functools.partial(
    tbptt_jax.tbptt_trainer, model, loss_fn, optax.sgd(0.1), k1=k1, k2=k2, style=style
  )
  if not valid(k1):
    with pytest.raises(ValueError, match="k1 must be an integer >= 1"):
      make()
  elif k2 is not None and not valid(k2):
    with pytest.raises(ValueError, match="k2 must be an integer >= 1"):
      make()
  elif style not in ("window", "per_loss"):
    with pytest.raises(ValueError, match="style must be one of"):
      make()
  elif style == "window" and (k1 if k2 is None else k2) < k1:
    with pytest.raises(ValueError, match="k2 >= k1"):
      make()
  else:
    assert isinstance(make(), tbptt_jax.Trainer)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 4), max_size=4), carry_batch=st.integers(1, 4))
def test_inputs_of_any_shape_run_or_are_refused_by_name(shape, carry_batch):
  """`unroll` of an Elman cell over 3 features: [batch, time, 3] with a matching carry runs;
  anything else is a ValueError naming what is wrong. (Without the cell's own check, a
  [batch, time] input would broadcast through x_t @ U: a silent wrong answer.)"""
  model = tbptt_jax.elman(2)
  params = model.init(jax.random.key(0), np.zeros((1, 3), np.float32))
  x, carry = np.zeros(shape, np.float32), np.zeros((carry_batch, 2), np.float32)
  if len(shape) < 2:
    message = r"unroll: inputs must have shape \[batch, time, \.\.\.\]"
  elif shape[0] == 0 or shape[1] == 0:
    message = "unroll: inputs must have at least one (sequence|time step)"
  elif carry_batch != shape[0]:
    message = "unroll: every array in carry must have leading batch size"
  elif shape[2:] != [3]:
    message = r"elman: each input step must have shape \[batch, in_features=3\]"
  else:
    final, ys = tbptt_jax.unroll(model.apply, params, carry, x)
    assert ys.shape == (shape[0], shape[1], 2) and final.shape == (shape[0], 2)
    return
  with pytest.raises(ValueError, match=message):
    tbptt_jax.unroll(model.apply, params, carry, x)
