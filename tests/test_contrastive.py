"""CMCL against an independent float64 numpy reference, on 8 fake CPU devices.

The reference below builds the column lists with plain loops, straight from the formula of
issue 3 / DESIGN.md, and differentiates it by hand (softmax differences); that hand gradient is
itself checked against central finite differences. Every implementation of ``cmcl_loss`` must
match it in loss, metrics and gradients w.r.t. every input and the log-temperature.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from unimo_jax.losses import contrastive

AUG = ("positive_texts", "negative_texts", "positive_images")


# ----------------------------------------------------------------------------- numpy reference
def _logsumexp(x):
  m = np.max(x)
  return m + math.log(np.sum(np.exp(x - m)))


def numpy_cmcl(img, txt, log_t, pair_valid, aug, valid, temperature_range=(0.001, 0.5)):
  """Loss, metrics and gradients (dict keyed like the inputs, plus 'log_temperature')."""
  lo, hi = temperature_range
  raw_tau = math.exp(log_t)
  tau = min(max(raw_tau, lo), hi)
  clipped = not lo < raw_tau < hi
  arrays = dict(image=np.asarray(img, np.float64), text=np.asarray(txt, np.float64))
  arrays.update({k: np.asarray(v, np.float64) for k, v in aug.items()})
  grads = {k: np.zeros_like(v) for k, v in arrays.items()}
  grads["log_temperature"] = 0.0
  B = len(img)

  # Columns: (input name, index into that input, owner row or -1).
  text_cols, image_cols = [], []
  for r in range(B):
    if not pair_valid[r]:
      continue
    text_cols.append(("text", (r,), r))
    image_cols.append(("image", (r,), r))
    for name, cols, positive in (("positive_texts", text_cols, True),
                                 ("negative_texts", text_cols, False),
                                 ("positive_images", image_cols, True)):
      if name in arrays:
        for k in range(arrays[name].shape[1]):
          if valid[name][r, k]:
            cols.append((name, (r, k), r if positive else -1))

  n = sum(bool(v) for v in pair_valid)
  metrics = dict(num_anchors=n, num_text_columns=len(text_cols),
                 num_image_columns=len(image_cols))
  pos_logits, neg_logits, total = [], [], 0.0
  for direction, anchor_name, cols in (("i2t", "image", text_cols), ("t2i", "text", image_cols)):
    loss, correct = 0.0, 0
    for a in range(B):
      if not pair_valid[a]:
        continue
      anchor = arrays[anchor_name][a]
      logits = np.array([anchor @ arrays[name][idx] / tau for name, idx, _ in cols])
      is_pos = np.array([owner == a for _, _, owner in cols])
      loss += _logsumexp(logits) - _logsumexp(logits[is_pos])
      correct += bool(is_pos[np.argmax(logits)])
      pos_logits += list(logits[is_pos])
      neg_logits += list(logits[~is_pos])
      # d loss_a / d logit_c = softmax over all columns - softmax over the positives.
      p_all = np.exp(logits - _logsumexp(logits))
      p_pos = np.zeros_like(logits)
      p_pos[is_pos] = np.exp(logits[is_pos] - _logsumexp(logits[is_pos]))
      g = 0.5 / n * (p_all - p_pos)
      for gc, lc, (name, idx, _) in zip(g, logits, cols):
        grads[anchor_name][a] += gc * arrays[name][idx] / tau
        grads[name][idx] += gc * anchor / tau
        if not clipped:
          grads["log_temperature"] += gc * -lc  # logit = cos * exp(-log_t)
    metrics[f"loss_{direction}"] = loss / n
    metrics[f"accuracy_{direction}"] = correct / n
    total += 0.5 * loss / n
  metrics["positive_logit"] = np.mean(pos_logits)
  metrics["negative_logit"] = np.mean(neg_logits)
  metrics["temperature"] = tau
  return total, metrics, grads


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_case(seed, B=16, d=8, Kp=2, Kn=3, Ki=1, pair_valid=None, p_aug=0.6):
  """Random unit embeddings; augmentations valid with probability p_aug (None when K is None)."""
  rng = np.random.default_rng(seed)
  img = _unit(rng.normal(size=(B, d)))
  txt = _unit(0.5 * img + rng.normal(size=(B, d)))  # Correlated, so some anchors are right.
  if pair_valid is None:
    pair_valid = rng.random(B) < 0.7
  aug, valid = {}, {}
  for name, k in zip(AUG, (Kp, Kn, Ki)):
    if k is not None:
      aug[name] = _unit(rng.normal(size=(B, k, d)))
      valid[name] = rng.random((B, k)) < p_aug
  return img, txt, np.asarray(pair_valid, bool), aug, valid


# ----------------------------------------------------------------------------- helpers
def auto_mesh(shape, names, num_devices=None):
  devices = np.array(jax.devices()[:num_devices or math.prod(shape)]).reshape(shape)
  return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


_FNS = {}


def loss_and_grads(implementation, mesh, img, txt, log_t, pair_valid, aug, valid,
                   temperature_range=(0.001, 0.5), shard_inputs=False):
  """jit(value_and_grad) of cmcl_loss in float32; grads w.r.t. embeddings, augmentations, log_t."""
  key = (implementation, id(mesh), temperature_range, tuple(sorted(aug)))
  if key not in _FNS:
    def loss_fn(emb, log_t, pair_valid, valid):
      kw = {k: emb[k] for k in aug}
      kw.update({k + "_valid": valid[k] for k in aug})
      return contrastive.cmcl_loss(
          emb["image"], emb["text"], log_temperature=log_t, pair_valid=pair_valid, mesh=mesh,
          implementation=implementation, temperature_range=temperature_range, **kw)
    _FNS[key] = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  emb = dict(image=img, text=txt, **aug)
  emb = {k: jnp.asarray(v, jnp.float32) for k, v in emb.items()}
  if shard_inputs:  # As a sharded train step would hand them over.
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    emb = jax.device_put(emb, sharding)
  (loss, metrics), (g_emb, g_t) = _FNS[key](emb, jnp.float32(log_t), pair_valid, valid)
  grads = dict(g_emb, log_temperature=g_t)
  return float(loss), {k: float(v) for k, v in metrics.items()}, jax.device_get(grads)


def assert_grads_close(actual, expected, rtol=1e-5):
  assert set(actual) == set(expected)
  for k in expected:
    a, e = np.asarray(actual[k], np.float64), np.asarray(expected[k], np.float64)
    # Entries near zero are judged against the tensor's scale.
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * max(np.max(np.abs(e), initial=0.0), 1e-6),
                               err_msg=k)


def check_against_numpy(implementation, mesh, case, log_t=math.log(0.07), **kw):
  img, txt, pair_valid, aug, valid = case
  loss, metrics, grads = loss_and_grads(implementation, mesh, img, txt, log_t, pair_valid, aug,
                                        valid, **kw)
  tr = kw.get("temperature_range", (0.001, 0.5))
  ref_loss, ref_metrics, ref_grads = numpy_cmcl(img, txt, log_t, pair_valid, aug, valid, tr)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for k, v in ref_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  assert_grads_close(grads, ref_grads)
  return grads


MESH = None


def mesh_4x2():
  global MESH
  if MESH is None:
    MESH = auto_mesh((4, 2), ("data", "fsdp"))
  return MESH


IMPLS = ["all_gather", "ring", "reference"]


# ----------------------------------------------------------------------------- tests
def test_reference_gradient_matches_finite_differences():
  img, txt, pair_valid, aug, valid = make_case(1, B=5, d=3, Kp=1, Kn=2, Ki=1)
  log_t = math.log(0.3)
  _, _, grads = numpy_cmcl(img, txt, log_t, pair_valid, aug, valid)
  inputs = dict(image=img, text=txt, **aug)

  def loss_at(name, idx, delta):
    x = {k: v.copy() for k, v in inputs.items()}
    if name == "log_temperature":
      return numpy_cmcl(x["image"], x["text"], log_t + delta, pair_valid,
                        {k: x[k] for k in aug}, valid)[0]
    x[name][idx] += delta
    return numpy_cmcl(x["image"], x["text"], log_t, pair_valid, {k: x[k] for k in aug}, valid)[0]

  eps = 1e-6
  for name in list(inputs) + ["log_temperature"]:
    shape = () if name == "log_temperature" else inputs[name].shape
    fd = np.zeros(shape)
    for idx in np.ndindex(*shape):
      fd[idx] = (loss_at(name, idx, eps) - loss_at(name, idx, -eps)) / (2 * eps)
    np.testing.assert_allclose(grads[name], fd, atol=1e-8, err_msg=name)


def test_hand_computed_two_pairs():
  # img0=(1,0), img1=(0,1), txt0=(1,0), txt1=(0.6,0.8), tau=0.5 (logits = 2*cos):
  #   i2t: img0 -> [2, 1.2]: log(1+e^-0.8) = 0.371101; img1 -> [0, 1.6]: log(1+e^-1.6) = 0.183901
  #   t2i: txt0 -> [2, 0]:   log(1+e^-2)   = 0.126928; txt1 -> [1.2, 1.6]: log(1+e^-0.4) = 0.513015
  #   loss = ((0.371101 + 0.183901)/2 + (0.126928 + 0.513015)/2) / 2 = 0.298736
  #   every argmax is the pair's own column: both accuracies 1.
  #   positive logits 2, 1.6, 2, 1.6 -> mean 1.8; negatives 1.2, 0, 0, 1.2 -> mean 0.6.
  img = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  txt = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
  log_t = math.log(0.5)
  two_devices = auto_mesh((2,), ("data",))
  for implementation, mesh in (("reference", None), ("all_gather", two_devices),
                               ("ring", two_devices)):
    loss, metrics = jax.jit(lambda img, txt: contrastive.cmcl_loss(
        img, txt, log_temperature=log_t, pair_valid=np.ones(2, bool), mesh=mesh,
        implementation=implementation, temperature_range=(0.001, 1.0)))(img, txt)
    np.testing.assert_allclose(float(loss), 0.298736, atol=2e-6)
    np.testing.assert_allclose(float(metrics["loss_i2t"]), (0.371101 + 0.183901) / 2, atol=2e-6)
    assert float(metrics["accuracy_i2t"]) == float(metrics["accuracy_t2i"]) == 1.0
    np.testing.assert_allclose(float(metrics["positive_logit"]), 1.8, atol=1e-6)
    np.testing.assert_allclose(float(metrics["negative_logit"]), 0.6, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLS)
def test_all_augmentations_uneven_valid_rows(implementation):
  # Device 0 (rows 0-1) has no valid pair, device 3 only one; augmentations valid at random.
  pair_valid = np.ones(16, bool)
  pair_valid[[0, 1, 6, 9]] = False
  case = make_case(2, pair_valid=pair_valid)
  check_against_numpy(implementation, mesh_4x2(), case, shard_inputs=True)


@pytest.mark.parametrize("implementation", ["all_gather", "ring"])
def test_no_augmentations(implementation):
  case = make_case(3, Kp=None, Kn=None, Ki=None)
  check_against_numpy(implementation, mesh_4x2(), case)


@pytest.mark.parametrize("implementation", ["all_gather", "ring"])
def test_zero_size_augmentations_and_missing_ones(implementation):
  # Kp = Ki = 0 (absent), hard negatives present but none valid on most rows.
  case = make_case(4, Kp=0, Kn=2, Ki=0, p_aug=0.2)
  check_against_numpy(implementation, mesh_4x2(), case)


@pytest.mark.parametrize("implementation", ["all_gather", "ring"])
def test_other_mesh_layouts(implementation):
  # The batch over one axis of 4 with a replicated 'tensor' axis, and 'fsdp' absent.
  mesh = auto_mesh((4, 2), ("data", "tensor"))
  case = make_case(5, B=8, Kp=1, Kn=4, Ki=2)
  check_against_numpy(implementation, mesh, case)


@pytest.mark.parametrize("log_t", [math.log(0.9), math.log(0.0002)])
@pytest.mark.parametrize("implementation", ["all_gather", "ring"])
def test_clipped_temperature_has_zero_gradient(implementation, log_t):
  case = make_case(6, Kp=1, Kn=1, Ki=1)
  grads = check_against_numpy(implementation, mesh_4x2(), case, log_t=log_t)
  assert grads["log_temperature"] == 0.0


def test_invalid_rows_with_zero_embeddings_give_finite_results():
  # Padding rows carry zero vectors; nothing may become NaN, and only valid rows matter.
  img, txt, pair_valid, aug, valid = make_case(7, Kp=1, Kn=1, Ki=1)
  pair_valid[:] = False
  pair_valid[[3, 12]] = True
  for x in (img, txt, *aug.values()):
    x[~pair_valid] = 0.0
  for implementation in ("all_gather", "ring"):
    loss, _, grads = loss_and_grads(implementation, mesh_4x2(), img, txt, math.log(0.07),
                                    pair_valid, aug, valid)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_no_valid_pair_gives_zero_loss():
  img, txt, _, aug, valid = make_case(8, Kp=1, Kn=1, Ki=1)
  for implementation in ("all_gather", "ring"):
    loss, metrics, grads = loss_and_grads(implementation, mesh_4x2(), img, txt, math.log(0.07),
                                          np.zeros(16, bool), aug, valid)
    assert loss == 0.0 and metrics["num_anchors"] == 0.0
    assert all(np.all(g == 0) for g in grads.values())


def test_temperature_helpers():
  assert np.isclose(float(contrastive.temperature(contrastive.init_log_temperature())), 0.07)
  assert float(contrastive.temperature(jnp.log(5.0))) == 0.5
  assert np.isclose(float(contrastive.temperature(jnp.log(1e-5))), 0.001)


def test_rejects_bad_shapes():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError):
    contrastive.cmcl_loss(x, x, log_temperature=0.0, pair_valid=np.ones(4),
                          negative_texts=np.zeros((4, 2, 5), np.float32))
  with pytest.raises(ValueError):
    contrastive.cmcl_loss(x, x, log_temperature=0.0, pair_valid=np.ones(4), implementation="x")
  with pytest.raises(ValueError):  # 4 rows over 8 batch shards.
    contrastive.cmcl_loss(x, x, log_temperature=0.0, pair_valid=np.ones(4),
                          mesh=auto_mesh((8,), ("data",)))


def test_memory_benchmark_runs_on_a_tiny_batch(capsys):
  from benchmark_util import load_benchmark  # pylint: disable=import-outside-toplevel
  module = load_benchmark("cmcl_memory")
  assert module.main(["--batch", "64", "--dim", "8", "--negatives", "0,2", "--runs", "1"]) == 0
  out = capsys.readouterr().out
  assert out.count("ratio ring/all_gather") == 2
