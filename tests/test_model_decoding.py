"""Key/value-cached decoding equals the uncached forward under the matching attention mask."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimo_jax.model import (ModelConfig, Unimo, init_cache, init_variables, masks,
                             reorder_cache)

STEPS = 4


def random_params(cfg, seed):
  shapes = nn.unbox(jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0))))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = rng.normal(size=s.shape) * 0.05
    return (x + 1.0 if path[-1].key == "scale" else x).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)["params"]


def run(cfg, params, *args, method):
  """Jitted uncached forward ``Unimo(cfg).apply(..., method=method)``."""
  return jax.jit(lambda p, *a: Unimo(cfg).apply({"params": p}, *a, method=method))(params, *args)


def cached(cfg, params, tokens, **prefix):
  """Prefill the prefix, then feed tokens [B, STEPS] one at a time through decode_step.
  Returns logits [B, STEPS, V], hidden [B, STEPS, H] and the final cache."""
  model = Unimo(cfg)

  @jax.jit
  def go(p, tokens, prefix):
    _, cache = model.apply({"params": p}, STEPS, method=Unimo.prefill, **prefix)

    def step(cache, token):  # a scan, as generation runs it inside a loop
      out, cache = model.apply({"params": p}, token, cache, method=Unimo.decode_step)
      return cache, (out["logits"], out["hidden"])
    cache, (logits, hidden) = jax.lax.scan(step, cache, tokens.T)
    return logits.swapaxes(0, 1), hidden.swapaxes(0, 1), cache
  return go(params, tokens, prefix)


def test_captioning_cache_equals_uncached_regions_with_padding():
  cfg = ModelConfig.tiny(visual_input="regions", roberta_positions=True)
  params = random_params(cfg, 0)
  rng = np.random.default_rng(0)
  b, r = 2, 5
  visual = dict(region_features=rng.normal(size=(b, r, cfg.region_feature_dim)).astype(np.float32),
                region_boxes=rng.uniform(size=(b, r, 5)).astype(np.float32),
                region_valid=np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool))
  tokens = np.concatenate([np.full((b, 1), cfg.cls_id), rng.integers(4, 999, (b, STEPS - 1))],
                          1).astype(np.int32)
  logits, hidden, cache = cached(cfg, params, tokens, visual=visual)

  visual_valid = np.concatenate([np.ones((b, 1), bool), visual["region_valid"]], 1)
  bias = masks.to_bias(masks.captioning(1 + r, np.ones((b, STEPS)), visual_valid))
  full = run(cfg, params, visual, tokens, bias, method=Unimo.encode_pair)
  want_logits = run(cfg, params, full["text_hidden"], np.tile(np.arange(STEPS), (b, 1)),
                    method=Unimo.lm_logits)
  np.testing.assert_allclose(hidden, full["text_hidden"], atol=2e-5)
  np.testing.assert_allclose(logits, want_logits, atol=1e-4)
  assert int(cache["index"]) == 1 + r + STEPS
  np.testing.assert_array_equal(cache["position"], cfg.position_offset + STEPS)


def test_captioning_cache_patches_and_reorder():
  cfg = ModelConfig.tiny()
  params = random_params(cfg, 1)
  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  tokens = rng.integers(4, 999, (3, STEPS)).astype(np.int32)
  logits, hidden, _ = cached(cfg, params, tokens, visual={"pixels": pixels})
  bias = masks.to_bias(masks.captioning(1 + cfg.num_patches, np.ones((3, STEPS))))
  full = run(cfg, params, {"pixels": pixels}, tokens, bias, method=Unimo.encode_pair)
  np.testing.assert_allclose(hidden, full["text_hidden"], atol=2e-5)

  # beam bookkeeping: reordering the cache rows == decoding the reordered batch
  rows = np.array([2, 0, 0, 1])
  model = Unimo(cfg)

  @jax.jit
  def first_step(p, pixels, token):
    _, cache = model.apply({"params": p}, 2, visual={"pixels": pixels}, method=Unimo.prefill)
    cache = reorder_cache(cache, rows)
    return model.apply({"params": p}, token, cache, method=Unimo.decode_step)[0]
  out = first_step(params, pixels, tokens[rows, 0])
  np.testing.assert_allclose(out["hidden"], hidden[rows, 0], atol=2e-5)


def test_seq2seq_cache_equals_uncached_with_padded_source():
  cfg = ModelConfig.tiny(roberta_positions=True)
  params = random_params(cfg, 2)
  rng = np.random.default_rng(2)
  source = np.full((2, 6), cfg.pad_id, np.int32)
  source[0, :6] = [0, 11, 12, 13, 14, 2]
  source[1, :3] = [0, 21, 2]
  tokens = np.concatenate([np.full((2, 1), cfg.cls_id), rng.integers(4, 999, (2, STEPS - 1))],
                          1).astype(np.int32)
  logits, hidden, cache = cached(cfg, params, tokens, ids=source)

  ids = np.concatenate([source, tokens], 1)
  segments = np.concatenate([np.where(source != cfg.pad_id, 1, 0), np.full((2, STEPS), 2)], 1)
  full = run(cfg, params, ids, masks.to_bias(masks.seq2seq(segments)), method=Unimo.encode_text)
  np.testing.assert_allclose(hidden, full["hidden"][:, 6:], atol=2e-5)
  want = run(cfg, params, full["hidden"], np.tile(np.arange(6, 6 + STEPS), (2, 1)),
             method=Unimo.lm_logits)
  np.testing.assert_allclose(logits, want, atol=1e-4)
  # positions continue after the real source tokens (RoBERTa offset 2)
  np.testing.assert_array_equal(cache["position"], [2 + 6 + STEPS, 2 + 3 + STEPS])


def test_decoding_from_an_empty_cache_is_a_causal_lm():
  cfg = ModelConfig.tiny(pre_ln=True)
  params = random_params(cfg, 3)
  tokens = np.random.default_rng(3).integers(4, 999, (2, STEPS)).astype(np.int32)
  model = Unimo(cfg)

  @jax.jit
  def decode(p, tokens):
    def step(cache, token):
      out, cache = model.apply({"params": p}, token, cache, method=Unimo.decode_step)
      return cache, out["hidden"]
    return jax.lax.scan(step, init_cache(cfg, 2, STEPS), tokens.T)[1].swapaxes(0, 1)
  causal = masks.seq2seq(np.full((2, STEPS), 2))
  full = run(cfg, params, tokens, masks.to_bias(causal), method=Unimo.encode_text)
  np.testing.assert_allclose(decode(params, tokens), full["hidden"], atol=2e-5)
