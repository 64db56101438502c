"""TFDS datasets by name (anything prepared under a data_dir), read by record index.

The split's TFRecord files are indexed once (record byte offsets, from the 12-byte record
headers; the payload is never read while indexing), so `read(i)` is one positioned read plus
`FeaturesDict.deserialize_example_np`. Image features are not decoded here: their encoded bytes
go to the TF image decoder of the pipeline (`images.py`); images stored as uint8 Tensor
features (synthetic_scenes) travel as raw pixels.

Field names follow the raw record keys (see `base`); `field_map` renames ``{raw: feature}``
with ``/`` for nested features (e.g. ``{"key": "image/id"}`` for coco_captions, whose
``captions`` feature is a sequence of ``{id, text}`` and is understood as is).
"""
import os
import struct

import numpy as np

from data_pipelines import images
from data_pipelines.sources import base

_KEY_CANDIDATES = ("image_id", "image/id", "id", "text_id")


def load_builder(tfds_name: str, data_dir=None, prepare: bool = False):
  """`tfds.builder` for a prepared dataset; registers synthetic_scenes on demand.

  `prepare` builds it first (only for builders that need no download, e.g. synthetic_scenes).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if tfds_name.split("/")[0].split(":")[0] == "synthetic_scenes":
    from data_pipelines.synthetic_scenes import builder as _  # noqa: F401  (registers it)
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if prepare:
    builder.download_and_prepare()
  if not builder.is_prepared():
    raise ValueError(f"TFDS dataset {tfds_name!r} is not prepared under "
                     f"{builder.data_dir!r}; prepare it first (no download happens here)")
  return builder


def tfrecord_offsets(path: str, skip: int = 0, take: int = -1):
  """Offsets and lengths of the payloads of TFRecord records [skip, skip + take)."""
  offsets, lengths = [], []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos, n = 0, 0
    while pos + 12 <= size and (take < 0 or n < skip + take):
      f.seek(pos)
      (length,) = struct.unpack("<Q", f.read(8))
      if pos + 12 + length + 4 > size:
        break  # a truncated last record is not indexed
      if n >= skip:
        offsets.append(pos + 12)
        lengths.append(length)
      pos += 12 + length + 4
      n += 1
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def _get(d, path):
  for part in path.split("/"):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


class TfdsSource(base.Source):
  """One split of a prepared TFDS dataset (TFRecord format)."""

  def __init__(self, name, tfds_name, *, split="train", data_dir=None, prepare=False,
               field_map=None):
    super().__init__(name)
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self._builder = load_builder(tfds_name, data_dir, prepare)
    fmt = str(getattr(self._builder.info, "file_format", "tfrecord") or "tfrecord").lower()
    if "tfrecord" not in fmt:
      raise ValueError(f"source {name!r}: {tfds_name} is stored as {fmt}; this reader needs "
                       "TFRecord (prepare it with file_format='tfrecord')")
    self._all_features = self._features = self._builder.info.features
    self._decoders = {k: tfds.decode.SkipDecoding() for k, f in self._features.items()
                      if isinstance(f, tfds.features.Image)}
    self._map = dict(field_map or {})
    self._files, paths, offsets, lengths = [], [], [], []
    for fi in self._builder.info.splits[split].file_instructions:
      off, ln = tfrecord_offsets(fi.filename, fi.skip, fi.take)
      paths.append(np.full(len(off), len(paths), np.int32))
      offsets.append(off)
      lengths.append(ln)
      self._files.append(fi.filename)
    if not offsets or sum(len(o) for o in offsets) == 0:
      raise ValueError(f"source {name!r}: split {split!r} of {tfds_name} is empty")
    self._file_id = np.concatenate(paths)
    self._offset = np.concatenate(offsets)
    self._length = np.concatenate(lengths)
    self._reader = base.FileReader()
    top = set(self._features.keys())
    self.fields = frozenset(
        raw for raw in ("text", "image", "captions", "paraphrases", "hard_negatives", "regions",
                        "label")
        if self._map.get(raw, raw).split("/")[0] in top
        or (raw == "captions" and "caption" in top))

  def __len__(self):
    return len(self._offset)

  def restrict(self, fields):
    """Decodes only the features behind `fields` (plus the key): numpy decoding of unused
    features (scene graphs, QA, ...) costs more than the rest of building a row."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.wanted = frozenset(fields)
    top = set(self._all_features.keys())
    keep = {self._map.get(raw, raw).split("/")[0] for raw in set(fields) | {"key"}}
    keep |= {k.split("/")[0] for k in _KEY_CANDIDATES} | {"caption"}
    if "key" in self._map:
      keep.add(self._map["key"].split("/")[0])
    keep &= top
    self._features = tfds.features.FeaturesDict({k: self._all_features[k] for k in sorted(keep)})
    self._decoders = {k: d for k, d in self._decoders.items() if k in keep}

  def read(self, i):
    data = self._reader.read(self._files[self._file_id[i]], int(self._offset[i]),
                             int(self._length[i]))
    ex = self._features.deserialize_example_np(data, decoders=self._decoders)
    key = None
    for k in ([self._map["key"]] if "key" in self._map else []) + list(_KEY_CANDIDATES):
      key = _get(ex, k)
      if key is not None:
        break
    rec = dict(key=str(int(key)) if isinstance(key, (int, np.integer)) else (
        base.decode_text(key, "key") if key is not None else str(i)))
    rec["keys"] = [rec["key"]]
    m = lambda raw: _get(ex, self._map.get(raw, raw))  # noqa: E731
    if m("text") is not None and self.wants("text"):
      rec["text"] = base.decode_text(m("text"), "text")
    if m("label") is not None:
      label = m("label")
      rec["label"] = int(label) if isinstance(label, (int, np.integer)) else (
          base.decode_text(label, "label"))
    caps = m("captions")
    if caps is None:
      caps = _get(ex, "caption")
    if isinstance(caps, dict):  # coco_captions: Sequence({id, text})
      caps = caps.get("text")
    if caps is not None:
      rec["captions"] = base.unique_texts(
          base.text_list(list(np.asarray(caps).reshape(-1)), "captions"))
    for raw in ("paraphrases", "hard_negatives"):
      if m(raw) is not None:
        rec[raw] = base.text_list(list(np.asarray(m(raw)).reshape(-1)), raw)
    img = m("image")
    if img is not None:
      if isinstance(img, (bytes, np.bytes_)):
        rec["image"] = bytes(img)
      else:
        try:
          rec["image"] = images.encode_raw(np.asarray(img))
        except ValueError as e:
          raise base.BadRecord("undecodable_image", str(e)) from None
    if isinstance(m("regions"), dict):
      regions = dict(m("regions"))
      if img is not None and not isinstance(img, (bytes, np.bytes_)):
        regions.setdefault("height", np.asarray(img).shape[0])
        regions.setdefault("width", np.asarray(img).shape[1])
      rec["regions"] = base.check_regions(regions, "regions")
    return rec

  def close(self):
    self._reader.close()
