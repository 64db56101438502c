"""Seeded masking for UNIMO's pre-training objectives (pure numpy: no jax, no TensorFlow).

Every function takes one example and a `np.random.Generator` (callers build it as
`np.random.default_rng([seed, stream, index])`), so a batch is a pure function of (seed, position)
and the data pipeline can call these functions from `tf.numpy_function` or from a plain Python
iterator. Outputs have fixed shapes; padding rows of `positions/targets/weights` are 0/0/0.0.
`span_mlm_batch` / `infilling_batch` (`text_masking`, `infilling`) mask B texts with B generators at
once: row b is what the one-text function gives with generator b.

Objectives (facts in shared/UNIMO.md, decisions written next to each function):
  span_mlm          bidirectional span MLM: whole words, span length ~ truncated Geo(0.2), 15%.
  infilling         seq2seq infilling: fragments of U(4,32) tokens until 25%, UniLM layout.
  captioning_layout text generated from an image prefix: `[CLS] w1..wN [SEP]`, next-token targets.
  region_mask       masked region prediction: 15% of regions + regions overlapping them.
  patch_mask        the same for patch inputs (patches never overlap, so no overlap rule).
"""
from __future__ import annotations

import numpy as np

# Span MLM (`text_masking`) and infilling (`infilling`), one text or a batch: re-exported.
from unimo_jax.infilling import _strip_text, infilling, infilling_batch  # noqa: F401
from unimo_jax.text_masking import (FIRST_ORDINARY_ID, _predictions, _round_half_up,  # noqa: F401
                                    random_ordinary_ids, span_length_distribution, span_mlm,
                                    span_mlm_batch)


# ---------------------------------------------------------------------------------------------
# Seq2seq layout of captioning (image prefix); infilling is in `unimo_jax.infilling`
# ---------------------------------------------------------------------------------------------


def captioning_layout(ids, *, max_length: int, max_predictions: int, bos_id: int = 0,
                      eos_id: int = 2, pad_id: int = 1) -> dict[str, np.ndarray]:
  """Captioning: the whole text is the target, generated after the image (the source).

    input_ids    = [CLS] w1 .. wN [SEP]  PAD..   (eos = [SEP], as UNIMO's captioning decoder)
    segments     =   2   2  ..  2   2      0
    position_ids =   0   1  ..  N  N+1     0       (0-based, as `infilling`'s)

  The image is not in this sequence: the model puts it in front and builds the captioning mask
  from (num_visual, text_valid). Position t predicts token t+1: positions 0..N, targets
  w1..wN [SEP]. The text (PAD, a leading [CLS] and a trailing [SEP] ignored) is cut at the end
  to N = min(len, max_length - 2, max_predictions - 1) so that the closing eos is always kept.

  Returns dict(input_ids [max_length], segments [max_length], position_ids [max_length],
  positions [P], targets [P], weights [P]).
  """
  text = _strip_text(ids, bos_id, eos_id, pad_id)
  n = max(0, min(len(text), max_length - 2, max_predictions - 1))
  seq = np.concatenate([[bos_id], text[:n], [eos_id]]).astype(np.int32)
  input_ids = np.full(max_length, pad_id, np.int32)
  input_ids[:len(seq)] = seq
  position_ids = np.zeros(max_length, np.int32)
  position_ids[:len(seq)] = np.arange(len(seq))
  segments = np.zeros(max_length, np.int32)
  segments[:len(seq)] = 2
  positions = np.arange(len(seq) - 1)
  out = _predictions(positions, seq[1:], max_predictions)
  out.update(input_ids=input_ids, segments=segments, position_ids=position_ids)
  return out


# ---------------------------------------------------------------------------------------------
# Visual masking
# ---------------------------------------------------------------------------------------------


def iou(boxes_a, boxes_b) -> np.ndarray:
  """Intersection over union of boxes (x1, y1, x2, y2, ...): [N, >=4], [M, >=4] -> [N, M].

  Extra columns (the area of UNIMO's 5-d boxes) are ignored. Degenerate boxes have IoU 0.
  """
  a = np.asarray(boxes_a, np.float64)[:, :4]
  b = np.asarray(boxes_b, np.float64)[:, :4]
  area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
  area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
  inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def region_mask(boxes, valid, rng: np.random.Generator, *, rate: float = 0.15,
                overlap_threshold: float = 0.3) -> np.ndarray:
  """Regions to zero for masked region prediction. boxes [R, >=4] (x1, y1, x2, y2), valid [R].

  Exactly k = max(1, round(rate * n_valid)) valid regions are drawn uniformly without
  replacement (an exact count, not a Bernoulli per region, so every image with a valid region
  trains MRP and the share does not fluctuate); then every valid region whose IoU with a drawn
  region exceeds `overlap_threshold` is masked too, so the model cannot copy a masked region from
  a near duplicate (UNIMO: 0.3). The overlap rule is applied once, to the drawn regions, not
  transitively. Returns mask [R] bool; invalid regions are never masked.
  """
  valid = np.asarray(valid, dtype=bool)
  idx = np.flatnonzero(valid)
  mask = np.zeros(valid.shape, dtype=bool)
  if len(idx) == 0:
    return mask
  k = min(len(idx), max(1, _round_half_up(rate * len(idx))))
  drawn = rng.choice(idx, size=k, replace=False)
  mask[drawn] = True
  overlap = iou(np.asarray(boxes)[drawn], np.asarray(boxes)).max(axis=0) > overlap_threshold
  return mask | (overlap & valid)


def patch_mask(num_patches: int, rng: np.random.Generator, *, rate: float = 0.15) -> np.ndarray:
  """Patches to zero for patch inputs: exactly max(1, round(rate * N)) of N, uniformly.

  Returns mask [N] bool in the model's patch order (row-major over the patch grid).
  """
  mask = np.zeros(num_patches, dtype=bool)
  if num_patches == 0:
    return mask
  k = min(num_patches, max(1, _round_half_up(rate * num_patches)))
  mask[rng.choice(num_patches, size=k, replace=False)] = True
  return mask
