"""Task metrics of fine-tuned runs (numpy; ROUGE through the ``rouge-score`` package).

- classification: accuracy, F1 (binary: of class 1; more classes: macro), Matthews correlation
  (CoLA; the multi-class form of Gorodkin 2004 reduces to the binary phi coefficient);
- regression: Pearson and Spearman correlation (STS-B; Spearman ranks ties by their mean);
- VQA accuracy: ``min(#annotators who gave the answer / 3, 1)`` (``layouts.vqa_accuracy``);
- retrieval: R@K both ways from a score matrix ``[images, texts]``, and the same after the
  dual encoder's top K of each query are re-scored by a cross-encoder (``rerank_ranks``);
- generation: ROUGE-1/2/L F-measure (``rouge_score``, stemming on, as the summarisation papers)
  and BLEU-4 / CIDEr (``evaluation.captioning.caption_scores``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(pred, label) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(label))) if len(pred) else float("nan")


def f1(pred, label, num_labels: int = 2) -> float:
  """Binary F1 of class 1, or the macro mean over classes when there are more than 2."""
  pred, label = np.asarray(pred), np.asarray(label)
  classes = [1] if num_labels == 2 else list(range(num_labels))
  scores = []
  for c in classes:
    tp = np.sum((pred == c) & (label == c))
    fp = np.sum((pred == c) & (label != c))
    fn = np.sum((pred != c) & (label == c))
    scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
  return float(np.mean(scores))


def matthews(pred, label, num_labels: int = 2) -> float:
  """Matthews correlation coefficient (multi-class form); 0 when undefined."""
  pred, label = np.asarray(pred), np.asarray(label)
  c = np.zeros((num_labels, num_labels), np.float64)
  np.add.at(c, (label, pred), 1.0)
  t, p = c.sum(1), c.sum(0)
  n, correct = c.sum(), np.trace(c)
  denom = np.sqrt((n * n - np.dot(p, p)) * (n * n - np.dot(t, t)))
  return float((correct * n - np.dot(t, p)) / denom) if denom else 0.0


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  d = np.sqrt(np.dot(x, x) * np.dot(y, y))
  return float(np.dot(x, y) / d) if d else 0.0


def _ranks(x) -> np.ndarray:
  """1-based ranks, ties sharing their mean rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    if tie.sum() > 1:
      ranks[tie] = ranks[tie].mean()
  return ranks


def spearman(x, y) -> float:
  return pearson(_ranks(x), _ranks(y))


# ------------------------------------------------------------------------------ retrieval
def ranks_from_scores(scores: np.ndarray, hits: np.ndarray) -> np.ndarray:
  """scores [Q, C], hits [Q, C] bool -> 0-based rank of each query's best-ranked hit (ties
  count against the hit: a hit ties with every candidate scoring at least as high)."""
  scores = np.asarray(scores, np.float64)
  best = np.where(hits, scores, -np.inf).max(1)
  return np.sum(scores > best[:, None], axis=1) + np.sum(
      (scores == best[:, None]) & ~hits, axis=1)


def rerank_ranks(dual: np.ndarray, hits: np.ndarray, k: int, cross_fn) -> np.ndarray:
  """Ranks after re-scoring each query's dual-encoder top ``k`` with ``cross_fn``.

  dual [Q, C] scores, hits [Q, C]; ``cross_fn(query [n], candidate [n]) -> scores [n]`` is
  called once over all Q*k pairs. A hit inside the top k takes its rank among the re-scored k;
  a hit outside keeps its dual rank (>= k)."""
  q = dual.shape[0]
  k = min(k, dual.shape[1])
  top = np.argsort(-dual, axis=1, kind="stable")[:, :k]
  cross = np.asarray(cross_fn(np.repeat(np.arange(q), k), top.reshape(-1))).reshape(q, k)
  top_hits = np.take_along_axis(hits, top, axis=1)
  inside = top_hits.any(1)
  reranked = ranks_from_scores(cross, top_hits)
  return np.where(inside, reranked, ranks_from_scores(dual, hits))


def recalls(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10), prefix: str = "") -> dict:
  return {f"{prefix}R@{k}": float(np.mean(np.asarray(ranks) < k)) for k in ks}


# ------------------------------------------------------------------------------ generation
def rouge(candidates: Sequence[str], references: Sequence[str]) -> dict:
  """Mean ROUGE-1/2/L F-measure (0..1) of each candidate against its reference."""
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
  for c, r in zip(candidates, references):
    s = scorer.score(r, c)
    for key in totals:
      totals[key] += s[key].fmeasure
  n = max(len(candidates), 1)
  return {k: v / n for k, v in totals.items()}
