"""An independent NumPy oracle for TBPTT(k1, k2), written from the equations.

The network is the seed of the library, in row (batch-first) form:

    s_t = tanh(x_t U + s_{t-1} W + b),   logits_t = s_t V + c,
    l_t = -log softmax(logits_t)[y_t],

with an optional reset before step t (stream b starts from zeros). Update i
covers the block of steps (i k1, e_i], e_i = min((i+1) k1, T); its objective is
the mean of l_t over the batch and the block. Each l_t is backpropagated on its
own, with a hand-written loop, through exactly the steps the definition allows:
max(1, e_i - k2 + 1)..e_i (window) or max(1, t - k2 + 1)..t (per_loss). It is
slow (O(T k1 k2)) and shares no code with the library.
"""

from __future__ import annotations

import numpy as np

NAMES = ("U", "W", "b", "V", "c")


def forward(params, s0, x, resets=None, first=0, last=None, entering0=None):
  """Runs the recurrence; returns the entering states and the states after each step.

  Steps first..last (0-based, inclusive) are run starting from `entering0` (the
  state before step `first`, default s0); `s_in[t]` is the state step t starts
  from (after a reset), `s[t]` the state after it.
  """
  batch, time = x.shape[:2]
  last = time - 1 if last is None else last
  hidden = params["W"].shape[0]
  s_in = np.zeros((time, batch, hidden))
  s = np.zeros((time, batch, hidden))
  prev = s0 if entering0 is None else entering0
  for t in range(first, last + 1):
    entering = prev if resets is None else np.where(resets[:, t, None], 0.0, prev)
    s_in[t] = entering
    s[t] = np.tanh(x[:, t] @ params["U"] + entering @ params["W"] + params["b"])
    prev = s[t]
  return s_in, s


def softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def blocks(time, k1):
  """The 0-based step indices of each update's block."""
  return [list(range(start, min(start + k1, time))) for start in range(0, time, k1)]


def first_step(t, block, k2, style):
  """The first (0-based) step l_t is backpropagated through."""
  end = block[-1] if style == "window" else t
  return max(0, end - k2 + 1)


def tbptt_gradients(params, s0, x, y, k1, k2, style, resets=None):
  """Per-update gradients `{name: [N, ...]}` and the final state."""
  batch, time = x.shape[:2]
  s_in, s = forward(params, s0, x, resets)
  updates = []
  for block in blocks(time, k1):
    g = {name: np.zeros_like(params[name]) for name in NAMES}
    for t in block:
      dlogits = softmax(s[t] @ params["V"] + params["c"])
      dlogits[np.arange(batch), y[:, t]] -= 1.0
      dlogits /= batch * len(block)
      g["V"] += s[t].T @ dlogits
      g["c"] += dlogits.sum(0)
      ds = dlogits @ params["V"].T
      for j in range(t, first_step(t, block, k2, style) - 1, -1):
        da = ds * (1.0 - s[j] ** 2)
        g["U"] += x[:, j].T @ da
        g["W"] += s_in[j].T @ da
        g["b"] += da.sum(0)
        ds = da @ params["W"].T
        if resets is not None:
          ds = ds * ~resets[:, j, None]  # the reset state is a constant
    updates.append(g)
  grads = {name: np.stack([g[name] for g in updates]) for name in NAMES}
  return grads, s[time - 1]


def truncated_objective(params, frozen_states, s0, x, y, i, k1, k2, style):
  """Update i's objective with every window's entering state frozen.

  `frozen_states` are the states after each step at the parameters where the
  gradient is taken; the loss of each step is recomputed at `params` from the
  frozen state entering its window, so the derivative of this function is the
  TBPTT gradient by definition (no resets).
  """
  batch, time = x.shape[:2]
  block = blocks(time, k1)[i]
  total = 0.0
  for t in block:
    first = first_step(t, block, k2, style)
    entering = s0 if first == 0 else frozen_states[first - 1]
    _, s = forward(params, s0, x, first=first, last=t, entering0=entering)
    p = softmax(s[t] @ params["V"] + params["c"])
    total += -np.log(p[np.arange(batch), y[:, t]]).sum()
  return total / (batch * len(block))
