"""Related images X_I and related texts X_T of every training pair: the neighbours side file.

    unimo-jax prepare neighbours --config C [--workdir W --step S] --out F

For every record of the pair source's training split, the k best related images from an image
stream source (the unpaired collection) and the k best related texts from the text stream's
sources, scored by one of three scorers and ranked by the sharded top-k builder
(`unimo_jax.neighbours.top_k`: the collection in blocks, never the full N x M matrix). One JSON
line per pair, the format `sources.base.load_neighbours` reads, plus the scores:

  {"key": K, "images": [K1, ...], "image_scores": [s1, ...], "texts": ["...", ...],
   "text_scores": [...]}

Image keys name records of the image source; the training config joins that source to the pair
source (``related_images`` of the pair source spec, `sources.related.RelatedImages`), so the
pipeline finds them. Config section ``neighbours`` (every key optional):

  images        "objects" (default): cosine of the region-class histograms, i.e. images sharing
                detected objects (the paper's overlapping objects); "embedding": cosine of the
                checkpoint's projected h[IMG] (visual similarity); "": no X_I
  texts         "tfidf" (default): TF-IDF cosine of the pair's captions and each text (the hard
                negatives' `rewriting.tfidf_vectors`); "embedding": the checkpoint's projected
                h[CLS] of the first caption and of each text; "": no X_T
  k_images, k_texts   neighbours written per pair (default 4)
  pair_source, image_source   source names (default: the first of their stream)
  block_size, query_block     collection rows per block / queries per pass of the builder
  batch_size    rows per embedding batch (sharded over the devices)
  max_features  TF-IDF vocabulary cap (the most frequent words)
  limit         read at most this many records per source (0: all; for quick checks)

Objects and TF-IDF neighbours need a score above 0 (a zero shares no object or word), so a pair
may get fewer than k. Exclusions: an image whose bytes (or region features) equal the pair's own
image, and a text equal to one of the pair's captions, are never neighbours; of several identical
collection items only the first can be picked. When every source is synthetic_scenes, relatedness
has a ground truth (`synthetic_scenes.related`: shared objects) and precision@k of each side is
reported.

Periodic refresh: `train_with_refresh(config, workdir, N)` trains N steps at a time and rebuilds
the file in place with the newest checkpoint's towers between rounds.
"""
import hashlib
import json
import os
import time

import numpy as np

from data_pipelines import examples, pipeline, rewriting
from data_pipelines.sources import BadRecord, open_source
from data_pipelines.streams import source_name

DEFAULTS = dict(images="objects", texts="tfidf", k_images=4, k_texts=4, pair_source="",
                image_source="", block_size=4096, query_block=1024, batch_size=64,
                max_features=4096, limit=0)
IMAGE_SCORERS = ("objects", "embedding", "")
TEXT_SCORERS = ("tfidf", "embedding", "")
_SPEC_ONLY = ("neighbours", "related_images", "tfidf_negatives", "lexicon_negatives")


def settings(config) -> dict:
  """The ``neighbours`` section over `DEFAULTS`; a bad key or value is a one-line ValueError."""
  section = config.get("neighbours", None) if hasattr(config, "get") else None
  section = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
  for key in section:
    if key not in DEFAULTS:
      raise ValueError(f"unknown config key 'neighbours.{key}' (keys: {sorted(DEFAULTS)})")
  out = {**DEFAULTS, **section}
  if out["images"] not in IMAGE_SCORERS:
    raise ValueError(f"neighbours.images must be one of {IMAGE_SCORERS}, got {out['images']!r}")
  if out["texts"] not in TEXT_SCORERS:
    raise ValueError(f"neighbours.texts must be one of {TEXT_SCORERS}, got {out['texts']!r}")
  for key in ("k_images", "k_texts", "block_size", "query_block", "batch_size", "max_features"):
    if int(out[key]) < 1:
      raise ValueError(f"neighbours.{key} must be >= 1, got {out[key]}")
  return out


def _pick(specs, name, stream):
  specs = [dict(s) for s in specs]
  if not specs:
    raise ValueError(f"the data config has no {stream} source (data.streams.{stream}.sources)")
  if not name:
    return specs[0], source_name(specs[0], stream, 0)
  for k, s in enumerate(specs):
    if source_name(s, stream, k) == name:
      return s, name
  raise ValueError(f"neighbours: no {stream} source named {name!r}")


def _records(spec, name, fields, limit=0):
  """Every readable record of a source (the neighbour keys and features); bad ones skipped."""
  spec = {k: v for k, v in spec.items() if k not in _SPEC_ONLY}
  src = open_source(spec, name=name)
  src.restrict(fields)
  n = len(src) if not limit else min(int(limit), len(src))
  out = []
  try:
    for i in range(n):
      try:
        out.append(src.read(i))
      except BadRecord:
        continue
  finally:
    src.close()
  return out


def _digest(*parts) -> str:
  h = hashlib.sha1()
  for p in parts:
    h.update(p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes())
  return h.hexdigest()


def _image_digest(rec) -> str:
  if rec.get("image") is not None:
    return _digest(bytes(rec["image"]))
  return _digest(np.asarray(rec["regions"]["features"], np.float32))


def _norm_text(t: str) -> str:
  return " ".join(str(t).lower().split())


def _dedupe(digests):
  """valid [M] (first of equal digests) and {digest: first index}."""
  first, valid = {}, np.zeros(len(digests), bool)
  for j, d in enumerate(digests):
    if d not in first:
      first[d] = j
      valid[j] = True
  return valid, first


def _exclusions(query_digests, first):
  """[N, E] collection rows equal to each query's items (-1 pads)."""
  rows = [[first[d] for d in ds if d in first] for ds in query_digests]
  width = max([len(r) for r in rows] + [0])
  out = np.full((len(rows), width), -1, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def _unit(x):
  x = np.asarray(x, np.float32)
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(n == 0, 1, n)


# -- scorers: (queries [N, d], collection [M, d] or (callable, M)) ------------------------------

def object_vectors(recs, num_classes: int) -> np.ndarray:
  """L2-normalised region-class histograms [n, C] (classes, else argmax of class_probs)."""
  out = np.zeros((len(recs), num_classes), np.float32)
  for i, rec in enumerate(recs):
    regions = rec.get("regions") or {}
    classes = regions.get("classes")
    if classes is None and regions.get("class_probs") is not None:
      classes = np.argmax(np.asarray(regions["class_probs"]), axis=-1)
    if classes is None:
      raise ValueError(f"record {rec.get('key')!r} has no region classes: the 'objects' scorer "
                       "needs regions with classes or class_probs")
    classes = np.asarray(classes, np.int64).reshape(-1)
    classes = classes[(classes >= 0) & (classes < num_classes)]
    np.add.at(out[i], classes, 1.0)
  return _unit(out)


def tfidf_matrices(query_texts, collection_texts, max_features: int):
  """TF-IDF rows (vocabulary and idf over both sides, capped to the most frequent words)."""
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  mat, _ = rewriting.tfidf_vectors(list(query_texts) + list(collection_texts))
  if mat.shape[1] > max_features:
    df = np.bincount(mat.indices, minlength=mat.shape[1])
    keep = np.sort(np.argsort(-df, kind="stable")[:max_features])
    mat = mat[:, keep]
    norms = np.sqrt(np.asarray(mat.multiply(mat).sum(axis=1))).ravel()
    mat = sparse.csr_matrix(sparse.diags(1.0 / np.where(norms == 0, 1, norms)) @ mat)
  n = len(query_texts)
  return mat[:n], mat[n:]


_DECODE_CHUNK = 4096  # images decoded per embedding pass


class Embedder:
  """A checkpoint's CMCL towers: projected h[IMG] of images, projected h[CLS] of texts."""

  def __init__(self, workdir: str, step, data_cfg: dict, tokenizer):
    import jax  # pylint: disable=import-outside-toplevel
    from unimo_jax.evaluation import main as eval_main  # pylint: disable=import-outside-toplevel
    from unimo_jax.model import Unimo  # pylint: disable=import-outside-toplevel
    config, model_cfg = eval_main.load_run(workdir, step)
    self.mesh = eval_main.eval_mesh(config)
    self.params, self.step = eval_main.restore_model_params(workdir, step, config, model_cfg,
                                                            self.mesh)
    model = Unimo(model_cfg)
    apply = lambda p, *a, method: model.apply({"params": p}, *a, method=method)

    def image(p, batch):
      img = apply(p, batch, method=Unimo.encode_image)["img"]
      return apply(p, img, method=Unimo.cmcl_image)

    def text(p, batch):
      cls = apply(p, batch["ids"], method=Unimo.encode_text)["cls"]
      return apply(p, cls, method=Unimo.cmcl_text)

    self._image, self._text = jax.jit(image), jax.jit(text)
    self.cfg, self.tok = data_cfg, tokenizer
    self.rows = examples.RowBuilder("image", data_cfg, tokenizer)
    self.codec = examples.TextCodec(tokenizer)
    self.seconds, self.items = 0.0, 0

  def _run(self, fn, arrays, batch_size):
    from unimo_jax import neighbours as nb  # pylint: disable=import-outside-toplevel
    t = time.time()
    out = nb.embed_all(fn, self.params, arrays, batch_size, self._builder_mesh())
    self.seconds += time.time() - t
    self.items += len(out)
    return np.asarray(out, np.float32)

  def _builder_mesh(self):
    from unimo_jax import neighbours as nb  # pylint: disable=import-outside-toplevel
    return nb.default_mesh(self.mesh.devices.reshape(-1))

  def images(self, recs, batch_size: int) -> np.ndarray:
    """[n, d] embeddings of the records' images, decoded ``_DECODE_CHUNK`` at a time (the
    pixels of a whole collection would not fit)."""
    out = [self._images(recs[a:a + _DECODE_CHUNK], batch_size)
           for a in range(0, len(recs), _DECODE_CHUNK)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def _images(self, recs, batch_size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if self.cfg["visual_input"] == "patches":
      from data_pipelines import eval_data  # pylint: disable=import-outside-toplevel
      blobs, ratios = [], []
      for rec in recs:
        row = self.rows.build(rec, rng)
        blobs.append(row["_image"][0])
        ratios.append(int(row["_image_ratio"][0]))
      # pylint: disable-next=protected-access
      arrays = {"pixels": eval_data._decode_pixels(blobs, ratios, self.cfg)}
    else:
      keys = ("region_features", "region_boxes", "region_valid")
      rows = [self.rows.build(rec, rng) for rec in recs]
      arrays = {k: np.stack([r[k] for r in rows]) for k in keys}
    return self._run(self._image, arrays, batch_size)

  def texts(self, texts, batch_size: int) -> np.ndarray:
    length = int(self.cfg["streams"]["pair"]["max_length"])
    ids = np.stack([self.codec.texts([t], 1, length)[0][0] for t in texts])
    return self._run(self._text, {"ids": ids.astype(np.int32)}, batch_size)


# -- the build -----------------------------------------------------------------------------------

_QUERY_CHUNK = 8192  # queries densified at once (TF-IDF rows are sparse on the host)


def _dense(x, a, b):
  return x[a:b].toarray() if hasattr(x, "toarray") else np.asarray(x[a:b])


def search(queries, collection, k: int, s: dict, *, valid=None, exclude=None):
  """`unimo_jax.neighbours.top_k` over dense or sparse (CSR) rows; returns (scores, indices,
  stats)."""
  from unimo_jax import neighbours as nb  # pylint: disable=import-outside-toplevel
  n, m = queries.shape[0], collection.shape[0]
  scores = np.full((n, k), -np.inf, np.float32)
  idx = np.full((n, k), -1, np.int32)
  t = time.time()
  stats = {}
  for a in range(0, n, _QUERY_CHUNK):
    b = min(a + _QUERY_CHUNK, n)
    scores[a:b], idx[a:b] = nb.top_k(
        _dense(queries, a, b), lambda c0, c1: _dense(collection, c0, c1), k, num_items=m,
        collection_valid=valid, exclude=None if exclude is None else exclude[a:b],
        block_size=int(s["block_size"]), query_block=int(s["query_block"]), stats=stats)
  seconds = time.time() - t
  stats.update(seconds=seconds, queries=n, items=m, items_per_s=n / max(seconds, 1e-9),
               pairs_per_s=n * m / max(seconds, 1e-9))
  return scores, idx, stats


def _is_synthetic(spec) -> bool:
  return spec.get("kind") == "tfds" and str(spec.get("tfds_name", "")).startswith(
      "synthetic_scenes/")


def _side_images(s, cfg, pairs, image_spec, image_name, embedder):
  coll = _records(image_spec, image_name, {"image", "regions"}, s["limit"])
  if not coll:
    raise ValueError(f"neighbours: image source {image_name!r} has no readable record")
  valid, first = _dedupe([_image_digest(r) for r in coll])
  exclude = _exclusions([[_image_digest(p)] for p in pairs], first)
  if s["images"] == "objects":
    num = max([int(cfg.get("num_region_classes", 1))] + [
        int(np.max(r["regions"]["classes"])) + 1 for r in pairs + coll
        if (r.get("regions") or {}).get("classes") is not None and len(r["regions"]["classes"])])
    q, c = object_vectors(pairs, num), object_vectors(coll, num)
    valid &= np.linalg.norm(c, axis=1) > 0  # no detected object: relates to nothing
  else:
    q = embedder.images(pairs, int(s["batch_size"]))
    c = embedder.images(coll, int(s["batch_size"]))
  scores, idx, stats = search(q, c, int(s["k_images"]), s, valid=valid, exclude=exclude)
  if s["images"] == "objects":
    scores[np.linalg.norm(q, axis=1) == 0] = -np.inf  # a pair without objects gets no X_I
  return coll, scores, idx, stats


def _side_texts(s, pairs, text_specs, embedder):
  texts, keys = [], []
  for k, spec in enumerate(text_specs):
    for rec in _records(spec, source_name(spec, "text", k), {"text"}, s["limit"]):
      if str(rec.get("text", "")).strip():
        texts.append(str(rec["text"]))
        keys.append(rec.get("key"))
  if not texts:
    raise ValueError("neighbours: the text sources have no readable text")
  valid, first = _dedupe([_norm_text(t) for t in texts])
  exclude = _exclusions([[_norm_text(c) for c in p.get("captions", [])] for p in pairs], first)
  if s["texts"] == "tfidf":
    q, c = tfidf_matrices([" ".join(p.get("captions", [])) for p in pairs], texts,
                          int(s["max_features"]))
  else:
    q = embedder.texts([(p.get("captions") or [""])[0] for p in pairs], int(s["batch_size"]))
    c = embedder.texts(texts, int(s["batch_size"]))
  scores, idx, stats = search(q, c, int(s["k_texts"]), s, valid=valid, exclude=exclude)
  return texts, keys, scores, idx, stats


def _lists(scores, idx, n, positive: bool):
  """Per query [(collection index, score)]; ``positive``: only scores > 0 (objects, TF-IDF: a
  zero means no shared object or word, i.e. unrelated)."""
  return [[(int(j), float(v)) for v, j in zip(scores[i], idx[i])
           if j >= 0 and np.isfinite(v) and (v > 0 or not positive)] for i in range(n)]


def build(config, out: str, *, workdir: str | None = None, step: int | None = None,
          tokenizer=None, log=print) -> dict:
  """Writes the neighbours side file of ``config``'s pair source to ``out``; returns a report
  (counts, throughput, precision@k when the data have a ground truth)."""
  t0 = time.time()
  cfg = pipeline.resolve_config(config["data"] if "data" in config else config.data)
  s = settings(config)
  if not s["images"] and not s["texts"]:
    raise ValueError("neighbours.images and neighbours.texts are both empty: nothing to build")
  pair_spec, pair_name = _pick(cfg["streams"]["pair"].get("sources", []), s["pair_source"],
                               "pair")
  embedder = None
  if "embedding" in (s["images"], s["texts"]):
    if not workdir:
      raise ValueError("the 'embedding' scorer needs a checkpoint: pass --workdir (and --step)")
    from data_pipelines import eval_data  # pylint: disable=import-outside-toplevel
    tok = eval_data._tokenizer(cfg, tokenizer)  # pylint: disable=protected-access
    embedder = Embedder(workdir, step, cfg, tok)
  pairs = _records(pair_spec, pair_name, {"image", "regions", "captions"}, s["limit"])
  if not pairs:
    raise ValueError(f"neighbours: pair source {pair_name!r} has no readable record")
  report = dict(out=os.path.abspath(out), pairs=len(pairs), scorers=dict(images=s["images"],
                                                                        texts=s["texts"]))
  images = texts = None
  synthetic = _is_synthetic(pair_spec)
  if s["images"]:
    image_spec, image_name = _pick(cfg["streams"]["image"].get("sources", []),
                                   s["image_source"], "image")
    coll, sc, ix, stats = _side_images(s, cfg, pairs, image_spec, image_name, embedder)
    images = _lists(sc, ix, len(pairs), s["images"] == "objects")
    report["images"] = dict(source=image_name, collection=len(coll), **_rates(stats))
    synthetic &= _is_synthetic(image_spec)
  if s["texts"]:
    text_specs = [dict(x) for x in cfg["streams"]["text"].get("sources", [])]
    if not text_specs:
      raise ValueError("the data config has no text source (data.streams.text.sources)")
    coll_texts, text_keys, sc, ix, stats = _side_texts(s, pairs, text_specs, embedder)
    texts = _lists(sc, ix, len(pairs), s["texts"] == "tfidf")
    report["texts"] = dict(collection=len(coll_texts), **_rates(stats))
    synthetic &= all(_is_synthetic(x) for x in text_specs)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for i, rec in enumerate(pairs):
      line = {"key": str(rec["key"])}
      if images is not None:
        line["images"] = [str(coll[j]["key"]) for j, _ in images[i]]
        line["image_scores"] = [round(v, 6) for _, v in images[i]]
      if texts is not None:
        line["texts"] = [coll_texts[j] for j, _ in texts[i]]
        line["text_scores"] = [round(v, 6) for _, v in texts[i]]
      f.write(json.dumps(line) + "\n")
  os.replace(tmp, out)
  if embedder is not None:
    report["embedding"] = dict(step=int(embedder.step), items=embedder.items,
                               items_per_s=round(embedder.items / max(embedder.seconds, 1e-9), 1))
  if synthetic:
    report["ground_truth"] = _ground_truth(
        pair_spec, [p["key"] for p in pairs],
        None if images is None else ([c["key"] for c in coll], images),
        None if texts is None else (text_keys, texts))
  report["seconds"] = round(time.time() - t0, 2)
  for line in _summary(report):
    log(line)
  return report


def _rates(stats):
  return dict(seconds=round(stats["seconds"], 3), items_per_s=round(stats["items_per_s"], 1),
              pairs_per_s=round(stats["pairs_per_s"], 1), block=stats.get("block"),
              scores_per_device=stats.get("scores_per_device"))


def _ground_truth(pair_spec, pair_keys, images, texts) -> dict:
  """precision@k against the shared-object ground truth of synthetic_scenes."""
  from data_pipelines.synthetic_scenes import related  # pylint: disable=import-outside-toplevel
  options = related.options_from_name(pair_spec["tfds_name"])
  qk = related.kinds_of_keys(options, pair_keys)
  out = {}
  for side, data in (("images", images), ("texts", texts)):
    if data is None:
      continue
    keys, lists = data
    ck = related.kinds_of_keys(options, keys)
    out[side] = related.precision_at_k(qk, [[ck[j] for j, _ in ns] for ns in lists], ck)
  return out


def _summary(report):
  yield f"neighbours of {report['pairs']} pairs -> {report['out']} ({report['seconds']}s)"
  for side in ("images", "texts"):
    if side in report:
      r = report[side]
      yield (f"  {side}: scorer {report['scorers'][side]}, collection {r['collection']}, "
             f"builder {r['items_per_s']} items/s ({r['pairs_per_s']:.3g} scores/s, block "
             f"{r['block']}, {r['scores_per_device']} scores per device)")
      gt = report.get("ground_truth", {}).get(side)
      if gt:
        yield (f"  {side}: precision@k {gt['precision']:.3f} over {gt['queries']} pairs "
               f"({gt['neighbours']} neighbours; a random pick: {gt.get('base_rate', 0):.3f})")
  if "embedding" in report:
    e = report["embedding"]
    yield (f"  embedding (checkpoint step {e['step']}): {e['items']} items, "
           f"{e['items_per_s']} items/s")


def train_with_refresh(config, workdir: str, every: int, *, images: str = "embedding",
                       texts: str = "embedding", log=print):
  """Trains ``config`` in rounds of ``every`` steps, re-mining the neighbours between rounds.

  The pair source's ``neighbours`` file is built first with the config's own scorers if absent;
  after each round it is rebuilt IN PLACE from the round's last checkpoint with the ``images``
  / ``texts`` scorers (default: the model's own towers, i.e. the periodic refresh), and the next
  round resumes from that checkpoint reading the new file (the same path, so the data state's
  fingerprint is unchanged and the data position continues exactly). What a round trained on
  is therefore the file as mined at its start; a round interrupted and resumed by hand reads the
  current file. Returns the last round's ``TrainResult``.
  """
  from unimo_jax.train import main as main_lib  # pylint: disable=import-outside-toplevel
  if int(every) < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  specs = list(config.data.streams.pair.sources)
  out = dict(specs[0]).get("neighbours") if specs else None
  if not out:
    raise ValueError("the config's pair source has no 'neighbours' file to refresh")
  if not os.path.exists(out):
    build(config, out, log=log)
  mined = config.copy_and_resolve_references() if hasattr(
      config, "copy_and_resolve_references") else json.loads(json.dumps(config))
  mined.neighbours = dict(settings(config), images=images, texts=texts)
  while True:
    result = main_lib.train_from_config(config, workdir, max_steps=int(every))
    if result.stopped_by != "max_steps" or result.checkpoint_step is None:
      return result
    log(f"refreshing the neighbours with the checkpoint of step {result.checkpoint_step}")
    build(mined, out, workdir=workdir, step=int(result.checkpoint_step), log=log)
