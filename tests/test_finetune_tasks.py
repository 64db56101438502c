"""Task forward passes and losses: against numpy / per-pair references, and sharded on 8 fake
devices equal to one device (value and gradients)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from finetune_util import random_batch, tiny_config
from unimo_jax import parallel
from unimo_jax.finetune import tasks
from unimo_jax.model import Unimo

KINDS = tasks.KINDS


def _task(kind, **kw):
  spec = tasks.TaskSpec(kind=kind, num_labels=1 if kind == "regression" else 3, head_hidden=24,
                        label_smoothing=0.1 if kind in ("captioning", "seq2seq") else 0.0, **kw)
  return tasks.Task(tiny_config(), spec)


def _params(task, seed=0):
  # one compiled program (op-by-op init compiles every differently shaped initialiser)
  return jax.jit(lambda k: nn.unbox(task.init_params(k)))(jax.random.key(seed))


def test_classification_loss_is_cross_entropy_of_the_head_on_encode_text():
  task = _task("classification")
  params = _params(task)
  batch = jax.tree.map(jnp.asarray, random_batch("classification", task.cfg))
  cls = jax.jit(lambda p, ids: task.model.apply({"params": p}, ids, method=Unimo.encode_text)[
      "cls"])(params["model"], batch["ids"])
  logits = np.asarray(task.head.apply({"params": params["head"]}, cls), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  nll = -np.log(p[np.arange(8), np.asarray(batch["label"])])
  w = np.asarray(batch["row_valid"], np.float64)
  loss_sum, sums = jax.jit(lambda p, bt: task.loss(p, bt, None, deterministic=True))(params, batch)
  np.testing.assert_allclose(loss_sum, (nll * w).sum(), rtol=1e-5)
  assert float(sums["count"]) == 7.0


def test_retrieval_joint_scoring_equals_scoring_each_pair():
  task = _task("retrieval", ranking_loss="circle")
  params = _params(task)
  b = random_batch("retrieval", task.cfg, b=3, negatives=2)
  one = jax.jit(lambda p, pix, ids: task.outputs(p, {"pixels": pix[None], "ids": ids[None]})[0])
  score = lambda pix, ids: float(one(params, pix, ids))
  from test_finetune_losses import _circle_np
  ref = []
  for i in range(3):
    sp = score(b["pixels"][i], b["ids"][i])
    si = np.array([score(b["neg_pixels"][i, j], b["ids"][i]) for j in range(2)])
    st = np.array([score(b["pixels"][i], b["neg_ids"][i, j]) for j in range(2)])
    li = _circle_np(np.array([sp]), si[None], b["neg_image_valid"][i][None], 0.2, 1.0)[0]
    lt = _circle_np(np.array([sp]), st[None], b["neg_text_valid"][i][None], 0.2, 1.0)[0]
    ref.append(0.5 * (li + lt)[0] * b["row_valid"][i])
  loss_sum, sums = jax.jit(lambda p, bt: task.loss(p, bt, None, deterministic=True))(
      params, jax.tree.map(jnp.asarray, b))
  np.testing.assert_allclose(loss_sum, sum(ref), rtol=1e-4)
  assert float(sums["count"]) == 2.0


def test_dual_agreement_is_the_cmcl_product_of_text_and_image_encoded_alone():
  task = _task("entailment", dual_agreement=True)
  params = _params(task)
  # give the zero-initialised dual fc weights, so the agreement reaches the logits
  params["head"]["dual"]["kernel"] = jax.random.normal(jax.random.key(4),
                                                       params["head"]["dual"]["kernel"].shape)
  b = jax.tree.map(jnp.asarray, random_batch("entailment", task.cfg, b=4))
  apply = lambda *a, method: task.model.apply({"params": params["model"]}, *a, method=method)
  t = apply(apply(b["ids"], method=Unimo.encode_text)["cls"], method=Unimo.cmcl_text)
  i = apply(apply({"pixels": b["pixels"]}, method=Unimo.encode_image)["img"],
            method=Unimo.cmcl_image)
  enc = apply({"pixels": b["pixels"]}, b["ids"], method=Unimo.encode_pair)
  ref = task.head.apply({"params": params["head"]}, enc["cls"], enc["img"],
                        np.asarray(t) * np.asarray(i) * task.cfg.projection_dim)
  np.testing.assert_allclose(task.outputs(params, b), ref, rtol=1e-5, atol=1e-6)
  # the agreement matters: other images change it
  b2 = dict(b, pixels=b["pixels"][::-1])
  assert not np.allclose(task.agreement(params, {"pixels": b2["pixels"]}, b["ids"]),
                         np.asarray(t) * np.asarray(i) * task.cfg.projection_dim)
  with pytest.raises(ValueError, match="dual_agreement"):
    tasks.TaskSpec(kind="vqa", dual_agreement=True).validate()


def test_retrieval_contrastive_term_is_the_infonce_of_each_item_encoded_alone():
  """loss = ranking of the cross scores + w * in-batch InfoNCE of the dual embeddings, the
  embeddings taken image by image and caption by caption through the model's CMCL entry
  points (an independent path from the batched one in the task)."""
  from test_finetune_losses import _infonce_np
  w_c, tau = 0.7, 0.2
  task = _task("retrieval", ranking_loss="softmax", dual_agreement=True,
               contrastive_weight=w_c, contrastive_temperature=tau)
  plain = _task("retrieval", ranking_loss="softmax", dual_agreement=True)
  params = _params(task)
  b = random_batch("retrieval", task.cfg, b=3, negatives=2)
  jb = jax.tree.map(jnp.asarray, b)
  apply = lambda *a, method: task.model.apply({"params": params["model"]}, *a, method=method)
  e_t = lambda ids: np.asarray(apply(apply(jnp.asarray(ids)[None], method=Unimo.encode_text)[
      "cls"], method=Unimo.cmcl_text), np.float64)[0]
  e_i = lambda pix: np.asarray(apply(apply({"pixels": jnp.asarray(pix)[None]},
                                           method=Unimo.encode_image)["img"],
                                     method=Unimo.cmcl_image), np.float64)[0]
  img = np.stack([e_i(x) for x in b["pixels"]])
  txt = np.stack([e_t(x) for x in b["ids"]])
  nimg = np.stack([[e_i(x) for x in row] for row in b["neg_pixels"]])
  ntxt = np.stack([[e_t(x) for x in row] for row in b["neg_ids"]])
  ref, ref_correct = _infonce_np(img, txt, nimg, ntxt, b["row_valid"].astype(np.float64),
                                 b["neg_image_valid"], b["neg_text_valid"], tau)
  loss = jax.jit(lambda p, bt: task.loss(p, bt, None, deterministic=True))
  base = jax.jit(lambda p, bt: plain.loss(p, bt, None, deterministic=True))
  (got, sums), (want_rank, _) = loss(params, jb), base(params, jb)
  np.testing.assert_allclose(sums["contrastive_sum"], ref, rtol=1e-4)
  assert float(sums["contrastive_correct"]) == ref_correct
  np.testing.assert_allclose(got, want_rank + w_c * ref, rtol=1e-4)
  with pytest.raises(ValueError, match="contrastive_weight"):
    tasks.TaskSpec(kind="entailment", contrastive_weight=1.0).validate()
  with pytest.raises(ValueError, match="contrastive_temperature"):
    tasks.TaskSpec(kind="retrieval", contrastive_temperature=0.0).validate()


def test_captioning_and_seq2seq_count_target_tokens():
  for kind in ("captioning", "seq2seq"):
    task = _task(kind)
    b = random_batch(kind, task.cfg)
    _, sums = jax.jit(lambda p, bt: task.loss(p, bt, None, deterministic=True))(
        _params(task), jax.tree.map(jnp.asarray, b))
    assert float(sums["count"]) == float((b["weights"] * b["row_valid"][:, None]).sum())


def test_seq2seq_source_does_not_see_the_target():
  """Changing target tokens leaves the logits at every source-conditioned first slot intact
  (slot 0 reads [CLS] of the target, which sees only the source)."""
  task = _task("seq2seq")
  params = _params(task)
  b = random_batch("seq2seq", task.cfg, last_invalid=False)
  out1 = task.token_logits(params, jax.tree.map(jnp.asarray, b))
  b2 = dict(b)
  ids = b["ids"].copy()
  tgt = b["segments"] == 2
  later = tgt & (b["position_ids"] >= 1)
  ids[later] = 5
  b2["ids"] = ids
  out2 = task.token_logits(params, jax.tree.map(jnp.asarray, b2))
  np.testing.assert_allclose(out1[:, 0], out2[:, 0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out1[:, 1], out2[:, 1])


# One kind runs in the fast suite; every kind under -m slow (each compiles its own model).
@pytest.mark.parametrize("kind", [k if k == "vqa" else pytest.param(k, marks=pytest.mark.slow)
                                  for k in KINDS] + ["retrieval_dual", "retrieval_contrastive"])
def test_sharded_loss_and_gradients_equal_one_device(kind):
  kind, extra = kind.partition("_")[::2]
  task = _task(kind, **{"dual": {"dual_agreement": True},
                        "contrastive": {"dual_agreement": True, "contrastive_weight": 0.5},
                        "": {}}[extra])
  params = _params(task)
  batch = random_batch(kind, task.cfg, b=8)
  key = jax.random.key(7)

  def f(p, bt):
    loss_sum, sums = task.loss(p, bt, key, deterministic=False)
    return loss_sum / jnp.maximum(sums["count"], 1.0)

  grad = jax.jit(jax.value_and_grad(f))
  one = grad(params, jax.tree.map(jnp.asarray, batch))
  mesh = parallel.make_mesh((-1, 1, 1))
  assert mesh.devices.size == 8
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  sharded = {k: jax.device_put(v, rows) for k, v in batch.items()}
  params8 = jax.device_put(params, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    eight = grad(params8, sharded)
  np.testing.assert_allclose(eight[0], one[0], rtol=2e-5)
  flat1, flat8 = jax.tree.leaves(one[1]), jax.tree.leaves(eight[1])
  for a, b in zip(flat1, flat8):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6)
  assert np.isfinite(float(one[0]))
