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
  with pytest.raises(ValueError, match="linear|cosine|constant|step"):
    opt_lib.learning_rate_schedule(1.0, 10, 0, "exponential")


def test_step_schedule_values_by_hand():
  """Flickr30k's shape at toy size: 40 steps ("epochs"), warmup 4, x0.1 at 24 and 32."""
  want = ([s / 4 for s in range(4)] + [1.0] * (24 - 4) + [0.1] * (32 - 24)
          + [0.01] * (40 - 32) + [0.01] * 5)  # past the end it stays at the last value
  for boundaries in ((0.6, 0.8), (24, 32)):  # fractions of total_steps, or steps
    s = opt_lib.learning_rate_schedule(1.0, total_steps=40, warmup_steps=4, schedule="step",
                                       step_boundaries=boundaries, step_factor=0.1)
    got = [float(s(i)) for i in range(45)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # no warmup: the peak from step 0; a factor other than 0.1
  s = opt_lib.learning_rate_schedule(2.0, 10, 0, "step", step_boundaries=(3,), step_factor=0.5)
  np.testing.assert_allclose([float(s(i)) for i in range(6)], [2, 2, 2, 1, 1, 1], rtol=1e-6)
  # the jitted optimizer sees the same values (the count is a traced int32)
  jitted = jax.jit(s)
  assert float(jitted(jnp.int32(2))) == 2.0 and float(jitted(jnp.int32(3))) == 1.0


@pytest.mark.parametrize("boundaries, fragment", [
    ((), "is empty"),
    ((0.8, 0.6), "increase strictly"),
    ((1.5,), "must be in (0, 1)"),
    ((24, 0.8), "all ints"),
    ((2,), "after the warmup"),
    ((40,), "not inside the run"),
])
def test_step_boundaries_errors_name_the_field(boundaries, fragment):
  with pytest.raises(ValueError, match="optimizer.step_boundaries") as e:
    opt_lib.step_boundary_steps(boundaries, total_steps=40, warmup_steps=4)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_step_schedule_drives_adamw_updates():
  """make_optimizer with schedule='step': an SGD-like check that the update scale follows the
  learning rate (Adam's first update has magnitude lr for any gradient sign)."""
  cfg = _cfg(learning_rate=1.0, warmup_steps=0, schedule="step", step_boundaries=(2,),
             step_factor=0.1, weight_decay=0.0, clip_norm=0.0)
  tx, sched = opt_lib.make_optimizer(cfg, total_steps=4)
  assert [float(sched(i)) for i in range(4)] == pytest.approx([1.0, 1.0, 0.1, 0.1])
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  sizes = []
  for _ in range(4):
    upd, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    sizes.append(float(jnp.abs(upd["w"]).max()))
  np.testing.assert_allclose(sizes, [1.0, 1.0, 0.1, 0.1], rtol=1e-4)


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


@pytest.mark.parametrize("clip, schedule", [(1.0, "linear"), (0.0, "step"), (50.0, "cosine"),
                                            (1.0, "constant")])
def test_fused_apply_matches_numpy_reference_and_optax(clip, schedule):
  """``FusedAdamW.fused_apply`` (the train step's update) against the independent numpy AdamW
  and against optax's own chain (``update`` + ``apply_updates``) over five steps: parameters,
  both moments, the counts and the state's tree structure. Gradients alternate between clipped
  (norm ~ 3 sqrt(15)) and unclipped sizes; the mask decays the matrix only."""
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)},
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  grads = [jax.tree.map(lambda x, s=s: (s * rng.normal(size=x.shape)).astype(np.float32), params)
           for s in (3.0, 0.05, 3.0, 0.05, 3.0)]
  cfg = _cfg(learning_rate=0.1, warmup_steps=2, weight_decay=0.1, clip_norm=clip,
             schedule=schedule, step_boundaries=(3,))
  tx, sched = opt_lib.make_optimizer(cfg, total_steps=5)
  assert isinstance(tx, opt_lib.FusedAdamW)
  p_fused = p_optax = jax.tree.map(jnp.asarray, params)
  s_fused = s_optax = tx.init(p_fused)
  apply = jax.jit(tx.fused_apply)
  for i, g in enumerate(grads):
    g = jax.tree.map(jnp.asarray, g)
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    p_fused, s_fused = apply(g, s_fused, p_fused, norm if i % 2 else None)
    updates, s_optax = tx.update(g, s_optax, p_optax)
    p_optax = jax.tree.map(lambda a, b: a + b, p_optax, updates)
  assert jax.tree.structure(s_fused) == jax.tree.structure(s_optax)
  for a, b in zip(jax.tree.leaves(s_fused), jax.tree.leaves(s_optax)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  flat = lambda t: {"w": t["w"], "scale": t["norm"]["scale"], "bias": t["bias"]}
  lrs = [float(sched(i)) for i in range(5)]
  ref = _numpy_adamw(flat(params), [flat(g) for g in grads], lrs, 0.9, 0.98, 1e-6, 0.1,
                     clip or np.inf, {"w": True, "scale": False, "bias": False})
  for k, want in ref.items():
    np.testing.assert_allclose(np.asarray(flat(p_fused)[k]), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(flat(p_optax)[k]), want, rtol=2e-5, atol=1e-6)


def test_fused_apply_keeps_bfloat16_parameters_and_moments():
  """Parameters and moments keep their dtypes (the arithmetic is float32)."""
  tx, _ = opt_lib.make_optimizer(_cfg(warmup_steps=0), 10)
  p = {"w": jnp.ones((4, 2), jnp.bfloat16)}
  s = tx.init(p)
  new_p, new_s = tx.fused_apply({"w": jnp.full((4, 2), 0.5, jnp.bfloat16)}, s, p)
  assert new_p["w"].dtype == jnp.bfloat16
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(new_s), jax.tree.leaves(s)))
  # first step: lr * (sign(g) + wd * p) = 1e-3 * 1.01 below 1
  np.testing.assert_allclose(np.asarray(new_p["w"], np.float32), 1 - 1e-3 * 1.01, rtol=1e-2)
