"""The input pipeline the trainer calls: `make_pipeline(data_config, process_index=, process_count=)`.

It returns a `DataIterator` whose `next()` is a dict of numpy arrays matching `schema.batch_spec`
(``{"text/mlm_ids": [b, L], ..., "pair/pixels": [b, S, S, 3], ...}`` with b = batch_size /
process_count rows of THIS process), whose `get_state()` / `set_state()` (or `save(path)` /
`restore(path)`) resume it exactly, whose `dropped_counts()` says which records were dropped and
`truncated_counts()` how many texts were cut to fit.

Design (see shared/ENVIRONMENT.md, "Exact resume of a tf.data mixture": the index-based of the two
measured designs). The position is one integer per stream: the next global slot. Slot g's source
and record are pure functions of (seed, stream, g) (`mixture.Mixture`), records are read by index
(`sources`), and its masking is seeded by ``np.random.default_rng([seed, stream_id, g])``. Hence
- restore is O(1): a restored pipeline starts at its slot, nothing is replayed (time and state
  size do not depend on the position; the state is a few dozen bytes of JSON);
- the GLOBAL batch is the same for 1, 2 or N processes, so a run may resume on another topology;
- each process reads only its rows (disjoint records at every step).
The iterator-checkpoint design (`tf.train.Checkpoint` of the iterator) was not chosen: its state
is megabytes of buffers per process, it silently reads wrong shards when the process count
changes, and it cannot save the Python readers (tar, TSV, npz, tokenisers) that feed it.
`tf.data.Dataset.sample_from_datasets` is not used for the same reason: its selector is a
stateful random stream (resuming it means replaying every earlier choice, and each component's
offset depends on all of them); `Mixture` gives the same weighted mixture with exact per-period
proportions, computable for any slot directly. A stream's rows are mixed before they are
batched (no per-source pipelines or buffers), and one prefetch follows the join of the streams.
Row building scales with the host's cores through `data.workers` processes (`workers`), each
building whole batches; since a batch is a pure function of (seed, stream, step), the batches,
drop counts and states are the same for any worker count (0 builds them in this process).
With workers, a stream without images to decode in TF (text, region features, images with
``jpeg_decode`` "auto" (the default) or "pillow", which the workers decode) takes its numpy
batches straight from the pool, without tf.data (whose per-batch overhead in this process was
the limit of worker scaling, benchmarks/README.md): views of the shared segments the workers
built them in, no copy and no per-row work here; streams with images for TF to decode keep the tf.data stage.

Config (``data`` section; `default_config()` has every field with its default):
  seed                 int, data seed (mixture, record order, masking)
  tokenizer            spec for `data_pipelines.tokenizers.load_tokenizer` ("sentencepiece:/x.model"
                       or "bpe:/dir"); `make_pipeline(tokenizer=...)` may pass an object instead
  visual_input         "patches" (pixels) | "regions" (detector features)
  image_size, patch_size   S and the patch side (N = (S / patch)^2 visual tokens with patches)
  pixel_mean, pixel_std    per-channel normalisation of pixels in [0, 1] (default 0.5: [-1, 1])
  max_image_pixels     images whose header says more pixels are dropped (image_too_large)
  jpeg_decode          "auto" (default): "accurate"'s pixels for every input, decoded where the
                       batch is built: by the workers when data.workers > 0 (Pillow for JPEG and
                       8-bit PNG, which it decodes as TF does bit for bit; TF ops in the worker
                       for anything else or anything Pillow refuses), else by TF ops in this
                       process's tf.data stage; batches identical either way
                       | "accurate" (libjpeg's accurate integer IDCT, fancy chroma upsampling) |
                       "fast" (fast integer IDCT, no fancy upsampling: other pixels, less decode
                       time; benchmarks/README.md): both TF ops in this process's tf.data stage
                       | "pillow" (Pillow + numpy in the batch builder, so in the workers when
                       data.workers > 0: no per-image work in this process; the same pixels as
                       "accurate", bit for bit, resized and CMYK images included
                       (`tf_resize`, `pil_decode`); not on WebP with alpha, 1-bit and palette
                       BMPs, which TF refuses or reads otherwise).
                       The demo's synthetic_scenes images are raw pixels: no JPEG decode.
  num_regions, region_feature_dim, num_region_classes   R, F, C of the regions input
  region_mask_rate, region_overlap_threshold            MRP masking (0.15, IoU 0.3)
  num_positives, num_negatives, num_related_images, num_related_texts   Kp, Kn, Ki, Kt
  mixture_period       slots per period of the stratified mixture (see `mixture`)
  max_attempts         reads per slot before a bad record's slot becomes a padding row
  parallel_batches     Python batch builders running at once per stream (in-process threads)
  workers              row-building worker processes (`data_pipelines.workers`): -1 (default)
                       derives it from the host's cores (cores - 2 with >= 4 cores, else 0),
                       0 builds rows in this process; batches are identical for any value.
                       Workers build each batch in place in a shared-memory segment
                       (/dev/shm) handed to the trainer without a copy; memory: per worker
                       ~60 MB + the sources' indexes, and for the host per stream
                       (worker_ahead + 1 + batches the trainer still holds) segments of one
                       batch each (paper shapes, 16 rows: 512-token texts 0.18 MB, 224 px
                       images 9.6 MB, pairs with 224 px pixels and Ki 1 19 MB, 100-region
                       images 23 MB, 100-region pairs with Ki 1 37 MB)
  worker_ahead         batches per stream in flight in the workers (0: workers + 1)
  prefetch             batches prefetched after joining the streams
  streams.<text|image|pair>:
    batch_size         GLOBAL rows per step (0 or no sources: the stream is left out)
    max_length, max_predictions        L, P of the masked LM (text, pair)
    s2s_max_length, s2s_max_predictions   L2 (text infilling), P2 (text and pair captioning)
    objectives         subset of ("mlm", "s2s"); mask_rate (0.15), infilling_rate (0.25)
    sources            list of source specs: {name, kind, weight, path | tfds_name + split, ...}
                       (kinds and keys: `data_pipelines.sources`)
"""
import atexit
import hashlib
import json
import os
import time
import weakref

import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import schema
from data_pipelines import workers as workers_lib
from data_pipelines.streams import Stream

STATE_VERSION = 1
_LIVE = weakref.WeakSet()


def default_config() -> ml_collections.ConfigDict:
  """Every data field with its default; streams have no sources (so all are off)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = ""
  c.visual_input = "patches"
  c.image_size = 64
  c.patch_size = 8
  c.pixel_mean = (0.5, 0.5, 0.5)
  c.pixel_std = (0.5, 0.5, 0.5)
  c.max_image_pixels = 1 << 26
  c.jpeg_decode = "auto"
  c.num_regions = 36
  c.region_feature_dim = 2048
  c.num_region_classes = 1601
  c.region_mask_rate = 0.15
  c.region_overlap_threshold = 0.3
  c.num_positives = 2
  c.num_negatives = 2
  c.num_related_images = 1
  c.num_related_texts = 1
  c.mixture_period = 1000
  c.max_attempts = 8
  c.parallel_batches = 2
  c.workers = -1
  c.worker_ahead = 0
  c.prefetch = 2
  c.streams = ml_collections.ConfigDict()
  c.streams.text = dict(batch_size=0, max_length=128, max_predictions=20, s2s_max_length=128,
                        s2s_max_predictions=48, objectives=("mlm", "s2s"), mask_rate=0.15,
                        infilling_rate=0.25, sources=[])
  c.streams.image = dict(batch_size=0, sources=[])
  c.streams.pair = dict(batch_size=0, max_length=40, max_predictions=8,
                        s2s_max_predictions=40, objectives=("mlm", "s2s"), mask_rate=0.15,
                        sources=[])
  return c


def default_synthetic_config(data_dir: str = "~/.cache/unimo_jax/tfds", size: str = "demo",
                             tokenizer: str | None = None) -> ml_collections.ConfigDict:
  """All three streams on synthetic_scenes (pairs / text / images), built locally on first use.

  `size` picks the SCENES size preset (tiny, demo, ...): the TFDS config names are ``pairs``,
  ``text``, ``images`` for demo and ``<kind>_<size>`` otherwise. Region sizes follow the
  synthetic defaults (F 64, 48 shape-colour classes, at most 3 objects). The tokenizer and the
  pairs' TF-IDF negatives default to what ``unimo-jax prepare synthetic_scenes --data-dir
  DATA_DIR`` writes (a missing side file just means no TF-IDF negatives).
  """
  from data_pipelines import rewriting  # pylint: disable=import-outside-toplevel
  from data_pipelines.synthetic_scenes import generate  # pylint: disable=import-outside-toplevel
  c = default_config()
  names = {k: generate.SceneOptions(kind=k, size=size).name for k in generate.KINDS}
  if tokenizer is None:
    spm = "spm" if names["pairs"] == "pairs" else f"spm_{names['pairs']}"
    tokenizer = f"sentencepiece:{os.path.join(data_dir, 'tokenizer', spm)}.model"
  c.tokenizer = tokenizer
  c.image_size = generate.SceneOptions().image_size
  c.region_feature_dim = generate.SceneOptions().feature_dim
  c.num_region_classes = 48
  c.num_regions = 4
  c.num_negatives = 4
  c.num_related_images = c.num_related_texts = 0  # no neighbours file for synthetic scenes

  def src(kind):
    return dict(name=f"synthetic_{kind}", kind="tfds", tfds_name=f"synthetic_scenes/{names[kind]}",
                split="train", data_dir=data_dir, prepare=True, weight=1.0)

  c.streams.text.batch_size = 32
  c.streams.text.sources = [src("text")]
  c.streams.image.batch_size = 32
  c.streams.image.sources = [src("images")]
  c.streams.pair.batch_size = 32
  c.streams.pair.sources = [dict(src("pairs"), tfidf_negatives=rewriting.tfidf_side_path(
      data_dir, f"synthetic_scenes/{names['pairs']}", "train"))]
  return c


def _plain(x):
  """ConfigDict / FrozenConfigDict / tuples of them -> plain dicts and lists."""
  if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def resolve_config(data_config) -> dict:
  """`data_config` over `default_config()` as plain dicts (streams merged field by field)."""
  out = _plain(default_config())
  user = _plain(data_config)
  for k, v in user.items():
    if k == "streams":
      for s, sv in v.items():
        if s not in schema.STREAMS:
          raise schema.SchemaError(f"unknown stream {s!r}; streams are {schema.STREAMS}")
        out["streams"][s].update(sv)
    else:
      out[k] = v
  return out


def _fingerprint(cfg) -> str:
  """Hash of what decides the batches (not parallelism or prefetch)."""
  keep = {k: v for k, v in cfg.items()
          if k not in ("parallel_batches", "prefetch", "workers", "worker_ahead")}
  if keep.get("jpeg_decode") in ("accurate", "auto"):
    # The same batches ("auto" is "accurate"'s pixels wherever it decodes), and the default of
    # a later field: old states resume.
    del keep["jpeg_decode"]
  return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DataIterator:
  """Numpy batches of the three streams, resumable exactly (see the module docstring)."""

  def __init__(self, cfg: dict, streams: dict, *, process_index: int, process_count: int,
               tokenizer=None):
    self.cfg, self.streams = cfg, streams
    self._tokenizer = tokenizer
    self.workers = workers_lib.resolve_workers(cfg.get("workers", 0))
    self._pool = None
    self.process_index, self.process_count = process_index, process_count
    self.spec = schema.batch_spec(cfg, process_count)
    self._fingerprint = _fingerprint(cfg)
    self._dropped = {n: {} for st in streams.values() for n in st.names}
    # texts cut to fit, per "<stream>/<source>" (this process's rows)
    self._truncated = {f"{s}/{n}": 0 for s, st in streams.items() for n in st.names}
    self._slots = {s: 0 for s in streams}  # next global slot of each stream
    self._step = 0
    self._it = None
    self._running, self._failed = False, None
    self._direct = {}
    self._start()
    _LIVE.add(self)

  # -- tf.data --------------------------------------------------------------------------------
  def _start(self):
    self._release()
    fetch = None
    if self.workers:
      if self._pool is None:
        self._pool = workers_lib.WorkerPool(
            self.cfg, self._tokenizer, process_index=self.process_index,
            process_count=self.process_count, workers=self.workers,
            source_names={s: st.names for s, st in self.streams.items()},
            ahead=int(self.cfg.get("worker_ahead", 0)),
            batch_bytes={s: st.batch_bytes() for s, st in self.streams.items()})
      else:
        self._pool.reset()
      fetch = self._pool.fetch
    # With workers, a stream that needs no TF op (no image to decode) skips tf.data: its
    # batches come from the pool as numpy arrays (the pool builds ahead, so tf.data would add
    # only its per-batch overhead, ~1 ms of this process's CPU per batch and stream).
    self._direct = {s: st for s, st in self.streams.items() if fetch is not None
                    and not st.needs_tf}
    self._bases = dict(self._slots)
    self._run_step = 0
    parts = {s: st.dataset(self._slots[s], int(self.cfg.get("parallel_batches", 2)), fetch)
             for s, st in self.streams.items() if s not in self._direct}
    got = {}
    if parts:
      ds = tf.data.Dataset.zip(parts)

      def flatten(d):
        return {f"{s}/{k}": v for s, row in d.items() for k, v in row.items()}

      ds = ds.map(flatten)
      ds = ds.prefetch(int(self.cfg.get("prefetch", 2)))
      options = tf.data.Options()
      options.deterministic = True
      ds = ds.with_options(options)
      got = {k: (tuple(v.shape), v.dtype.as_numpy_dtype) for k, v in ds.element_spec.items()}
    for s, st in self._direct.items():
      got.update({f"{s}/{k}": v for k, v in st.batch_spec().items()})
    got = {k: v for k, v in got.items() if not k.split("/", 1)[1].startswith("_")}
    for k, (shape, dtype) in self.spec.items():
      if k not in got or got[k][0] != tuple(shape) or np.dtype(got[k][1]) != dtype:
        raise schema.SchemaError(f"pipeline field {k!r}: expected {dtype.name}{list(shape)}, "
                                 f"got {got.get(k)}")
    if set(got) != set(self.spec):
      raise schema.SchemaError(f"pipeline fields not in schema: {sorted(set(got) - set(self.spec))}")
    self._it = iter(ds) if parts else None
    self._running, self._failed = True, None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._failed is not None:
      raise self._failed
    if not self._running:
      raise StopIteration
    raw = {}
    try:
      if len(self._direct) < len(self.streams):
        raw.update((k, v.numpy()) for k, v in next(self._it).items())
      for s, st in self._direct.items():
        arrays = self._pool.fetch(s, self._bases[s], self._run_step)
        raw.update((f"{s}/{k}", v) for k, v in st.as_dict(arrays).items())
    except Exception as e:  # pylint: disable=broad-except
      # The streams may now stand at different steps: the same error until `set_state`.
      self._failed = e
      raise
    batch = {k: v for k, v in raw.items() if "/_" not in k}  # "<stream>/_<field>": internal
    for s, st in self.streams.items():
      sources, truncated = raw[f"{s}/_source"], raw[f"{s}/_truncated"]
      self._count(st, sources, raw[f"{s}/_drops"], raw.get(f"{s}/_decode_failed"))
      if truncated.any():  # (most batches have no cut text: no bincount)
        cut = np.bincount(sources, weights=truncated, minlength=len(st.names))
        for name, n in zip(st.names, cut):
          self._truncated[f"{s}/{name}"] += int(n)
      self._slots[s] += st.global_batch
    self._step += 1
    self._run_step += 1
    return batch

  next = __next__

  def _count(self, st, sources, drops, decode_failed):
    # Summed per source in a few numpy calls (a loop over rows cost ~3 us a row); a batch with
    # nothing dropped (most of them) costs one `any` per array.
    failed = decode_failed is not None and decode_failed.any()
    if not (failed or drops.any()):
      return
    sources = np.asarray(sources)
    for s in np.unique(sources):
      mine = sources == s
      per_reason = drops[mine].sum(axis=0)
      counts = self._dropped[st.names[int(s)]]
      for r in np.flatnonzero(per_reason):
        reason = schema.DROP_REASONS[r]
        counts[reason] = counts.get(reason, 0) + int(per_reason[r])
      if failed:
        n = int(decode_failed[mine].sum())
        if n:
          counts["undecodable_image"] = counts.get("undecodable_image", 0) + n

  # -- state ----------------------------------------------------------------------------------
  @property
  def step(self) -> int:
    """Batches handed out since slot 0 of the current run (restored with the state)."""
    return self._step

  def get_state(self) -> dict:
    """JSON-able position: next global slot per stream, step, this process's drop and
    truncation counts."""
    return dict(version=STATE_VERSION, fingerprint=self._fingerprint, step=self._step,
                slots=dict(self._slots),
                dropped={n: dict(c) for n, c in self._dropped.items()},
                truncated=dict(self._truncated))

  def set_state(self, state: dict):
    """Continues from `state` (same config: the batches an uninterrupted run would give)."""
    if int(state.get("version", -1)) != STATE_VERSION:
      raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
    if state.get("fingerprint") != self._fingerprint:
      # Allowed on purpose (e.g. a new global batch size after a topology change): the slots
      # still say where each stream was, so no record is repeated or skipped.
      tf.get_logger().warning("data config changed since this state was saved; batches "
                              "continue from the saved slots but differ from the old run's")
    slots = state["slots"]
    missing = [s for s in self.streams if s not in slots]
    if missing:
      raise ValueError(f"data state has no position for stream(s) {missing}")
    self._slots = {s: int(slots[s]) for s in self.streams}
    self._step = int(state.get("step", 0))
    self._dropped = {n: {} for n in self._dropped}
    for n, c in state.get("dropped", {}).items():
      self._dropped.setdefault(n, {}).update({r: int(v) for r, v in c.items()})
    saved = state.get("truncated", {})
    self._truncated = {k: int(saved.get(k, 0)) for k in self._truncated}
    self._start()

  def save(self, path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.get_state(), f)
    os.replace(tmp, path)

  def restore(self, path: str):
    with open(path) as f:
      self.set_state(json.load(f))

  def dropped_counts(self) -> dict:
    """{source: {reason: count}}: records dropped while indexing (whole source, this process)
    plus those met in the batches handed out so far (this process's rows)."""
    out = {}
    for st in self.streams.values():
      for s, name in enumerate(st.names):
        c = dict(st.sources[s].index_drops)
        for r, v in self._dropped.get(name, {}).items():
          c[r] = c.get(r, 0) + v
        out[name] = c
    return out

  def truncated_counts(self) -> dict:
    """{"<stream>/<source>": texts cut to fit the stream's lengths} in the batches handed out
    (this process's rows)."""
    return dict(self._truncated)

  def _release(self):
    it, self._it = self._it, None
    self._running = False
    del it

  @property
  def worker_pids(self) -> list:
    """Process ids of the row-building workers (empty in-process)."""
    return self._pool.pids if self._pool is not None else []

  def close(self):
    """Releases the tf.data iterator and stops the workers (do this before exit: see
    ENVIRONMENT.md's hang trap; exit and SIGTERM stop the workers anyway)."""
    pool, self._pool = self._pool, None
    if pool is not None:
      pool.close()  # first: a batch request waiting on a worker returns at once
    self._release()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


@atexit.register
def _close_all():
  # Iterators over numpy_function datasets can hang interpreter exit if still alive.
  for it in list(_LIVE):
    it.close()


def make_pipeline(data_config, *, process_index: int = 0, process_count: int = 1,
                  tokenizer=None) -> DataIterator:
  """The trainer's one entry: the ``data`` config section -> `DataIterator` at slot 0.

  `tokenizer` overrides ``data.tokenizer`` (an object with the tokenizer interface). Raises
  `schema.SchemaError` naming the source and the field when a source cannot feed its stream.
  """
  cfg = resolve_config(data_config)
  # Resolved once here: the streams (jpeg_decode "auto") and the workers see the same count.
  cfg["workers"] = workers_lib.resolve_workers(cfg.get("workers", 0))
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  enabled = schema.enabled_streams(cfg)
  if not enabled:
    raise schema.SchemaError("no stream has a batch size and sources")
  if tokenizer is None and any(s in enabled for s in ("text", "pair")):
    if not cfg.get("tokenizer"):
      raise ValueError("data.tokenizer is empty (a spec like 'sentencepiece:/path.model')")
    from data_pipelines import tokenizers  # pylint: disable=import-outside-toplevel
    spec = cfg["tokenizer"]  # load_tokenizer expands ~
    try:
      tokenizer = tokenizers.load_tokenizer(spec)
    except (OSError, ValueError, RuntimeError) as e:
      raise ValueError(f"data.tokenizer {cfg['tokenizer']!r} cannot be loaded ({e}); for "
                       "synthetic_scenes run `unimo-jax prepare synthetic_scenes`") from e
  t0 = time.time()
  streams = {s: Stream(s, cfg, tokenizer, process_index=process_index,
                       process_count=process_count) for s in enabled}
  it = DataIterator(cfg, streams, process_index=process_index, process_count=process_count,
                    tokenizer=tokenizer)
  tf.get_logger().info("data pipeline built in %.1fs", time.time() - t0)
  return it
