"""The model against an independent numpy implementation of UNIMO's equations, plus shapes,
[IMG] means, padding invariance, heads and config checks (tiny shapes)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from unimo_jax.model import ModelConfig, Unimo, init_params, init_variables, masks

ATOL = 2e-5


def random_params(cfg, seed):
  """Every parameter random (biases and LayerNorms too, so the reference checks them all);
  numpy-filled from the init's shapes, which is much cheaper than compiling the init."""
  shapes = nn.unbox(jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0))))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = rng.normal(size=s.shape) * 0.05
    return (x + 1.0 if path[-1].key == "scale" else x).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)["params"]


def run(cfg, params, *args, method, **static):
  """Jitted ``Unimo(cfg).apply`` (one compile per shape; cheaper than op-by-op)."""
  fn = jax.jit(lambda p, *a: Unimo(cfg).apply({"params": p}, *a, method=method, **static))
  return fn(params, *args)


# ----------------------------------------------------------------- numpy reference
def np_ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_dense(x, p, k=1):
  w = np.asarray(p["kernel"], np.float64)
  return np.tensordot(x, w, axes=k) + np.asarray(p["bias"], np.float64)


def np_encoder(x, mask, params, cfg):
  """x [B,L,H] float64, mask [B,L,L] 0/1 -> hidden [B,L,H] (post-LN or pre-LN)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d = cfg.head_dim

  def attention(h, a):
    q, k, v = (np_dense(h, a[n]) for n in ("query", "key", "value"))
    logits = np.einsum("bqhd,bkhd->bhqk", q * d ** -0.5, k)
    logits = np.where(mask[:, None] > 0, logits, -1e30)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    return np_dense(np.einsum("bhqk,bkhd->bqhd", probs, v), a["out"], k=2)

  def mlp(h, m):
    return np_dense(np_gelu(np_dense(h, m["wi"])), m["wo"])

  for i in range(cfg.num_layers):  # the scanned layout: every leaf stacked [num_layers, ...]
    lp = jax.tree.map(lambda a: a[i], p["layers"])
    if cfg.pre_ln:
      x = x + attention(np_ln(x, lp["attention_norm"]), lp["attention"])
      x = x + mlp(np_ln(x, lp["mlp_norm"]), lp["mlp"])
    else:
      x = np_ln(x + attention(x, lp["attention"]), lp["attention_norm"])
      x = np_ln(x + mlp(x, lp["mlp"]), lp["mlp_norm"])
  if cfg.pre_ln:
    x = np_ln(x, p["final_norm"])
  return x


def np_text_embed(ids, params, cfg):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["text_embed"])
  pos = np.zeros_like(ids)
  for b in range(ids.shape[0]):
    n = 0
    for j in range(ids.shape[1]):
      if ids[b, j] == cfg.pad_id:
        pos[b, j] = cfg.pad_id if cfg.roberta_positions else 0
      else:
        pos[b, j] = (cfg.pad_id + 1 if cfg.roberta_positions else 0) + n
        n += 1
  return np_ln(p["word"][ids] + p["position"][pos], p["norm"])


def np_region_embed(feats, boxes, valid, vmask, params):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["region_embed"])
  keep = valid & ~vmask
  feats = np.where(keep[..., None], feats, 0.0)
  img = np.stack([feats[b][keep[b]].mean(0) for b in range(len(feats))])
  f = np.concatenate([img[:, None], feats], 1)
  bx = np.concatenate([np.tile([[[0, 0, 1, 1, 1.0]]], (len(feats), 1, 1)), boxes], 1)
  return np_ln(np_dense(f, p["feature"]) + np_dense(bx, p["box"]), p["norm"])


def np_patch_embed(pixels, params, cfg):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["patch_embed"])
  s, ps = cfg.image_size, cfg.patch_size
  rows = []
  for b in range(pixels.shape[0]):
    patches = [pixels[b, i:i + ps, j:j + ps, :].reshape(-1)
               for i in range(0, s, ps) for j in range(0, s, ps)]
    rows.append(np.stack(patches))
  e = np_dense(np.stack(rows), p["patch"])
  if cfg.patch_positions == "sincos2d":
    position = np.concatenate([p["img_position"], np_sincos_2d(s // ps, cfg.hidden_size)])
  else:
    position = p["position"]
  x = np.concatenate([e.mean(1, keepdims=True), e], 1) + position[None]
  return np_ln(x, p["norm"])


def np_sincos_2d(grid, width, temperature=10000.0):
  """big_vision's posemb_sincos_2d, element by element: patch (row r, column c) gets
  [sin(c w_k), cos(c w_k), sin(r w_k), cos(r w_k)] over k < width/4, w_k = T^(-k/(width/4-1))."""
  q = width // 4
  out = np.zeros((grid * grid, width))
  for r in range(grid):
    for c in range(grid):
      for k in range(q):
        w = temperature ** (-k / (q - 1))
        out[r * grid + c, [k, q + k, 2 * q + k, 3 * q + k]] = (
            np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w))
  return out


# ----------------------------------------------------------------- fixtures
def _ids(rng, cfg, lengths, total):
  ids = np.full((len(lengths), total), cfg.pad_id, np.int32)
  for b, n in enumerate(lengths):
    ids[b, :n] = rng.integers(4, cfg.vocab_size - 1, n)
    ids[b, 0], ids[b, n - 1] = cfg.cls_id, cfg.sep_id
  return ids


def _regions(rng, cfg, batch, r):
  feats = rng.normal(size=(batch, r, cfg.region_feature_dim)).astype(np.float32)
  boxes = rng.uniform(size=(batch, r, 5)).astype(np.float32)
  valid = np.ones((batch, r), bool)
  valid[0, -2:] = False
  return dict(region_features=feats, region_boxes=boxes, region_valid=valid)


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("pre_ln,roberta", [(False, False), (True, True)])
def test_encode_text_matches_numpy(pre_ln, roberta):
  cfg = ModelConfig.tiny(pre_ln=pre_ln, roberta_positions=roberta)
  params = random_params(cfg, 0)
  ids = _ids(np.random.default_rng(0), cfg, [7, 4], 9)
  out = run(cfg, params, ids, method=Unimo.encode_text)
  valid = ids != cfg.pad_id
  want = np_encoder(np_text_embed(ids, params, cfg), masks.bidirectional(valid), params["encoder"],
                    cfg)
  assert out["hidden"].shape == (2, 9, cfg.hidden_size)
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid], want[valid], atol=ATOL)
  np.testing.assert_allclose(out["cls"], want[:, 0], atol=ATOL)


def test_encode_pair_regions_matches_numpy_with_masked_and_padded_regions():
  cfg = ModelConfig.tiny(visual_input="regions")
  params = random_params(cfg, 1)
  rng = np.random.default_rng(1)
  visual = _regions(rng, cfg, 2, 5)
  vmask = np.zeros((2, 5), bool)
  vmask[0, 1] = vmask[1, 3] = True
  ids = _ids(rng, cfg, [6, 3], 6)
  out = run(cfg, params, visual, ids, None, vmask, method=Unimo.encode_pair)

  xv = np_region_embed(visual["region_features"], visual["region_boxes"],
                       visual["region_valid"], vmask, params)
  xt = np_text_embed(ids, params, cfg)
  valid = np.concatenate([np.ones((2, 1), bool), visual["region_valid"], ids != cfg.pad_id], 1)
  want = np_encoder(np.concatenate([xv, xt], 1), masks.bidirectional(valid), params["encoder"],
                    cfg)
  assert out["hidden"].shape == (2, 1 + 5 + 6, cfg.hidden_size)
  assert out["visual_hidden"].shape == (2, 6, cfg.hidden_size)
  assert out["text_hidden"].shape == (2, 6, cfg.hidden_size)
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid], want[valid], atol=ATOL)
  np.testing.assert_allclose(out["img"], want[:, 0], atol=ATOL)
  np.testing.assert_allclose(out["cls"], want[:, 6], atol=ATOL)
  np.testing.assert_array_equal(out["visual_valid"], valid[:, :6])

  # image alone: the [IMG] slot is the mean kept feature with box [0,0,1,1,1]
  img = run(cfg, params, visual, vmask, method=Unimo.encode_image)
  want_img = np_encoder(xv, masks.bidirectional(valid[:, :6]), params["encoder"], cfg)
  np.testing.assert_allclose(img["img"], want_img[:, 0], atol=ATOL)
  emb, _ = run(cfg, params, visual, vmask, method=Unimo.embed_visual)
  np.testing.assert_allclose(np.asarray(emb)[:, 0], xv[:, 0], atol=ATOL)


def test_patch_embedding_shapes_and_img_mean():
  cfg = ModelConfig.tiny()
  params = random_params(cfg, 2)
  pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  emb, valid = run(cfg, params, {"pixels": pixels}, method=Unimo.embed_visual)
  assert emb.shape == (2, 1 + 16, cfg.hidden_size) and valid.shape == (2, 17)
  np.testing.assert_allclose(emb, np_patch_embed(pixels, params, cfg), atol=ATOL)
  with pytest.raises(ValueError, match="pixels must be"):
    run(cfg, params, {"pixels": pixels[:, :16]}, method=Unimo.embed_visual)


def test_sincos2d_patch_positions_match_numpy_and_see_where_a_patch_is():
  cfg = ModelConfig.tiny(patch_positions="sincos2d")
  params = random_params(cfg, 3)
  assert "position" not in params["patch_embed"]
  assert params["patch_embed"]["img_position"].shape == (1, cfg.hidden_size)
  rng = np.random.default_rng(3)
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  emb, _ = run(cfg, params, {"pixels": pixels}, method=Unimo.embed_visual)
  np.testing.assert_allclose(emb, np_patch_embed(pixels, params, cfg), atol=ATOL)
  # The same patch contents one grid column to the right: each token's position term moves.
  shifted = np.roll(pixels, cfg.patch_size, axis=2)
  moved, _ = run(cfg, params, {"pixels": shifted}, method=Unimo.embed_visual)
  np.testing.assert_allclose(moved, np_patch_embed(shifted, params, cfg), atol=ATOL)
  assert np.abs(np.asarray(moved)[:, 1:2] - np.asarray(emb)[:, 4:5]).max() > 0.1
  with pytest.raises(ValueError, match="patch_positions"):
    ModelConfig.tiny(patch_positions="sincos")
  with pytest.raises(ValueError, match="divisible by 4"):
    ModelConfig.tiny(patch_positions="sincos2d", hidden_size=34, num_heads=2)


def test_padding_invariance_text_pair_and_regions():
  cfg = ModelConfig.tiny(visual_input="regions", roberta_positions=True)
  params = random_params(cfg, 3)
  rng = np.random.default_rng(3)
  ids = _ids(rng, cfg, [5, 3], 5)
  ids_padded = np.pad(ids, [(0, 0), (0, 4)], constant_values=cfg.pad_id)
  real = ids != cfg.pad_id
  visual = _regions(rng, cfg, 2, 4)
  more = {k: np.pad(v, [(0, 0), (0, 3)] + [(0, 0)] * (v.ndim - 2)) for k, v in visual.items()}
  more["region_features"][:, 4:] = 7.0  # garbage in padded regions must not matter
  a = run(cfg, params, visual, ids, method=Unimo.encode_pair)
  b = run(cfg, params, more, ids_padded, method=Unimo.encode_pair)
  np.testing.assert_allclose(b["img"], a["img"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(b["text_hidden"])[:, :5][real],
                             np.asarray(a["text_hidden"])[real], atol=1e-5)
  for x in jax.tree.leaves(b):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))  # padded rows are finite too


def test_heads_match_numpy():
  cfg = ModelConfig.tiny(visual_input="regions")
  params = random_params(cfg, 4)
  rng = np.random.default_rng(4)
  hidden = rng.normal(size=(2, 6, cfg.hidden_size)).astype(np.float32)
  positions = np.array([[1, 4, 0], [5, 5, 2]], np.int32)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  logits = run(cfg, params, hidden, positions, method=Unimo.lm_logits)
  assert logits.shape == (2, 3, cfg.vocab_size) and logits.dtype == jnp.float32
  rows = np.take_along_axis(hidden, positions[..., None], 1).astype(np.float64)
  t = p["lm_head"]["transform"]
  want = np_ln(np_gelu(np_dense(rows, t["dense"])), t["norm"]) @ p["text_embed"]["word"].T
  np.testing.assert_allclose(logits, want + p["lm_head"]["bias"], atol=1e-4)

  region = run(cfg, params, hidden, method=Unimo.region_heads)
  rh = p["region_head"]
  for key, name, transform, width in [
      ("features", "feature", "feature_transform", cfg.region_feature_dim),
      ("class_logits", "classes", "class_transform", cfg.num_region_classes)]:
    tr = rh[transform]
    want = np_dense(np_ln(np_gelu(np_dense(hidden.astype(np.float64), tr["dense"])), tr["norm"]),
                    rh[name])
    assert region[key].shape == (2, 6, width)
    np.testing.assert_allclose(region[key], want, atol=1e-4)

  z = run(cfg, params, hidden[:, 0], method=Unimo.cmcl_text)
  tp = p["text_projection"]
  want = np_dense(np.maximum(np_dense(hidden[:, 0].astype(np.float64), tp["pooler"]), 0),
                  tp["projection"])
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(z, want, atol=1e-5)
  zi = run(cfg, params, hidden[:, 1], method=Unimo.cmcl_image)
  np.testing.assert_allclose(np.linalg.norm(zi, axis=-1), 1.0, atol=1e-5)

  patch_cfg = ModelConfig.tiny()
  region = run(patch_cfg, random_params(patch_cfg, 4), hidden, method=Unimo.region_heads)
  assert region["features"].shape == (2, 6, 8 * 8 * 3) and "class_logits" not in region


def test_init_dropout_bf16_remat_and_logical_axes():
  cfg = ModelConfig.tiny()
  # every parameter carries logical axis names
  boxed = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["text_embed"]["word"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert specs["encoder"]["layers"]["attention"]["query"]["kernel"] == (
      jax.sharding.PartitionSpec("layers", "embed", "heads", "kv"))
  # init follows TruncatedNormal(0.02) (std 0.88 * 0.02, |x| <= 0.04); LayerNorm = (1, 0)
  params = init_params(cfg, jax.random.PRNGKey(5))  # the same compiled init as model-info
  word = np.asarray(params["text_embed"]["word"])
  assert abs(word.std() - 0.02 * 0.88) < 2e-3 and np.abs(word).max() <= 0.04 + 1e-6
  assert params["encoder"]["layers"]["mlp"]["wi"]["kernel"].shape == (
      cfg.num_layers, cfg.hidden_size, cfg.mlp_dim)
  np.testing.assert_array_equal(params["encoder"]["layers"]["mlp_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["encoder"]["layers"]["mlp"]["wi"]["bias"], 0.0)
  # layers are initialised independently (the scan splits the params rng)
  q = np.asarray(params["encoder"]["layers"]["attention"]["query"]["kernel"])
  assert not np.allclose(q[0], q[1])

  params = random_params(cfg, 5)
  ids = _ids(np.random.default_rng(5), cfg, [6, 4], 6)
  ref = run(cfg, params, ids, method=Unimo.encode_text)["hidden"]
  drop = jax.jit(lambda p, i, k: Unimo(cfg).apply(
      {"params": p}, i, deterministic=False, method=Unimo.encode_text,
      rngs={"dropout": k}))(params, ids, jax.random.PRNGKey(0))["hidden"]
  assert not np.allclose(drop, ref, atol=1e-3)
  for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable"):
    remat = run(cfg.replace(remat=True, remat_policy=policy), params, ids,
                method=Unimo.encode_text)["hidden"]
    np.testing.assert_allclose(remat, ref, atol=1e-6)
  bf16 = run(cfg.replace(dtype="bfloat16"), params, ids, method=Unimo.encode_text)
  assert bf16["hidden"].dtype == jnp.bfloat16
  real = ids != cfg.pad_id
  err = np.abs(np.asarray(bf16["hidden"], np.float32) - np.asarray(ref))[real]
  assert err.max() < 0.15, err.max()


def test_scan_unroll_changes_no_value_or_gradient():
  """The unrolled layer scan computes what the rolled one does: hidden states with dropout
  (the per-layer dropout rngs are split the same way) and parameter gradients."""
  cfg = ModelConfig.tiny(num_layers=4)
  params = random_params(cfg, 7)
  ids = _ids(np.random.default_rng(7), cfg, [6, 4], 6)

  def loss_and_grad(c):
    def loss(p):
      h = Unimo(c).apply({"params": p}, ids, deterministic=False, method=Unimo.encode_text,
                         rngs={"dropout": jax.random.PRNGKey(3)})["hidden"]
      return jnp.sum(jnp.sin(h)), h
    (value, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return h, g

  ref_h, ref_g = loss_and_grad(cfg)
  for unroll in (2, 4):
    h, g = loss_and_grad(cfg.replace(scan_unroll=unroll))
    np.testing.assert_allclose(h, ref_h, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, ref_g)
  with pytest.raises(ValueError, match="scan_unroll"):
    ModelConfig.tiny(num_layers=4, scan_unroll=3)
  with pytest.raises(ValueError, match="scan_unroll"):
    ModelConfig.tiny(scan_unroll=0)


def test_config_presets_validation_and_json():
  tiny, base, large = ModelConfig.tiny(), ModelConfig.base(), ModelConfig.large()
  assert (base.num_layers, base.hidden_size, base.num_heads, base.mlp_dim) == (12, 768, 12, 3072)
  assert (large.num_layers, large.hidden_size, large.num_heads, large.mlp_dim) == (
      24, 1024, 16, 4096)
  assert base.mask_token_id == 50264 and base.max_text_length == 512
  assert tiny.num_patches == 16 and tiny.layer_norm_eps == 1e-5 and not tiny.pre_ln
  assert ModelConfig.from_json(tiny.to_json()) == tiny
  with pytest.raises(ValueError, match="hidden_size"):
    ModelConfig.tiny(hidden_size=30)
  with pytest.raises(ValueError, match="visual_input"):
    ModelConfig.tiny(visual_input="pixels")
  with pytest.raises(ValueError, match="dtype"):
    ModelConfig.tiny(dtype="float8")
  with pytest.raises(ValueError, match="image_size"):
    ModelConfig.tiny(image_size=30)
  with pytest.raises(ValueError, match="unknown field"):
    ModelConfig.from_dict({"hidden": 3})
  with pytest.raises(ValueError, match="position table"):
    jax.eval_shape(lambda: Unimo(tiny).init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, 200), jnp.int32),
                                            method=Unimo.encode_text))
