"""WebDataset tar shards: members grouped by key (``dir/key.ext``), image + ``txt``/``json``.

The index is built from the tar headers alone (no member data is read): for every key, the
offset and size of each of its members. A member whose data runs past the end of its shard (a
truncated download) drops its whole record and is counted as ``truncated_member``; a shard
whose header chain breaks ends there. ``txt`` is one caption (or a text, for the text stream);
``json`` may hold ``caption``/``captions``/``paraphrases``/``hard_negatives``/``text``/``label``
and ``cls`` a class label. A record's captions are those of ``txt`` and ``json`` without repeats;
an empty or undecodable ``txt`` drops the record only when the stream needs its text and no
``json`` supplies it (so the image stream, which never reads captions, drops nothing for it).
"""
import os
import tarfile

from data_pipelines.sources import base
from data_pipelines.sources.files import IMAGE_EXTENSIONS, expand_paths

_IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)


def _split_key(name: str):
  """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``): the key ends at the basename's 1st dot."""
  d, base_name = os.path.split(name)
  if "." not in base_name:
    return None, None
  k, ext = base_name.split(".", 1)
  return os.path.join(d, k), ext.lower()


class WebDatasetSource(base.Source):
  """Records of WebDataset shards (a path, glob or list)."""
  fields = frozenset({"image", "captions", "paraphrases", "hard_negatives", "text", "label"})

  def __init__(self, name, path):
    super().__init__(name)
    self._shards = expand_paths(path, f"source {name!r}")
    self._records = []  # (shard id, key, {ext: (offset, size)})
    for s, shard in enumerate(self._shards):
      self._index_shard(s, shard)
    self._reader = base.FileReader()
    if not self._records:
      raise ValueError(f"source {name!r}: no complete records in {path!r}")

  def _index_shard(self, s, shard):
    size = os.path.getsize(shard)
    group_key, members, truncated = None, {}, False

    def flush():
      if group_key is None:
        return
      if truncated:
        self._drop_at_index("truncated_member")
      else:
        self._records.append((s, group_key, dict(members)))

    try:
      with tarfile.open(shard, mode="r:") as tar:
        while True:
          try:
            m = tar.next()
          except (tarfile.ReadError, EOFError):
            break  # header chain broken (truncated shard): what came before is kept
          if m is None:
            break
          if not m.isfile():
            continue
          key, ext = _split_key(m.name)
          if key is None:
            continue
          if key != group_key:
            flush()
            group_key, members, truncated = key, {}, False
          if m.offset_data + m.size > size:
            truncated = True
          members[ext] = (m.offset_data, m.size)
    except tarfile.ReadError as e:
      raise ValueError(f"source {self.name!r}: {shard} is not a tar file: {e}") from None
    flush()

  def __len__(self):
    return len(self._records)

  def key(self, i):
    return self._records[i][1]

  def read(self, i):
    s, key, members = self._records[i]
    shard = self._shards[s]
    rec = dict(key=key, keys=[key, os.path.basename(key)])
    want_text = self.wants("text") or self.wants("captions")
    captions, texts, problems = [], [], []
    for ext, (off, size) in members.items():
      last = ext.rsplit(".", 1)[-1]
      if last in _IMAGE_EXTS and "image" not in rec:
        if self.wants("image"):
          rec["image"] = self._reader.read(shard, off, size)
      elif last == "txt" and want_text:
        try:
          text = base.decode_text(self._reader.read(shard, off, size), f"{key}.{ext}")
        except base.BadRecord as e:  # only fatal when nothing else gives the field
          problems.append(e)
          continue
        texts.append(text)
        captions.append(text)
      elif last == "cls" and self.wants("label"):
        rec["label"] = base.decode_text(self._reader.read(shard, off, size), f"{key}.{ext}")
      elif last == "json" and (want_text or self.wants("paraphrases")
                               or self.wants("hard_negatives") or self.wants("label")):
        obj = base.parse_json_object(self._reader.read(shard, off, size), f"{key}.{ext}")
        caps = obj.get("captions", obj.get("caption"))
        if caps is not None:
          captions.extend(base.text_list(caps, "captions"))
        for field in ("paraphrases", "hard_negatives"):
          if obj.get(field) is not None:
            rec[field] = base.text_list(obj[field], field)
        if obj.get("text") is not None and str(obj["text"]).strip():
          texts.append(base.decode_text(str(obj["text"]), "text"))
        for k in ("label", "class", "cls"):
          if obj.get(k) is not None and "label" not in rec:
            rec["label"] = obj[k]
    if captions:
      rec["captions"] = base.unique_texts(captions)
    if texts:
      rec["text"] = texts[0]
    if problems:
      fatal = (not captions and not texts) if self.wanted is None else any(
          self.wants(f) and f not in rec for f in ("captions", "text"))
      if fatal:
        raise problems[0]
    return rec

  def close(self):
    self._reader.close()
