"""Task metrics against scipy / sklearn-free hand computations."""
import numpy as np
import pytest
import scipy.stats

from unimo_jax.finetune import metrics


def test_classification_metrics_against_hand_counts():
  pred = np.array([1, 1, 0, 0, 1, 0, 1, 1])
  label = np.array([1, 0, 0, 1, 1, 0, 1, 0])
  tp, fp, fn, tn = 3, 2, 1, 2
  assert metrics.accuracy(pred, label) == 5 / 8
  assert metrics.f1(pred, label) == pytest.approx(2 * tp / (2 * tp + fp + fn))
  phi = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert metrics.matthews(pred, label) == pytest.approx(phi)
  assert metrics.matthews(np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0
  # three classes: macro F1 and the multi-class MCC (perfect = 1)
  lab3 = np.array([0, 1, 2, 2, 1, 0])
  assert metrics.matthews(lab3, lab3, 3) == pytest.approx(1.0)
  assert metrics.f1(lab3, lab3, 3) == 1.0


def test_correlations_against_scipy():
  r = np.random.default_rng(0)
  x = r.normal(size=50)
  y = x + r.normal(size=50)
  y[:5] = y[5]  # ties
  assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
  assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0])


def test_ranks_and_reranking():
  scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.4]])
  hits = np.array([[False, True, False], [True, False, False]])
  np.testing.assert_array_equal(metrics.ranks_from_scores(scores, hits), [1, 2])
  # a cross-encoder that prefers the hit moves it to rank 0 inside the top 2; query 1's hit is
  # outside its top 2 and keeps its dual rank
  cross = {(0, 0): 0.0, (0, 1): 5.0, (1, 2): 1.0, (1, 1): 0.0}
  calls = []

  def cross_fn(q, c):
    calls.append(len(q))
    return np.array([cross[(int(a), int(b))] for a, b in zip(q, c)])
  np.testing.assert_array_equal(metrics.rerank_ranks(scores, hits, 2, cross_fn), [0, 2])
  assert calls == [4]
  assert metrics.recalls(np.array([0, 2, 7]), (1, 5)) == {"R@1": 1 / 3, "R@5": 2 / 3}


def test_rouge_of_identical_and_disjoint_texts():
  out = metrics.rouge(["a red circle", "green"], ["a red circle", "blue square"])
  assert out["rouge1"] == pytest.approx(0.5) and out["rougeL"] == pytest.approx(0.5)


def test_reranking_every_candidate_equals_ranking_by_the_cross_scores():
  r = np.random.default_rng(1)
  dual, cross = r.normal(size=(5, 7)), r.normal(size=(5, 7))
  hits = np.zeros((5, 7), bool)
  hits[np.arange(5), r.integers(0, 7, 5)] = True
  hits[0, 3] = True
  got = metrics.rerank_ranks(dual, hits, 7, lambda q, c: cross[q, c])
  np.testing.assert_array_equal(got, metrics.ranks_from_scores(cross, hits))
