"""A pre-tokenised text store: sharded int32 .npy token arrays plus offsets, read by memory map.

`unimo-jax prepare tokens` (`write_store`) tokenises a ``text`` or ``jsonl`` corpus once with the
run's tokenizer; `TokenStoreSource` (source kind ``token_store``) reads it. A record is then a
slice of a memory-mapped array instead of a SentencePiece / BPE pass over the whole document
(at the paper's shapes ~150 us of a text row's ~540 us, benchmarks/README.md). The text stream
builds the same row from the stored ids as from the text (the window, masking and infilling
draw from the same ids), so with a corpus without bad records the batches are byte-identical
to the raw corpus's (`tests/test_token_store.py`).

Layout of the store directory D::

  D/tokens.json            manifest: format, version, tokenizer {fingerprint, vocab_size, spec},
                           records, tokens, skipped (drop reason -> count at conversion: records
                           the raw source could not give and texts without tokens), shards
                           [{name, records, tokens}], source, seconds
  D/keys.jsonl             one JSON string per record: its key in the raw source
  D/<shard>.tokens.npy     int32 [tokens]: the records' ids (no special tokens), one after another
  D/<shard>.offsets.npy    int64 [records + 1]: record j is tokens[offsets[j]:offsets[j + 1]]

The store is tied to its tokenizer: `Stream` refuses a store whose tokenizer fingerprint is not
the run's (`check_tokenizer`). Every shard name in the manifest must be a plain file name inside
D (no separators, no ``..``). A record whose offsets point outside its shard, or whose ids fall
outside the vocabulary, raises `BadRecord` (skipped and counted by the pipeline).
"""
import hashlib
import json
import os
import pickle
import threading
import time

import numpy as np

from data_pipelines.sources import base
from data_pipelines.sources import store_manifest

FORMAT, VERSION = "unimo_jax.token_store", 1
MANIFEST, KEYS = "tokens.json", "keys.jsonl"


def _fail(path, field, msg):
  store_manifest.fail("token store", path, field, msg)


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 prefix of what decides a tokenizer's ids: its `fingerprint()` (the model or vocab
  files) or, for other tokenizer objects, their pickle."""
  fp = getattr(tokenizer, "fingerprint", None)
  if callable(fp):
    return fp()
  return hashlib.sha256(pickle.dumps(tokenizer, protocol=4)).hexdigest()[:16]


def _inside(root: str, name: str, manifest: str) -> str:
  return store_manifest.inside("token store", root, name, manifest)


def read_manifest(root: str) -> dict:
  """The validated manifest of the store at `root` (one-line ValueError naming the field)."""
  m, path = store_manifest.load("token store", root, MANIFEST, FORMAT, VERSION,
                                 "unimo-jax prepare tokens --path CORPUS --tokenizer SPEC")
  tok = m.get("tokenizer")
  if not isinstance(tok, dict) or not isinstance(tok.get("fingerprint"), str) or not isinstance(
      tok.get("vocab_size"), int) or tok["vocab_size"] < 1:
    _fail(path, "tokenizer", f"{tok!r} needs a fingerprint and a vocab_size")
  shards = m.get("shards")
  if not isinstance(shards, list):
    _fail(path, "shards", "not a list")
  for s in shards:
    if not isinstance(s, dict) or not isinstance(s.get("records"), int) or not isinstance(
        s.get("tokens"), int) or s["records"] < 0 or s["tokens"] < 0:
      _fail(path, "shards", f"{s!r} needs name, records and tokens")
    _inside(root, s.get("name"), path)
  if m.get("records") != sum(s["records"] for s in shards):
    _fail(path, "records", f"{m.get('records')!r} is not the shards' record total")
  if not isinstance(m.get("skipped", {}), dict):
    _fail(path, "skipped", "not an object")
  return m


class TokenStoreSource(base.Source):
  """Records ``{key, token_ids}`` of a store written by `write_store` (module docstring).

  The conversion's skipped records count as this source's `index_drops` (as the raw source's
  bad records would have been counted when met)."""
  fields = frozenset({"token_ids"})

  def __init__(self, name, path):
    super().__init__(name)
    self.root = os.path.expanduser(path)
    self.manifest = m = read_manifest(self.root)
    self.tokenizer_fingerprint = m["tokenizer"]["fingerprint"]
    self.vocab_size = m["tokenizer"]["vocab_size"]
    for reason, n in m.get("skipped", {}).items():
      self._drop_at_index(str(reason), int(n))
    self._shards = [s["name"] for s in m["shards"]]
    self._tokens_per_shard = [s["tokens"] for s in m["shards"]]
    self._keys = store_manifest.read_keys("token store", self.root, KEYS, m["records"],
                                          lambda k: isinstance(k, str), "a JSON string")
    counts = np.asarray([s["records"] for s in m["shards"]], np.int64)
    self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [shards + 1]
    self._maps = {}  # (shard, array) -> memory map, opened on first read
    self._map_lock = threading.RLock()  # reentrant: the offsets check maps the tokens
    self._by_key = None

  def _file(self, s, array):
    return _inside(self.root, f"{self._shards[s]}.{array}.npy",
                   os.path.join(self.root, MANIFEST))

  def _array(self, s, array):
    a = self._maps.get((s, array))
    if a is None:
      with self._map_lock:
        a = self._maps.get((s, array))
        if a is None:
          path = self._file(s, array)
          try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
          except (OSError, ValueError) as e:
            raise ValueError(f"token store {path}: unreadable: {e}") from None
          spec = self.manifest["shards"][s]
          want = ((spec["tokens"],), np.int32) if array == "tokens" else (
              (spec["records"] + 1,), np.int64)
          if a.shape != want[0] or a.dtype != want[1]:
            raise ValueError(f"token store {path}: {a.dtype}{a.shape}, expected "
                             f"{np.dtype(want[1])}{want[0]}")
          if array == "offsets":
            a = self._spans(s, np.array(a))
          self._maps[(s, array)] = a
    return a

  def _spans(self, s, offsets):
    """(start, end) int64 [records, 2] of shard s, damaged records (-1, -1): one vectorised pass
    over the shard when it is first read, instead of a check per read (16 bytes a record)."""
    n_tok = self._tokens_per_shard[s]
    spans = np.stack([offsets[:-1], offsets[1:]], 1)
    bad = (spans[:, 1] < spans[:, 0]) | (spans[:, 0] < 0) | (spans[:, 1] > n_tok)
    tokens = self._array(s, "tokens")
    out_of_vocab = np.flatnonzero((tokens < 0) | (tokens >= self.vocab_size))
    if len(out_of_vocab) and not bad.any():  # sorted offsets: the record of each position
      bad[np.searchsorted(spans[:, 1], out_of_vocab, side="right")] = True
    elif len(out_of_vocab):  # damaged offsets too: check every record on its own
      for j in np.flatnonzero(~bad):
        ids = tokens[spans[j, 0]:spans[j, 1]]
        bad[j] = bool(len(ids)) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size)
    spans[bad] = -1
    return spans

  def __len__(self):
    return len(self._keys)

  def key(self, i):
    return self._keys[i]

  def find(self, key):
    with self._lock:
      if self._by_key is None:
        self._by_key = {}
        for i, k in enumerate(self._keys):
          self._by_key.setdefault(k, i)
    return self._by_key.get(key)

  def read(self, i):
    i = int(i)
    s = int(np.searchsorted(self._first, i, side="right")) - 1 if len(self._first) > 2 else 0
    j = i - int(self._first[s])
    # A damaged shard must not reach the model (the writer stored only ids of the vocabulary):
    # `_check_shard` marked its damaged records when the shard was first read.
    start, end = self._array(s, "offsets")[j].tolist()
    if start < 0:
      raise base.BadRecord("bad_token_ids", f"{self.root} record {i} ({self._keys[i]}): "
                           f"offsets outside its shard or ids outside [0, {self.vocab_size})")
    if end == start:
      raise base.BadRecord("empty_text", f"{self.root} record {i} ({self._keys[i]}): no tokens")
    return dict(key=self._keys[i], token_ids=self._array(s, "tokens")[start:end])


def check_tokenizer(src: TokenStoreSource, tokenizer, stream: str):
  """ValueError (one line) when the store was written with another tokenizer than the run's."""
  got = tokenizer_fingerprint(tokenizer)
  if got != src.tokenizer_fingerprint or int(tokenizer.vocab_size) != src.vocab_size:
    raise ValueError(
        f"source {src.name!r} (stream {stream}): token store {src.root} was written with "
        f"tokenizer {src.manifest['tokenizer'].get('spec') or '?'} (fingerprint "
        f"{src.tokenizer_fingerprint}, vocab {src.vocab_size}), not this run's (fingerprint "
        f"{got}, vocab {tokenizer.vocab_size}); rebuild it with unimo-jax prepare tokens")


# ---------------------------------------------------------------------------------------------
# Conversion (`unimo-jax prepare tokens`)
# ---------------------------------------------------------------------------------------------


def write_store(src: base.Source, tokenizer, out: str, *, tokenizer_spec: str = "",
                shard_records: int = 65536, chunk: int = 256, log=None) -> dict:
  """Tokenises every record of text source `src` into a store at `out`; returns the manifest.

  Records that raise `BadRecord` (non-UTF-8, empty) or give no tokens are skipped and counted
  in the manifest's ``skipped``, with the raw source's own index drops. The manifest is
  written last, so a store without one is incomplete."""
  if shard_records < 1:
    raise ValueError(f"--shard-records {shard_records}: must be >= 1")
  if os.path.exists(os.path.join(out, MANIFEST)):
    raise ValueError(f"{out}: a token store is already there ({MANIFEST}); remove it first")
  if "text" not in src.fields:
    raise ValueError(f"source {src.name!r} has no text field (fields {sorted(src.fields)})")
  os.makedirs(out, exist_ok=True)
  start_time = time.time()
  skipped = dict(src.index_drops)
  shards, keys = [], []
  cur_ids, cur_keys, total_tokens = [], [], 0

  def flush():
    nonlocal cur_ids, cur_keys
    name = f"shard-{len(shards):05d}"
    lens = np.asarray([len(a) for a in cur_ids], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = np.concatenate(cur_ids).astype(np.int32) if cur_ids else np.zeros(0, np.int32)
    np.save(os.path.join(out, f"{name}.tokens.npy"), tokens, allow_pickle=False)
    np.save(os.path.join(out, f"{name}.offsets.npy"), offsets, allow_pickle=False)
    shards.append(dict(name=name, records=len(cur_ids), tokens=int(offsets[-1])))
    keys.extend(cur_keys)
    cur_ids, cur_keys = [], []

  encode_batch = getattr(tokenizer, "encode_batch", None) or (
      lambda texts: [tokenizer.encode(t) for t in texts])
  vocab = int(tokenizer.vocab_size)
  for first in range(0, len(src), chunk):
    texts, names = [], []
    for i in range(first, min(len(src), first + chunk)):
      try:
        rec = src.read(i)
        if "text" not in rec:
          raise base.BadRecord("missing_field", "text")
      except base.BadRecord as e:
        skipped[e.reason] = skipped.get(e.reason, 0) + 1
        continue
      texts.append(rec["text"])
      names.append(str(rec.get("key", f"{src.name}:{i}")))
    for ids, key in zip(encode_batch(texts), names):
      ids = np.asarray(ids, np.int32)
      if ids.size == 0:
        skipped["empty_text"] = skipped.get("empty_text", 0) + 1
        continue
      if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"tokenizer gave ids outside [0, {vocab}) for record {key}")
      cur_ids.append(ids)
      cur_keys.append(key)
      total_tokens += len(ids)
      if len(cur_ids) == shard_records:
        flush()
        if log:
          log(f"{len(keys)} records in {time.time() - start_time:.1f}s")
  if cur_ids or not shards:
    flush()
  with open(os.path.join(out, KEYS), "w", encoding="utf-8") as f:
    for k in keys:
      f.write(json.dumps(k) + "\n")
  manifest = dict(format=FORMAT, version=VERSION,
                  tokenizer=dict(fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=vocab,
                                 spec=tokenizer_spec),
                  records=len(keys), tokens=total_tokens, skipped=skipped, shards=shards,
                  source=src.name, seconds=round(time.time() - start_time, 3))
  with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  return manifest
