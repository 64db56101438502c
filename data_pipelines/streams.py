"""One stream of one process: sources + mixture + row builder -> a tf.data dataset of batches.

The dataset is ``range(0, inf)`` of step numbers mapped by ONE `tf.numpy_function` per step that
builds this process's rows of that step in Python (a per-batch call: a per-row numpy_function
costs ~100 us of overhead, a per-batch one a few us per row), then, in ``patches`` mode, maps
each batch's images through `images.safe_decode_batch` (decoded and resized in parallel, a
failed one masks its row). Row j of step t of this process is global slot
``base + t * B + process_index * b + j`` (B global, b = B / process_count rows per process), so
the GLOBAL batch of a step is the same for any process count, and the processes read disjoint
records at every step.

Bad records: a row whose record raises `BadRecord` is rebuilt from replacement draws of the same
source (`Mixture.replacement`, up to ``data.max_attempts``); every failure is reported in the
row's internal ``_drops`` [num reasons] counts, so the iterator can count drops exactly for the
batches it has handed out (a resume neither loses nor double-counts them). A row whose attempts
all fail, or whose image fails to decode in TF, becomes a padding row (``row_valid`` False,
weights 0).
"""
import collections
import logging
import os
import threading

import numpy as np
from data_pipelines.lazy import tensorflow as tf  # loaded on first use (row workers never do)

from data_pipelines import images, pil_decode, rewriting, schema, shm_ring
from data_pipelines.examples import HALF_FIELDS, Padded, RowBuilder
from data_pipelines.half_float import copy_into
from data_pipelines.mixture import Mixture
from data_pipelines.sources import BadRecord, TokenStoreSource, load_neighbours, open_source
from data_pipelines.sources import token_store
from data_pipelines.worker_errors import PoolStopped

_PROBE_RECORDS = 16
_IMAGE_SLOTS = ("_image", "_image_ratio", "_image_present")
_DECODED = ("pixels", "related_pixels", "_decode_failed")  # filled by the "pillow" decode


def _heap(shape, dtype, zero):
  return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)


def source_name(spec, stream: str, k: int) -> str:
  return str(spec.get("name") or f"{stream}.{spec.get('kind', 'source')}{k}")


class Stream:
  """Python side of one stream in one process (see the module docstring)."""

  def __init__(self, stream: str, cfg, tokenizer, *, process_index: int, process_count: int,
               probe: bool = True, half_regions: bool = True):
    self.stream, self.cfg = stream, cfg
    self.stream_id = schema.STREAM_IDS[stream]
    self.seed = int(cfg["seed"])
    scfg = cfg["streams"][stream]
    self.global_batch = int(scfg["batch_size"])
    self.local_batch = schema.local_batch_size(cfg, stream, process_count)
    self.process_index = int(process_index)
    self.max_attempts = max(1, int(cfg.get("max_attempts", 8)))
    self.builder = RowBuilder(stream, cfg, tokenizer)
    self.patches = cfg["visual_input"] == "patches" and stream != "text"
    try:
      jpeg_decode = images.check_jpeg_decode(cfg.get("jpeg_decode", "auto"))
      # `make_pipeline` resolves data.workers (-1: from the host's cores) before building the
      # streams, and the workers get that config: all see the same count.
      workers = int(cfg.get("workers", 0))
    except ValueError as e:
      raise schema.SchemaError(str(e)) from None
    self.num_images = (1 + (self.builder.d["Ki"] if stream == "pair" else 0)) if self.patches else 0
    # "pillow", and "auto" when workers build the batches: the batch builder decodes the images
    # itself (`pil_decode`), no TF stage. "auto" decodes exactly as the TF stage would (TF ops
    # for what Pillow does not decode as TF does), so batches are the same for any worker count.
    self.python_decode = self.patches and (
        jpeg_decode == "pillow" or (jpeg_decode == "auto" and workers > 0))
    self._tf_exact = jpeg_decode == "auto"
    self._norm = (pil_decode.Normaliser(cfg.get("pixel_mean", (0.5, 0.5, 0.5)),
                                        cfg.get("pixel_std", (0.5, 0.5, 0.5)))
                  if self.python_decode else None)
    self.sources, self.names, self.neighbours, weights = [], [], [], []
    self.tfidf, self.lexicon = [], []  # per source: {example id: negatives}, rewrite flag
    names = set()
    for k, spec in enumerate(scfg["sources"]):
      name = source_name(spec, stream, k)
      if name in names:
        raise schema.SchemaError(f"two sources of stream {stream} are named {name!r}")
      names.add(name)
      src = open_source(spec, name=name)
      if isinstance(src, TokenStoreSource):
        try:
          token_store.check_tokenizer(src, tokenizer, stream)
        except ValueError as e:
          raise schema.SchemaError(str(e)) from None
      src.restrict(self.builder.wanted_fields())
      self.sources.append(src)
      self.names.append(name)
      self.neighbours.append(load_neighbours(spec["neighbours"]) if spec.get("neighbours")
                             else {})
      if self.neighbours[-1]:
        src.find("")  # builds the key index now rather than inside the first batch
      self.tfidf.append(rewriting.load_tfidf_side_file(os.path.expanduser(
          spec["tfidf_negatives"])) if spec.get("tfidf_negatives") else {})
      self.lexicon.append(bool(spec.get("lexicon_negatives", False)))
      weights.append(float(spec.get("weight", 1.0)))
    # Every source gives float16 region features (float16 region stores): the rows carry them
    # as float16 (half the bytes to write). In this process the batches do too, and the tf.data
    # stage (or `as_dict`) casts them to the schema's float32, exactly; worker processes
    # (`half_regions` False) write them as float32 straight into the shared batch
    # (`half_float`), so the training process has no cast to do.
    if cfg["visual_input"] == "regions" and stream != "text" and self.sources and all(
        src.region_dtype == np.float16 for src in self.sources):
      self.builder.region_dtype = np.dtype(np.float16)
    self.half_regions = bool(half_regions)
    self.mixture = Mixture(weights, [len(s) for s in self.sources], seed=self.seed,
                           stream_id=self.stream_id, period=int(cfg.get("mixture_period", 1000)))
    self._lock = threading.Lock()
    self._logged = set()
    self.on_row = None  # (slot, source, record) before each row: a worker's progress record
    self.out_spec = self._out_spec()
    for s in range(len(self.sources) if probe else 0):  # workers: probed by their parent
      self._probe(s)

  # -- spec of the numpy_function's output ---------------------------------------------------
  def _out_spec(self):
    """Ordered {name: (row shape, dtype)}: schema fields (pixels replaced by image slots) plus
    the internal ``_source``, ``_drops`` and ``_truncated``."""
    spec = {}
    for name, (shape, dtype) in schema.row_spec(self.stream, self.cfg).items():
      if self.patches and not self.python_decode and name in ("pixels", "related_pixels"):
        continue
      if name in HALF_FIELDS and self.half_regions:
        dtype = self.builder.region_dtype
      spec[name] = (shape, dtype)
    if self.python_decode:
      spec["_decode_failed"] = ((self.num_images,), np.dtype(np.int32))
    elif self.patches:
      spec["_image"] = ((self.num_images,), np.dtype(object))
      spec["_image_ratio"] = ((self.num_images,), np.dtype(np.int32))
      spec["_image_present"] = ((self.num_images,), np.dtype(bool))
    spec["_source"] = ((), np.dtype(np.int32))
    spec["_drops"] = ((len(schema.DROP_REASONS),), np.dtype(np.int32))
    spec["_truncated"] = ((), np.dtype(np.int32))  # texts of the row cut to fit
    return spec

  def _probe(self, s: int):
    """Build-time check: source s can feed this stream and its rows match the schema."""
    src, name = self.sources[s], self.names[s]
    for field in self.builder.required_fields(src.fields):
      if field not in src.fields:
        raise schema.SchemaError(
            f"source {name!r} (stream {self.stream}) cannot provide field {field!r} "
            f"(it provides {sorted(src.fields)})")
    reasons = collections.Counter()
    for i in range(min(len(src), _PROBE_RECORDS)):
      try:
        row = self._build(s, i, slot=-1 - i)
      except BadRecord as e:
        reasons[e.reason] += 1
        continue
      expected = {k: v for k, v in self.out_spec.items() if not k.startswith("_")
                  and k not in _DECODED}
      got = {k: v for k, v in row.items() if not k.startswith("_")}
      schema.check_row(got, expected, source=name, stream=self.stream)
      return
    raise schema.SchemaError(
        f"source {name!r} (stream {self.stream}): none of its first {min(len(src), 16)} "
        f"records gives a {self.stream} row (drop reasons {dict(reasons)})")

  # -- rows and batches ---------------------------------------------------------------------
  def _read(self, s: int, i: int):
    try:
      return self.sources[s].read(int(i))
    except BadRecord:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A reader failure other than the ones we classify (a new kind of broken file): count it
      # and say once what it was, rather than ending the run on one record.
      if s not in self._logged:
        self._logged.add(s)
        logging.warning("source %s: record %d unreadable: %r", self.names[s], i, e)
      raise BadRecord("unreadable_record", repr(e)) from None

  def _related(self, s: int, rec):
    nb = self.neighbours[s].get(rec.get("key"))
    if not nb:
      return [], []
    related = []
    for key in nb[0][:self.builder.d["Ki"]]:
      j = self.sources[s].find(key)
      try:
        related.append(None if j is None else self._read(s, j))
      except BadRecord:
        related.append(None)
    return related, nb[1]

  def _build(self, s: int, i: int, slot: int, defer: bool = False):
    rec = self._read(s, i)
    rng = np.random.default_rng([self.seed, self.stream_id, slot]) if slot >= 0 else (
        np.random.default_rng([self.seed, self.stream_id, 0]))
    if self.stream != "pair":
      return self.builder.build(rec, rng, defer=defer)
    related_images, related_texts = self._related(s, rec)
    key = rec.get("key", "")
    extra = self.tfidf[s].get(int(key), ()) if self.tfidf[s] and key.isdigit() else ()
    return self.builder.build(rec, rng, related_images, related_texts, extra_negatives=extra,
                              lexicon_negatives=self.lexicon[s])

  def row(self, slot: int, s: int, i: int, defer: bool = False):
    """The row of global `slot` (record i of source s, or its replacements) + drop counts.

    defer: a text row's masking is left to `builder.finish_text_rows` (`batch` masks its rows
    together)."""
    drops = np.zeros(len(schema.DROP_REASONS), np.int32)
    if self.on_row is not None:
      self.on_row(slot, s, i)
    for attempt in range(self.max_attempts):
      if attempt:
        with self._lock:
          i = self.mixture.replacement(slot, s, attempt)
      try:
        row = self._build(s, i, slot, defer)
        break
      except BadRecord as e:
        drops[schema.REASON_IDS[e.reason]] += 1
    else:
      row = self.builder.empty_row()
    row["_source"] = np.int32(s)
    row["_drops"] = drops
    return row

  def batch(self, base: int, step: int, alloc=None):
    """This process's rows of `step` (slots counted from `base`) as arrays in `out_spec` order.

    `alloc(shape, dtype, zero)`, if given, provides the non-object arrays (a worker's shared
    batch segment, `shm_ring.Arena`); the default is ``np.zeros`` / ``np.empty``."""
    own = alloc is None
    if own:
      alloc = _heap
    first = int(base) + int(step) * self.global_batch + self.process_index * self.local_batch
    slots = np.arange(first, first + self.local_batch, dtype=np.int64)
    with self._lock:
      srcs, recs = self.mixture.records(slots)
    rows = [self.row(int(g), int(s), int(i), defer=True) for g, s, i in zip(slots, srcs, recs)]
    # Text rows are masked together: their masked fields come as whole batch arrays.
    masked = self.builder.finish_text_rows(rows) if self.stream == "text" else {}
    out = {}
    for name, (shape, dtype) in self.out_spec.items():
      full = (self.local_batch,) + tuple(shape)
      if name in masked:
        v = np.asarray(masked[name], dtype).reshape(full)
        if own:  # this process's arrays: masking's own
          out[name] = v
        else:
          out[name] = alloc(full, dtype, False)
          out[name][...] = v
      elif name in _DECODED:
        out[name] = alloc(full, dtype, False)  # written by the decode below
      elif dtype == np.dtype(object):
        out[name] = np.asarray([list(r[name]) for r in rows], dtype=object).reshape(full)
      elif any(isinstance(r[name], Padded) for r in rows):
        # Written in place: the same values as stacking the padded rows, one copy fewer.
        a = alloc(full, dtype, True)
        for j, r in enumerate(rows):
          v = r[name]
          if isinstance(v, Padded):
            v.write(a[j])
          else:
            copy_into(a[j], np.asarray(v).reshape(shape))
        out[name] = a
      elif name in HALF_FIELDS:
        a = alloc(full, dtype, False)
        for j, r in enumerate(rows):
          copy_into(a[j], np.asarray(r[name]))  # float16 -> float32 (workers), exact
        out[name] = a
      else:
        # Row by row into one array: the same values as np.stack, without its per-row copies.
        a = alloc(full, dtype, False)
        for j, r in enumerate(rows):
          a[j] = r[name]
        out[name] = a
    if self.python_decode:
      ok = pil_decode.decode_batch(rows, out["pixels"], out.get("related_pixels"),
                                   out["_decode_failed"], self._norm, tf_exact=self._tf_exact)
      if "related_valid" in out:
        out["related_valid"] &= ok[:, 1:]
      pil_decode.mask_invalid(out, out["row_valid"] & (out["_decode_failed"][:, 0] == 0))
    return tuple(out.values())

  # -- numpy batches without tf.data --------------------------------------------------------
  @property
  def needs_tf(self) -> bool:
    """Whether this stream's batches need TF ops after the Python builder (TF image decoding;
    "pillow" decodes in the builder)."""
    return self.patches and not self.python_decode

  def batch_spec(self) -> dict:
    """{field: (batch shape, dtype)} of `as_dict`'s output (internal ``_*`` fields included)."""
    row_spec = schema.row_spec(self.stream, self.cfg)
    return {name: ((self.local_batch,) + tuple(shape),
                   row_spec[name][1] if name in row_spec else np.dtype(dtype))
            for name, (shape, dtype) in self.out_spec.items()}

  def batch_bytes(self) -> int:
    """Bytes of one batch's non-object arrays as the workers write them (float32 regions):
    the size of its shared segment (`shm_ring`), before any batch was built."""
    return sum(shm_ring.aligned(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
               for shape, dtype in self.batch_spec().values() if np.dtype(dtype) != object)

  def as_dict(self, arrays) -> dict:
    """`batch`'s arrays -> {field: array} with the schema's dtypes (what tf.data's stage gives
    for a stream without images): float16 region fields become float32, exactly."""
    out = dict(zip(self.out_spec, arrays))
    for name in HALF_FIELDS:
      if name in out and out[name].dtype != np.float32:
        # TF's cast is vectorised; numpy's float16 -> float32 is ~4x slower here.
        out[name] = tf.cast(out[name], tf.float32).numpy()
    return out

  # -- tf.data ------------------------------------------------------------------------------
  def dataset(self, base: int, parallel_batches: int = 2, fetch=None) -> "tf.data.Dataset":
    """Batches of this stream from slot `base` on: dict {field: [b, ...]} (internal `_*` kept).

    `fetch(stream, base, step)`, if given, returns `batch(base, step)` built elsewhere (the
    worker processes of `data_pipelines.workers`): they build ahead in parallel, so steps are
    asked for one at a time, in order."""
    names = list(self.out_spec)
    touts = [tf.string if d == np.dtype(object) else tf.as_dtype(d)
             for _, d in self.out_spec.values()]
    row_spec = schema.row_spec(self.stream, self.cfg)

    def rows_of_step(step):
      if fetch is not None:
        try:
          return fetch(self.stream, base, int(step))
        except PoolStopped:
          pass  # a prefetch of an iterator being released: same batch, built here, unused
      return self.batch(base, int(step))

    def py_batch(step):
      return tf.numpy_function(rows_of_step, [step], touts, stateful=False,
                               name=f"{self.stream}_rows")

    def to_dict(*arrays):
      out = {}
      for name, a in zip(names, arrays):
        shape = (self.local_batch,) + tuple(self.out_spec[name][0])
        out[name] = tf.ensure_shape(a, shape)
        if name in row_spec and row_spec[name][1] != self.out_spec[name][1]:
          out[name] = tf.cast(out[name], row_spec[name][1])  # float16 -> float32, exact
      return out

    ds = tf.data.Dataset.range(0, np.iinfo(np.int64).max)
    ds = ds.map(py_batch, num_parallel_calls=1 if fetch is not None else max(
        1, int(parallel_batches)), deterministic=True)
    ds = ds.map(to_dict)
    if self.needs_tf:
      # A batch's images decode together (`images.safe_decode_batch`: one nested dataset, the
      # images side by side in its parallel map); batches overlap in this parallel map.
      ds = ds.map(self._decode_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds

  def _decode_batch(self, batch):
    """TF: a batch's image slots [b, 1 + Ki] -> pixels [b, S, S, 3] (+ related_pixels
    [b, Ki, S, S, 3]) and ``_decode_failed`` [b, 1 + Ki]; a failed main image masks the row."""
    cfg, size, b = self.cfg, self.builder.d["S"], self.local_batch
    k = self.num_images

    def flat(x):  # the rows' own images first, then every related image, row by row
      return tf.concat([x[:, 0], tf.reshape(x[:, 1:], [-1])], 0)

    present = batch["_image_present"]
    pix, ok = images.safe_decode_batch(
        flat(batch["_image"]), flat(batch["_image_ratio"]), flat(present), image_size=size,
        mean=cfg.get("pixel_mean", (0.5, 0.5, 0.5)), std=cfg.get("pixel_std", (0.5, 0.5, 0.5)),
        jpeg_decode=cfg.get("jpeg_decode", "auto"))
    ok = tf.concat([ok[:b, None], tf.reshape(ok[b:], [b, k - 1])], 1)
    out = {n: v for n, v in batch.items() if n not in _IMAGE_SLOTS}
    out["pixels"] = pix[:b]
    failed = present & ~ok
    out["_decode_failed"] = tf.cast(failed, tf.int32)
    if self.stream == "pair":
      out["related_pixels"] = tf.reshape(pix[b:], [b, k - 1, size, size, 3])
      out["related_valid"] = out["related_valid"] & ok[:, 1:]
    return mask_invalid(out, out["row_valid"] & ~failed[:, 0])


def mask_invalid(row, valid):
  """Sets row_valid and zeroes every weight / validity flag of invalid rows (TF): `row` one
  row and `valid` a scalar, or a batch and `valid` [b]."""
  out = dict(row)
  out["row_valid"] = valid
  for k, v in row.items():
    shaped = valid[(...,) + (None,) * (v.shape.rank - valid.shape.rank)]
    if k.endswith("_weights"):
      out[k] = v * tf.cast(shaped, v.dtype)
    elif (k.endswith("_valid") or k == "visual_mask") and k != "row_valid":
      out[k] = v & shaped
  return out
