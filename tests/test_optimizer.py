"""AdamW settings, schedules and the weight-decay mask against hand-written numpy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unimo_jax.train import optimizer as opt_lib


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, schedule="linear",
                                     end_lr_factor=0.0, b1=0.9, b2=0.98, eps=1e-6,
                                     weight_decay=0.01, clip_norm=1.0, grad_accum_steps=1))
  c.update(kw)
  return c


def test_linear_schedule_values():
  s = opt_lib.learning_rate_schedule(1.0, total_steps=110, warmup_steps=10, schedule="linear",
                                     end_lr_factor=0.1)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), 1.0 - 0.9 * 50 / 100, rtol=1e-6)
  np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(s(500)), 0.1, rtol=1e-6)


def test_cosine_schedule_values():
  s = opt_lib.learning_rate_schedule(2.0, total_steps=20, warmup_steps=4, schedule="cosine",
                                     end_lr_factor=0.0)
  for step in (4, 8, 12, 20):
    t = (step - 4) / 16
    np.testing.assert_allclose(float(s(step)), 2.0 * 0.5 * (1 + np.cos(np.pi * t)), atol=1e-6)


def test_constant_and_bad_schedule():
  s = opt_lib.learning_rate_schedule(3.0, 100, 0, "constant")
  assert float(s(0)) == 3.0 and float(s(99)) == 3.0
  with pytest.raises(ValueError, match="linear|cosine|constant"):
    opt_lib.learning_rate_schedule(1.0, 10, 0, "step")


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(10, 8, name="word_embedding")(ids)
    x = nn.LayerNorm(name="pre_encoder_layer_norm")(x)
    x = nn.DenseGeneral((2, 4), name="query")(x)  # bias is 2-D [heads, head_dim]
    x = x.reshape(x.shape[:-2] + (8,))
    x = nn.Dense(8, name="ffn")(x)
    t = self.param("log_temperature", nn.initializers.zeros, ())
    return x * jnp.exp(t)


def test_decay_mask_excludes_biases_norms_and_scalars():
  params = _Tiny().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  mask = opt_lib.decay_mask(params)
  assert mask["word_embedding"]["embedding"]
  assert mask["query"]["kernel"] and not mask["query"]["bias"]
  assert mask["ffn"]["kernel"] and not mask["ffn"]["bias"]
  assert not mask["pre_encoder_layer_norm"]["scale"]
  assert not mask["pre_encoder_layer_norm"]["bias"]
  assert not mask["log_temperature"]


def _numpy_adamw(params, grads_seq, lrs, b1, b2, eps, wd, clip, mask):
  """Independent AdamW: clip by global norm, bias-corrected moments, decoupled decay."""
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  p = {k: x.copy() for k, x in params.items()}
  for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
    norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
    scale = min(1.0, clip / norm)
    for k in p:
      gk = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk * gk
      mhat = m[k] / (1 - b1 ** t)
      vhat = v[k] / (1 - b2 ** t)
      upd = mhat / (np.sqrt(vhat) + eps)
      if mask[k]:
        upd = upd + wd * p[k]
      p[k] = p[k] - lr * upd
  return p


def test_adamw_matches_numpy_reference():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  grads = [{k: (3.0 * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
           for _ in range(5)]
  cfg = _cfg(learning_rate=0.1, warmup_steps=2, weight_decay=0.1, clip_norm=1.0)
  tx, sched = opt_lib.make_optimizer(cfg, total_steps=5)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  lrs = [float(sched(i)) for i in range(5)]
  ref = _numpy_adamw(params, grads, lrs, 0.9, 0.98, 1e-6, 0.1, 1.0, {"w": True, "bias": False})
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=2e-5, atol=1e-6)


def test_clipping_off_when_zero():
  tx, _ = opt_lib.make_optimizer(_cfg(clip_norm=0.0, warmup_steps=0, weight_decay=0.0), 10)
  p = {"w": jnp.ones((2, 2))}
  state = tx.init(p)
  upd, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, state, p)
  # First Adam step: m̂/√v̂ = sign(g) exactly (up to ε), independent of the gradient's size.
  np.testing.assert_allclose(np.asarray(upd["w"]), -1e-3 * np.ones((2, 2)), rtol=1e-5)


def test_tree_map_params_maps_moments_only():
  tx, _ = opt_lib.make_optimizer(_cfg(), 10)
  params = {"w": jnp.ones((4, 2)), "b": jnp.ones((2,))}
  state = tx.init(params)
  names = {"w": "W", "b": "B"}
  mapped = opt_lib.tree_map_params(tx, lambda p, n: n, state, names, non_params=lambda x: "other")
  leaves = jax.tree_util.tree_leaves(mapped)
  assert leaves.count("W") == 2 and leaves.count("B") == 2  # mu and nu
  assert "other" in leaves  # the step count
