"""A converted region-feature store: sharded .npy arrays plus an index, read by memory map.

`unimo-jax prepare regions` (`write_store`) converts a ``region_npz`` directory or the official
base64 ``region_tsv`` into this layout once; `RegionStoreSource` (source kind ``region_store``)
reads it. Reading a record is then a slice of memory-mapped arrays (no zip, no base64, no
float32 parse): at the paper's shapes 1.6 ms (npz) and 12 ms (TSV, a pair and its related
image) per row become a few tens of microseconds.

Layout of the store directory D::

  D/regions.json               manifest: format, version, dtype, feature_dim, num_classes, records,
                               skipped (drop reason -> count at conversion), shards [{name, images,
                               rows}], source
  D/keys.jsonl                 one JSON list per record: every key the record is filed under
  D/<shard>.index.npy          int64 [images, 5]: first row, region count, width, height (0 when
                               unknown), has class_probs (0/1)
  D/<shard>.boxes.npy          float32 [rows, 4] pixel boxes x1 y1 x2 y2 (exact)
  D/<shard>.features.npy       dtype [rows, F] region features
  D/<shard>.classes.npy        int32 [rows]: the record's classes, or argmax of its float32 probs
  D/<shard>.probs.npy          dtype [rows, C] class probabilities (only with num_classes)

dtype is ``float16`` (default) or ``float32``. float16 halves the bytes read and carried and
rounds features and class probabilities to float16 (relative error <= 2^-11; probabilities
below 6e-5 keep an absolute error <= 3e-8): the model input equals the float32 path's rounded
to float16, which `tests/test_region_store.py` checks. Classes are taken from the float32 values
at conversion, so region classes (the MRC target's argmax) are exactly those of the float32 path.
A value too large for float16 (|x| > 65504) makes its record a ``nonfinite_features`` skip.

Every shard name in the manifest must be a plain file name inside D (no separators, no ``..``):
a manifest cannot make the reader open files elsewhere. A record whose index points outside its
shard, or whose values are not finite, raises `BadRecord` (skipped and counted by the pipeline).
"""
import json
import os
import threading
import time

import numpy as np

from data_pipelines.sources import base
from data_pipelines.sources import store_manifest

FORMAT, VERSION = "unimo_jax.region_store", 1
MANIFEST, KEYS = "regions.json", "keys.jsonl"
DTYPES = ("float16", "float32")
_ARRAYS = ("index", "boxes", "features", "classes", "probs")


def _fail(path, field, msg):
  store_manifest.fail("region store", path, field, msg)


def _inside(root: str, name: str, manifest: str) -> str:
  return store_manifest.inside("region store", root, name, manifest)


def read_manifest(root: str) -> dict:
  """The validated manifest of the store at `root` (one-line ValueError naming the field)."""
  m, path = store_manifest.load("region store", root, MANIFEST, FORMAT, VERSION,
                                 "unimo-jax prepare regions --kind region_npz|region_tsv --path SRC")
  if m.get("dtype") not in DTYPES:
    _fail(path, "dtype", f"{m.get('dtype')!r}, expected one of {DTYPES}")
  if not isinstance(m.get("feature_dim"), int) or m["feature_dim"] < 0:
    _fail(path, "feature_dim", f"{m.get('feature_dim')!r} is not a size")
  if m.get("num_classes") is not None and (not isinstance(m["num_classes"], int)
                                           or m["num_classes"] < 1):
    _fail(path, "num_classes", f"{m.get('num_classes')!r} is not a size")
  shards = m.get("shards")
  if not isinstance(shards, list):
    _fail(path, "shards", "not a list")
  for s in shards:
    if not isinstance(s, dict) or not isinstance(s.get("images"), int) or not isinstance(
        s.get("rows"), int):
      _fail(path, "shards", f"{s!r} needs name, images and rows")
    _inside(root, s.get("name"), path)
  if m.get("records") != sum(s["images"] for s in shards):
    _fail(path, "records", f"{m.get('records')!r} is not the shards' image total")
  return m


def _finite(a) -> bool:
  """All of `a` finite. float16: no value has an all-ones exponent, checked on the bits (numpy's
  float16 reductions convert element by element, several times slower); float32: a NaN or inf
  makes the max or the min non-finite."""
  if a.size == 0:
    return True
  if a.dtype == np.float16:
    return int(np.bitwise_and(a.view(np.uint16), 0x7FFF).max()) < 0x7C00
  return bool(np.isfinite(a.max()) and np.isfinite(a.min()))


class RegionStoreSource(base.Source):
  """Records of a store written by `write_store` (see the module docstring)."""
  fields = frozenset({"regions"})

  def __init__(self, name, path):
    super().__init__(name)
    self.root = os.path.expanduser(path)
    self.manifest = m = read_manifest(self.root)
    self._dtype = self.region_dtype = np.dtype(m["dtype"])
    self._F, self._C = m["feature_dim"], m["num_classes"]
    self._shards = [s["name"] for s in m["shards"]]
    self._keys = store_manifest.read_keys(
        "region store", self.root, KEYS, m["records"],
        lambda k: isinstance(k, list) and k and all(isinstance(x, str) for x in k),
        "a non-empty list of keys")
    index, shard_of = [], []
    for s, spec in enumerate(m["shards"]):
      a = self._load(s, "index")
      if a.shape != (spec["images"], 5) or a.dtype != np.int64:
        raise ValueError(f"region store {self._file(s, 'index')}: index {a.dtype}{a.shape}, "
                         f"expected int64({spec['images']}, 5)")
      index.append(np.array(a))  # small: copied, so no file stays mapped for it
      shard_of.append(np.full(spec["images"], s, np.int32))
    self._index = np.concatenate(index) if index else np.zeros((0, 5), np.int64)
    self._shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
    self._rows = [spec["rows"] for spec in m["shards"]]
    self._maps = {}  # (shard, array) -> memory map, opened on first read
    self._map_lock = threading.Lock()
    self._by_key = None

  def _file(self, s, array):
    return _inside(self.root, f"{self._shards[s]}.{array}.npy",
                   os.path.join(self.root, MANIFEST))

  def _load(self, s, array):
    path = self._file(s, array)
    try:
      return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"region store {path}: unreadable: {e}") from None

  def _array(self, s, array):
    a = self._maps.get((s, array))
    if a is None:
      with self._map_lock:
        a = self._maps.get((s, array))
        if a is None:
          a = self._load(s, array)
          width = {"boxes": 4, "features": self._F, "probs": self._C}.get(array)
          dtype = {"boxes": np.float32, "classes": np.int32}.get(array, self._dtype)
          want = (self._rows[s],) + (() if width is None else (width,))
          if a.shape != want or a.dtype != dtype:
            raise ValueError(f"region store {self._file(s, array)}: {a.dtype}{a.shape}, "
                             f"expected {np.dtype(dtype)}{want}")
          self._maps[(s, array)] = a
    return a

  def __len__(self):
    return len(self._keys)

  def key(self, i):
    return self._keys[i][0]

  def find(self, key):
    with self._lock:
      if self._by_key is None:
        by_key = {}
        for i, ks in enumerate(self._keys):
          for k in ks:
            by_key.setdefault(k, i)
        self._by_key = by_key
    return self._by_key.get(key)

  def read(self, i):
    s = int(self._shard_of[i])
    start, n, w, h, has_probs = (int(v) for v in self._index[i])
    what = f"{self.root} record {i} ({self._keys[i][0]})"
    if start < 0 or n < 0 or start + n > self._rows[s]:
      raise base.BadRecord("bad_feature_shape", f"{what}: rows {start}+{n} outside its shard")
    feats = self._array(s, "features")[start:start + n]
    boxes = self._array(s, "boxes")[start:start + n]
    classes = self._array(s, "classes")[start:start + n]
    regions = dict(boxes=boxes, features=feats, classes=classes, class_probs=None)
    if has_probs and self._C is not None:
      regions["class_probs"] = self._array(s, "probs")[start:start + n]
    # A damaged shard must not reach the model (the writer stored only finite values).
    for k in ("boxes", "features", "class_probs"):
      if regions[k] is not None and not _finite(regions[k]):
        raise base.BadRecord("nonfinite_features", f"{what}: {k}")
    if w > 0 and h > 0:
      regions.update(width=w, height=h)
    return dict(key=self._keys[i][0], keys=list(self._keys[i]), regions=regions)


# ---------------------------------------------------------------------------------------------
# Conversion (`unimo-jax prepare regions`)
# ---------------------------------------------------------------------------------------------


class _Shard:
  """Arrays of one shard being filled (written as .npy files when full)."""

  def __init__(self):
    self.index, self.boxes, self.feats, self.classes, self.probs = [], [], [], [], []
    self.rows = 0

  def add(self, boxes, feats, classes, probs, width, height):
    n = len(boxes)
    self.index.append((self.rows, n, width, height, int(probs is not None)))
    if n:  # records without regions add no rows (their feature size may not be known yet)
      self.boxes.append(boxes)
      self.feats.append(feats)
      self.classes.append(classes)
      self.probs.append(probs if probs is not None else n)  # n: zeros of the store's C
    self.rows += n

  def arrays(self, F, C, dtype) -> dict:
    out = dict(index=np.asarray(self.index, np.int64).reshape(-1, 5),
               boxes=np.concatenate(self.boxes or [np.zeros((0, 4), np.float32)]),
               features=np.concatenate(self.feats or [np.zeros((0, F), dtype)]),
               classes=np.concatenate(self.classes or [np.zeros(0, np.int32)]))
    if C is not None and any(not isinstance(p, int) for p in self.probs):
      out["probs"] = np.concatenate([np.zeros((p, C), dtype) if isinstance(p, int) else p
                                     for p in self.probs])
    return out


def _regions_of(regions, F, C, dtype):
  """A record's checked arrays in the store's dtypes: (boxes, features, classes, probs|None).

  Classes come from the float32 probabilities (when the record has no classes), before
  rounding, so they are the float32 path's."""
  feats, boxes = regions["features"], regions["boxes"]
  n = len(boxes)
  if n and feats.shape[1] != F:
    raise base.BadRecord("bad_feature_shape", f"features of size {feats.shape[1]}, expected {F}")
  probs = regions.get("class_probs")
  classes = regions.get("classes")
  if probs is not None and n and C is not None and probs.shape[1] != C:
    raise base.BadRecord("bad_feature_shape", f"class_probs of size {probs.shape[1]}, "
                         f"expected {C}")
  if probs is None and classes is None:
    raise base.BadRecord("missing_field", "region classes or class_probs")
  if classes is None:
    classes = np.argmax(probs, axis=1) if n else np.zeros(0, np.int64)
  if C is not None and n and (classes.min() < 0 or classes.max() >= C):
    raise base.BadRecord("bad_feature_shape", f"region class outside [0, {C})")
  if not n:
    return np.zeros((0, 4), np.float32), None, np.zeros(0, np.int32), None
  out_f = feats.astype(dtype)
  out_p = None if probs is None or C is None else probs.astype(dtype)
  for v in (out_f, out_p):
    if v is not None and not np.all(np.isfinite(v)):
      raise base.BadRecord("nonfinite_features", f"a value outside {dtype}'s range")
  return boxes.astype(np.float32), out_f, classes.astype(np.int32), out_p


def write_store(src: base.Source, out: str, *, dtype: str = "float16", shard_images: int = 256,
                num_classes: int | None = None, log=None) -> dict:
  """Converts every record of region source `src` into a store at `out`; returns the manifest.

  Records that raise `BadRecord` (unreadable, wrong sizes, non-finite, a feature size other
  than the first record's) are skipped and counted in the manifest's ``skipped``.
  `num_classes` fixes C (default: the first record's class_probs size; a classes-only source
  stores no probabilities). The manifest is written last, so a store without one is incomplete.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r}: expected one of {DTYPES}")
  if shard_images < 1:
    raise ValueError(f"--shard-images {shard_images}: must be >= 1")
  if os.path.exists(os.path.join(out, MANIFEST)):
    raise ValueError(f"{out}: a region store is already there ({MANIFEST}); remove it first")
  os.makedirs(out, exist_ok=True)
  start_time = time.time()
  F, C = None, num_classes
  skipped, shards, keys, nbytes = {}, [], [], 0
  cur = _Shard()

  def flush():
    nonlocal cur, nbytes
    name = f"shard-{len(shards):05d}"
    for k, a in cur.arrays(F or 0, C, dtype).items():
      np.save(os.path.join(out, f"{name}.{k}.npy"), a, allow_pickle=False)
      nbytes += a.nbytes
    shards.append(dict(name=name, images=len(cur.index), rows=cur.rows))
    cur = _Shard()

  for i in range(len(src)):
    try:
      rec = src.read(i)
      reg = rec["regions"]
      if F is None and len(reg["boxes"]):
        F = int(reg["features"].shape[1])
        if C is None and reg.get("class_probs") is not None:
          C = int(reg["class_probs"].shape[1])
      boxes, feats, classes, probs = _regions_of(reg, F, C, dtype)
    except base.BadRecord as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    cur.add(boxes, feats, classes, probs, int(reg.get("width") or 0),
            int(reg.get("height") or 0))
    keys.append(list(dict.fromkeys(rec.get("keys") or [rec["key"]])))
    if len(cur.index) == shard_images and F is not None:
      flush()
      if log:
        log(f"{len(keys)} records in {time.time() - start_time:.1f}s")
  if cur.index:
    flush()
  with open(os.path.join(out, KEYS), "w", encoding="utf-8") as f:
    for k in keys:
      f.write(json.dumps(k) + "\n")
  manifest = dict(format=FORMAT, version=VERSION, dtype=dtype, feature_dim=int(F or 0),
                  num_classes=C, records=len(keys), skipped=skipped, shards=shards,
                  source=src.name, bytes=nbytes, seconds=round(time.time() - start_time, 3))
  with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  return manifest
