"""Retrieval recall, hard-negative accuracy and caption metrics against hand-computed values."""
import math

import numpy as np
import pytest

from unimo_jax.evaluation import captioning
from unimo_jax.evaluation import hard_negatives
from unimo_jax.evaluation import retrieval


def _embeddings_for(scores):
  """Image/text embeddings whose dot products are exactly ``scores`` [I, T]: image i = e_i."""
  scores = np.asarray(scores, np.float32)
  return np.eye(scores.shape[0], dtype=np.float32), scores.T.copy()


# 3 images, 6 captions; captions 0,1 -> image 0, 2,3 -> image 1, 4,5 -> image 2.
SCORES = np.array([
    #  c0   c1   c2   c3   c4   c5
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],   # image 0: best correct c0 (0.9) is first -> rank 0
    [0.7, 0.6, 0.1, 0.5, 0.8, 0.2],   # image 1: best correct c3 (0.5); c0, c1, c4 above -> rank 3
    [0.1, 0.2, 0.3, 0.4, 0.0, 0.35],  # image 2: best correct c5 (0.35); c3 above -> rank 1
])
TEXT_IMAGE = np.array([0, 0, 1, 1, 2, 2])


def test_recall_at_k_hand_built_matrix():
  img, txt = _embeddings_for(SCORES)
  out = retrieval.recall_metrics(img, txt, TEXT_IMAGE, ks=(1, 2, 5))
  np.testing.assert_array_equal(out["ranks"]["i2t"], [0, 3, 1])
  assert out["i2t_r@1"] == (1.0, 3.0)
  assert out["i2t_r@2"] == (2.0, 3.0)
  assert out["i2t_r@5"] == (3.0, 3.0)
  # t2i: column by column, rank of the own image among 3.
  # c0 (img 0): .9 vs .7 .1 -> 0; c1 (img 0): .1 vs .6 .2 -> 2; c2 (img 1): .1 vs .8 .3 -> 2;
  # c3 (img 1): .5 vs .2 .4 -> 0; c4 (img 2): .0 vs .3 .8 -> 2; c5 (img 2): .35 vs .0 .2 -> 0.
  np.testing.assert_array_equal(out["ranks"]["t2i"], [0, 2, 2, 0, 2, 0])
  assert out["t2i_r@1"] == (3.0, 6.0)
  assert out["t2i_r@2"] == (3.0, 6.0)
  assert out["t2i_r@5"] == (6.0, 6.0)
  assert out["i2t_chance_r@1"] == pytest.approx((2 / 6, 1.0))
  assert out["t2i_chance_r@1"] == pytest.approx((1 / 3, 1.0))


def test_i2t_counts_a_hit_when_any_correct_caption_is_in_the_top_k():
  # Image 0's captions 0 and 1: caption 1 is last, caption 0 first -> still a hit at K=1.
  scores = np.array([[0.9, -1.0, 0.5], [0.0, 0.0, 1.0]])
  img, txt = _embeddings_for(scores)
  np.testing.assert_array_equal(retrieval.i2t_ranks(img, txt, np.array([0, 0, 1])), [0, 0])


def test_ties_count_against_the_model():
  img, txt = _embeddings_for(np.zeros((3, 3)))
  out = retrieval.recall_metrics(img, txt, np.arange(3), ks=(1, 3))
  assert out["i2t_r@1"] == (0.0, 3.0) and out["t2i_r@1"] == (0.0, 3.0)
  assert out["i2t_r@3"] == (3.0, 3.0)


def test_blocked_ranking_equals_one_block():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(37, 8)), rng.normal(size=(90, 8))
  owner = rng.integers(0, 37, size=90)
  np.testing.assert_array_equal(retrieval.i2t_ranks(img, txt, owner, block=5),
                                retrieval.i2t_ranks(img, txt, owner))
  np.testing.assert_array_equal(retrieval.t2i_ranks(img, txt, owner, block=7),
                                retrieval.t2i_ranks(img, txt, owner))


def test_flatten_captions():
  flat, owner = retrieval.flatten_captions(np.array([[1, 1, 0], [0, 1, 1]]))
  np.testing.assert_array_equal(flat, [[0, 0], [0, 1], [1, 1], [1, 2]])
  np.testing.assert_array_equal(owner, [0, 0, 1, 1])


def test_hard_negative_accuracy_hand_case():
  # 2 images, unit 2-d embeddings so scores are easy: image 0 = (1, 0), image 1 = (0, 1).
  img = np.array([[1.0, 0.0], [0.0, 1.0]])
  cap = np.array([[[0.9, 0], [0.5, 0]],     # image 0 captions score .9, .5
                  [[0, 0.7], [9, 9]]])       # image 1: caption .7, second caption absent
  cap_valid = np.array([[1, 1], [1, 0]])
  neg = np.array([[[0.6, 0], [0.2, 0], [0.95, 0]],   # .6 beats .5 only, .2 loses to both, .95 wins
                  [[0, 0.7], [0, 0.1], [0, 0]]])      # .7 ties (a loss), .1 loses, 3rd absent
  neg_valid = np.array([[1, 1, 1], [1, 1, 0]])
  kinds = np.array([[0, 1, 0], [1, 0, -1]])
  out = hard_negatives.hard_negative_sums(img, cap, cap_valid, neg, neg_valid, kinds,
                                          ("colour", "shape"))
  # Trials (caption beats negative): image 0: (.9>.6 y)(.9>.2 y)(.9>.95 n)(.5>.6 n)(.5>.2 y)
  # (.5>.95 n) -> 3/6; image 1: (.7>.7 n)(.7>.1 y) -> 1/2. Total 4/8.
  assert out["hard_negative_acc"] == (4.0, 8.0)
  # Negatives below all captions: image 0: .2 only; image 1: .1 -> 2 of 5.
  assert out["hard_negative_all_acc"] == (2.0, 5.0)
  # colour (kind 0): image 0 negs .6, .95 (4 trials, 1 win); image 1 neg .1 (1 trial, 1 win).
  assert out["hard_negative_acc/colour"] == (2.0, 5.0)
  assert out["hard_negative_acc/shape"] == (2.0, 3.0)


def test_tokenize():
  assert captioning.tokenize("A red Circle, on the LEFT.") == "a red circle on the left"
  assert captioning.tokenize("the dog's ball -- 2 cubes!") == "the dog's ball 2 cubes"


def test_identical_captions_score_the_maximum():
  refs = {1: ["a big red circle on the left"], 2: ["two small blue squares near one green star"]}
  out = captioning.caption_scores({k: v[0].upper() + "." for k, v in refs.items()}, refs)
  for n in range(1, 5):
    assert out[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
  # CIDEr is at most 10 (mean over n of a cosine, times 10): reached when every n-gram order
  # matches and no n-gram is shared by all images (idf 0).
  assert out["cider"] == pytest.approx(10.0, rel=1e-6)


def test_bleu_and_cider_hand_computed():
  refs = {1: ["a b c d e"], 2: ["p q r s"]}
  cands = {1: "a b c d f", 2: "p q"}
  out = captioning.caption_scores(cands, refs)
  # BLEU (corpus): clipped matches / candidate n-grams summed over images.
  # n=1: 4+2 of 5+2; n=2: 3+1 of 4+1; n=3: 2+0 of 3+0; n=4: 1 of 2.
  # Brevity: candidate length 7, closest reference length 9 -> exp(1 - 9/7).
  p = [6 / 7, 4 / 5, 2 / 3, 1 / 2]
  bp = math.exp(1 - 9 / 7)
  assert out["bleu4"] == pytest.approx(bp * math.prod(p) ** 0.25, rel=1e-6)
  assert out["bleu1"] == pytest.approx(bp * p[0], rel=1e-6)
  # CIDEr: 2 images with disjoint vocabularies -> every n-gram has idf log(2), tf 1, so each
  # order's score is a plain cosine of 0/1 vectors, times a gaussian length penalty.
  # Image 1: n-gram overlaps 4/5, 3/4, 2/3, 1/2 (equal sizes), equal lengths -> no penalty.
  img1 = 10 * np.mean([4 / 5, 3 / 4, 2 / 3, 1 / 2])
  # Image 2: cand {p,q} vs ref {p,q,r,s}: 2/sqrt(2*4); {pq} vs {pq,qr,rs}: 1/sqrt(3); no 3/4-grams.
  # Length difference 2 words -> exp(-4 / (2 * 36)).
  img2 = 10 * np.mean([2 / math.sqrt(8), 1 / math.sqrt(3), 0, 0]) * math.exp(-4 / 72)
  np.testing.assert_allclose(out["cider_per_image"], [img1, img2], rtol=1e-6)
  assert out["cider"] == pytest.approx((img1 + img2) / 2, rel=1e-6)


def test_decode_tokens_stops_at_eos():
  toks = np.array([[5, 6, 2, 7], [8, 1, 1, 1]])
  got = captioning.decode_tokens(toks, np.array([3, 1]), lambda ids: " ".join(map(str, ids)), 2)
  assert got == ["5 6", "8"]


def test_evaluation_modules_do_not_import_tensorflow():
  import subprocess
  import sys
  code = ("import sys, importlib, pkgutil, unimo_jax.evaluation as e\n"
          "for i in pkgutil.walk_packages(e.__path__, 'unimo_jax.evaluation.'):\n"
          "  importlib.import_module(i.name)\n"
          "sys.exit(any(m.split('.')[0] == 'tensorflow' for m in sys.modules))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# Repeated caption strings (templated captions)
# ---------------------------------------------------------------------------------------------

def _templated_split(classes=3, per_class=4, seed=0):
  """Images of `classes` classes, each captioned by the same two template strings of its class;
  a perfect model: every image and every caption of class k embeds to the unit vector e_k."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(classes), per_class))
  templates = ("a scan of {}", "an image showing {}")
  captions = [[t.format(f"class {k}") for t in templates] for k in labels]
  image_emb = np.eye(classes, dtype=np.float32)[labels]
  caption_emb = np.repeat(image_emb[:, None, :], len(templates), axis=1)
  strings = sorted({c for caps in captions for c in caps})
  keys = np.asarray([[strings.index(c) for c in caps] for caps in captions])
  return labels, captions, image_emb, caption_emb, keys


def test_a_perfect_model_scores_recall_one_on_templated_captions():
  labels, _, img, cap, keys = _templated_split()
  valid = np.ones(keys.shape, bool)
  rows = np.arange(len(labels))
  pairs, art = retrieval.split_retrieval(img, cap, valid, rows, ks=(1, 5), caption_keys=keys)
  assert pairs["i2t_r@1"] == (12.0, 12.0)
  # One query per distinct text (3 classes x 2 templates); each owns the 4 images of its class.
  assert pairs["t2i_r@1"] == (6.0, 6.0)
  assert pairs["i2t_chance_r@1"] == pytest.approx((2 / 6, 1.0))
  assert pairs["t2i_chance_r@1"] == pytest.approx((4 / 12, 1.0))
  # Without deduplication the copies of the right caption owned by other images tie with it
  # (ties count against the model): the failure the deduplication removes.
  flat, owner = retrieval.flatten_captions(valid)
  plain = retrieval.recall_metrics(img, cap[flat[:, 0], flat[:, 1]], owner, ks=(1,))
  assert plain["i2t_r@1"][0] == 0.0
  # The figure's ranking is the metric's: every shown rank-1 candidate is correct.
  assert art["top5_correct"][:, 0].all()
  assert (art["i2t_ranks"] == 0).all()


def test_equal_token_ids_are_one_candidate_without_string_keys():
  labels, _, img, cap, keys = _templated_split()
  ids = keys[:, :, None] * np.ones((1, 1, 4), np.int64)  # equal strings -> equal ids
  pairs, _ = retrieval.split_retrieval(img, cap, np.ones(keys.shape, bool),
                                       np.arange(len(labels)), ks=(1,), caption_ids=ids)
  assert pairs["i2t_r@1"] == (12.0, 12.0) and pairs["t2i_r@1"] == (6.0, 6.0)


def test_dedupe_owner_union_hand_case():
  # Texts: "a" (images 0, 2), "b" (image 1), "a" again (image 0: a repeat within one image).
  first, own_t, own_i = retrieval.dedupe_texts(np.array([0, 1, 2, 0]), np.array([7, 3, 7, 7]))
  np.testing.assert_array_equal(first, [0, 1])
  assert sorted(zip(own_t.tolist(), own_i.tolist())) == [(0, 0), (0, 2), (1, 1)]


def test_ties_between_distinct_texts_still_count_against_the_model():
  # Two distinct strings with equal scores for image 0: the wrong one ranks first.
  img = np.array([[1.0, 0.0]], np.float32)
  txt = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  out = retrieval.recall_metrics(img, txt, np.array([0, 0]), ks=(1,),
                                 text_keys=np.array([0, 1]))
  assert out["i2t_r@1"] == (1.0, 1.0)  # both are image 0's: a hit
  img2 = np.eye(2, dtype=np.float32)
  ranks, order, correct = retrieval.hit_ranks(img2, txt, np.array([0, 1]), np.array([0, 1]),
                                              top=[0], k=2)
  np.testing.assert_array_equal(ranks, [1, 1])   # tied wrong candidate above the right one
  np.testing.assert_array_equal(order, [[1, 0]])  # the figure shows the same order
  np.testing.assert_array_equal(correct, [[False, True]])


def test_figure_order_matches_the_ranks_on_random_scores():
  rng = np.random.default_rng(1)
  img = rng.normal(size=(20, 6)).astype(np.float32)
  txt = np.round(rng.normal(size=(50, 6)), 1).astype(np.float32)
  owner = rng.integers(0, 20, size=50)
  ranks, order, correct = retrieval.hit_ranks(img, txt, owner, np.arange(50), block=7,
                                              top=range(20), k=50)
  # rank r means r wrong candidates come before the first correct one in the shown order.
  first_hit = np.argmax(correct, axis=1)
  np.testing.assert_array_equal(first_hit[correct.any(axis=1)],
                                ranks[correct.any(axis=1)])


# ---------------------------------------------------------------------------------------------
# Zero-shot classification with prompt ensembles
# ---------------------------------------------------------------------------------------------

def test_class_embedding_is_the_renormalised_mean_of_valid_prompts():
  from unimo_jax.evaluation import zero_shot
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(3, 4, 5))
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  valid = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
  got = zero_shot.class_embeddings(emb, valid)
  for k in range(2):
    mean = emb[k][valid[k]].mean(axis=0)
    np.testing.assert_allclose(got[k], mean / np.linalg.norm(mean), rtol=1e-6)
  np.testing.assert_array_equal(got[2], np.zeros(5))


def test_zero_shot_accuracy_hand_case_and_ties():
  from unimo_jax.evaluation import zero_shot
  cls = np.eye(3, dtype=np.float32)
  img = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1], [0.5, 0.5, 0.0], [0, 0, 1]], np.float32)
  labels = np.array([0, 2, 1, -1])
  # image 0 -> class 0 (right); image 1 -> class 1 (label 2: wrong); image 2 ties 0 and 1
  # (label 1: a tie counts against); image 3 has no label.
  out = zero_shot.accuracy_sums(img, labels, cls)
  assert out["zero_shot_acc"] == (1.0, 3.0)
  assert out["zero_shot_chance"] == pytest.approx((1 / 3, 1.0))
  assert "zero_shot_acc@5" not in out


def test_a_perfect_model_classifies_templated_prompts_exactly():
  from unimo_jax.evaluation import zero_shot
  rng = np.random.default_rng(2)
  k, t, d = 7, 4, 16
  centres = np.linalg.qr(rng.normal(size=(d, k)))[0].T  # k orthonormal class directions
  # Each template moves a prompt off its class direction by a template-specific offset that is
  # orthogonal to every class: the ensemble mean cancels nothing but stays on the class.
  prompts = centres[:, None, :] + 0.3 * rng.normal(size=(1, t, d)) @ (
      np.eye(d) - centres.T @ centres)
  prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
  labels = rng.integers(0, k, size=50)
  img = centres[labels]

  def embed(ids):
    return prompts.reshape(k * t, d)[ids[:, 0]]

  data = dict(prompt_ids=np.arange(k * t).reshape(k, t, 1), prompt_valid=np.ones((k, t), bool),
              label=labels)
  out = zero_shot.split_sums(embed, img, np.arange(50), data)
  assert out["zero_shot_acc"] == (50.0, 50.0) and out["zero_shot_acc@5"] == (50.0, 50.0)
