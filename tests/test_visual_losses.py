"""Masked region prediction vs an independent float64 numpy reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimo_jax.losses import visual

B, N, F, C = 2, 6, 7, 5


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _case(seed):
  rng = np.random.default_rng(seed)
  pred = rng.normal(size=(B, N, F)).astype(np.float32)
  target = rng.normal(size=(B, N, F)).astype(np.float32)
  logits = (rng.normal(size=(B, N, C)) * 2).astype(np.float32)
  # Uneven masked counts per image: 4 and 1.
  mask = np.zeros((B, N), np.float32)
  mask[0, [0, 2, 3, 5]] = 1
  mask[1, 4] = 1
  classes = rng.integers(0, C, size=(B, N)).astype(np.int32)
  probs = _softmax(rng.normal(size=(B, N, C)) * 2)
  probs[..., 1] = 0.0  # a class the detector never predicts: 0 log 0 must be 0
  probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  return pred, target, logits, mask, classes, probs


def _reference(pred, target, logits, mask, classes, probs, wr, wc, reduction):
  """(loss, d/dpred, d/dlogits) written from the formulas."""
  pred, target, logits = (a.astype(np.float64) for a in (pred, target, logits))
  count = mask.sum()
  scale = 1.0 if reduction == "sum" else 1.0 / F
  l2 = ((pred - target) ** 2).sum(-1) * scale
  q = _softmax(logits)
  if probs is not None:
    p = probs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
      cls = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)
  else:
    p = np.eye(C)[classes]
    cls = -np.log(np.take_along_axis(q, classes[..., None], -1)[..., 0])
  loss = (wr * (l2 * mask).sum() + wc * (cls * mask).sum()) / count
  g_pred = wr * 2 * scale * (pred - target) * mask[..., None] / count
  g_logits = wc * (q - p) * mask[..., None] / count
  return loss, g_pred, g_logits, (l2 * mask).sum() / count, (cls * mask).sum() / count


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_region_prediction_vs_numpy(soft, reduction):
  pred, target, logits, mask, classes, probs = _case(0)
  probs = probs if soft else None
  wr, wc = 0.7, 1.3

  def fn(pr, lg):
    return visual.region_prediction_loss(
        pr, target, lg, mask, classes=classes, class_probs=probs, regression_weight=wr,
        class_weight=wc, regression_reduction=reduction)

  (loss, m), (g_pred, g_logits) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      jnp.asarray(pred), jnp.asarray(logits))
  ref_loss, ref_gp, ref_gl, ref_reg, ref_cls = _reference(
      pred, target, logits, mask, classes, probs, wr, wc, reduction)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(g_pred, ref_gp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_logits, ref_gl, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["regression"], ref_reg, rtol=1e-5)
  np.testing.assert_allclose(m["class_loss"], ref_cls, rtol=1e-5)
  np.testing.assert_allclose(m["loss_sum"], ref_loss * 5, rtol=1e-5)
  assert m["count"] == 5
  label = probs.argmax(-1) if soft else classes
  ref_acc = ((logits.argmax(-1) == label) * mask).sum() / 5
  np.testing.assert_allclose(m["class_accuracy"], ref_acc, rtol=1e-6)


def test_kl_is_zero_when_prediction_matches_detector():
  _, target, _, mask, _, probs = _case(1)
  logits = np.log(np.maximum(probs, 1e-30))
  loss, m = visual.region_prediction_loss(target, target, logits, mask, class_probs=probs)
  assert abs(float(m["class_loss"])) < 1e-5 and float(m["regression"]) == 0.0


def test_regression_only_and_empty_mask():
  pred, target, _, mask, _, _ = _case(2)
  loss, m = visual.region_prediction_loss(pred, target, None, mask, regression_weight=2.0)
  ref = 2.0 * (((pred.astype(np.float64) - target) ** 2).sum(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert m["class_loss"] == 0
  zeros = np.zeros_like(mask)
  loss, grad = jax.value_and_grad(
      lambda x: visual.region_prediction_loss(x, target, None, zeros)[0])(jnp.asarray(pred))
  assert loss == 0 and np.all(np.asarray(grad) == 0)


def test_patch_targets_vs_loops():
  rng = np.random.default_rng(3)
  pixels = rng.random((2, 8, 12, 3)).astype(np.float32)
  p = 4
  got = np.asarray(visual.patch_targets(pixels, p, normalize=False))
  got_norm = np.asarray(visual.patch_targets(pixels, p))
  assert got.shape == (2, 6, p * p * 3)
  for b in range(2):
    for gy in range(2):
      for gx in range(3):
        patch = pixels[b, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p, :].astype(np.float64)
        flat = patch.reshape(-1)  # (py, px, c) order
        n = gy * 3 + gx  # row-major over the patch grid
        np.testing.assert_allclose(got[b, n], flat, rtol=1e-6)
        norm = (flat - flat.mean()) / np.sqrt(flat.var() + 1e-6)
        np.testing.assert_allclose(got_norm[b, n], norm, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError):
    visual.patch_targets(pixels, 5)


def test_apply_visual_mask():
  x = np.ones((2, 3, 4), np.float32)
  m = np.array([[1, 0, 0], [0, 1, 1]])
  out = np.asarray(visual.apply_visual_mask(jnp.asarray(x), jnp.asarray(m)))
  np.testing.assert_array_equal(out[..., 0], 1 - m)
  np.testing.assert_array_equal(out.sum(-1), 4 * (1 - m))
