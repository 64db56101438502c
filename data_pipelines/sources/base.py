"""What every source is: a random-access list of raw records, plus shared readers and checks.

A source is opened once per process. Opening builds an index (byte offsets of lines, tar
members or TFRecord records; file lists) so that `read(i)` fetches record i directly; the
pipeline's resume therefore never replays earlier records. Records that are broken in a way the
index already shows (a tar member running past the end of its shard, an empty line) are left out
of the index and counted in `index_drops`; everything else is checked in `read`, which raises
`BadRecord(reason)` and the pipeline counts it and draws a replacement.

Raw records are plain dicts (the same keys for every kind of source):
  key            str, the record's name (file stem, image id); neighbours files refer to it
  keys           list of str, every name a region store may file this image under
  text           str (text corpora)
  image          bytes: encoded (jpeg/png/gif/bmp/webp) or `images.encode_raw` pixels
  captions       list of str (pairs), without repeats; paraphrases, hard_negatives: list of
                 str (optional)
  label          str or int: the record's class (optional: zero-shot classification)
  regions        dict(boxes [n,4] f32 pixels x1y1x2y2, features [n,F] f32, optional classes [n]
                 int, optional class_probs [n,C] f32, optional width/height of the image)
"""
import base64
import json
import mmap
import os
import threading

import numpy as np


class BadRecord(Exception):
  """A record that must be dropped; `reason` is one of `schema.DROP_REASONS`."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


class Source:
  """Random-access raw records. Subclasses set `name`, `fields` and implement `__len__`/`read`.

  `fields` is the set of raw keys this source can provide (besides `key`); the pipeline checks it
  against what each stream needs when it is built.
  """
  name: str = ""
  fields: frozenset = frozenset()
  # dtype of the region features and class probabilities `read` returns, when a source knows
  # every record's (a float16 region store); None: float32 or not known.
  region_dtype = None

  def __init__(self, name: str):
    self.name = name
    self.index_drops = {}  # reason -> count, found while indexing
    self.wanted = None  # raw fields the stream reads (None: all); see `restrict`
    self._key_index = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    raise TypeError(f"{type(self).__name__} does not define __len__")

  def read(self, i: int) -> dict:
    raise TypeError(f"{type(self).__name__} does not define read")

  def restrict(self, fields):
    """Only these raw fields will be used: a source then skips decoding the rest, and a broken
    field the stream never reads (an empty caption for the image stream) drops nothing."""
    self.wanted = frozenset(fields)

  def wants(self, field: str) -> bool:
    return self.wanted is None or field in self.wanted

  def key(self, i: int) -> str:
    """The key of record i (cheap for file-backed sources; subclasses override)."""
    return self.read(i)["key"]

  def find(self, key: str):
    """Index of the record named `key`, or None (builds a key index on first use)."""
    with self._lock:
      if self._key_index is None:
        index = {}
        for i in range(len(self)):
          try:
            index.setdefault(self.key(i), i)
          except BadRecord:
            continue
        self._key_index = index
    return self._key_index.get(key)

  def _drop_at_index(self, reason: str, n: int = 1):
    self.index_drops[reason] = self.index_drops.get(reason, 0) + n

  def close(self):
    pass


# ------------------------------------------------------------------------------------------
# Readers shared by the file-backed sources
# ------------------------------------------------------------------------------------------


class FileReader:
  """Thread-safe random reads of byte ranges (``os.pread``; no shared file position)."""

  def __init__(self):
    self._fds = {}
    self._lock = threading.Lock()

  def read(self, path: str, offset: int, length: int) -> bytes:
    fd = self._fds.get(path)
    if fd is None:
      with self._lock:
        fd = self._fds.get(path)
        if fd is None:
          fd = self._fds[path] = os.open(path, os.O_RDONLY)
    data = os.pread(fd, length, offset)
    if len(data) != length:
      raise BadRecord("truncated_member", f"{path}@{offset}: {len(data)} of {length} bytes")
    return data

  def close(self):
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()


def line_offsets(path: str):
  """Start offsets and lengths (without the newline) of every line of a file: int64 [n] x 2.

  Vectorised over 64 MiB chunks of an mmap, so a GB-sized corpus is indexed in seconds.
  """
  size = os.path.getsize(path)
  if size == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
    newlines = []
    chunk = 64 << 20
    for start in range(0, size, chunk):
      buf = np.frombuffer(mm[start:start + chunk], np.uint8)
      newlines.append(np.flatnonzero(buf == 10).astype(np.int64) + start)
  ends = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
  if len(ends) == 0 or ends[-1] != size - 1:
    ends = np.concatenate([ends, [size]])  # last line without a newline
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  return starts, ends - starts


def decode_text(raw, what: str = "text") -> str:
  """bytes/str -> str; raises BadRecord non_utf8_text / empty_text."""
  if isinstance(raw, (bytes, bytearray, memoryview, np.bytes_)):
    try:
      raw = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("non_utf8_text", f"{what}: {e}") from None
  text = str(raw).strip()
  if not text:
    raise BadRecord("empty_text", what)
  return text


def text_list(values, what: str) -> list:
  """A str, or a list of str/bytes -> list of non-empty str (empty items are skipped).

  Non-UTF-8 items raise; callers decide whether an empty list is fatal.
  """
  if values is None:
    return []
  if isinstance(values, (str, bytes, np.bytes_)):
    values = [values]
  out = []
  for v in values:
    try:
      out.append(decode_text(v, what))
    except BadRecord as e:
      if e.reason != "empty_text":
        raise
  return out


def unique_texts(texts) -> list:
  """The texts without repeats, in first-seen order (a caption given in .txt and .json once)."""
  return list(dict.fromkeys(texts))


def parse_json_object(raw: bytes, what: str) -> dict:
  """bytes of one JSON object -> dict; BadRecord non_utf8_text / bad_json."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecord("non_utf8_text", f"{what}: {e}") from None
  try:
    obj = json.loads(text)
  except ValueError as e:
    raise BadRecord("bad_json", f"{what}: {e}") from None
  if not isinstance(obj, dict):
    raise BadRecord("bad_json", f"{what}: not an object")
  return obj


def check_regions(regions: dict, what: str) -> dict:
  """Validates rank/size agreement and finiteness of raw region arrays; returns f32/int arrays.

  boxes [n,4], features [n,F], optional classes [n], class_probs [n,C]; n may be 0.
  """
  try:
    boxes = np.asarray(regions["boxes"], np.float32)
    feats = np.asarray(regions["features"], np.float32)
  except (KeyError, ValueError, TypeError) as e:
    raise BadRecord("bad_feature_shape", f"{what}: {e}") from None
  n = boxes.shape[0] if boxes.ndim == 2 else -1
  if boxes.ndim != 2 or boxes.shape[1] != 4 or feats.ndim != 2 or feats.shape[0] != n:
    raise BadRecord("bad_feature_shape", f"{what}: boxes {boxes.shape}, features {feats.shape}")
  out = dict(boxes=boxes, features=feats)
  if regions.get("classes") is not None:
    classes = np.asarray(regions["classes"])
    if classes.shape != (n,):
      raise BadRecord("bad_feature_shape", f"{what}: classes {classes.shape} for {n} boxes")
    out["classes"] = classes.astype(np.int64)
  if regions.get("class_probs") is not None:
    probs = np.asarray(regions["class_probs"], np.float32)
    if probs.ndim != 2 or probs.shape[0] != n:
      raise BadRecord("bad_feature_shape", f"{what}: class_probs {probs.shape} for {n} boxes")
    out["class_probs"] = probs
  for k in ("boxes", "features", "class_probs"):
    if k in out and not np.all(np.isfinite(out[k])):
      raise BadRecord("nonfinite_features", f"{what}: {k}")
  for k in ("width", "height"):
    if regions.get(k) is not None:
      out[k] = int(regions[k])
  return out


def b64_floats(text, shape_rows: int, what: str) -> np.ndarray:
  """base64 of raw little-endian float32 -> [shape_rows, -1] (the official UNIMO TSV format)."""
  try:
    raw = base64.b64decode(text, validate=False)
  except ValueError as e:
    raise BadRecord("bad_feature_shape", f"{what}: {e}") from None
  if len(raw) % 4:
    raise BadRecord("bad_feature_shape", f"{what}: {len(raw)} bytes is not float32")
  a = np.frombuffer(raw, "<f4")
  if shape_rows == 0:
    if len(a):
      raise BadRecord("bad_feature_shape", f"{what}: {len(a)} values for 0 boxes")
    return a.reshape(0, 0)
  if len(a) % shape_rows:
    raise BadRecord("bad_feature_shape", f"{what}: {len(a)} values for {shape_rows} boxes")
  return a.reshape(shape_rows, -1)


def stem(path: str) -> str:
  """File name without directories and without ALL extensions (webdataset key convention)."""
  base = os.path.basename(path)
  return base.split(".", 1)[0] if "." in base else base


def load_neighbours(path: str) -> dict:
  """Neighbours side file (JSON lines) -> {key: (image_keys list, texts list)}.

  One line per record: ``{"key": K, "images": [K1, ...], "texts": ["...", ...]}``; image keys
  name records of the SAME source; both lists are optional. Lines that are not objects or lack
  a key are skipped (the file is advisory: a missing neighbour is masked, never an error).
  """
  out = {}
  if not os.path.exists(os.path.expanduser(path)):
    raise ValueError(f"neighbours file {path} (a pair source's 'neighbours') does not exist; "
                     "build it with: unimo-jax prepare neighbours --config CONFIG")
  with open(os.path.expanduser(path), "rb") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except ValueError:
        continue
      if not isinstance(obj, dict) or "key" not in obj:
        continue
      images = [str(k) for k in obj.get("images", []) or []]
      texts = [str(t) for t in obj.get("texts", []) or [] if str(t).strip()]
      out[str(obj["key"])] = (images, texts)
  return out
