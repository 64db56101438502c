"""Fine-tuning losses and heads against independent numpy computations (value and gradient)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimo_jax.finetune import heads, layouts, losses
from unimo_jax.model import ModelConfig

RTOL, ATOL = 2e-5, 2e-6


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ---------------------------------------------------------------------------- classification
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_classification_value_and_gradient(rng, eps):
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 3, 1, 2, 2, 0])
  w = np.array([1, 1, 1, 0, 1, 1], np.float32)
  p = _softmax(logits.astype(np.float64))
  target = (1 - eps) * np.eye(4)[labels] + eps / 4
  ref = -(target * np.log(p)).sum(-1)
  ref_grad = (p - target) * w[:, None]
  f = lambda x: losses.classification(x, jnp.asarray(labels), jnp.asarray(w), eps)["loss_sum"]
  out = losses.classification(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w), eps)
  np.testing.assert_allclose(out["loss_sum"], (ref * w).sum(), rtol=RTOL)
  assert float(out["count"]) == 5.0
  assert float(out["correct"]) == float(((logits.argmax(-1) == labels) * w).sum())
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logits)), ref_grad, rtol=1e-5, atol=ATOL)


def test_regression_value_and_gradient(rng):
  p = rng.normal(size=5).astype(np.float32)
  t = rng.normal(size=5).astype(np.float32)
  w = np.array([1, 0, 1, 1, 1], np.float32)
  out = losses.regression(jnp.asarray(p), jnp.asarray(t), jnp.asarray(w))
  np.testing.assert_allclose(out["loss_sum"], (((p - t) ** 2) * w).sum(), rtol=RTOL)
  g = jax.grad(lambda x: losses.regression(x, jnp.asarray(t), jnp.asarray(w))["loss_sum"])(
      jnp.asarray(p))
  np.testing.assert_allclose(g, 2 * (p - t) * w, rtol=1e-5, atol=ATOL)


# ---------------------------------------------------------------------------- VQA
def test_soft_bce_value_gradient_and_vqa_score(rng):
  x = rng.normal(scale=3, size=(4, 7)).astype(np.float32)
  y = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=(4, 7)).astype(np.float32)
  w = np.array([1, 1, 0, 1], np.float32)
  s = _sigmoid(x.astype(np.float64))
  ref = -(y * np.log(s) + (1 - y) * np.log(1 - s)).sum(-1)
  out = losses.soft_binary_cross_entropy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
  np.testing.assert_allclose(out["loss_sum"], (ref * w).sum(), rtol=RTOL)
  best = y[np.arange(4), x.argmax(-1)]
  np.testing.assert_allclose(out["vqa_score_sum"], (best * w).sum(), rtol=RTOL)
  g = jax.grad(lambda a: losses.soft_binary_cross_entropy(a, jnp.asarray(y), jnp.asarray(w))[
      "loss_sum"])(jnp.asarray(x))
  np.testing.assert_allclose(g, (s - y) * w[:, None], rtol=1e-5, atol=ATOL)


def test_vqa_soft_scores_and_accuracy():
  vocab = {"yes": 0, "no": 1, "two": 2}
  scores = layouts.vqa_soft_scores(["yes", "yes", "no", "yes", "yes", "maybe"], vocab)
  np.testing.assert_allclose(scores, [1.0, 1 / 3, 0.0])
  acc = layouts.vqa_accuracy(["yes", "two", "no"], [["yes"] * 3, ["two", "three"], ["yes"]])
  assert acc == pytest.approx((1.0 + 1 / 3 + 0.0) / 3)


# ---------------------------------------------------------------------------- ranking
def _circle_np(sp, sn, valid, m, scale):
  """numpy circle loss and its gradient (alphas constant), float64."""
  ap = np.maximum(1 + m - sp, 0)
  an = np.maximum(sn + m, 0)
  lp = -scale * ap * (sp - (1 - m))
  ln = np.where(valid, scale * an * (sn - m), -np.inf)
  lse = np.log(np.exp(ln - ln.max(-1, keepdims=True)).sum(-1)) + ln.max(-1)
  z = lse + lp
  loss = np.log1p(np.exp(z))
  sig = _sigmoid(z)
  soft = np.where(valid, np.exp(ln - lse[:, None]), 0.0)
  return loss, sig * (-scale * ap), sig[:, None] * soft * scale * an


def test_circle_loss_value_and_gradient(rng):
  sp = rng.uniform(-1, 1, size=5)
  sn = rng.uniform(-1, 1, size=(5, 3))
  valid = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]], bool)
  ref, gp, gn = _circle_np(sp, sn, valid, 0.2, 1.0)
  f = lambda a, b: losses.circle_loss(a, b, jnp.asarray(valid), 0.2, 1.0)
  out = f(jnp.asarray(sp, jnp.float32), jnp.asarray(sn, jnp.float32))
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  ga, gb = jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(
      jnp.asarray(sp, jnp.float32), jnp.asarray(sn, jnp.float32))
  np.testing.assert_allclose(ga, gp, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gb, gn, rtol=1e-4, atol=1e-6)


def test_ranking_mean_of_two_directions_and_softmax(rng):
  sp = rng.uniform(-1, 1, size=4).astype(np.float32)
  si = rng.uniform(-1, 1, size=(4, 2)).astype(np.float32)
  st = rng.uniform(-1, 1, size=(4, 3)).astype(np.float32)
  w = np.array([1, 1, 1, 0], np.float32)
  ones_i, ones_t = np.ones((4, 2), bool), np.ones((4, 3), bool)
  ref = 0.5 * (_circle_np(sp, si, ones_i, 0.2, 1.0)[0] + _circle_np(sp, st, ones_t, 0.2, 1.0)[0])
  out = losses.ranking(*map(jnp.asarray, (sp, si, st, w)))
  np.testing.assert_allclose(out["loss_sum"], (ref * w).sum(), rtol=1e-5)
  correct = (sp > np.maximum(si.max(1), st.max(1))) * w
  assert float(out["correct"]) == correct.sum()
  # softmax: -log softmax of the positive among [pos, negatives], each kind separately
  def nll(neg):
    allx = np.concatenate([sp[:, None], neg], 1).astype(np.float64)
    return -np.log(_softmax(allx)[:, 0])
  out = losses.ranking(*map(jnp.asarray, (sp, si, st, w)), kind="softmax")
  np.testing.assert_allclose(out["loss_sum"], (0.5 * (nll(si) + nll(st)) * w).sum(), rtol=1e-5)
  g = jax.grad(lambda a: losses.ranking(a, jnp.asarray(si), jnp.asarray(st), jnp.asarray(w),
                                        kind="softmax")["loss_sum"])(jnp.asarray(sp))
  ps = lambda neg: _softmax(np.concatenate([sp[:, None], neg], 1).astype(np.float64))[:, 0]
  np.testing.assert_allclose(g, 0.5 * ((ps(si) - 1) + (ps(st) - 1)) * w, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="circle"):
    losses.ranking(*map(jnp.asarray, (sp, si, st, w)), kind="hinge")


def _infonce_np(img, txt, nimg, ntxt, w, iv, tv, tau):
  """The in-batch contrastive loss, anchor by anchor, in float64."""
  b = img.shape[0]
  total, correct = 0.0, 0.0
  for r in range(b):
    if not w[r]:
      continue
    per_dir = []
    ok = True
    for anchor, pos, negs, nv in ((img[r], txt, ntxt, tv), (txt[r], img, nimg, iv)):
      cols = [pos[c] for c in range(b) if w[c]]
      own = sum(1 for c in range(r) if w[c])            # index of column r among the valid
      cols += [negs[c, j] for c in range(b) if w[c] for j in range(negs.shape[1]) if nv[c, j]]
      logits = np.array([anchor @ c for c in cols]) / tau
      per_dir.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[own])
      ok &= bool(logits[own] > np.delete(logits, own).max())
    total += w[r] * 0.5 * sum(per_dir)
    correct += w[r] * ok
  return total, correct


def test_in_batch_contrastive_value_and_gradient(rng):
  b, n, m, p = 4, 2, 3, 5
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  img, txt = unit(rng.normal(size=(b, p))), unit(rng.normal(size=(b, p)))
  nimg, ntxt = unit(rng.normal(size=(b, n, p))), unit(rng.normal(size=(b, m, p)))
  w = np.array([1, 1, 0, 1], np.float64)                  # row 2 is padding
  iv = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], bool)
  tv = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
  tau = 0.3
  ref, ref_correct = _infonce_np(img, txt, nimg, ntxt, w, iv, tv, tau)

  def f(*x):
    return losses.in_batch_contrastive(*x, jnp.asarray(w, jnp.float32), jnp.asarray(iv),
                                       jnp.asarray(tv), tau)
  args = [jnp.asarray(a, jnp.float32) for a in (img, txt, nimg, ntxt)]
  out = f(*args)
  np.testing.assert_allclose(out["contrastive_sum"], ref, rtol=1e-5)
  assert float(out["contrastive_correct"]) == ref_correct
  grads = jax.grad(lambda *x: f(*x)["contrastive_sum"], argnums=(0, 1, 2, 3))(*args)
  base = [img, txt, nimg, ntxt]
  for k, g in enumerate(grads):  # central differences of the numpy reference
    num = np.zeros_like(base[k])
    for idx in np.ndindex(base[k].shape):
      hi = [a.copy() for a in base]
      lo = [a.copy() for a in base]
      hi[k][idx] += 1e-6
      lo[k][idx] -= 1e-6
      num[idx] = (_infonce_np(*hi, w, iv, tv, tau)[0] - _infonce_np(*lo, w, iv, tv, tau)[0]) / 2e-6
    np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-5)
  # the padding row's embeddings and the invalid negatives get no gradient
  assert not np.any(np.asarray(grads[0][2])) and not np.any(np.asarray(grads[1][2]))
  assert not np.any(np.asarray(grads[2][1, 1])) and not np.any(np.asarray(grads[3][3, 2]))


# ---------------------------------------------------------------------------- heads
CFG = ModelConfig.tiny(hidden_size=16, num_heads=2, mlp_dim=32)


def _p(tree, *path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree, np.float64)


def _head_np(kind, params, cls, img, agreement=None):
  """numpy forward of each head (deterministic); ``agreement`` [B, P] for the dual heads."""
  dense = lambda name, x: x @ _p(params, name, "kernel") + _p(params, name, "bias")
  pool = lambda name, x: np.maximum(x @ _p(params, name, "dense", "kernel")
                                    + _p(params, name, "dense", "bias"), 0)
  if agreement is not None:  # the dual fc added to the fusion output / the score
    if kind == "entailment":
      return dense("out", dense("fuse", pool("text_pooler", cls) + pool("image_pooler", img))
                   + dense("dual", agreement))
    fused = pool("text_pooler", cls) * pool("image_pooler", img)
    return (dense("out", fused) + dense("dual", agreement))[:, 0]
  if kind in ("classification", "regression"):
    return dense("out", pool("text_pooler", cls))
  if kind == "entailment":
    return dense("out", dense("fuse", pool("text_pooler", cls) + pool("image_pooler", img)))
  if kind == "vqa":
    from scipy.special import erf
    h = dense("fuse", pool("text_pooler", cls) * pool("image_pooler", img))
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + CFG.layer_norm_eps) * _p(params, "norm", "scale") + _p(
        params, "norm", "bias")
    return dense("out", h)
  fused = pool("text_pooler", cls) * pool("image_pooler", img)
  return dense("out", fused)[:, 0]


@pytest.mark.parametrize("kind", ["classification", "regression", "entailment", "vqa",
                                  "retrieval"])
def test_head_matches_numpy_value_and_gradient(kind):
  head = heads.make_head(kind, CFG, num_labels=3, hidden=12, dropout_rate=0.1)
  r = np.random.default_rng(1)
  cls = r.normal(size=(4, 16)).astype(np.float32)
  img = r.normal(size=(4, 16)).astype(np.float32)
  two = kind not in ("classification", "regression")
  args = (cls, img) if two else (cls,)
  params = jax.tree.map(lambda x: x + 0.0, jax.tree.map(
      np.asarray, __import__("flax").linen.unbox(head.init(jax.random.key(0), *args)["params"])))
  # biases start at zero: give them values so the test sees them
  params = jax.tree.map(lambda x: x + r.normal(scale=0.1, size=x.shape).astype(np.float32),
                        params)
  out = head.apply({"params": params}, *args)
  ref = _head_np(kind, params, cls.astype(np.float64), img.astype(np.float64))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  # gradient w.r.t. h[CLS] of sum(out * c), against central differences of the numpy head
  c = r.normal(size=np.shape(ref))
  g = jax.grad(lambda x: jnp.sum(head.apply({"params": params}, x, *args[1:]) * c))(
      jnp.asarray(cls))
  num = np.zeros_like(cls, np.float64)
  h = 1e-5
  for i in np.ndindex(cls.shape):
    up, dn = cls.astype(np.float64).copy(), cls.astype(np.float64).copy()
    up[i] += h
    dn[i] -= h
    num[i] = ((_head_np(kind, params, up, img) - _head_np(kind, params, dn, img)) * c).sum() / (2 * h)
  np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-4)
  # dropout is active only when asked (and needs a key)
  d = head.apply({"params": params}, *args, deterministic=False,
                 rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(d, out)


@pytest.mark.parametrize("kind", ["entailment", "retrieval"])
def test_dual_agreement_head_matches_numpy_value_and_gradient(kind):
  head = heads.make_head(kind, CFG, num_labels=3, hidden=12, dual=True)
  r = np.random.default_rng(2)
  cls, img = (r.normal(size=(4, 16)).astype(np.float32) for _ in range(2))
  agr = r.normal(size=(4, 8)).astype(np.float32)
  init = __import__("flax").linen.unbox(head.init(jax.random.key(0), cls, img, agr)["params"])
  # the dual fc starts at zero: the head starts as the official one
  np.testing.assert_array_equal(init["dual"]["kernel"], 0)
  params = jax.tree.map(lambda x: np.asarray(x) + r.normal(scale=0.1, size=x.shape).astype(
      np.float32), init)
  out = head.apply({"params": params}, cls, img, agr)
  f64 = lambda x: x.astype(np.float64)
  np.testing.assert_allclose(out, _head_np(kind, params, f64(cls), f64(img), f64(agr)),
                             rtol=1e-4, atol=1e-5)
  c = r.normal(size=np.shape(out))
  g = jax.grad(lambda a: jnp.sum(head.apply({"params": params}, cls, img, a) * c))(
      jnp.asarray(agr))
  num = np.zeros_like(agr, np.float64)
  for i in np.ndindex(agr.shape):
    up, dn = f64(agr).copy(), f64(agr).copy()
    up[i] += 1e-5
    dn[i] -= 1e-5
    num[i] = ((_head_np(kind, params, f64(cls), f64(img), up)
               - _head_np(kind, params, f64(cls), f64(img), dn)) * c).sum() / 2e-5
  np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="agreement"):
    head.apply({"params": params}, cls, img)
  with pytest.raises(ValueError, match="dual agreement"):
    heads.make_head("vqa", CFG, num_labels=3, dual=True)


def test_copy_pretrained_poolers():
  model = {"text_projection": {"pooler": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}},
           "image_projection": {"pooler": {"kernel": 2 * np.ones((2, 2)), "bias": np.ones(2)}}}
  head = {"text_pooler": {"dense": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}},
          "out": {"kernel": np.zeros((2, 3))}}
  out = heads.copy_pretrained_poolers(head, model)
  np.testing.assert_array_equal(out["text_pooler"]["dense"]["kernel"], np.ones((2, 2)))
  assert "image_pooler" not in out and out["out"] is head["out"]


# ---------------------------------------------------------------------------- layouts
def test_pair_text_truncates_longer_first():
  row = layouts.pair_text(np.arange(10, 16), np.arange(20, 22), 9, cls_id=0, sep_id=2, pad_id=1)
  np.testing.assert_array_equal(row, [0, 10, 11, 12, 13, 2, 20, 21, 2])
  row = layouts.pair_text(np.arange(10, 12), None, 6, cls_id=0, sep_id=2, pad_id=1)
  np.testing.assert_array_equal(row, [0, 10, 11, 2, 1, 1])


def test_seq2seq_layout():
  out = layouts.seq2seq_layout([10, 11], [20, 21, 22], max_source=5, max_target=6, cls_id=0,
                               sep_id=2, mask_id=99, pad_id=1)
  np.testing.assert_array_equal(out["ids"], [0, 10, 11, 2, 1, 0, 20, 21, 22, 99, 1])
  np.testing.assert_array_equal(out["segments"], [1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(out["position_ids"], [0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 0])
  np.testing.assert_array_equal(out["positions"], [5, 6, 7, 8, 0])
  np.testing.assert_array_equal(out["targets"], [20, 21, 22, 99, 1])
  np.testing.assert_array_equal(out["weights"], [1, 1, 1, 1, 0])
