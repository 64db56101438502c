"""Language losses vs an independent float64 numpy reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unimo_jax.losses import language


def _np_reference(logits, targets, weights, eps):
  """Loss, gradient w.r.t. logits, accuracy: softmax CE with uniform label smoothing."""
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  v = x.shape[-1]
  q = np.full(x.shape, eps / v)
  np.put_along_axis(q, targets[..., None], 1 - eps + eps / v, axis=-1)
  per_tok = -(q * logp).sum(-1)
  count = weights.sum()
  loss = (per_tok * weights).sum() / count
  grad = (np.exp(logp) - q) * weights[..., None] / count
  acc = ((logits.argmax(-1) == targets) * weights).sum() / count
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return loss, grad, acc, (nll * weights).sum()


def _case(seed, b=3, p=5, v=11, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(b, p, v)) * scale).astype(np.float32)
  targets = rng.integers(0, v, size=(b, p)).astype(np.int32)
  # Uneven counts per row: 5, 2 and 0 real targets.
  weights = np.zeros((b, p), np.float32)
  weights[0] = 1
  weights[1, :2] = 1
  return logits, targets, weights


@pytest.mark.parametrize("fn", [language.masked_lm_loss, language.seq2seq_loss])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_value_and_gradient_vs_numpy(fn, eps):
  logits, targets, weights = _case(0)
  ref_loss, ref_grad, ref_acc, ref_nll = _np_reference(logits, targets, weights, eps)
  (loss, metrics), grad = jax.value_and_grad(
      lambda x: fn(x, targets, weights, label_smoothing=eps), has_aux=True)(jnp.asarray(logits))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  assert metrics["count"] == 7
  np.testing.assert_allclose(metrics["loss_sum"], ref_loss * 7, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], ref_acc, rtol=1e-6)
  np.testing.assert_allclose(metrics["nll_sum"], ref_nll, rtol=1e-6)
  # Slots with weight 0 get no gradient.
  assert np.all(np.asarray(grad)[weights == 0] == 0)


def test_normalised_by_total_count_not_row_mean():
  logits, targets, weights = _case(1)
  loss, _ = language.masked_lm_loss(logits, targets, weights)
  ref_loss = _np_reference(logits, targets, weights, 0.0)[0]
  # A mean of per-row means would weigh row 1's two targets like row 0's five.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  # Micro-batches recombined over the total count equal the whole batch.
  parts = [language.masked_lm_loss(logits[i:i + 1], targets[i:i + 1], weights[i:i + 1])[1]
           for i in range(3)]
  combined = language.renormalize(parts)
  np.testing.assert_allclose(combined["loss"], ref_loss, rtol=1e-6)
  assert combined["count"] == 7


def test_all_padding_gives_zero_not_nan():
  logits, targets, _ = _case(2)
  zeros = np.zeros(targets.shape, np.float32)
  (loss, m), grad = jax.value_and_grad(
      lambda x: language.seq2seq_loss(x, targets, zeros), has_aux=True)(jnp.asarray(logits))
  assert loss == 0 and m["count"] == 0 and m["accuracy"] == 0
  assert np.all(np.asarray(grad) == 0)


def test_bf16_and_extreme_logits_stay_finite_and_exact():
  logits, targets, weights = _case(3, v=50, scale=30.0)
  logits = logits + 5e3 * (np.arange(50) % 2)  # huge offsets: a naive exp overflows
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  loss, _ = language.masked_lm_loss(bf16, targets, weights, label_smoothing=0.1)
  ref = _np_reference(np.asarray(bf16.astype(jnp.float32)), targets, weights, 0.1)[0]
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  grad = jax.grad(lambda x: language.masked_lm_loss(x, targets, weights)[0])(bf16)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_global_count_under_sharding():
  """Jitted on a batch sharded over 8 devices, the loss equals the unsharded reference."""
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(8, 4, 13)).astype(np.float32)
  targets = rng.integers(0, 13, size=(8, 4)).astype(np.int32)
  weights = (rng.random((8, 4)) < np.linspace(0.1, 0.9, 8)[:, None]).astype(np.float32)
  weights[0, 0] = 1
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  fn = jax.jit(jax.value_and_grad(lambda x, t, w: language.masked_lm_loss(x, t, w)[0]))
  loss, grad = fn(shard(logits), shard(targets), shard(weights))
  ref_loss, ref_grad, _, _ = _np_reference(logits, targets, weights, 0.0)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
