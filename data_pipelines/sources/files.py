"""Local file sources: text corpora, JSON lines, image folders, COCO caption JSON.

Each builds its index when opened (line offsets, sorted file lists, a caption table) and reads
one record per `read(i)` with a positioned read, so any record is reachable in O(1).
"""
import glob
import json
import os

import numpy as np

from data_pipelines.sources import base

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def expand_paths(path, what: str) -> list:
  """A path, glob or list of them -> sorted unique existing files; ValueError when none."""
  patterns = [path] if isinstance(path, str) else list(path)
  files = []
  for p in patterns:
    files += sorted(glob.glob(os.path.expanduser(str(p)), recursive=True)) if any(
        c in str(p) for c in "*?[") else [os.path.expanduser(str(p))]
  files = [f for f in dict.fromkeys(files) if os.path.isfile(f)]
  if not files:
    raise ValueError(f"{what}: no files match {path!r}")
  return files


class _LineSource(base.Source):
  """Shared index of (file, offset, length) over the lines of several files."""

  def __init__(self, name, path):
    super().__init__(name)
    self._files = expand_paths(path, f"source {name!r}")
    file_ids, offsets, lengths = [], [], []
    for k, f in enumerate(self._files):
      starts, lens = base.line_offsets(f)
      # An empty line is an empty record: dropped here, where it costs nothing to see.
      empty = lens == 0
      if empty.any():
        self._drop_at_index("empty_text", int(empty.sum()))
      file_ids.append(np.full(int((~empty).sum()), k, np.int32))
      offsets.append(starts[~empty])
      lengths.append(lens[~empty])
    self._file_id = np.concatenate(file_ids)
    self._offset = np.concatenate(offsets)
    self._length = np.concatenate(lengths)
    self._reader = base.FileReader()

  def __len__(self):
    return len(self._offset)

  def _line(self, i: int) -> bytes:
    return self._reader.read(self._files[self._file_id[i]], int(self._offset[i]),
                             int(self._length[i])).rstrip(b"\r")

  def _default_key(self, i):
    return f"{os.path.basename(self._files[self._file_id[i]])}:{int(self._offset[i])}"

  def close(self):
    self._reader.close()


class TextSource(_LineSource):
  """Plain text files, one example per line (a sentence, paragraph or document)."""
  fields = frozenset({"text"})

  def read(self, i):
    return dict(key=self._default_key(i), text=base.decode_text(self._line(i)))

  def key(self, i):
    return self._default_key(i)


class JsonlSource(_LineSource):
  """JSON lines. Recognised keys (renamed through `field_map` {raw: json key}):

  ``text`` (corpus), ``captions`` (list) or ``caption`` (str), ``paraphrases``,
  ``hard_negatives``, ``image`` (a path, relative to `image_dir`), ``key`` (or ``id``,
  ``image_id``), ``label`` (a class name or index). A record may carry any subset; the stream
  decides what it needs (fields it does not read are not decoded, so they drop nothing).
  """

  def __init__(self, name, path, *, image_dir=None, field_map=None):
    super().__init__(name, path)
    self._image_dir = image_dir
    self._map = dict(field_map or {})
    self.fields = frozenset({"text", "captions", "paraphrases", "hard_negatives", "label"}
                            | ({"image"} if image_dir is not None else set()))

  def _get(self, obj, raw_name, *alternatives):
    for k in (self._map.get(raw_name, raw_name),) + alternatives:
      if k in obj:
        return obj[k]
    return None

  def read(self, i):
    obj = base.parse_json_object(self._line(i), f"line {i}")
    key = self._get(obj, "key", "id", "image_id")
    rec = dict(key=str(key) if key is not None else self._default_key(i))
    rec["keys"] = [rec["key"]]
    text = self._get(obj, "text")
    if text is not None and self.wants("text"):  # an empty text drops only text-stream rows
      rec["text"] = base.decode_text(text if isinstance(text, str) else str(text))
    captions = self._get(obj, "captions")
    if captions is None:
      captions = self._get(obj, "caption")
    for raw_name, value in (("captions", captions),
                            ("paraphrases", self._get(obj, "paraphrases")),
                            ("hard_negatives", self._get(obj, "hard_negatives"))):
      if value is not None and self.wants(raw_name):
        rec[raw_name] = base.text_list(value, raw_name)
    if "captions" in rec:
      rec["captions"] = base.unique_texts(rec["captions"])
    label = self._get(obj, "label")
    if label is not None:
      rec["label"] = label
    image = self._get(obj, "image")
    if image is not None and self._image_dir is not None and self.wants("image"):
      path = os.path.join(self._image_dir, str(image))
      rec["keys"] += [base.stem(path), str(image)]
      try:
        with open(path, "rb") as f:
          rec["image"] = f.read()
      except OSError as e:
        raise base.BadRecord("missing_field", f"image {path}: {e}") from None
    return rec


class ImageFolderSource(base.Source):
  """Every image file under a directory (recursive, sorted); key = path stem."""
  fields = frozenset({"image"})

  def __init__(self, name, path):
    super().__init__(name)
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
      raise ValueError(f"source {name!r}: {path!r} is not a directory")
    files = []
    for d, _, names in os.walk(root):
      files += [os.path.join(d, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    self._root = root
    self._files = sorted(files)
    if not self._files:
      raise ValueError(f"source {name!r}: no images under {path!r}")

  def __len__(self):
    return len(self._files)

  def key(self, i):
    return base.stem(self._files[i])

  def read(self, i):
    path = self._files[i]
    with open(path, "rb") as f:
      data = f.read()
    rel = os.path.relpath(path, self._root)
    return dict(key=base.stem(path), keys=[base.stem(path), rel], image=data)


class CocoCaptionsSource(base.Source):
  """COCO caption JSON (``images`` [{id, file_name, width, height}], ``annotations``
  [{image_id, caption}]) + image folder; one record per image, with all its captions. Without
  an image folder the records have captions only (regions come from a joined store)."""

  def __init__(self, name, path, *, image_dir=None):
    super().__init__(name)
    self.fields = frozenset({"captions"} | ({"image"} if image_dir is not None else set()))
    with open(os.path.expanduser(path), "rb") as f:
      ann = json.load(f)
    captions = {}
    for a in ann.get("annotations", []):
      captions.setdefault(a.get("image_id"), []).append(a.get("caption", ""))
    self._images = []
    for img in sorted(ann.get("images", []), key=lambda x: x["id"]):
      if img["id"] in captions:
        self._images.append((img, captions[img["id"]]))
      else:
        self._drop_at_index("missing_field")
    self._image_dir = os.path.expanduser(image_dir) if image_dir is not None else None
    if not self._images:
      raise ValueError(f"source {name!r}: no captioned images in {path!r}")

  def __len__(self):
    return len(self._images)

  def key(self, i):
    return base.stem(self._images[i][0]["file_name"])

  def read(self, i):
    img, caps = self._images[i]
    rec = dict(key=self.key(i), keys=[self.key(i), str(img["id"]), img["file_name"]])
    rec["captions"] = base.unique_texts(base.text_list(caps, "captions"))
    if not rec["captions"] and self.wants("captions"):
      raise base.BadRecord("empty_text", "captions")
    if not self.wants("image") or self._image_dir is None:
      return rec
    try:
      with open(os.path.join(self._image_dir, img["file_name"]), "rb") as f:
        rec["image"] = f.read()
    except OSError as e:
      raise base.BadRecord("missing_field", f"image: {e}") from None
    return rec
