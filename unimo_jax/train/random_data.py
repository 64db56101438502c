"""Random batches that follow the batch schema, for tests, benchmarks and smoke runs.

``RandomBatches(spec, ...)`` yields per-process batches ``{"<stream>/<field>": np.ndarray}``
for a ``spec = {name: (shape, dtype)}`` (``data_pipelines.schema.batch_spec``), with values that
respect each field's meaning (ids in the vocabulary with [CLS] ... [SEP] then PAD, prediction
positions inside the text, 0/1 weights, normalised class distributions, valid boxes), so every
loss is finite and meaningful. Batch ``i`` is a pure function of ``(seed, i, process)``, and the
object has the input pipeline's resume interface (``get_state`` / ``set_state``), so exact-resume
tests of the trainer need no TensorFlow.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

CLS, PAD, SEP = 0, 1, 2


class RandomBatches:
  """An endless iterator of schema-conforming random batches.

  Args:
    spec: ``{"<stream>/<field>": (shape, dtype)}`` of one per-process batch.
    vocab_size: token ids are drawn from ``[4, vocab_size - 1)`` (MASK is ``vocab_size - 1``).
    seed: batches are a function of ``(seed, position, process_index)``.
    process_index: this process's index (different rows per process).
    text_fill: fraction of each text's length that holds real tokens (on average).
  """

  def __init__(self, spec: Mapping[str, tuple], vocab_size: int, seed: int = 0,
               process_index: int = 0, text_fill: float = 0.7):
    self.spec = dict(spec)
    self.vocab_size = int(vocab_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.text_fill = float(text_fill)
    self.position = 0

  # ---------------------------------------------------------------- resume interface
  def get_state(self) -> dict:
    return {"position": self.position, "seed": self.seed}

  def set_state(self, state: Mapping) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"data state has seed {state['seed']}, this iterator {self.seed}")
    self.position = int(state["position"])

  def dropped_counts(self) -> dict:
    return {}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self.position)
    self.position += 1
    return batch

  # ---------------------------------------------------------------- generation
  def batch(self, position: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, position, self.process_index])
    out: dict[str, np.ndarray] = {}
    # Texts first: prediction positions depend on their lengths.
    lengths: dict[str, np.ndarray] = {}
    for name in sorted(self.spec):
      shape, dtype = self.spec[name]
      if name.endswith("_ids"):
        out[name], lengths[name] = self._texts(rng, shape)
    for name in sorted(self.spec):
      if name in out:
        continue
      shape, dtype = self.spec[name]
      out[name] = self._field(rng, name, shape, np.dtype(dtype), out, lengths)
    for name, (shape, dtype) in self.spec.items():
      out[name] = out[name].astype(dtype).reshape(shape)
    return out

  def _texts(self, rng, shape):
    *lead, length = shape
    n = int(np.prod(lead)) if lead else 1
    real = np.clip(rng.binomial(length - 2, self.text_fill, size=n), 1, length - 2)
    ids = np.full((n, length), PAD, np.int32)
    for r in range(n):
      ids[r, 0] = CLS
      ids[r, 1:1 + real[r]] = rng.integers(4, self.vocab_size - 1, size=real[r])
      ids[r, 1 + real[r]] = SEP
    return ids.reshape(shape), (real + 2).reshape(lead)

  def _field(self, rng, name, shape, dtype, out, lengths):
    stream, field = name.split("/", 1)
    if field.endswith("positions") or field.endswith("targets") or field.endswith("weights"):
      prefix = field.rsplit("_", 1)[0]  # mlm / s2s
      ids_key = f"{stream}/{prefix}_ids"
      lens = lengths.get(ids_key, np.full(shape[:1], 2))
      b, p = shape
      if field.endswith("positions"):
        pos = np.zeros((b, p), np.int32)
        for r in range(b):
          k = min(p, max(1, int(lens[r]) - 2))
          pos[r, :k] = np.sort(rng.choice(np.arange(1, max(2, int(lens[r]) - 1)), size=k,
                                          replace=int(lens[r]) - 2 < k))
        return pos
      if field.endswith("targets"):
        return rng.integers(4, self.vocab_size - 1, size=shape)
      w = np.zeros((b, p), np.float32)
      pos = out.get(f"{stream}/{prefix}_positions")
      for r in range(b):
        w[r, :min(p, max(1, int(lens[r]) - 2))] = 1.0
      return w
    if field == "s2s_segments":
      ids = out[f"{stream}/s2s_ids"]
      seg = np.where(ids != PAD, 1, 0).astype(np.int32)
      if stream == "pair":
        return np.where(ids != PAD, 2, 0).astype(np.int32)
      for r in range(seg.shape[0]):
        n = int(seg[r].sum())
        seg[r, n // 2:n] = 2  # second half is the target
      return seg
    if field.endswith("position_ids"):
      return np.broadcast_to(np.arange(shape[-1]), shape).copy()
    if field.endswith("pixels"):
      return rng.normal(size=shape).astype(np.float32)
    if field.endswith("region_features"):
      return np.abs(rng.normal(size=shape)).astype(np.float32)
    if field.endswith("region_boxes"):
      xy = np.sort(rng.uniform(0, 1, size=shape[:-1] + (2, 2)), axis=-2)
      x1, x2 = xy[..., 0, 0], xy[..., 1, 0]
      y1, y2 = xy[..., 0, 1], xy[..., 1, 1]
      return np.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], axis=-1).astype(np.float32)
    if field.endswith("region_class_probs"):
      logits = rng.normal(size=shape) * 2
      p = np.exp(logits - logits.max(-1, keepdims=True))
      return (p / p.sum(-1, keepdims=True)).astype(np.float32)
    if field.endswith("region_classes"):
      probs = out.get(f"{stream}/region_class_probs")
      if probs is not None:
        return probs.argmax(-1)
      return rng.integers(0, 8, size=shape)
    if field == "visual_mask":
      m = rng.uniform(size=shape) < 0.15
      m[:, 0] = True  # at least one masked region per row
      return m
    if field == "row_valid":
      return np.ones(shape, bool)
    if field.endswith("_valid"):
      if field in ("region_valid", "related_region_valid"):
        v = rng.uniform(size=shape) < 0.9
        v[..., 0] = True
        return v
      return rng.uniform(size=shape) < 0.7
    if np.issubdtype(dtype, np.floating):
      return rng.normal(size=shape)
    if dtype == np.bool_:
      return rng.uniform(size=shape) < 0.5
    return rng.integers(0, 2, size=shape)
