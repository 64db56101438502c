"""Retrieval evaluation of a cross-encoder: every (image, caption) pair scored (the official
protocol, ``evaluation.rerank_k = 0``) equals a brute-force numpy ranking of the cross scores
computed on one device, and re-ranking the dual top K with K = N equals it."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_util import tiny_config
from unimo_jax import parallel
from unimo_jax.finetune import config as config_lib
from unimo_jax.finetune import evaluate as eval_lib
from unimo_jax.finetune import tasks

IMAGES = 5


def _collection():
  """5 images; captions [5, 3, L] with 8 valid slots (image 1 has one caption, 3 has two)."""
  cfg = tiny_config()
  r = np.random.default_rng(0)
  pixels = r.normal(size=(IMAGES, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  length = 8
  table = np.full((IMAGES, 3, length), cfg.pad_id, np.int32)
  valid = np.zeros((IMAGES, 3), bool)
  for i, n in enumerate([2, 1, 2, 2, 1]):
    for j in range(n):
      k = int(r.integers(2, length - 1))
      table[i, j, 0], table[i, j, k] = cfg.cls_id, cfg.sep_id
      table[i, j, 1:k] = r.integers(4, cfg.vocab_size - 1, k - 1)
      valid[i, j] = True
  meta = dict(scenes=types.SimpleNamespace(visual={"pixels": pixels}),
              caption_table=(table, valid))
  return cfg, meta


def _task_and_params(cfg):
  task = tasks.Task(cfg, tasks.TaskSpec(kind="retrieval", head_hidden=16))
  params = jax.jit(lambda k: nn.unbox(task.init_params(k)))(jax.random.key(1))
  # a non-zero head so that the cross scores differ between pairs
  params["head"] = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2),
                                                                         x.shape), params["head"])
  return task, params


def _brute_force_recalls(scores, hits, prefix):
  """For each query: sort candidates by score, best first, a wrong candidate before a right
  one on a tie; the rank is the first right candidate's place."""
  ranks = []
  for q in range(scores.shape[0]):
    order = sorted(range(scores.shape[1]), key=lambda c: (-scores[q, c], bool(hits[q, c])))
    ranks.append(next(i for i, c in enumerate(order) if hits[q, c]))
  ranks = np.asarray(ranks)
  return {f"{prefix}R@{k}": float(np.mean(ranks < k)) for k in (1, 5, 10)}


def _evaluate(task, params, meta, **settings):
  mesh = parallel.make_mesh((-1, 1, 1))
  return eval_lib.evaluate_split(task, eval_lib.put_params(params, mesh), [], meta, mesh,
                                 eval_lib.GenerationSettings(**settings))


def test_full_cross_scoring_equals_a_brute_force_ranking_and_rerank_with_k_n():
  cfg, meta = _collection()
  task, params = _task_and_params(cfg)
  table, valid = meta["caption_table"]
  img_of, cap_of = np.nonzero(valid)
  texts = table[img_of, cap_of]                       # 8 candidate captions
  pixels = meta["scenes"].visual["pixels"]
  # reference: every pair at once on one device
  ii, tt = np.repeat(np.arange(IMAGES), len(texts)), np.tile(np.arange(len(texts)), IMAGES)
  scores = np.asarray(task.outputs(params, {"pixels": jnp.asarray(pixels[ii]),
                                            "ids": jnp.asarray(texts[tt])}))
  scores = scores.reshape(IMAGES, len(texts))
  assert np.unique(scores.round(6)).size == scores.size  # no ties: the ranking is well defined
  hits = img_of[None, :] == np.arange(IMAGES)[:, None]
  want = dict(_brute_force_recalls(scores, hits, "i2t_"),
              **_brute_force_recalls(scores.T, hits.T, "t2i_"))
  assert 0 < want["i2t_R@1"] + want["t2i_R@1"] < 2  # neither all hits nor all misses

  full = _evaluate(task, params, meta, rerank_k=0, cross_batch_size=8)  # 40 pairs, 5 batches
  for key, value in want.items():
    assert full[key] == pytest.approx(value), key
  assert full["cross_pairs"] == IMAGES * len(texts) == full["full_cross_pairs"]
  assert full["rerank_k"] == 0 and full["cross_seconds"] >= 0.0

  every = _evaluate(task, params, meta, rerank_k=len(texts), cross_batch_size=8)
  for key in want:
    assert every[key] == pytest.approx(full[key]), key
  assert every["cross_pairs"] == 2 * IMAGES * len(texts)  # each direction scores all pairs


def _dual_cosines(task, params, pixels, texts):
  """[images, texts] cosines of the dual encoder, computed image by image / text by text."""
  e_img = np.stack([np.asarray(task.embed_images(params, {"pixels": jnp.asarray(p[None])}))[0]
                    for p in pixels])
  e_txt = np.stack([np.asarray(task.embed_texts(params, jnp.asarray(t[None])))[0]
                    for t in texts])
  return e_img.astype(np.float64) @ e_txt.T.astype(np.float64)


@pytest.mark.parametrize("rerank_k", [0, 3])
def test_rerank_fusion_ranks_by_cross_plus_w_times_the_dual_cosine(rerank_k):
  cfg, meta = _collection()
  task, params = _task_and_params(cfg)
  table, valid = meta["caption_table"]
  img_of, cap_of = np.nonzero(valid)
  texts = table[img_of, cap_of]
  pixels = meta["scenes"].visual["pixels"]
  ii, tt = np.repeat(np.arange(IMAGES), len(texts)), np.tile(np.arange(len(texts)), IMAGES)
  cross = np.asarray(task.outputs(params, {"pixels": jnp.asarray(pixels[ii]),
                                           "ids": jnp.asarray(texts[tt])}), np.float64)
  cross = cross.reshape(IMAGES, len(texts))
  dual = _dual_cosines(task, params, pixels, texts)
  hits = img_of[None, :] == np.arange(IMAGES)[:, None]
  w = 10.0 * float(np.std(cross) / np.std(dual))  # the cosine weighs enough to reorder
  fused = cross + w * dual
  if rerank_k:  # candidates outside a query's dual top k keep their dual rank (behind the k)
    def restricted(scores, d):
      top = np.argsort(-d, axis=1, kind="stable")[:, :rerank_k]
      out = np.full_like(scores, -1e9)
      np.put_along_axis(out, top, np.take_along_axis(scores, top, 1), 1)
      return out
    want = dict(_brute_force_recalls(restricted(fused, dual), hits, "i2t_"),
                **_brute_force_recalls(restricted(fused.T, dual.T), hits.T, "t2i_"))
  else:
    want = dict(_brute_force_recalls(fused, hits, "i2t_"),
                **_brute_force_recalls(fused.T, hits.T, "t2i_"))
  plain = _evaluate(task, params, meta, rerank_k=rerank_k, cross_batch_size=8)
  got = _evaluate(task, params, meta, rerank_k=rerank_k, cross_batch_size=8, rerank_fusion=w)
  for key, value in want.items():
    if rerank_k and key.endswith("R@10"):
      continue  # past k the rank is the dual one, which the restricted reference does not keep
    assert got[key] == pytest.approx(value), key
  assert got["rerank_fusion"] == w and plain["rerank_fusion"] == 0.0
  assert any(got[k] != plain[k] for k in want)  # the fusion changed some ranking


def test_pairs_are_fed_in_bounded_batches_covering_every_pair_once():
  cfg, meta = _collection()
  task, params = _task_and_params(cfg)
  texts = np.arange(7)[:, None] * np.ones((1, 4), np.int32)  # 7 captions
  visual = {"pixels": np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones(
      (1, cfg.image_size, cfg.image_size, 3), np.float32)}
  scorer = eval_lib.CrossScorer(task, params, visual, texts, None, size=8)
  batches = list(scorer._batches(21, lambda lo, hi: divmod(np.arange(lo, hi), 7)))
  assert [len(b["ids"]) for b in batches] == [8, 8, 8]
  seen = [(int(b["pixels"][r, 0, 0, 0]), int(b["ids"][r, 0])) for b in batches
          for r in np.nonzero(b["row_valid"])[0]]
  assert sorted(seen) == [(i, j) for i in range(3) for j in range(7)]
  assert [int(i) for b in batches for i in b["index"][b["row_valid"]]] == list(range(21))


@pytest.mark.parametrize("field, value, fragment", [
    ("rerank_k", -1, "evaluation.rerank_k must be an integer >= 0"),
    ("cross_batch_size", 0, "evaluation.cross_batch_size must be an integer >= 1"),
    ("rerank_fusion", -1.0, "evaluation.rerank_fusion=-1.0 must be a number >= 0"),
])
def test_retrieval_evaluation_keys_validate(field, value, fragment):
  import importlib
  c = importlib.import_module("experiments.configs.finetune.flickr30k").get_config("smoke")
  config_lib.validate(c, num_devices=8, check_files=False)
  c.evaluation[field] = value
  with pytest.raises(config_lib.ConfigError, match=fragment):
    config_lib.validate(c, num_devices=8, check_files=False)


def test_official_flickr30k_scores_every_pair():
  import importlib
  for arg in ("base", "large"):
    c = importlib.import_module("experiments.configs.finetune.flickr30k").get_config(arg)
    assert c.evaluation.rerank_k == 0
