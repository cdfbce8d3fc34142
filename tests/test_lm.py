"""Tests of `tbptt_jax.lm`: the language model, its presets, evaluation and model files."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scan_checks import scan_of_apply, scan_summary

import tbptt_jax
from tbptt_jax import lm
from tbptt_jax.cells import map_steps

VOCAB, BATCH = 11, 3


def config(**overrides):
  return lm.LMConfig(**{"vocab_size": VOCAB, "hidden": 6, "layers": 2, **overrides})


def init(cfg, batch=BATCH, seed=0):
  model = lm.language_model(cfg)
  x_t = (jnp.zeros((batch,), jnp.int32), None)
  return model, model.init(jax.random.key(seed), x_t)


def tokens(n, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int32)


def stream_nll_in_one_piece(model, params, stream):
  """The mean NLL of one stream run through a single scan, the head on every step."""
  carry = model.initial_carry((jnp.zeros((1,), jnp.int32), None))

  def step(carry, w_t):
    carry, h_t = model.apply(params, carry, (w_t[None], None))
    return carry, h_t

  _, hs = jax.lax.scan(step, carry, jnp.asarray(stream[:-1]))
  logits = model.head(params, hs[:, 0])
  return float(jnp.mean(lm.cross_entropy(logits, jnp.asarray(stream[1:]))))


def test_model_structure_and_uniform_init():
  model, params = init(config(init_scale=0.05))
  assert params.embedding.shape == (VOCAB, 6) and params.softmax.shape == (VOCAB, 6)
  assert params.bias.shape == (VOCAB,) and len(params.layers) == 2
  values = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)])
  assert np.abs(values).max() <= 0.05
  # U(-a, a) has standard deviation a / sqrt(3); over about 1,000 draws within 10%.
  np.testing.assert_allclose(values.std(), 0.05 / np.sqrt(3), rtol=0.1)
  carry = model.initial_carry((jnp.zeros((BATCH,), jnp.int32), None))
  carry, h_t = model.apply(params, carry, (jnp.arange(BATCH), None))
  assert h_t.shape == (BATCH, 6) and model.head(params, h_t).shape == (BATCH, VOCAB)


def test_embedding_size_differs_from_the_state_size():
  model, params = init(config(embedding_size=5, cell="elman", dropout=0.2))
  assert params.embedding.shape == (VOCAB, 5) and params.layers[0].U.shape == (5, 6)
  x_t = (jnp.arange(BATCH), jax.random.key_data(jax.random.split(jax.random.key(0), BATCH)))
  _, h_t = model.apply(params, model.initial_carry(x_t), x_t)
  assert h_t.shape == (BATCH, 6)


def test_tied_embeddings_share_the_embedding_matrix():
  model, params = init(config(tie_embeddings=True))
  assert params.softmax is None
  h_t = jnp.ones((BATCH, 6))
  np.testing.assert_allclose(
    model.head(params, h_t), h_t @ params.embedding.T + params.bias, rtol=1e-6
  )


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
  model, params = init(config())
  params = params._replace(softmax=jnp.zeros_like(params.softmax), bias=jnp.zeros(VOCAB))
  result = lm.evaluator(model, batch_size=2, chunk_len=4)(params, tokens(41))
  assert result.tokens == 2 * (20 - 1)
  np.testing.assert_allclose(result.perplexity, VOCAB, rtol=1e-5)
  np.testing.assert_allclose(result.bits_per_token, math.log2(VOCAB), rtol=1e-5)


def test_evaluation_carries_the_state_across_chunks():
  """Chunked evaluation with the carried state equals one scan over the whole stream."""
  model, params = init(config())
  stream = tokens(30, seed=1)
  want = stream_nll_in_one_piece(model, params, stream)
  for chunk_len in (1, 4, 7, 100):
    got = lm.evaluator(model, batch_size=1, chunk_len=chunk_len)(params, stream)
    assert got.tokens == 29
    np.testing.assert_allclose(got.loss, want, rtol=1e-6)


def test_evaluation_has_no_dropout():
  cfg = config(dropout=0.5)
  model, params = init(cfg)
  stream = tokens(25, seed=2)
  got = lm.evaluator(model, batch_size=1, chunk_len=6)(params, stream)
  deterministic = lm.language_model(cfg._replace(dropout=0.0))
  np.testing.assert_allclose(got.loss, stream_nll_in_one_piece(deterministic, params, stream))


def test_dropout_in_training_drops_and_rescales_non_recurrent_activations():
  keep = 0.7
  model, params = init(config(hidden=500, layers=1, dropout=1 - keep), batch=4)
  x_t = jnp.arange(4)
  carry = model.initial_carry((x_t, None))
  rng_t = jax.random.key_data(jax.random.split(jax.random.key(3), 4))
  carry_train, h_train = model.apply(params, carry, (x_t, rng_t))
  carry_eval, h_eval = model.apply(params, carry, (x_t, None))
  dropped = np.asarray(h_train == 0)
  assert 0.25 < dropped.mean() < 0.35  # 2,000 Bernoulli(0.3) draws
  # The carried state is never dropped, only what flows to the next layer or softmax.
  assert not np.any(np.asarray(carry_train[0][1]) == 0)
  # Kept units are the layer's output scaled by 1 / keep; the layer's input was dropped
  # too, so compare with the step's own carried state h_t, not with evaluation's.
  np.testing.assert_allclose(
    np.asarray(h_train)[~dropped], np.asarray(carry_train[0][1] / keep)[~dropped], rtol=1e-6
  )
  assert not np.any(np.asarray(h_eval) == 0)
  # Different streams get different masks.
  assert not np.array_equal(dropped[0], dropped[1])


def test_the_window_scan_is_the_scan_of_the_step_with_the_same_dropout_masks():
  """The model's own scan (embedding and masks for all steps at once, then each layer's LSTM
  scan) is `jax.lax.scan` of its step, values and gradients, at float64."""
  cfg = config(cell="optimized_lstm", dropout=0.3)
  model, params = init(cfg)
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    carry = jax.tree.map(
      lambda c: jnp.asarray(rng.standard_normal(c.shape)),
      model.initial_carry((tokens(BATCH), None)),
    )
    keys = jnp.asarray(rng.integers(0, 2**32, (5, BATCH, 2)), jnp.uint32)
    xs = (jnp.asarray(tokens(5 * BATCH).reshape(5, BATCH)), keys)
    # The inputs are integers (tokens and keys): gradients with respect to params and carry.
    got = scan_summary(lambda p, c, x: model.scan(p, c, x, 1), params, carry, xs, wrt=(0, 1))
    want = scan_summary(
      lambda p, c, x: scan_of_apply(model, p, c, x, 1), params, carry, xs, wrt=(0, 1)
    )
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)


def head_summary(head_steps, params, hs):
  """A weighted sum of a window's logits and its gradients with respect to params and states."""
  weights = jnp.sin(jnp.arange(VOCAB) + 1.0)
  return jax.value_and_grad(lambda p, h: jnp.sum(weights * head_steps(p, h)), (0, 1))(params, hs)


@pytest.mark.parametrize("tie", [False, True])
def test_the_window_head_is_the_step_head_over_every_step(tie):
  """`head_steps` (one product, its own backward pass) is vmap of `head`, values and gradients
  at float64; a wrong gradient is caught."""
  model, params32 = init(config(tie_embeddings=tie))
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params32)
    hs = jnp.asarray(rng.standard_normal((4, BATCH, 6)))
    got = head_summary(model.head_steps, params, hs)
    want = head_summary(lambda p, h: map_steps(model.head, p, h), params, hs)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)

    @jax.custom_vjp
    def off(weights, bias, hs):  # the softmax layer, its bias gradient 1e-9 too large
      return hs @ weights.T + bias

    def backward(residuals, g):
      dw, db, dh = lm._softmax_layer_backward(residuals, g)
      return dw, db * (1 + 1e-9), dh

    off.defvjp(lm._softmax_layer_forward, backward)

    def broken(p, h):
      return off(lm._softmax_weights(p), p.bias, h)

    with pytest.raises(AssertionError):
      chex.assert_trees_all_close(head_summary(broken, params, hs), want, rtol=1e-12, atol=1e-12)


def test_the_engine_applies_the_window_head():
  """The window's gradient goes through `head_steps` (doubled logits: another gradient), and
  equals the one through vmap of `head`."""
  model, params32 = init(config())
  xs, ys = tokens(4 * BATCH).reshape(BATCH, 4), tokens(4 * BATCH, seed=1).reshape(BATCH, 4)
  doubled = model._replace(head_steps=lambda p, h: 2.0 * model.head_steps(p, h))
  carry = model.initial_carry(xs[:, 0])
  grads = [
    tbptt_jax.cell_gradients(m, lm.cross_entropy, tbptt_jax.Truncation(4), params32, carry, xs, ys)
    for m in (model, doubled, model._replace(head_steps=None))
  ]
  assert not np.allclose(grads[0][0].bias, grads[1][0].bias)
  with pytest.raises(ValueError, match="head_steps is set without head"):
    tbptt_jax.cell_gradients(
      model._replace(head=None), lm.cross_entropy, tbptt_jax.Truncation(4), params32, carry, xs, ys
    )
  chex.assert_trees_all_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)


def test_a_model_without_dropout_takes_token_ids_alone():
  """No dropout, no draws: plain token steps train without step_rngs, as (w_t, None) steps do."""
  model, params = init(config())
  w_t = jnp.arange(BATCH)
  carry = model.initial_carry(w_t)
  chex.assert_trees_all_equal(
    model.apply(params, carry, w_t), model.apply(params, carry, (w_t, None))
  )
  streams = tokens(3 * 21).reshape(3, 21)
  trainer = tbptt_jax.tbptt_trainer(model, lm.cross_entropy, optax.sgd(0.1), k1=4)
  state = trainer.init(jax.random.key(0), streams[:, :4])
  state, metrics = trainer.update(state, streams[:, :-1], streams[:, 1:])
  assert metrics.loss.shape == (5,) and np.all(np.isfinite(metrics.loss))


def test_a_model_with_dropout_given_token_ids_alone_asks_for_step_rngs():
  model = lm.language_model(config(dropout=0.5))
  trainer = tbptt_jax.tbptt_trainer(model, lm.cross_entropy, optax.sgd(0.1), k1=4)
  with pytest.raises(ValueError, match=r"dropout 0.5 takes steps \(w_t, rng_t\).*step_rngs=True"):
    trainer.init(jax.random.key(0), tokens(12).reshape(3, 4))
  with_rngs = tbptt_jax.tbptt_trainer(model, lm.cross_entropy, optax.sgd(0.1), k1=4, step_rngs=True)
  assert with_rngs.init(jax.random.key(0), tokens(12).reshape(3, 4)).step == 0


def test_lr_schedule_follows_zaremba():
  small = lm.lr_schedule(lm.PRESETS["small"], updates_per_epoch=10)
  assert [float(small(10 * e)) for e in range(7)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]
  medium = lm.lr_schedule(lm.PRESETS["medium"], updates_per_epoch=3)
  np.testing.assert_allclose(float(medium(3 * 6)), 1 / 1.2, rtol=1e-6)  # epoch 7
  np.testing.assert_allclose(float(medium(3 * 7)), 1 / 1.44, rtol=1e-6)
  assert float(lm.lr_schedule(lm.PRESETS["small"], 10, lr=0.3)(0)) == pytest.approx(0.3)


def test_epoch_bookkeeping():
  streams = np.zeros((4, 46), np.int32)  # 45 steps per stream
  assert lm.updates_per_epoch(streams, 20) == 3  # 20 + 20 + 5
  assert lm.updates_per_epoch(streams, 45) == 1
  # Blocks of 20, 20 and 5 steps: the last block's mean weighs 5 / 45.
  np.testing.assert_allclose(lm.epoch_loss([1.0, 2.0, 4.0], 45, 20), (20 + 40 + 20) / 45)
  with pytest.raises(ValueError, match="cannot cover 70 steps"):
    lm.epoch_loss([1.0, 2.0, 4.0], 70, 20)


def test_presets_match_zaremba_table_1():
  small, medium, large = (lm.PRESETS[name] for name in ("small", "medium", "large"))
  assert (small.hidden, small.k, small.epochs, small.max_grad_norm, small.dropout) == (
    200,
    20,
    13,
    5.0,
    0.0,
  )
  assert (medium.hidden, medium.k, medium.epochs, medium.dropout) == (650, 35, 39, 0.5)
  assert (large.hidden, large.init_scale, large.max_grad_norm, large.dropout) == (
    1500,
    0.04,
    10.0,
    0.65,
  )
  assert all(p.batch_size == 20 and p.layers == 2 and p.lr == 1.0 for p in lm.PRESETS.values())


def test_zaremba_sgd_scales_by_k_then_clips():
  k, lr, clip = 20, 0.5, 5.0
  optimizer = lm.zaremba_sgd(k, lr, clip)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([0.1, -0.2, 0.05])}  # the mean-loss gradient
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  summed = k * grads["w"]
  want = -lr * summed * min(1.0, clip / float(jnp.linalg.norm(summed)))
  np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
  small = {"w": jnp.array([1e-3, 0.0, 0.0])}  # below the clip norm: plain SGD on the sum
  updates, _ = optimizer.update(small, optimizer.init(params), params)
  np.testing.assert_allclose(updates["w"], -lr * k * small["w"], rtol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_model_file_round_trip(tmp_path, tie):
  cfg = config(tie_embeddings=tie, dropout=0.25)
  _, params = init(cfg)
  path = str(tmp_path / "model.msgpack")
  lm.save_model(path, cfg, params, {"vocabulary": {"tokens": ["a", "b"]}})
  got_cfg, got_params, extra = lm.load_model(path)
  assert got_cfg == cfg and extra == {"vocabulary": {"tokens": ["a", "b"]}}
  chex.assert_trees_all_equal(got_params, params)
  assert not (tmp_path / "model.msgpack.tmp").exists()


def test_model_file_errors(tmp_path):
  missing = tmp_path / "missing.msgpack"
  with pytest.raises(ValueError, match="cannot read model file .*missing.msgpack"):
    lm.load_model(str(missing))
  corrupt = tmp_path / "corrupt.msgpack"
  corrupt.write_bytes(b"\xc1\xff not msgpack")
  with pytest.raises(ValueError, match="corrupt.msgpack.* is not a tbptt_jax model file"):
    lm.load_model(str(corrupt))
  foreign = tmp_path / "foreign.msgpack"
  foreign.write_bytes(
    __import__("flax").serialization.msgpack_serialize({"format": "other", "x": 1})
  )
  with pytest.raises(ValueError, match="foreign.msgpack.* is not a tbptt_jax model file"):
    lm.load_model(str(foreign))
  # Parameters of another size than the config says.
  cfg = config()
  _, params = init(cfg)
  mismatched = tmp_path / "mismatched.msgpack"
  lm.save_model(str(mismatched), cfg._replace(hidden=7), params)
  with pytest.raises(ValueError, match="mismatched.msgpack.*do not match the config"):
    lm.load_model(str(mismatched))
  truncated = tmp_path / "truncated.msgpack"
  lm.save_model(str(truncated), cfg, params)
  truncated.write_bytes(truncated.read_bytes()[:100])
  with pytest.raises(ValueError, match="truncated.msgpack"):
    lm.load_model(str(truncated))


def test_sample_is_reproducible_and_in_range():
  model, params = init(config())
  got = lm.sample(model, params, [1, 2, 3], 12, jax.random.key(0), temperature=0.8)
  assert got.shape == (12,) and got.min() >= 0 and got.max() < VOCAB
  np.testing.assert_array_equal(
    got, lm.sample(model, params, [1, 2, 3], 12, jax.random.key(0), temperature=0.8)
  )
  # Near-zero temperature is greedy: the first token is the argmax after the prompt.
  carry = model.initial_carry((jnp.zeros((1,), jnp.int32), None))
  for w in (1, 2, 3):
    carry, h_t = model.apply(params, carry, (jnp.array([w]), None))
  greedy = lm.sample(model, params, [1, 2, 3], 1, jax.random.key(5), temperature=1e-4)
  assert greedy[0] == int(jnp.argmax(model.head(params, h_t)[0]))


def test_presets_are_looked_up_by_a_function_that_lists_them():
  assert lm.preset("small") is lm.PRESETS["small"]
  with pytest.raises(ValueError, match="preset: no preset 'tiny'; the presets are 'small', "):
    lm.preset("tiny")
  with pytest.raises(KeyError, match="no preset 'tiny'; the presets are 'small', 'medium'"):
    lm.PRESETS["tiny"]


def test_cross_entropy_names_float_targets_and_swapped_arguments():
  logits, targets = jnp.zeros((BATCH, VOCAB)), jnp.array([0, 3, 10])
  with pytest.raises(ValueError, match=r"targets must be integer token ids \[batch\], got float32"):
    lm.cross_entropy(logits, targets.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"logits must be floating point .* swapped"):
    lm.cross_entropy(targets, logits)


@pytest.mark.parametrize(
  "call,message",
  [
    (lambda: lm.language_model(config(cell="rnn")), "config.cell must be one of"),
    (lambda: lm.language_model(config(dropout=1.0)), r"config.dropout must be in \[0, 1\)"),
    (lambda: lm.language_model(config(hidden=0)), "config.hidden must be an integer >= 1"),
    (lambda: lm.language_model({"vocab_size": 3}), "config must be an LMConfig"),
    (
      lambda: lm.language_model(config(tie_embeddings=True, embedding_size=4)),
      r"tied embeddings need config.embedding_size == config.hidden \(6\), got 4",
    ),
    (lambda: lm.evaluator(lm.language_model(config()), batch_size=0), "batch_size"),
    (lambda: lm.sample(*init(config()), [], 3, jax.random.key(0)), "prompt must be"),
    (lambda: lm.sample(*init(config()), [1], 3, jax.random.key(0), temperature=0), "temperature"),
    (lambda: lm.zaremba_sgd(0, 1.0, 5.0), "k must be an integer >= 1"),
    # Out-of-range ids would be clamped by the embedding and the loss: a silent wrong answer.
    (lambda: lm.sample(*init(config()), [1, VOCAB], 3, jax.random.key(0)), f"got {VOCAB}"),
    (
      lambda: lm.evaluator(lm.language_model(config()))(init(config())[1], np.arange(-1, 5)),
      rf"tokens must be ids in \[0, {VOCAB}\) for this model's vocabulary, got -1",
    ),
    (
      lambda: lm.evaluator(lm.language_model(config()))(init(config())[1], np.ones(5)),
      "tokens must be integer token ids, got dtype float64",
    ),
  ],
)
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_evaluation_of_too_short_a_stream():
  model, params = init(config())
  with pytest.raises(ValueError, match="at least 2 tokens"):
    lm.evaluator(model, batch_size=4)(params, tokens(7))


def test_cross_entropy_is_optax():
  logits = jax.random.normal(jax.random.key(0), (BATCH, VOCAB))
  targets = jnp.array([0, 3, 10])
  np.testing.assert_array_equal(
    lm.cross_entropy(logits, targets),
    optax.softmax_cross_entropy_with_integer_labels(logits, targets),
  )


def test_an_lru_layer_keeps_its_own_initialisation():
  """The uniform +-init_scale draw covers every parameter but an LRU's: its |lambda| stay on the
  paper's ring (uniform in area on [0, 1] here), not near exp(-exp(+-0.1)) ~ 0.37."""
  model = lm.language_model(lm.LMConfig(vocab_size=50, hidden=64, layers=1, cell="lru"))
  params = model.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
  projection, lru_params, _ = params.layers[0]
  modulus = np.exp(-np.exp(np.asarray(lru_params.nu_log)))
  assert modulus.max() > 0.6 and modulus.min() < 0.2, modulus
  assert float(jnp.abs(projection["params"]["kernel"]).max()) <= 0.1
