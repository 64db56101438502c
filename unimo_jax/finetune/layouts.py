"""Numpy row layouts of the fine-tuning tasks (no JAX: the data readers build them).

- ``pair_text``: ``[CLS] A [SEP] B [SEP]`` (UNIMO's GLUE pairs, not RoBERTa's ``</s></s>``),
  truncating the longer text first.
- ``seq2seq_layout``: UNIMO's seq2seq rows: source ``[CLS] s.. [SEP]``, target ``[CLS] t..
  [MASK]`` (bos [CLS], eos [MASK] in place of the final [SEP]); target positions restart at 0;
  segments 1 source, 2 target; position t of the target predicts token t + 1.
- ``vqa_soft_scores``: VQA v2's soft score of each answer, ``min(#annotators / 3, 1)``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def pair_text(a: np.ndarray, b: np.ndarray | None, max_length: int, *, cls_id: int,
              sep_id: int, pad_id: int) -> np.ndarray:
  """Token arrays (no specials) -> int32 [max_length]: ``[CLS] a [SEP] (b [SEP])`` then PAD.

  The longer of a / b loses tokens from its end until the pair fits (BERT's truncation)."""
  a = np.asarray(a, np.int32)
  b = None if b is None else np.asarray(b, np.int32)
  budget = max_length - (3 if b is not None else 2)
  if budget < 1:
    raise ValueError(f"max_length {max_length} leaves no room for text")
  if b is None:
    a = a[:budget]
    seq = np.concatenate([[cls_id], a, [sep_id]])
  else:
    while len(a) + len(b) > budget:
      if len(a) >= len(b):
        a = a[:-1]
      else:
        b = b[:-1]
    seq = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]])
  out = np.full(max_length, pad_id, np.int32)
  out[:len(seq)] = seq
  return out


def seq2seq_layout(source: np.ndarray, target: np.ndarray, *, max_source: int, max_target: int,
                   cls_id: int, sep_id: int, mask_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """One seq2seq row (tokens without specials in, cut to fit).

    ids          = [CLS] s1..sn [SEP] PAD..  [CLS] t1..tm [MASK] PAD..
    segments     =   1   1 .. 1   1    0       2   2 .. 2    2     0
    position_ids =   0   1 .. n  n+1   0       0   1 .. m   m+1    0
  Source block ``max_source`` long, target block ``max_target`` long. Slots (P = max_target -
  1): target position j predicts target token j + 1, i.e. t1..tm then the eos [MASK].

  Returns dict(ids, segments, position_ids [max_source + max_target], positions, targets,
  weights [max_target - 1]).
  """
  s = np.asarray(source, np.int32)[:max_source - 2]
  t = np.asarray(target, np.int32)[:max_target - 2]
  src = np.concatenate([[cls_id], s, [sep_id]]).astype(np.int32)
  tgt = np.concatenate([[cls_id], t, [mask_id]]).astype(np.int32)
  length = max_source + max_target
  ids = np.full(length, pad_id, np.int32)
  seg = np.zeros(length, np.int32)
  pos = np.zeros(length, np.int32)
  ids[:len(src)], seg[:len(src)], pos[:len(src)] = src, 1, np.arange(len(src))
  o = max_source
  ids[o:o + len(tgt)], seg[o:o + len(tgt)], pos[o:o + len(tgt)] = tgt, 2, np.arange(len(tgt))
  p = max_target - 1
  positions = np.zeros(p, np.int32)
  targets = np.full(p, pad_id, np.int32)
  weights = np.zeros(p, np.float32)
  k = len(tgt) - 1
  positions[:k] = o + np.arange(k)
  targets[:k] = tgt[1:]
  weights[:k] = 1.0
  return dict(ids=ids, segments=seg, position_ids=pos, positions=positions, targets=targets,
              weights=weights)


def vqa_soft_scores(answers: Sequence[str], vocabulary: Mapping[str, int]) -> np.ndarray:
  """Annotators' answers of one question -> float32 [len(vocabulary)] with
  ``min(count / 3, 1)`` at each answer in the vocabulary (answers outside it are dropped)."""
  out = np.zeros(len(vocabulary), np.float32)
  for answer in set(answers):
    if answer in vocabulary:
      out[vocabulary[answer]] = min(list(answers).count(answer) / 3.0, 1.0)
  return out


def vqa_accuracy(predicted: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Mean VQA accuracy ``min(#annotators who gave the prediction / 3, 1)``."""
  if not predicted:
    return 0.0
  return float(np.mean([min(list(a).count(p) / 3.0, 1.0) for p, a in zip(predicted, answers)]))
