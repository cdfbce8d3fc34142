r"""The Linear Recurrent Unit (LRU) of Orvieto et al. (2023), as a `Cell` whose windows run as
a parallel scan.

A diagonal, complex, linear recurrence with a real read-out (Orvieto, Smith, Gu, Fernando,
Gulcehre, Pascanu & De, "Resurrecting Recurrent Neural Networks for Long Sequences", ICML 2023):

    lambda = exp(-exp(nu) + i exp(theta))          (one complex eigenvalue per state unit)
    h_t    = lambda * h_{t-1} + gamma * (B x_t)     (gamma = exp(gamma_log), elementwise)
    y_t    = Re(C h_t) + D * x_t                    (D: the skip term, elementwise)

with h_t in C^N, B in C^{N x H}, C in C^{H x N}, D in R^H. The exponential parametrisation keeps
|lambda| = exp(-exp(nu)) in (0, 1): the recurrence is stable whatever the optimizer does to nu.
At initialisation (the paper's section 3.3 and appendix A) lambda is drawn uniformly on the
ring r_min <= |lambda| <= r_max with phase in [0, max_phase]; gamma = sqrt(1 - |lambda|^2)
normalises each unit's input so that its state has the variance of its input under white
noise; B and C are complex Glorot-normal, D standard normal.

Because the recurrence is linear, the states of a window of T steps are the prefix products
of the affine maps h -> lambda h + b_t, an associative operation

    (a_1, b_1) . (a_2, b_2) = (a_2 a_1, a_2 b_1 + b_2),

so `jax.lax.associative_scan` computes them in O(log T) parallel depth instead of T dependent
steps (Blelloch 1990; Martin & Cundy 2018; S5, Smith et al. 2023). The carry entering the
window folds into the first step, b_1 = lambda h_0 + gamma B x_1, so a window starts from the
carry the engine hands it: exact TBPTT(k1, k2) with the state carried between chunks. A reset
before step t (a document boundary) makes that step's map constant, a_t = 0 and
b_t = lambda h_reset + gamma B x_t: the state restarts from the reset carry and no gradient
crosses it, inside the same parallel scan. Only the padding the engine puts before a
sequence's first step runs through `apply` one step at a time (its generic path).

The parallel scan does more arithmetic than the loop (it sweeps the maps up and down), which
pays on a GPU or TPU, where one small step leaves the device idle, and not on a CPU: there the
same maps applied in a `jax.lax.scan` are faster (`lru(..., scan=...)`; `"auto"` picks by
backend). Either way the input and output projections, B x_t and Re(C h_t), run for the whole
window at once, outside the loop.

The carry is the real and imaginary parts of h, `(h_re, h_im)`, each `[batch, N]`: real arrays,
as every part of the library (diagnostics, sharding, checkpoints) expects.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tbptt_jax import _checks
from tbptt_jax.cells import Cell, feedforward, stack
from tbptt_jax.rtrl import RTRLCarry


class LRUParams(NamedTuple):
  """The LRU's parameters; complex matrices as their real and imaginary parts."""

  nu_log: jax.Array  # [N]: |lambda| = exp(-exp(nu_log))
  theta_log: jax.Array  # [N]: arg(lambda) = exp(theta_log)
  gamma_log: jax.Array  # [N]: the input normalisation, log sqrt(1 - |lambda|^2) at init
  B_re: jax.Array  # [H, N]: input matrix (transposed: x_t @ B is B x_t for a batch of rows)
  B_im: jax.Array  # [H, N]
  C_re: jax.Array  # [N, H]: output matrix (transposed likewise)
  C_im: jax.Array  # [N, H]
  D: jax.Array  # [H]: the skip term


class _Settings(NamedTuple):
  state_size: int
  r_min: float
  r_max: float
  max_phase: float
  param_dtype: Any


def lru(
  state_size: int,
  *,
  r_min: float = 0.0,
  r_max: float = 1.0,
  max_phase: float = 2 * math.pi,
  param_dtype: Any = jnp.float32,
  scan: str = "auto",
) -> Cell:
  """An LRU layer of `state_size` complex units, as a `Cell` (see the module docstring).

  Its output has the size of its input (the skip term D x_t needs it): stack a
  `feedforward` layer before or after it to change sizes, as the paper does.

  Args:
    state_size: N, the number of complex state units.
    r_min, r_max: the ring |lambda| is drawn from at initialisation,
      0 <= r_min < r_max <= 1 (the paper's defaults: 0 and 1; 0.9 and 0.999
      for its long-range tasks).
    max_phase: arg(lambda) is drawn from [0, max_phase] (default 2 pi).
    param_dtype: dtype of the parameters and of the carry.
    scan: how a window's states are computed, the same function either way:
      `"associative"` (`jax.lax.associative_scan`, log T deep: for GPUs and
      TPUs), `"sequential"` (a `jax.lax.scan` of the elementwise recurrence,
      the input and output projections hoisted out of the loop: faster on a
      CPU, where the parallel scan's extra arithmetic is not paid back; on 2
      cores the parallel scan took about twice its time from k = 30 to 1000,
      benchmarks/RESULTS.md section 13), or `"auto"` (associative, except on
      a CPU backend).

  Returns:
    A `Cell` with `apply` (one step) and `scan` (a window at once, the same
    function); input steps are `[batch, H]`.

  Example:
    >>> cell = lru(32, r_min=0.9, r_max=0.999)
    >>> x_t = jnp.ones((4, 8))
    >>> params = cell.init(jax.random.key(0), x_t)
    >>> carry, y_t = cell.apply(params, cell.initial_carry(x_t), x_t)
    >>> y_t.shape
    (4, 8)

  References:
    A. Orvieto, S. L. Smith, A. Gu, A. Fernando, C. Gulcehre, R. Pascanu and
    S. De, "Resurrecting Recurrent Neural Networks for Long Sequences", ICML 2023.
  """
  settings = _settings("lru", state_size, r_min, r_max, max_phase, param_dtype)
  if scan not in SCANS:
    raise ValueError(f"lru: scan must be one of {SCANS}, got {scan!r}")
  return Cell(
    init=functools.partial(_init, settings),
    initial_carry=functools.partial(_initial_carry, settings),
    apply=_step,
    scan=functools.partial(_scan, scan),
    scan_resets=True,
  )


# How `lru`'s `scan` runs a window: see its `scan` argument.
SCANS = ("auto", "associative", "sequential")


def lru_block(
  features: int, *, state_size: int | None = None, online: bool = False, **options: Any
) -> Cell:
  """An LRU as a recurrent layer of width `features`, the way the paper uses it: a linear
  projection of the input to `features`, the LRU (`state_size` complex units, default
  `features`), and a GELU layer on its output (the paper's block without its normalisation
  and residual). It is what `cell_by_name("lru", n)` and the command line's `--cell lru` build.

  Args:
    features: the layer's output width (and the LRU's input width).
    state_size: N, default `features`.
    online: use `online_lru` (the diagonal online sensitivities, for
      `tbptt_trainer(..., gradient="online")`); the parameters are the same.
    **options: `r_min`, `r_max`, `max_phase`, `param_dtype` (and, unless
      online, `scan`), passed to the LRU.
  """
  features = _checks.positive_int("lru_block", "features", features)
  make = online_lru if online else lru
  dtype = options.get("param_dtype", jnp.float32)
  return stack(
    feedforward(nn.Dense(features, param_dtype=dtype)),
    make(features if state_size is None else state_size, **options),
    feedforward(nn.Sequential([nn.Dense(features, param_dtype=dtype), nn.gelu])),
  )


def _settings(
  where: str, state_size: Any, r_min: Any, r_max: Any, max_phase: Any, param_dtype: Any
) -> _Settings:
  """The LRU's arguments, checked."""
  state_size = _checks.positive_int(where, "state_size", state_size)
  if not 0.0 <= r_min < r_max <= 1.0:
    raise ValueError(
      f"{where}: r_min and r_max must satisfy 0 <= r_min < r_max <= 1, got r_min={r_min!r}, "
      f"r_max={r_max!r}"
    )
  if not max_phase > 0:
    raise ValueError(f"{where}: max_phase must be > 0, got {max_phase!r}")
  return _Settings(state_size, float(r_min), float(r_max), float(max_phase), param_dtype)


def _init(settings: _Settings, rng: jax.Array, x_t: Any) -> LRUParams:
  """The paper's initialisation (appendix A): lambda uniform on the ring, gamma normalising."""
  n, h, dtype = settings.state_size, x_t.shape[-1], settings.param_dtype
  k_u1, k_u2, k_b, k_c, k_d = jax.random.split(rng, 5)
  # Uniform on (0, 1): a draw of exactly 0 would put log(0) into nu or theta.
  tiny = jnp.finfo(dtype).tiny
  u1 = jax.random.uniform(k_u1, (n,), dtype, minval=tiny)
  u2 = jax.random.uniform(k_u2, (n,), dtype, minval=tiny)
  r_min, r_max = settings.r_min, settings.r_max
  # |lambda|^2 uniform on [r_min^2, r_max^2]: lambda uniform in area on the ring.
  nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
  theta_log = jnp.log(settings.max_phase * u2)
  modulus = jnp.exp(-jnp.exp(nu_log))
  gamma_log = jnp.log(jnp.sqrt(1 - modulus**2))
  b = jax.random.normal(k_b, (2, h, n), dtype) / math.sqrt(2 * h)
  c = jax.random.normal(k_c, (2, n, h), dtype) / math.sqrt(n)
  d = jax.random.normal(k_d, (h,), dtype)
  return LRUParams(nu_log, theta_log, gamma_log, b[0], b[1], c[0], c[1], d)


def _initial_carry(settings: _Settings, x_t: Any) -> tuple[jax.Array, jax.Array]:
  zeros = jnp.zeros((x_t.shape[0], settings.state_size), settings.param_dtype)
  return zeros, zeros


def _eigenvalues(params: LRUParams) -> jax.Array:
  """lambda = exp(-exp(nu) + i exp(theta)), [N] complex."""
  return jnp.exp(-jnp.exp(params.nu_log) + 1j * jnp.exp(params.theta_log))


def _projected(params: LRUParams, x: jax.Array) -> jax.Array:
  """B x for rows x [..., H], [..., N] complex."""
  return x @ params.B_re + 1j * (x @ params.B_im)


def _driven_input(params: LRUParams, x: jax.Array) -> jax.Array:
  """gamma * (B x) for rows x [..., H]: the input each state unit adds, [..., N] complex."""
  return jnp.exp(params.gamma_log) * _projected(params, x)


def _complex(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
  """h from the carry's `(Re h, Im h)`."""
  return pair[0] + 1j * pair[1]


def _parts(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(Re z, Im z)`: complex numbers as the real arrays the carry holds."""
  return z.real, z.imag


def _read_out(params: LRUParams, h: jax.Array, x: jax.Array) -> jax.Array:
  """y = Re(C h) + D x for rows h [..., N], x [..., H]."""
  return h.real @ params.C_re - h.imag @ params.C_im + params.D * x


def _step(
  params: LRUParams, carry: tuple[jax.Array, jax.Array], x_t: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """One step: h_t = lambda h_{t-1} + gamma B x_t, y_t = Re(C h_t) + D x_t."""
  h = _eigenvalues(params) * _complex(carry) + _driven_input(params, x_t)
  return _parts(h), _read_out(params, h, x_t)


def _compose(earlier: tuple, later: tuple) -> tuple:
  """The affine map h -> a h + b applied after another: (a1, b1) then (a2, b2)."""
  a1, b1 = earlier
  a2, b2 = later
  return a2 * a1, a2 * b1 + b2


def _scan(
  kind: str,
  params: LRUParams,
  carry: tuple[jax.Array, jax.Array],
  xs: jax.Array,
  unroll: int | bool = 1,
  *,
  resets: jax.Array | None = None,
  reset_carry: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array, tuple[jax.Array, jax.Array]]:
  """`jax.lax.scan` of `_step` over the leading (time) axis of `xs` [T, batch, H], computed as
  one associative scan or one loop of the elementwise recurrence (`kind`, `lru`'s `scan`): the
  carry after the last step, the outputs and the carries of all steps.

  A reset before step t (`resets[t, b]`, `[T, batch]` bool) makes step t's map constant,
  h -> lambda h_reset + b_t (a_t = 0): the state restarts from `reset_carry`, and nothing, the
  gradient included, crosses from the steps before. `unroll` is the sequential loop's (a
  parallel scan has none).
  """
  lam = _eigenvalues(params)
  b = _driven_input(params, xs)  # [T, batch, N]
  a = jnp.broadcast_to(lam, b.shape)
  entering = lam * _complex(carry)  # the carry in, folded into step 1
  if resets is not None:
    restart = resets[..., None]  # [T, batch, 1]
    a = jnp.where(restart, 0, a)
    if reset_carry is not None:  # else zeros, as `unroll.scan_steps` defaults it
      b = b + jnp.where(restart, lam * _complex(reset_carry), 0)
    entering = jnp.where(restart[0], 0, entering)
  b = b.at[0].add(entering)
  if kind == "associative" or (kind == "auto" and jax.default_backend() != "cpu"):
    _, h = jax.lax.associative_scan(_compose, (a, b))
  else:  # the same maps applied one after another: h_t = a_t h_{t-1} + b_t from h_0 = 0

    def step(h: jax.Array, map_t: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
      h = map_t[0] * h + map_t[1]
      return h, h

    _, h = jax.lax.scan(step, jnp.zeros_like(b[0]), (a, b), unroll=unroll)
  return _parts(h[-1]), _read_out(params, h, xs), _parts(h)


class LRUTraces(NamedTuple):
  """The diagonal sensitivities of an LRU's state h [batch, N] (Zucchet et al. 2023), each as
  its real and imaginary parts: every entry of h depends on its own lambda_i, gamma_i and row
  i of B only, so these are the whole of dh/dtheta for the recurrence's own parameters."""

  lam: tuple[jax.Array, jax.Array]  # dh_i/dlambda_i: [batch, N]
  gamma: tuple[jax.Array, jax.Array]  # dh_i/dgamma_i: [batch, N]
  B: tuple[jax.Array, jax.Array]  # dh_i/dB_re[j, i] (and i times it for B_im): [batch, H, N]


def online_lru(
  state_size: int,
  *,
  r_min: float = 0.0,
  r_max: float = 1.0,
  max_phase: float = 2 * math.pi,
  param_dtype: Any = jnp.float32,
) -> Cell:
  r"""The LRU with the diagonal online sensitivities of Zucchet et al. (2023) in its carry.

  Real-time recurrent learning carries dh_t/dtheta forward in time (see `tbptt_jax.rtrl`).
  For the LRU's diagonal recurrence h_t = lambda * h_{t-1} + gamma * (B x_t), unit i depends
  on lambda_i, gamma_i and row i of B only, so the sensitivities are diagonal too and cost
  about as much as the forward step, O(N H) per stream instead of RTRL's O(N^2 H):

      e_t = lambda e_{t-1} + h_{t-1}            (dh_t/dlambda)
      g_t = lambda g_{t-1} + B x_t              (dh_t/dgamma)
      F_t = lambda F_{t-1} + gamma x_t^T        (dh_t[i]/dB_re[j, i]; i F_t for B_im)

  The step returns h_t with the total derivative these give: its value is h_t, and its
  derivative in the parameters is e (dlambda) + g (dgamma) + F (dB), so that the reverse pass
  of one step (train with `k2=1, style="per_loss"`, or `tbptt_trainer(...,
  gradient="online")`) gives each loss's gradient through every past step since the last
  reset. C, D and the layers after the recurrence read h_t directly, so their gradients
  need no trace.

  **What is exact.** For a network with one LRU layer, the gradient of every parameter of the
  LRU and of everything after it is full BPTT's, to rounding (the tests check 1e-10 at
  float64). Parameters *before* the recurrence (an input projection, lower layers of a stack,
  an embedding) receive the gradient through the present step only, h_t's dependence on x_t
  being gamma B; the paths through earlier steps, h_t's dependence on x_s for s < t, are
  dropped. In a stack of several `online_lru` layers each layer's own parameters therefore get
  their exact sensitivities but an approximate error signal from the layers above (the present
  step's only): the approximation of Zucchet et al., section 3, that they show still learns
  long-range dependencies. `rtrl_cell` gives the exact gradient of any stack, at O(N^2 P).

  Arguments and parameters are those of `lru`: the two cells share `LRUParams`, so a model
  trained online can be evaluated with `lru`'s parallel scan.

  References:
    N. Zucchet, R. Meier, S. Schug, A. Mujika and J. Sacramento, "Online learning of
    long-range dependencies", NeurIPS 2023.
  """
  settings = _settings("online_lru", state_size, r_min, r_max, max_phase, param_dtype)
  return Cell(
    init=functools.partial(_init, settings),
    initial_carry=functools.partial(_online_initial_carry, settings),
    apply=_online_step,
  )


def _online_initial_carry(settings: _Settings, x_t: Any) -> RTRLCarry:
  """Zero state and zero traces: nothing is known before the first step."""
  state = _initial_carry(settings, x_t)
  zeros_bhn = jnp.zeros((x_t.shape[0], x_t.shape[-1], settings.state_size), settings.param_dtype)
  return RTRLCarry(state, LRUTraces(state, state, (zeros_bhn, zeros_bhn)))


def _online_step(
  params: LRUParams, carry: RTRLCarry, x_t: jax.Array
) -> tuple[RTRLCarry, jax.Array]:
  """One step of the state and of its traces; h_t carries the traces' derivative."""
  frozen = jax.lax.stop_gradient(params)
  lam, gamma = _eigenvalues(frozen), jnp.exp(frozen.gamma_log)
  x = jax.lax.stop_gradient(x_t)
  h_prev = _complex(carry.state)
  bx = _projected(frozen, x)  # B x_t, [batch, N]
  h = lam * h_prev + gamma * bx
  traces = carry.sensitivity
  e = lam * _complex(traces.lam) + h_prev
  g = lam * _complex(traces.gamma) + bx
  f = lam * _complex(traces.B) + gamma * x[..., :, None]  # [batch, H, N]
  # Each added term is zero in value; its derivative is one of dh/dtheta's parts, or (the
  # last) the present step's dependence on the input, for the layers below.
  delta_b = (params.B_re - frozen.B_re) + 1j * (params.B_im - frozen.B_im)
  h_total = (
    h
    + e * (_eigenvalues(params) - lam)
    + g * (jnp.exp(params.gamma_log) - gamma)
    + jnp.einsum("bjn,jn->bn", f, delta_b)
    + _driven_input(frozen, x_t - x)
  )
  traces = jax.lax.stop_gradient(LRUTraces(_parts(e), _parts(g), _parts(f)))
  return RTRLCarry(_parts(h_total), traces), _read_out(params, h_total, x_t)
