"""UNIMO's official fine-tuning lines: SNLI-VE and captioning, ``;``-separated, pre-tokenized,
with detector region features (``data.source = "unimo_lines"``).

The field order is the one the official readers split a line into
(PaddlePaddle/Research ``NLP/UNIMO/src/reader/visual_entailment_reader.py`` and
``img2txt_reader.py``):

  entailment, 14 fields   image_id; data_id; label; token_ids; sent_ids; pos_ids; -; image_w;
                          image_h; number_box; boxes; image_embeddings; -; -
  captioning, 16 fields   image_id; caption_id; token_ids; sent_ids; pos_ids; seg_labels;
                          node_attr_b; node_attr_e; image_h; image_w; number_box; boxes;
                          probs; attr_probs; image_embeddings; label

Width comes before height in SNLI-VE lines and after it in captioning lines. ``token_ids``
are space-separated ids of UNIMO's vocabulary, which are RoBERTa's (read these files with the
``bpe:`` tokenizer of RoBERTa's vocab.json / merges.txt), ``[CLS] w.. [SEP]``; they are
re-laid out exactly as the JSONL readers lay out a text (``[CLS] w.. [SEP]`` cut to
``max_length``; captions by ``masking.captioning_layout``). ``sent_ids`` / ``pos_ids`` and the
scene-graph fields are not needed (our positions and segments follow from the layout).
``boxes`` and ``image_embeddings`` are base64 of raw float32, ``[number_box, 4]`` boxes
x1, y1, x2, y2 in pixels and ``[number_box, F]`` features; they become the model's region
inputs as the official reader builds them: boxes ``[x1/W, y1/H, x2/W, y2/H, area/(W*H)]``,
the first ``num_regions`` regions kept, ``region_valid`` marking them (the model adds the
``[IMG]`` slot, the mean feature with box [0, 0, 1, 1, 1], itself). SNLI-VE labels are ints
in [0, num_labels) as the file holds them, or the names entailment / neutral / contradiction
(0 / 1 / 2, SNLI-VE's order). The official captioning model also reads detector object tags
from a separate file; they are not used here.

Lines are grouped by image_id; the features are decoded once while reading (to check them)
and again per batch from the line's byte offset, so memory holds no features. Bad lines are
skipped and counted: ``not_utf8``, ``wrong_field_count``, ``bad_label``, ``bad_token_ids``
(not ints, or outside the tokenizer's vocabulary), ``empty_text``, ``bad_size`` (W or H not a
positive number), ``bad_features`` (not base64, a length that is not number_box x 4 / x F, a
non-finite value, no box). A file where NO line has the layout's field count, or whose
features all have another width than ``data.region_feature_dim``, is refused in one line
naming the file and the field.
"""
from __future__ import annotations

import base64
import binascii
import os
from collections import Counter

import numpy as np

from data_pipelines.finetune import files

VE_LABELS = ("entailment", "neutral", "contradiction")
# kind -> (field count, {field: index})
LAYOUTS = {
    "entailment": (14, dict(image_id=0, label=2, token_ids=3, image_w=7, image_h=8,
                            number_box=9, boxes=10, image_embeddings=11)),
    "captioning": (16, dict(image_id=0, token_ids=2, image_h=8, image_w=9, number_box=10,
                            boxes=11, image_embeddings=14)),
}


class BadLine(Exception):
  """A line that is skipped; ``args[0]`` is the reason counted."""


def _floats(text: str, rows: int, what: str) -> np.ndarray:
  try:
    raw = base64.b64decode(text.strip(), validate=True)
  except (binascii.Error, ValueError):
    raise BadLine("bad_features") from None
  if rows < 1 or len(raw) % (4 * rows):
    raise BadLine("bad_features")
  x = np.frombuffer(raw, np.float32).reshape(rows, -1)
  if not np.isfinite(x).all():
    raise BadLine("bad_features")
  if what == "boxes" and x.shape[1] != 4:
    raise BadLine("bad_features")
  return x


def region_inputs(fields: list[str], kind: str, num_regions: int) -> dict:
  """The region inputs of one split line: region_features [R, F] float32, region_boxes [R, 5]
  float32 (x1/W, y1/H, x2/W, y2/H, area/(W*H)), region_valid [R] bool, R = num_regions."""
  at = LAYOUTS[kind][1]
  try:
    w, h = float(fields[at["image_w"]]), float(fields[at["image_h"]])
  except ValueError:
    raise BadLine("bad_size") from None
  if not (w > 0 and h > 0 and np.isfinite(w) and np.isfinite(h)):
    raise BadLine("bad_size")
  try:
    n = int(fields[at["number_box"]])
  except ValueError:
    raise BadLine("bad_features") from None
  boxes = _floats(fields[at["boxes"]], n, "boxes")
  feats = _floats(fields[at["image_embeddings"]], n, "features")
  k = min(n, num_regions)
  out_boxes = np.zeros((num_regions, 5), np.float32)
  b = boxes[:k]
  out_boxes[:k, :4] = b / np.array([w, h, w, h], np.float32)
  out_boxes[:k, 4] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
  out_feats = np.zeros((num_regions, feats.shape[1]), np.float32)
  out_feats[:k] = feats[:k]
  valid = np.zeros(num_regions, bool)
  valid[:k] = True
  return dict(region_features=out_feats, region_boxes=out_boxes, region_valid=valid)


def _token_ids(text: str, tokenizer) -> np.ndarray:
  try:
    ids = np.asarray([int(t) for t in text.split()], np.int64)
  except ValueError:
    raise BadLine("bad_token_ids") from None
  if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
    raise BadLine("bad_token_ids")
  if ids.size and ids[0] == tokenizer.cls_id:
    ids = ids[1:]
  if ids.size and ids[-1] == tokenizer.sep_id:
    ids = ids[:-1]
  if not ids.size:
    raise BadLine("empty_text")
  return ids.astype(np.int32)


def _label(text: str, num_labels: int) -> int:
  value = text.strip()
  if value.lower() in VE_LABELS:
    return VE_LABELS.index(value.lower())
  try:
    x = int(value)
  except ValueError:
    raise BadLine("bad_label") from None
  if not 0 <= x < num_labels:
    raise BadLine("bad_label")
  return x


class RegionLines:
  """The usable lines of one file, grouped by image; the interface of ``files.ImageRecords``
  (``count``, ``ids``, ``names``, ``captions``, ``visual``, ``gather``) with region inputs.

  ``texts``: entailment (image index, token ids, label) / captioning (image index, token
  ids), one per usable line; ``captions``: each image's decoded captions (the references)."""

  def __init__(self, path: str, kind: str, tokenizer, *, num_regions: int, feature_dim: int,
               num_labels: int = 3):
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file")
    if kind not in LAYOUTS:
      raise ValueError(f"unimo_lines hold {tuple(LAYOUTS)}, not {kind!r}")
    if path.endswith(".gz"):
      raise ValueError(f"{path}: gzip files are not read (their lines cannot be sought); "
                       f"gunzip it first")
    self.path, self.kind, self.num_regions = path, kind, num_regions
    count, at = LAYOUTS[kind]
    self.dropped = Counter()
    index: dict[str, int] = {}
    self.offsets, self.texts, self.captions = [], [], []
    shaped, widths, first_count = 0, Counter(), None
    with open(path, "rb") as f:
      offset = 0
      for raw in f:
        start, offset = offset, offset + len(raw)
        if not raw.strip():
          continue
        try:
          line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
          self.dropped["not_utf8"] += 1
          continue
        fields = line.split(";")
        first_count = len(fields) if first_count is None else first_count
        if len(fields) != count:
          self.dropped["wrong_field_count"] += 1
          continue
        shaped += 1
        try:
          label = _label(fields[at["label"]], num_labels) if kind == "entailment" else None
          ids = _token_ids(fields[at["token_ids"]], tokenizer)
          regions = region_inputs(fields, kind, num_regions)
          width = regions["region_features"].shape[1]
          if width != feature_dim:
            widths[width] += 1
            raise BadLine("bad_features")
        except BadLine as e:
          self.dropped[e.args[0]] += 1
          continue
        name = fields[at["image_id"]].strip()
        if name not in index:
          index[name] = len(self.offsets)
          self.offsets.append(start)
          self.captions.append([])
        i = index[name]
        if kind == "entailment":
          self.texts.append((i, ids, label))
        else:
          self.texts.append((i, ids))
          self.captions[i].append(tokenizer.decode(ids))
    if first_count is not None and not shaped:
      other = [k for k, (n, _) in LAYOUTS.items() if n == first_count and k != kind]
      raise ValueError(f"{path}: no line has the {count} ';'-separated fields of UNIMO's {kind} "
                       f"lines (the first has {first_count}"
                       + (f": the {other[0]} layout" if other else "") + ")")
    if widths and not self.texts:
      raise ValueError(f"{path}: image_embeddings have {widths.most_common(1)[0][0]} values "
                       f"per box, data.region_feature_dim={feature_dim}")
    self.count = len(self.offsets)
    self.ids = np.arange(self.count, dtype=np.int64)
    self.names = list(index)
    self.negatives = [[] for _ in range(self.count)]
    self.qa = [[] for _ in range(self.count)]

  def _regions(self, index) -> list[dict]:
    out = []
    with open(self.path, "rb") as f:
      for i in index:
        f.seek(self.offsets[int(i)])
        fields = f.readline().decode("utf-8").rstrip("\r\n").split(";")
        out.append(region_inputs(fields, self.kind, self.num_regions))
    return out

  def gather(self, index: np.ndarray, prefix: str = "") -> dict:
    """Region inputs of images ``index`` (any shape): each field ``index.shape + [R, ...]``."""
    index = np.asarray(index)
    regs = self._regions(index.reshape(-1))
    return {prefix + k: np.stack([r[k] for r in regs]).reshape(index.shape + regs[0][k].shape)
            for k in regs[0]}

  @property
  def visual(self) -> dict:
    """Every image's region inputs (evaluation of captioning)."""
    return self.gather(self.ids)


def entailment_rows(lines: RegionLines, tokenizer, max_length: int):
  """-> (rows dict(image_index, ids, label), dropped), as ``files.entailment_rows`` (the lines'
  hypotheses are token ids already)."""
  return files.entailment_table(lines.texts, lines.dropped, tokenizer, max_length)
