"""Region-feature stores: one npz per image, and the official UNIMO base64 TSV.

Both are sources on their own (an image collection for the ``regions`` visual input) and lookup
tables that `RegionJoin` attaches to a pair/image source by key (COCO captions + TSV features).

npz keys: ``boxes`` [n,4] float pixels x1y1x2y2, ``features`` [n,F], optional ``classes`` [n],
``class_probs`` (or ``probs``/``cls_prob``) [n,C], optional ``image_w``/``image_h`` (or
``width``/``height``). TSV columns (UNIMO.md): ``img_filename W H num_box boxes features
probs`` with boxes/features/probs base64 of raw float32 ([n,4], [n,F], [n,C]); probs optional.
"""
import glob
import os
import zipfile

import numpy as np

from data_pipelines.sources import base
from data_pipelines.sources.files import _LineSource

_PROB_KEYS = ("class_probs", "probs", "cls_prob")
_W_KEYS = ("image_w", "width", "w")
_H_KEYS = ("image_h", "height", "h")


class NpzRegionSource(base.Source):
  """A directory (or glob) of ``<key>.npz`` region files."""
  fields = frozenset({"regions"})

  def __init__(self, name, path):
    super().__init__(name)
    p = os.path.expanduser(path)
    pattern = os.path.join(p, "**", "*.npz") if os.path.isdir(p) else p
    self._files = sorted(glob.glob(pattern, recursive=True))
    if not self._files:
      raise ValueError(f"source {name!r}: no npz files at {path!r}")

  def __len__(self):
    return len(self._files)

  def key(self, i):
    return base.stem(self._files[i])

  def read(self, i):
    path = self._files[i]
    what = os.path.basename(path)
    try:
      with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      raise base.BadRecord("bad_feature_shape", f"{what}: unreadable npz: {e}") from None
    if "boxes" not in arrays or "features" not in arrays:
      raise base.BadRecord("bad_feature_shape", f"{what}: needs boxes and features")
    regions = dict(boxes=arrays["boxes"], features=arrays["features"],
                   classes=arrays.get("classes"))
    regions["class_probs"] = next((arrays[k] for k in _PROB_KEYS if k in arrays), None)
    w = next((arrays[k] for k in _W_KEYS if k in arrays), None)
    h = next((arrays[k] for k in _H_KEYS if k in arrays), None)
    if w is not None and h is not None:
      regions.update(width=int(np.asarray(w).reshape(())), height=int(np.asarray(h).reshape(())))
    return dict(key=self.key(i), keys=[self.key(i)], regions=base.check_regions(regions, what))


class TsvRegionSource(_LineSource):
  """The official base64 TSV of region features (one image per line)."""
  fields = frozenset({"regions"})

  def key(self, i):
    # Only the first column is needed: read a short prefix of the line.
    head = self._reader.read(self._files[self._file_id[i]], int(self._offset[i]),
                             int(min(self._length[i], 512)))
    return base.stem(head.split(b"\t", 1)[0].decode("utf-8", "replace"))

  def read(self, i):
    line = self._line(i)
    cols = line.split(b"\t")
    if len(cols) not in (6, 7):
      raise base.BadRecord("bad_feature_shape", f"line {i}: {len(cols)} columns, expected 6-7")
    try:
      fname = cols[0].decode("utf-8")
      w, h, n = int(cols[1]), int(cols[2]), int(cols[3])
    except (UnicodeDecodeError, ValueError) as e:
      raise base.BadRecord("bad_feature_shape", f"line {i}: {e}") from None
    what = f"{fname}"
    boxes = base.b64_floats(cols[4], n, what + " boxes")
    feats = base.b64_floats(cols[5], n, what + " features")
    if n == 0:
      boxes, feats = boxes.reshape(0, 4), feats.reshape(0, 0)
    probs = base.b64_floats(cols[6], n, what + " probs") if len(cols) == 7 else None
    regions = dict(boxes=boxes, features=feats, class_probs=probs, width=w, height=h)
    k = base.stem(fname)
    return dict(key=k, keys=[k, fname], regions=base.check_regions(regions, what))


class RegionJoin(base.Source):
  """`source`'s records with ``regions`` looked up by key in a region `store`."""

  def __init__(self, source: base.Source, store: base.Source):
    super().__init__(source.name)
    self._source, self._store = source, store
    self.fields = frozenset(source.fields | {"regions"})
    self.index_drops = source.index_drops
    self.region_dtype = store.region_dtype

  def __len__(self):
    return len(self._source)

  def key(self, i):
    return self._source.key(i)

  def restrict(self, fields):
    self._source.restrict(set(fields) - {"regions"})

  def find(self, key):
    return self._source.find(key)

  def read(self, i):
    rec = self._source.read(i)
    for k in rec.get("keys") or [rec["key"]]:
      j = self._store.find(k)
      if j is not None:
        rec["regions"] = self._store.read(j)["regions"]
        return rec
    raise base.BadRecord("missing_regions", f"no regions for {rec['key']!r}")

  def close(self):
    self._source.close()
    self._store.close()
