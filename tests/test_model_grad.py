"""Gradients through the whole model (embeddings, encoder, every head) against central finite
differences in float64, on a batch with padding, masked regions and a fully padded row."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimo_jax.model import ModelConfig, Unimo, init_variables, masks


def _inputs(cfg, rng):
  b, r, length = 3, 4, 6
  visual = dict(region_features=rng.normal(size=(b, r, cfg.region_feature_dim)),
                region_boxes=rng.uniform(size=(b, r, 5)),
                region_valid=np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool))
  ids = rng.integers(4, cfg.vocab_size - 1, (b, length)).astype(np.int32)
  ids[1, 4:] = cfg.pad_id
  ids[2, :] = cfg.pad_id  # a fully padded row (text) next to an image with no regions
  vmask = np.zeros((b, r), bool)
  vmask[0, 2] = True
  return visual, ids, vmask


def _loss_fn(cfg, visual, ids, vmask, weights):
  """A scalar touching every parameter: captioning-masked pair encoding, LM head, region heads,
  both CMCL projections (fixed random weights make each output matter)."""
  model = Unimo(cfg)
  num_visual = 1 + visual["region_valid"].shape[1]
  visual_valid = np.concatenate([np.ones((len(ids), 1), bool), visual["region_valid"]], 1)
  bias = masks.to_bias(masks.captioning(num_visual, ids != cfg.pad_id, visual_valid), cfg.dtype)

  def loss(params, features):
    v = dict(visual, region_features=features)
    out = model.apply({"params": params}, v, ids, bias, vmask, method=Unimo.encode_pair)
    logits = model.apply({"params": params}, out["text_hidden"], np.array([[1, 2]] * len(ids)),
                         method=Unimo.lm_logits)
    region = model.apply({"params": params}, out["visual_hidden"][:, 1:],
                         method=Unimo.region_heads)
    zt = model.apply({"params": params}, out["cls"], method=Unimo.cmcl_text)
    zi = model.apply({"params": params}, out["img"], method=Unimo.cmcl_image)
    return (jnp.sum(jax.nn.log_softmax(logits) * weights["lm"])
            + jnp.sum(region["features"] * weights["feat"])
            + jnp.sum(jax.nn.log_softmax(region["class_logits"]) * weights["cls"])
            + jnp.sum(zt * zi * weights["pair"]) + jnp.sum(out["hidden"] * weights["hidden"]))
  return loss


def test_gradients_match_finite_differences_float64():
  with jax.enable_x64(True):
    cfg = ModelConfig.tiny(visual_input="regions", dtype="float64", param_dtype="float64",
                           vocab_size=50, region_feature_dim=12, num_region_classes=5,
                           hidden_size=16, num_heads=2, mlp_dim=24, dropout_rate=0.0,
                           attention_dropout_rate=0.0)
    rng = np.random.default_rng(0)
    shapes = nn.unbox(jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0))))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: rng.normal(size=s.shape) * 0.3 + (path[-1].key == "scale"),
        shapes)["params"]
    visual, ids, vmask = _inputs(cfg, rng)
    # Losses read real positions only: a fully padded query row attends uniformly because
    # logit + big_negative rounds to big_negative, so its value no longer depends on the logits
    # while autodiff still propagates d/dlogit; such rows are finite but not differentiable.
    valid = np.concatenate([np.ones((3, 1)), visual["region_valid"], ids != cfg.pad_id], 1)
    weights = dict(lm=rng.normal(size=(3, 2, cfg.vocab_size)) * (ids[:, 1:3, None] != 1),
                   feat=rng.normal(size=(3, 4, cfg.region_feature_dim)) * valid[:, 1:5, None],
                   cls=rng.normal(size=(3, 4, cfg.num_region_classes)) * valid[:, 1:5, None],
                   hidden=rng.normal(size=(3, 1 + 4 + 6, cfg.hidden_size)) * valid[..., None],
                   pair=valid[:, 5:6])  # rows with a real [CLS]
    loss = jax.jit(_loss_fn(cfg, visual, ids, vmask, weights))
    features = visual["region_features"]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, features)

    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      assert np.all(np.isfinite(g)), path
    # every parameter receives gradient (nothing is silently disconnected)
    zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads[0])
            if not np.any(g)]
    assert not zero, zero

    # directional derivative along a random direction vs a central difference
    direction = jax.tree.map(lambda x: rng.normal(size=np.shape(x)), (params, features))
    analytic = sum(np.sum(g * d) for g, d in zip(jax.tree.leaves(grads),
                                                 jax.tree.leaves(direction)))
    eps = 1e-6
    shift = lambda s: jax.tree.map(lambda x, d: x + s * eps * d, (params, features), direction)
    numeric = (loss(*shift(1.0)) - loss(*shift(-1.0))) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7)


def test_dense_product_gradients_match_autodiff_of_the_plain_dot():
  """``layers.dense_product`` (the projections' product on CPU float32, whose weight gradient
  transposes the smaller operand itself) against autodiff of ``lax.dot_general`` and against
  the hand-written products in numpy: widening (K < N, the transposed-x path) and narrowing
  (K >= N, the transposed-dy path) projections, one and two contracted dims, one and several
  output dims; jitted."""
  from unimo_jax.model import layers
  rng = np.random.default_rng(3)
  cases = [((3, 5, 4), (4, 7), 1), ((3, 5, 8), (8, 2), 1), ((3, 5, 2, 3), (2, 3, 9), 2),
           ((4, 6), (6, 3, 2, 5), 1), ((2, 3, 4, 2), (4, 2, 3), 2), ((3, 4, 12), (12, 2, 3), 1),
           ((5, 2, 3), (2, 3, 2, 2), 2), ((4, 5), (5, 5), 1)]
  for xs, ws, k in cases:
    x = rng.normal(size=xs).astype(np.float32)
    w = rng.normal(size=ws).astype(np.float32)
    c = rng.normal(size=xs[:len(xs) - k] + ws[k:]).astype(np.float32)
    ours = jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(layers.dense_product(x, w, k, jnp.float32) * c), (0, 1)))
    plain = jax.value_and_grad(
        lambda x, w: jnp.sum(layers._dense_dot(x, w, k, jnp.float32) * c), (0, 1))
    (v1, (dx1, dw1)), (v2, (dx2, dw2)) = ours(x, w), plain(x, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw2, rtol=1e-5, atol=1e-5)
    # numpy: rows R = prod(lead), dx = c W^T, dW = X^T c
    r, kk = int(np.prod(xs[:len(xs) - k])), int(np.prod(xs[len(xs) - k:]))
    x2, w2, c2 = x.reshape(r, kk), w.reshape(kk, -1), c.reshape(r, -1)
    np.testing.assert_allclose(dx1, (c2 @ w2.T).reshape(xs), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw1, (x2.T @ c2).reshape(ws), rtol=1e-4, atol=1e-5)
  # the model's projections use it on CPU float32 only
  assert layers.use_dense_product(jnp.float32) == (jax.default_backend() == "cpu")
  assert not layers.use_dense_product(jnp.bfloat16)


def test_tied_lm_head_product_gradients_match_autodiff_and_numpy():
  """The LM head's ``x @ table^T`` on CPU float32, ``dense_product`` onto the table transposed
  (its table gradient the transpose of ``x^T g``, through the ``.T``), against autodiff of the
  plain einsum and against numpy, with one and two row dims; jitted."""
  from unimo_jax.model import layers
  rng = np.random.default_rng(4)
  for xs, v in [((7, 5), 11), ((3, 4, 6), 9), ((2, 3, 8), 3)]:
    h = xs[-1]
    x = rng.normal(size=xs).astype(np.float32)
    table = rng.normal(size=(v, h)).astype(np.float32)
    c = rng.normal(size=xs[:-1] + (v,)).astype(np.float32)
    ours = jax.jit(jax.value_and_grad(
        lambda x, t: jnp.sum(layers.dense_product(x, t.T, 1, jnp.float32) * c), (0, 1)))
    plain = jax.value_and_grad(lambda x, t: jnp.sum(jnp.einsum("...h,vh->...v", x, t) * c), (0, 1))
    (v1, (dx1, dt1)), (v2, (dx2, dt2)) = ours(x, table), plain(x, table)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dt1, dt2, rtol=1e-5, atol=1e-5)
    x2, c2 = x.reshape(-1, h), c.reshape(-1, v)
    np.testing.assert_allclose(dx1, (c2 @ table).reshape(xs), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dt1, c2.T @ x2, rtol=1e-4, atol=1e-5)
