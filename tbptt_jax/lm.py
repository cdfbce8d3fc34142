r"""Recurrent language models trained with TBPTT: Zaremba et al. (2014) and its presets.

The model reads one token per step and predicts the next:

    e_t = E[w_t],   h_t^(l) = cell_l(h_{t-1}^(l), D(h_t^(l-1))),
    p(w_{t+1} | w_1..w_t) = softmax(V D(h_t^(L)) + c)

with h_t^(0) = e_t, and D dropout on the non-recurrent connections only (the
embedding, between layers and before the softmax; the carried states are never
dropped), as in Zaremba, Sutskever & Vinyals (2014). With tied embeddings
V = E (Press & Wolf 2017; Inan et al. 2017). Every parameter starts uniform in
[-init_scale, init_scale], except an LRU's (`--cell lru`), which keeps the paper's.

The model is a `Cell` whose step input is the token ids `w_t` `[batch]`, or
`(w_t, rng_t)` with per-stream PRNG key data `[batch, 2]` for the dropout
masks (`tbptt_trainer(..., step_rngs=True)` supplies them; a model with
dropout needs them in training); with `rng_t = None`, or token ids alone,
the model is deterministic, as in evaluation. The softmax layer
is the cell's `head`, so training computes it for all steps of a window in one
matrix product, outside the scan (`head_steps`, with its own backward pass).

Evaluation (`evaluator`) is forward only: the state is carried across the
whole evaluation stream, so every token is predicted from all the text before
it in its stream; no truncation is involved.

References:
  Zaremba, Sutskever & Vinyals, "Recurrent Neural Network Regularization",
  arXiv:1409.2329, 2014 (Table 1: the small, medium and large presets).
  Press & Wolf, "Using the Output Embedding to Improve Language Models", EACL 2017.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tbptt_jax import _checks, _files
from tbptt_jax.cells import CELL_NAMES, Cell, cell_by_name, full_step, map_head, map_steps
from tbptt_jax.linear_rnn import LRUParams
from tbptt_jax.streams import batchify
from tbptt_jax.truncation import block_sizes
from tbptt_jax.unroll import scan_steps, time_major


class LMConfig(NamedTuple):
  """The architecture of a language model: everything needed to rebuild it."""

  vocab_size: int
  hidden: int = 200  # embedding size and state size of every layer
  layers: int = 2
  cell: str = "optimized_lstm"  # a `cell_by_name` name
  dropout: float = 0.0  # probability of dropping a non-recurrent activation
  tie_embeddings: bool = False  # softmax weights = embedding matrix
  init_scale: float = 0.1  # every parameter starts uniform in [-init_scale, init_scale]
  embedding_size: int | None = None  # default: hidden (as Zaremba et al.)

  @property
  def embedding_dim(self) -> int:
    return self.hidden if self.embedding_size is None else self.embedding_size


class LMParams(NamedTuple):
  """Parameters of the language model."""

  embedding: jax.Array  # shape=[vocab, embedding_dim], E
  layers: tuple  # one cell's parameters per layer
  softmax: jax.Array | None  # shape=[vocab, hidden], V; None when tied to `embedding`
  bias: jax.Array  # shape=[vocab], c


class Preset(NamedTuple):
  """A training recipe: model, truncation, optimizer and learning-rate schedule.

  The learning rate of epoch e = 1, 2, ... is lr * lr_decay ** max(0, e - decay_after),
  plain SGD on the gradient clipped to global norm `max_grad_norm`.
  """

  hidden: int
  layers: int
  k: int  # TBPTT(k, k): Zaremba's num_steps
  batch_size: int
  init_scale: float
  lr: float
  decay_after: int  # epochs at the full learning rate
  lr_decay: float  # factor per epoch after that
  max_grad_norm: float
  epochs: int
  dropout: float
  valid_ppl: float  # Zaremba et al., Table 1
  test_ppl: float


class _Presets(dict):
  """The presets by name; a missing name is a KeyError that lists the valid ones."""

  def __missing__(self, name: Any) -> Preset:
    raise KeyError(f"no preset {name!r}; the presets are {', '.join(map(repr, self))}")


def preset(name: str) -> Preset:
  """The preset called `name` ("small", "medium" or "large").

  Raises:
    ValueError: naming the valid presets, for any other name.
  """
  if name not in PRESETS:
    raise ValueError(f"preset: no preset {name!r}; the presets are {', '.join(map(repr, PRESETS))}")
  return PRESETS[name]


# Zaremba et al. (2014), Table 1 and section 4.1: 2 layers, batch 20, SGD.
PRESETS = _Presets(
  {
    "small": Preset(200, 2, 20, 20, 0.1, 1.0, 4, 0.5, 5.0, 13, 0.0, 120.7, 114.5),
    "medium": Preset(650, 2, 35, 20, 0.05, 1.0, 6, 1 / 1.2, 5.0, 39, 0.5, 86.2, 82.7),
    "large": Preset(1500, 2, 35, 20, 0.04, 1.0, 14, 1 / 1.15, 10.0, 55, 0.65, 82.2, 78.4),
  }
)


def language_model(config: LMConfig) -> Cell:
  """The recurrent language model of `config`, as a `Cell` with a softmax `head`.

  Step input: token ids `w_t` `[batch]` (int), or `(w_t, rng_t)` with PRNG
  key data `rng_t` `[batch, 2]` (uint32) for the dropout masks, or None for
  no dropout (evaluation). A model with dropout draws its masks from `rng_t`,
  so in training it needs `tbptt_trainer(..., step_rngs=True)`; given token
  ids alone it raises a `ValueError` that says so. A model without dropout
  draws nothing and takes token ids alone. The step output is the top
  layer's (dropped-out) state; `head` maps it to logits `[batch, vocab]`, and
  `head_steps` a window's states to their logits in one product, with the
  backward pass of `_softmax_layer`.

  Args:
    config: the architecture; see `LMConfig`.

  Example:
    >>> model = language_model(LMConfig(vocab_size=10_000, hidden=200, layers=2))
    >>> w_t = jnp.zeros((20,), jnp.int32)
    >>> params = model.init(jax.random.key(0), w_t)
    >>> carry, h_t = model.apply(params, model.initial_carry(w_t), w_t)
    >>> model.head(params, h_t).shape
    (20, 10000)

  References:
    Zaremba, Sutskever & Vinyals 2014, section 3 (dropout on non-recurrent
    connections only).
  """
  config = check_config("language_model", config)
  cells = tuple(cell_by_name(config.cell, config.hidden) for _ in range(config.layers))
  return Cell(
    init=functools.partial(_init, config, cells),
    initial_carry=functools.partial(_initial_carry, config, cells),
    apply=functools.partial(_apply, config, cells),
    head=_head,
    scan=functools.partial(_scan, config, cells),
    head_steps=_head_steps,
  )


def _step_input(config: LMConfig, x_t: Any) -> tuple[Any, Any]:
  """`(w_t, rng_t)` of a step input: `(w_t, rng_t)` itself, or token ids alone (no draws)."""
  if isinstance(x_t, tuple):
    w_t, rng_t = x_t
    return w_t, rng_t
  if config.dropout > 0:
    raise ValueError(
      f"language_model: a model with dropout {config.dropout} takes steps (w_t, rng_t), whose "
      "keys draw its masks, got token ids alone: pass step_rngs=True to tbptt_trainer (or give "
      "(w_t, None) to run it without dropout)"
    )
  return x_t, None


def _init(config: LMConfig, cells: tuple[Cell, ...], rng: jax.Array, x_t: Any) -> LMParams:
  w_t, _ = _step_input(config, x_t)
  batch = jnp.shape(w_t)[0]
  keys = jax.random.split(rng, config.layers + 1)
  layers = []
  h_t = jnp.zeros((batch, config.embedding_dim), jnp.float32)
  for cell, key in zip(cells, keys[1:], strict=True):
    layers.append(cell.init(key, h_t))
    h_t = jnp.zeros((batch, config.hidden), jnp.float32)
  params = LMParams(
    embedding=jnp.zeros((config.vocab_size, config.embedding_dim), jnp.float32),
    layers=tuple(layers),
    softmax=None
    if config.tie_embeddings
    else jnp.zeros((config.vocab_size, config.hidden), jnp.float32),
    bias=jnp.zeros((config.vocab_size,), jnp.float32),
  )
  drawn = uniform_init(keys[0], params, config.init_scale)
  # An LRU keeps its own initialisation: its eigenvalues on the ring and its input normalisation
  # (Orvieto et al.); drawn uniform in +-0.1 instead, every |lambda| would start near exp(-1).
  return jax.tree.map(
    lambda new, own: own if isinstance(own, LRUParams) else new,
    drawn,
    params,
    is_leaf=lambda node: isinstance(node, LRUParams),
  )


def _initial_carry(config: LMConfig, cells: tuple[Cell, ...], x_t: Any) -> tuple:
  w_t, _ = _step_input(config, x_t)
  h_t = jax.ShapeDtypeStruct((jnp.shape(w_t)[0], config.hidden), jnp.float32)
  # Every cell here sizes its carry by its own state size, not by its input.
  return tuple(cell.initial_carry(h_t) for cell in cells)


def _apply(
  config: LMConfig, cells: tuple[Cell, ...], params: LMParams, carry: tuple, x_t: Any
) -> tuple[tuple, jax.Array]:
  w_t, rng_t = _step_input(config, x_t)
  drop = functools.partial(_dropout, _uniforms(config, rng_t), 1.0 - config.dropout)
  h = drop(params.embedding[w_t], 0)
  new_carry = []
  for layer, (cell, layer_params, layer_carry) in enumerate(
    zip(cells, params.layers, carry, strict=True)
  ):
    layer_carry, h = cell.apply(layer_params, layer_carry, h)
    new_carry.append(layer_carry)
    h = drop(h, layer + 1)
  return tuple(new_carry), h


def _scan(
  config: LMConfig,
  cells: tuple[Cell, ...],
  params: LMParams,
  carry: tuple,
  inputs: Any,
  unroll: int | bool = 1,
) -> tuple[tuple, jax.Array, tuple]:
  """`_apply` over a window (`Cell.scan`), layer by layer: the same function, faster.

  Layer l at step t reads only layer l - 1's output at step t, so the window runs
  one layer at a time, each with its cell's own scan where it has one (Flax's LSTMs
  and GRU: `gated`), and the work that does not depend on the carry (the embedding
  lookup, the dropout masks) is done for all steps at once, outside the loops.
  """
  w, rng = _step_input(config, inputs)
  # The masks of every step drawn at once, each from its step's keys as `_apply` draws them.
  uniforms = None if rng is None else jax.vmap(functools.partial(_uniforms, config))(rng)
  drop = functools.partial(_dropout, uniforms, 1.0 - config.dropout)
  h = drop(params.embedding[w], 0)
  finals, carries = [], []
  for layer, (cell, layer_params, layer_carry) in enumerate(
    zip(cells, params.layers, carry, strict=True)
  ):
    run = scan_steps(cell, layer_params, layer_carry, h, unroll=unroll, keep_carries=True)
    h = drop(run.outputs, layer + 1)
    finals.append(run.carry)
    carries.append(run.carries)
  return tuple(finals), h, tuple(carries)


def _uniforms(config: LMConfig, rng_t: Any) -> jax.Array | None:
  """One step's dropout draws, `[batch, layers + 1, width]`, or None without dropout."""
  if rng_t is None or config.dropout == 0:
    return None
  # One draw per stream for all dropout sites of the step (cheaper than one per site).
  keys = jax.vmap(jax.random.wrap_key_data)(rng_t)
  width = max(config.hidden, config.embedding_dim)
  return jax.vmap(jax.random.uniform, (0, None))(keys, (config.layers + 1, width))


def _dropout(uniforms: jax.Array | None, keep: float, h: jax.Array, site: int) -> jax.Array:
  # Inverted dropout, an independent mask per stream: scaled up in training, so
  # evaluation (no masks) needs no correction. `uniforms` and `h` have the same leading
  # axes: `[batch]` for a step, `[time, batch]` for a window.
  if uniforms is None:
    return h
  return jnp.where(uniforms[..., site, : h.shape[-1]] < keep, h / keep, 0.0)


def _softmax_weights(params: LMParams) -> jax.Array:
  """The softmax layer's weights `[vocab, hidden]`: the embedding's when tied."""
  return params.embedding if params.softmax is None else params.softmax


def _head(params: LMParams, h_t: jax.Array) -> jax.Array:
  return h_t @ _softmax_weights(params).T + params.bias


def _head_steps(params: LMParams, hs: jax.Array) -> jax.Array:
  """`_head` on every step of a window, `hs` `[time, batch, hidden]`, as one product."""
  return _softmax_layer(_softmax_weights(params), params.bias, hs)


@jax.custom_vjp
def _softmax_layer(weights: jax.Array, bias: jax.Array, hs: jax.Array) -> jax.Array:
  r"""The logits `hs @ weights.T + bias`, `[..., vocab]`, with the backward pass

      dW = (H^T G)^T,   db = 1^T G,   dH = G W

  for the logits' cotangent G `[..., vocab]`, H and G taken as matrices of one row per step and
  stream. What JAX's transpose would give is the same sums; this layout is faster on XLA's CPU:
  it transposes H (rows x hidden, small) rather than G (rows x vocab, the largest array of the
  update) to reach its row-major matrix product, and takes the bias gradient as a product
  rather than a reduction over the rows. The leading axes are contracted as they are, not
  merged, so a batch axis split over devices stays split (`tbptt_jax.sharding`).
  """
  return hs @ weights.T + bias


def _softmax_layer_forward(weights, bias, hs):
  return _softmax_layer(weights, bias, hs), (weights, hs)


def _softmax_layer_backward(residuals, g):
  weights, hs = residuals
  rows = tuple(range(hs.ndim - 1))  # the leading (step, stream) axes
  # The barrier keeps H^T a row-major array of its own: without it XLA folds the transpose
  # back into the product's dimension numbers, and copies G transposed instead.
  hs_t = jax.lax.optimization_barrier(jnp.moveaxis(hs, -1, 0))
  weights_grad = jax.lax.dot_general(hs_t, g, ((tuple(r + 1 for r in rows), rows), ((), ()))).T
  bias_grad = jax.lax.dot_general(jnp.ones(g.shape[:-1], g.dtype), g, ((rows, rows), ((), ())))
  return weights_grad, bias_grad, g @ weights


_softmax_layer.defvjp(_softmax_layer_forward, _softmax_layer_backward)


def uniform_init(rng: jax.Array, params: Any, scale: float) -> Any:
  """Every leaf of `params` drawn afresh, uniform in [-scale, scale] (Zaremba et al.)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  drawn = [
    jax.random.uniform(key, a.shape, a.dtype, -scale, scale)
    for key, a in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, drawn)


def check_config(where: str, config: Any) -> LMConfig:
  """`config` checked: positive sizes, a known cell, dropout in [0, 1)."""
  if not isinstance(config, LMConfig):
    raise ValueError(f"{where}: config must be an LMConfig, got {type(config).__name__}")
  for name in ("vocab_size", "hidden", "layers"):
    _checks.positive_int(where, f"config.{name}", getattr(config, name))
  if config.cell not in CELL_NAMES:
    raise ValueError(f"{where}: config.cell must be one of {CELL_NAMES}, got {config.cell!r}")
  if not 0.0 <= config.dropout < 1.0:
    raise ValueError(f"{where}: config.dropout must be in [0, 1), got {config.dropout!r}")
  if not config.init_scale > 0:
    raise ValueError(f"{where}: config.init_scale must be > 0, got {config.init_scale!r}")
  if config.embedding_size is not None:
    _checks.positive_int(where, "config.embedding_size", config.embedding_size)
    if config.tie_embeddings and config.embedding_size != config.hidden:
      raise ValueError(
        f"{where}: tied embeddings need config.embedding_size == config.hidden "
        f"({config.hidden}), got {config.embedding_size}"
      )
  return config


def lr_schedule(preset: Preset, updates_per_epoch: int, lr: float | None = None) -> optax.Schedule:
  """The preset's per-epoch learning rate as a function of the update count.

  Epoch e = update // updates_per_epoch + 1 has learning rate
  lr * lr_decay ** max(0, e - decay_after): constant for `decay_after` epochs,
  then divided by 1 / lr_decay each epoch (Zaremba et al., section 4.1).
  """
  base = preset.lr if lr is None else lr
  updates_per_epoch = _checks.positive_int("lr_schedule", "updates_per_epoch", updates_per_epoch)

  def schedule(count: jax.Array) -> jax.Array:
    epoch = count // updates_per_epoch + 1
    return base * preset.lr_decay ** jnp.maximum(0, epoch - preset.decay_after)

  return schedule


def updates_per_epoch(streams: Any, k1: int) -> int:
  """Updates in one pass over language-model streams `[batch, L]`: ceil((L - 1) / k1).

  L - 1 steps (the last token is only a target), in blocks of k1, the last one
  shorter when k1 does not divide L - 1 (`iterate_chunks` with chunks that
  are multiples of k1).
  """
  k1 = _checks.positive_int("updates_per_epoch", "k1", k1)
  return -(-(np.shape(streams)[1] - 1) // k1)


def epoch_loss(update_losses: Any, steps: int, k1: int) -> float:
  """The mean loss per token of an epoch from its updates' block means.

  Every update's loss is the mean over its block; all blocks are k1 steps
  but the last, which is the rest of the `steps`, so the blocks are weighted
  by their lengths.
  """
  update_losses = np.asarray(update_losses, np.float64)
  sizes = block_sizes(steps, k1)
  if len(sizes) != len(update_losses):
    raise ValueError(
      f"epoch_loss: {len(update_losses)} updates of k1 = {k1} steps cannot cover {steps} steps"
    )
  return float(np.sum(update_losses * sizes) / steps)


def zaremba_sgd(
  k: int,
  learning_rate: float | optax.Schedule,
  max_grad_norm: float | None = None,
  optimizer: Callable[..., optax.GradientTransformation] = optax.sgd,
) -> optax.GradientTransformation:
  """SGD on the loss summed over the k steps of a block, as Zaremba et al. train.

  `tbptt_trainer` differentiates the mean loss over the batch and the block's
  steps. Zaremba et al. (and TensorFlow's PTB tutorial) minimise the loss
  summed over the k steps and averaged over the batch, whose gradient is k
  times larger; their learning rate 1 and clipping norm 5 are in those units.
  So the gradient is scaled by k, then (optionally) clipped, then the step
  taken: the same updates as theirs (PyTorch's word_language_model writes the
  same thing as lr 20, clip 0.25 on the mean loss at k = 20).

  Clipping the summed loss's gradient at c is clipping the mean loss's at
  c / k before the scaling, which is what `tbptt-jax train` does:
  `tbptt_trainer(..., zaremba_sgd(k, lr), max_grad_norm=c / k)`, so that the
  trainer's metrics report the clipping.

  Args:
    k: the block length k1.
    learning_rate: a float or an optax schedule (e.g. `lr_schedule`).
    max_grad_norm: the clipping norm of the summed loss's gradient, or None.
    optimizer: an optax optimizer factory taking the learning rate.
  """
  k = _checks.positive_int("zaremba_sgd", "k", k)
  clip = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
  return optax.chain(optax.scale(float(k)), *clip, optimizer(learning_rate))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example negative log-likelihood in nats, `[batch]`: the training loss.

  Args:
    logits: `[batch, vocab]`, floating point.
    targets: `[batch]` integer token ids.

  Raises:
    ValueError: if `logits` are not floating point or `targets` not integers (e.g. the two
      swapped), naming which (checked when traced, so free under `jax.jit`).
  """
  if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
    raise ValueError(
      f"cross_entropy: logits must be floating point [batch, vocab], got {jnp.result_type(logits)}"
      f"{list(jnp.shape(logits))} (are logits and targets swapped?)"
    )
  if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
    raise ValueError(
      f"cross_entropy: targets must be integer token ids [batch], got "
      f"{jnp.result_type(targets)}{list(jnp.shape(targets))}"
    )
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


class Evaluation(NamedTuple):
  """The result of evaluating a model on a token stream."""

  loss: float  # mean negative log-likelihood per predicted token, nats
  tokens: int  # tokens predicted

  @property
  def perplexity(self) -> float:
    return math.exp(self.loss)

  @property
  def bits_per_token(self) -> float:
    return self.loss / math.log(2)


def evaluator(
  model: Cell, *, batch_size: int = 1, chunk_len: int | None = None
) -> Callable[[Any, Any], Evaluation]:
  """A function `evaluate(params, tokens) -> Evaluation` with the state carried throughout.

  `tokens` (1-D) is cut into `batch_size` streams (`batchify`); each stream is
  run forward from the initial carry to its end, `chunk_len` steps per jitted
  call, the state carried from chunk to chunk, and every token after a
  stream's first is scored given all the tokens before it in its stream. The
  result does not depend on `chunk_len`. No dropout: the model gets
  `rng_t = None`.

  Args:
    model: a model of `language_model`, or any `Cell` whose step input is
      `(w_t, rng_t)` and whose `head` gives the logits.
    batch_size: evaluation streams (1 scores every token after the first with
      the whole text before it; more streams are faster).
    chunk_len: steps per jitted call; default about 1000 tokens per call, which
      bounds the memory of the logits (`[tokens, vocab]` floats per call).
  """
  where = "evaluator"
  batch_size = _checks.positive_int(where, "batch_size", batch_size)
  if chunk_len is None:
    chunk_len = max(1, 1024 // batch_size)
  chunk_len = _checks.positive_int(where, "chunk_len", chunk_len)

  @jax.jit
  def chunk_loss(params, carry, inputs, targets):
    xs = time_major(inputs)
    # The model itself, not its step: its own scan, where it has one, runs the window.
    run = scan_steps(model, params, carry, map_steps(model.embed, params, (xs, None)))
    logits = map_head(model, params, run.outputs)
    return run.carry, jnp.sum(jax.vmap(cross_entropy)(logits, time_major(targets)))

  def evaluate(params: Any, tokens: Any) -> Evaluation:
    _check_token_ids(where, "tokens", tokens, _vocab_size(model, params))
    streams = batchify(tokens, batch_size)
    if streams.shape[1] < 2:
      raise ValueError(
        f"{where}: tokens must give each of the {batch_size} streams at least 2 tokens, "
        f"got {len(np.asarray(tokens))} tokens"
      )
    carry = model.initial_carry((jnp.zeros((batch_size,), jnp.int32), None))
    total = 0.0
    for start in range(0, streams.shape[1] - 1, chunk_len):
      stop = min(start + chunk_len, streams.shape[1] - 1)
      carry, loss = chunk_loss(
        params, carry, streams[:, start:stop], streams[:, start + 1 : stop + 1]
      )
      total += float(loss)  # float64 on the host: exact over millions of tokens
    count = batch_size * (streams.shape[1] - 1)
    return Evaluation(total / count, count)

  return evaluate


def sample(
  model: Cell,
  params: Any,
  prompt: Any,
  length: int,
  rng: jax.Array,
  *,
  temperature: float = 1.0,
) -> np.ndarray:
  """Generates `length` tokens after `prompt`, the state carried from the prompt on.

  No dropout: the model gets `rng_t = None`.

  Args:
    model: a model of `language_model`, or any `Cell` whose step input is
      `(w_t, rng_t)` and whose `head` gives the logits.
    params: its parameters.
    prompt: 1-D token ids, at least one.
    length: tokens to generate.
    rng: PRNG key for sampling.
    temperature: logits are divided by it; smaller is greedier.

  Returns:
    The generated ids, a NumPy array `[length]`.
  """
  where = "sample"
  prompt = np.asarray(prompt)
  if prompt.ndim != 1 or len(prompt) < 1:
    raise ValueError(f"{where}: prompt must be a 1-D array of one or more ids, got {prompt!r}")
  _check_token_ids(where, "prompt", prompt, _vocab_size(model, params))
  length = _checks.positive_int(where, "length", length)
  if not temperature > 0:
    raise ValueError(f"{where}: temperature must be > 0, got {temperature!r}")
  return np.asarray(_sample(model, params, jnp.asarray(prompt), length, rng, temperature))[:, 0]


def _vocab_size(model: Cell, params: Any) -> int:
  """The number of classes the model scores: the size of its logits."""
  x_t = (jax.ShapeDtypeStruct((1,), jnp.int32), None)

  def logits(params, x_t):
    _, y_t = full_step(model)(params, model.initial_carry(x_t), x_t)
    return y_t if model.head is None else model.head(params, y_t)

  return jax.eval_shape(logits, params, x_t).shape[-1]


def _check_token_ids(where: str, name: str, tokens: Any, vocab_size: int) -> None:
  """Token ids index the embedding and the logits: out of range, JAX would clamp them."""
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{where}: {name} must be integer token ids, got dtype {tokens.dtype}")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
    raise ValueError(
      f"{where}: {name} must be ids in [0, {vocab_size}) for this model's vocabulary, got {bad}"
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _sample(model, params, prompt, length, rng, temperature):
  carry = model.initial_carry((prompt[:1], None))
  # The prompt but its last token only sets the state.
  run = scan_steps(full_step(model), params, carry, (prompt[:-1, None], None), keep_outputs=False)

  def step(state, key):
    carry, w_t = state
    carry, h_t = full_step(model)(params, carry, (w_t, None))
    logits = model.head(params, h_t) / temperature
    w_next = jax.random.categorical(key, logits)
    return (carry, w_next), w_next

  _, tokens = jax.lax.scan(step, (run.carry, prompt[-1:]), jax.random.split(rng, length))
  return tokens


# Model files: `save_model` / `load_model`.
_FORMAT = "tbptt_jax.language_model"
_VERSION = 1


def save_model(path: str, config: LMConfig, params: Any, extra: dict | None = None) -> None:
  """Writes a model file: config, parameters and `extra` (e.g. the vocabulary), atomically.

  The bytes go to `path + ".tmp"`, are flushed to disk, then renamed over
  `path`: a crash leaves the previous file intact. The format is msgpack
  (`flax.serialization`), readable without tbptt_jax.
  """
  payload = {
    "format": _FORMAT,
    "version": _VERSION,
    "config": config._asdict(),
    "params": flax.serialization.to_state_dict(jax.device_get(params)),
    "extra": extra or {},
  }
  _files.atomic_write(path, flax.serialization.msgpack_serialize(payload))


def load_model(path: str) -> tuple[LMConfig, LMParams, dict]:
  """Reads a file written by `save_model`: `(config, params, extra)`.

  Raises a `ValueError` naming `path` if it is missing, not a model file, or
  its parameters do not match its config.
  """
  where = "load_model"
  payload = _files.read_format(
    where, path, "model file", _FORMAT, _VERSION, flax.serialization.msgpack_restore
  )
  try:
    config = check_config(where, LMConfig(**payload["config"]))
  except (TypeError, KeyError) as e:
    raise ValueError(f"{where}: {path!r} has a malformed config: {e}") from None
  model = language_model(config)
  x_t = (jax.ShapeDtypeStruct((1,), jnp.int32), None)
  template = jax.eval_shape(model.init, jax.random.key(0), x_t)
  try:
    params = flax.serialization.from_state_dict(template, payload["params"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{where}: {path!r}: parameters do not match the config: {e}") from None
  shapes = [jnp.shape(a) for a in jax.tree.leaves(params)]
  if shapes != [a.shape for a in jax.tree.leaves(template)]:
    raise ValueError(f"{where}: {path!r}: parameter shapes do not match the config")
  return config, jax.tree.map(jnp.asarray, params), payload.get("extra", {})
