"""Image task files: one JSON record per line naming an image under ``image_dir``.

  entailment (SNLI-VE)  {"image": "123.jpg" | "Flikr30kID": "123.jpg", "hypothesis" |
                        "sentence2": "...", "label" | "gold_label": "entailment"}
  vqa (VQA v2)          {"image": ..., "question": "...", "answers": ["two", "2", ...]}
                        (every annotator's answer; soft scores min(#annotators / 3, 1))
  retrieval, captioning {"image": ..., "captions": ["...", ...]}  (Flickr30k / COCO Karpathy)

The keys in ``|`` are alternatives (SNLI-VE's own jsonl keys are accepted as they are). Images
are decoded with PIL, resized (bilinear, antialiased) and normalised exactly as the
pre-training pipeline (``(x / 255 - mean) / std``), and kept as uint8 after resizing (the
normalisation happens per batch). Skipped and counted by reason: ``bad_json``,
``missing_field``, ``empty_text``, ``bad_label``, ``missing_image``, ``undecodable_image``. A
file where NO record has a required field is refused with one line naming the file and field.

``ImageRecords`` has the interface the synthetic_scenes tasks use (``count``, ``ids``,
``captions``, ``negatives``, ``qa``, ``visual``, ``gather``), so ``scenes``' row builders serve
both; entailment rows come from ``entailment_rows`` here (the labels are in the file).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Sequence

import numpy as np

from unimo_jax.finetune import layouts

FIELDS = {
    "entailment": (("image", "Flikr30kID", "Flickr30K_ID"), ("hypothesis", "sentence2"),
                   ("label", "gold_label")),
    "vqa": (("image",), ("question",), ("answers",)),
    "retrieval": (("image",), ("captions",)),
    "captioning": (("image",), ("captions",)),
}
VE_LABELS = ("entailment", "neutral", "contradiction")


def _get(record: dict, names: Sequence[str]):
  for n in names:
    if n in record:
      return record[n]
  return None


def _load_image(path: str, size: int) -> np.ndarray | None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as im:
      pixels = np.asarray(im.convert("RGB"), np.float32)
  except (OSError, ValueError, SyntaxError):
    return None
  x = tf.image.resize(pixels[None], [size, size], method="bilinear", antialias=True)[0]
  return np.clip(np.round(x.numpy()), 0, 255).astype(np.uint8)


class ImageRecords:
  """The records of one JSONL file whose image decodes, grouped by image."""

  def __init__(self, path: str, kind: str, image_dir: str, *, image_size: int,
               pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3, limit: int = 0):
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file")
    fields = FIELDS[kind]
    self.dropped = Counter()
    self.mean = np.asarray(pixel_mean, np.float32)
    self.std = np.asarray(pixel_std, np.float32)
    index: dict[str, int] = {}
    images, self.captions, self.qa, self.labels = [], [], [], []
    self.texts = []  # entailment: (image index, hypothesis, label)
    seen_fields = Counter()
    with open(path, "rb") as f:
      for raw in f:
        if not raw.strip():
          continue
        try:
          record = json.loads(raw.decode("utf-8"))
          if not isinstance(record, dict):
            raise ValueError
        except ValueError:
          self.dropped["bad_json"] += 1
          continue
        values = [_get(record, names) for names in fields]
        for names, v in zip(fields, values):
          seen_fields[names[0]] += v is not None
        if any(v is None for v in values):
          self.dropped["missing_field"] += 1
          continue
        name = str(values[0])
        if name not in index:
          if limit and len(index) >= limit:
            continue
          file = os.path.join(os.path.expanduser(image_dir), name)
          if not os.path.splitext(name)[1] and not os.path.exists(file):
            file += ".jpg"  # SNLI-VE names Flickr30k images by id
          if not os.path.isfile(file):
            self.dropped["missing_image"] += 1
            continue
          pixels = _load_image(file, image_size)
          if pixels is None:
            self.dropped["undecodable_image"] += 1
            continue
          index[name] = len(images)
          images.append(pixels)
          self.captions.append([])
          self.qa.append([])
        i = index[name]
        if kind in ("retrieval", "captioning"):
          caps = [str(c).strip() for c in values[1] if str(c).strip()]
          if not caps:
            self.dropped["empty_text"] += 1
          self.captions[i].extend(caps)
        elif kind == "vqa":
          q = str(values[1]).strip()
          answers = [str(a).strip().lower() for a in values[2]]
          if not q or not answers:
            self.dropped["empty_text"] += 1
            continue
          self.qa[i].append((q, answers))
        else:
          hyp, label = str(values[1]).strip(), str(values[2]).strip().lower()
          if not hyp:
            self.dropped["empty_text"] += 1
            continue
          if label not in VE_LABELS:
            self.dropped["bad_label"] += 1
            continue
          self.texts.append((i, hyp, VE_LABELS.index(label)))
    for names in fields:
      if seen_fields[names[0]] == 0 and sum(self.dropped.values()) + len(images) > 0:
        raise ValueError(f"{path}: no record has the field {names[0]!r}"
                         + (f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else "")
                         + f" expected for {kind}")
    self.count = len(images)
    self.pixels = (np.stack(images) if images else
                   np.zeros((0, image_size, image_size, 3), np.uint8))
    self.ids = np.arange(self.count, dtype=np.int64)
    self.names = list(index)
    self.negatives = [[] for _ in range(self.count)]

  def _normalise(self, pixels: np.ndarray) -> np.ndarray:
    return ((pixels.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

  @property
  def visual(self) -> dict:
    return {"pixels": self._normalise(self.pixels)}

  def gather(self, index: np.ndarray, prefix: str = "") -> dict:
    return {prefix + "pixels": self._normalise(self.pixels[index])}


def entailment_rows(records: ImageRecords, tokenizer, max_length: int):
  """-> (rows dict(image_index, ids, label), dropped): labels entailment 0, neutral 1,
  contradiction 2 (SNLI-VE's three)."""
  return entailment_table(records.texts, records.dropped, tokenizer, max_length,
                          encode=tokenizer.encode)


def entailment_table(texts, dropped, tokenizer, max_length: int, encode=None):
  """Entailment rows from ``(image_index, hypothesis, label)`` triples: the hypothesis a string
  (``encode`` gives its token ids) or, without ``encode``, token ids already."""
  ids = [layouts.pair_text(encode(h) if encode else h, None, max_length,
                           cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                           pad_id=tokenizer.pad_id)
         for _, h, _ in texts]
  return (dict(image_index=np.asarray([i for i, _, _ in texts], np.int32),
               ids=np.asarray(ids, np.int32).reshape(-1, max_length),
               label=np.asarray([y for _, _, y in texts], np.int32)),
          dict(dropped))
