"""Runs the evaluators over a split on every device, with padded batches and masks.

The data side is a plain dict of numpy arrays over the whole split (``data_pipelines.eval_data``
builds it; any source with these fields works):

  pixels [N, S, S, 3] | region_features/region_boxes/region_valid   the model's visual input
  image_id [N] int64
  caption_ids [N, C, L] int32, caption_valid [N, C] bool           every reference caption
  negative_ids [N, K, L] int32, negative_valid [N, K] bool         hard negatives (optional)
  negative_kind [N, K] int32 (optional, index into ``meta["kind_names"]``)
  mlm_* / s2s_* / cap_* language layouts (optional, see ``language``)

plus host-only ``meta``: ``captions`` (list of lists of str), ``kind_names``, ``name``.

Every batch is padded to one fixed global size (a multiple of the data-parallel device count,
so one compilation serves all batches) with ``row_valid`` False on the padding; outputs are
gathered to every host and the padding rows dropped by ``row_valid``, so an uneven last batch
counts each real row exactly once. With several processes each one feeds its share of every
global batch and all take the same number of steps (``lockstep`` pads a process that runs out),
so no host waits forever in a collective. Metrics are accumulated as (sum, count) pairs and
divided once at the end.
"""
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from unimo_jax import parallel
from unimo_jax.evaluation import captioning, hard_negatives, language, retrieval, zero_shot

EVALUATORS = ("retrieval", "hard_negatives", "captioning", "language", "zero_shot")
_EMBED_KEYS = retrieval.VISUAL_KEYS + ("caption_ids", "negative_ids")
_LANGUAGE_PREFIXES = ("mlm_", "s2s_", "cap_")
# Keys of the ``evaluation`` config section read by ``main`` rather than by the runner.
_MAIN_KEYS = {"splits", "limit", "train_splits", "sources", "allow_train_source", "zero_shot"}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What to evaluate and how (the ``eval`` section of a config; every field optional there).

  evaluators: any of ``EVALUATORS``.
  batch_size: global rows per step (rounded up to a multiple of the data-parallel size).
  caption: generation settings. caption_images: images captioned per split (0 = all).
  ks: the K of Recall@K.
  """
  evaluators: tuple = EVALUATORS
  batch_size: int = 64
  caption: captioning.CaptionSettings = captioning.CaptionSettings()
  caption_images: int = 0
  ks: tuple = retrieval.DEFAULT_KS

  @classmethod
  def from_config(cls, cfg: Mapping | None) -> "EvalSettings":
    """Reads a mapping (ConfigDict or dict) with the fields above; ``caption`` may be a mapping
    of ``CaptionSettings`` fields. Unknown keys are an error naming the key."""
    if cfg is None:
      return cls()
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names - _MAIN_KEYS)
    if unknown:
      raise ValueError(f"eval config: unknown key(s) {unknown}; known: {sorted(names)}")
    kw = {k: cfg[k] for k in names if k in cfg}
    if isinstance(kw.get("caption"), Mapping):
      cap = dict(kw["caption"])
      known = {f.name for f in dataclasses.fields(captioning.CaptionSettings)}
      bad = sorted(set(cap) - known)
      if bad:
        raise ValueError(f"eval.caption: unknown key(s) {bad}; known: {sorted(known)}")
      kw["caption"] = captioning.CaptionSettings(**cap)
    for k in ("evaluators", "ks"):
      if k in kw:
        kw[k] = tuple(kw[k])
    bad = sorted(set(kw.get("evaluators", ())) - set(EVALUATORS))
    if bad:
      raise ValueError(f"eval.evaluators: unknown {bad}; known: {list(EVALUATORS)}")
    return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

def global_batch_size(batch_size: int, mesh) -> int:
  """``batch_size`` rounded up to a multiple of the data-parallel size and the process count."""
  unit = np.lcm(parallel.data_parallel_size(mesh), jax.process_count())
  return int(-(-max(batch_size, 1) // unit) * unit)


def pad_rows(batch: Mapping[str, np.ndarray], size: int) -> dict:
  """Pads every field to ``size`` rows with zeros; adds ``row_valid`` (False on padding)."""
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f"batch of {n} rows does not fit the step size {size}")
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) if n < size else v
  valid = np.asarray(batch.get("row_valid", np.ones((n,), bool)), bool)
  out["row_valid"] = np.concatenate([valid, np.zeros((size - n,), bool)])
  return out


def split_batches(data: Mapping[str, np.ndarray], batch_size: int, keys: Sequence[str],
                  process_index: int = 0, process_count: int = 1,
                  limit: int = 0) -> Iterator[dict]:
  """This process's share of consecutive global batches of ``data`` (fields ``keys``).

  Each global batch of ``batch_size`` rows is cut into ``process_count`` equal slices; every
  process gets the same number of batches (the last ones may be all padding). Rows carry
  ``index`` (their row in ``data``) and ``row_valid``.
  """
  n = len(data["image_id"]) if "image_id" in data else len(data[keys[0]])
  n = min(n, limit) if limit else n
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    lo = min(n, start + process_index * local)
    hi = min(n, lo + local) if lo < n else lo
    rows = np.arange(lo, hi)
    batch = {k: np.asarray(data[k])[rows] for k in keys if k in data}
    batch["index"] = rows.astype(np.int64)
    yield pad_rows(batch, local)


def lockstep(batches: Iterable[dict]) -> Iterator[dict]:
  """Yields until EVERY process has run out; a process that ran out early yields all-padding
  copies of its last batch, so collective steps stay matched. One process: a no-op."""
  if jax.process_count() == 1:
    yield from batches
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  it, template = iter(batches), None
  while True:
    batch = next(it, None)
    if batch is not None:
      template = batch
    more = multihost_utils.process_allgather(np.asarray([batch is not None], np.int32))
    if not np.any(more):
      return
    if batch is None:
      if template is None:
        raise RuntimeError("evaluation: this process got no batch while others did")
      batch = {k: np.zeros_like(v) for k, v in template.items()}
    yield batch


def _gather(tree):
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)


def map_rows(fn: Callable, params, batches: Iterable[dict], mesh) -> dict:
  """Applies a jitted ``fn(params, batch) -> {name: [B, ...]}`` to every batch on ``mesh``.

  Returns:
    {name: np.ndarray [rows, ...]} over the real rows of every process, in ``index`` order
    (``index`` is returned too).
  """
  outs = []
  for batch in lockstep(batches):
    host = {k: v for k, v in batch.items() if k not in ("index", "row_valid")}
    dev = parallel.global_batch(host, mesh)
    out = fn(params, dev)
    # The row index and validity travel through the same global arrays as the outputs, so they
    # come back in the same row order whatever the process/device layout.
    tags = parallel.global_batch({"index": batch["index"].astype(np.int32),
                                  "row_valid": batch["row_valid"]}, mesh)
    out = _gather(dict(out, **tags))
    keep = np.asarray(out.pop("row_valid"), bool)
    outs.append({k: np.asarray(v)[keep] for k, v in out.items()})
  if not outs:
    return {}
  merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  order = np.argsort(merged["index"], kind="stable")
  return {k: v[order] for k, v in merged.items()}


# ---------------------------------------------------------------------------------------------
# The evaluators over a split
# ---------------------------------------------------------------------------------------------

def finalize(pairs: Mapping[str, tuple]) -> dict:
  """(sum, count) pairs -> ratios (NaN when the count is 0)."""
  return {k: (s / c if c else float("nan")) for k, (s, c) in pairs.items()}


class Evaluator:
  """Runs the configured evaluators; jitted functions are built once and reused (the training
  loop calls ``run`` every N steps with new parameters)."""

  def __init__(self, model, mesh, settings: EvalSettings = EvalSettings(),
               decode_fn: Callable | None = None):
    """decode_fn: token ids -> text (the tokenizer's ``decode``); needed for BLEU/CIDEr."""
    self.model, self.mesh, self.settings, self.decode_fn = model, mesh, settings, decode_fn
    self.batch_size = global_batch_size(settings.batch_size, mesh)
    self._embed = jax.jit(functools.partial(retrieval.embed_batch, model))
    self._prompts = jax.jit(functools.partial(zero_shot.embed_prompts, model))
    self._language = jax.jit(functools.partial(language.language_rows, model))
    self._caption = jax.jit(
        lambda p, b: captioning.generate(model, p, {k: b[k] for k in retrieval.VISUAL_KEYS
                                                    if k in b}, settings.caption))

  def _batches(self, data, keys, limit=0):
    return split_batches(data, self.batch_size, keys, jax.process_index(), jax.process_count(),
                         limit)

  def embeddings(self, params, data) -> dict:
    """CMCL embeddings of every image, caption and hard negative of the split."""
    return map_rows(self._embed, params, self._batches(data, _EMBED_KEYS), self.mesh)

  def run(self, params, data: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
          evaluators: Sequence[str] | None = None) -> dict:
    """Evaluates ``params`` on one split.

    Returns:
      dict(metrics={name: float}, pairs={name: (sum, count)}, artefacts={...}) where the
      artefacts feed the report: retrieval ranks and top-5 captions, generated captions.
    """
    meta = dict(meta or {})
    evaluators = tuple(evaluators or self.settings.evaluators)
    pairs, metrics, art = {}, {}, {}
    timings = {}
    if {"retrieval", "hard_negatives", "zero_shot"} & set(evaluators):
      t0 = time.time()
      emb = self.embeddings(params, data)
      timings["embed_s"] = time.time() - t0
      cap_valid = np.asarray(data["caption_valid"])[emb["index"]]
      if "retrieval" in evaluators:
        # Equal caption strings are one candidate owned by all their images (retrieval.py).
        keys, ids = data.get("caption_key"), data.get("caption_ids")
        rec, art["retrieval"] = retrieval.split_retrieval(
            emb["image"], emb["caption"], cap_valid, emb["index"], self.settings.ks,
            caption_keys=None if keys is None else np.asarray(keys)[emb["index"]],
            caption_ids=None if ids is None else np.asarray(ids)[emb["index"]])
        pairs.update(rec)
      if "hard_negatives" in evaluators and "negative" in emb:
        kinds = data.get("negative_kind")
        pairs.update(hard_negatives.hard_negative_sums(
            emb["image"], emb["caption"], cap_valid, emb["negative"],
            np.asarray(data["negative_valid"])[emb["index"]],
            None if kinds is None else np.asarray(kinds)[emb["index"]],
            tuple(meta.get("kind_names", ()))))
      if "zero_shot" in evaluators and "prompt_ids" in data and "label" in data:
        # Class prompts through the same sharded text pass; labels from the records.
        pairs.update(zero_shot.split_sums(
            lambda ids: map_rows(self._prompts, params, split_batches(
                {"prompt_ids": ids}, self.batch_size, ["prompt_ids"], jax.process_index(),
                jax.process_count()), self.mesh)["text"], emb["image"], emb["index"], data))
    if "language" in evaluators and any(k.startswith(_LANGUAGE_PREFIXES) for k in data):
      t0 = time.time()
      keys = [k for k in data if k.startswith(_LANGUAGE_PREFIXES)] + list(retrieval.VISUAL_KEYS)
      rows = map_rows(self._language, params, self._batches(data, keys), self.mesh)
      timings["language_s"] = time.time() - t0
      lang = language.sums(rows)
      pairs.update(lang)
      metrics.update(language.finalize(lang))
    if "captioning" in evaluators:
      t0 = time.time()
      art["captions"] = self._captions(params, data, meta, pairs)
      timings["captioning_s"] = time.time() - t0
    metrics.update({k: v for k, v in finalize(pairs).items() if k not in metrics})
    metrics.update(timings)
    return dict(metrics=metrics, pairs=pairs, artefacts=art)

  def _captions(self, params, data, meta, pairs) -> list:
    out = map_rows(self._caption_rows, params,
                   self._batches(data, retrieval.VISUAL_KEYS, self.settings.caption_images),
                   self.mesh)
    if not out:
      return []
    if self.decode_fn is None or "captions" not in meta:
      logging.warning("captioning: no tokenizer or reference captions; BLEU/CIDEr skipped")
      return []
    texts = captioning.decode_tokens(out["tokens"], out["lengths"], self.decode_fn,
                                     self.model.config.sep_id)
    ids = np.asarray(data["image_id"])[out["index"]]
    refs = captioning.references_by_id(ids, [meta["captions"][i] for i in out["index"]])
    candidates = {int(i): t for i, t in zip(ids, texts)}
    scores = captioning.caption_scores(candidates, refs)
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider"):
      pairs[k] = (scores[k], 1.0)
    cider = dict(zip(sorted(candidates), scores["cider_per_image"]))  # scorer's key order
    return [dict(index=int(i), image_id=int(d), text=t, references=refs[int(d)],
                 cider=float(cider[int(d)]))
            for i, d, t in zip(out["index"], ids, texts)]

  def _caption_rows(self, params, batch):
    dec = self._caption(params, batch)
    return {"tokens": dec.tokens[:, 0], "lengths": dec.lengths[:, 0], "score": dec.scores[:, 0]}


def train_evaluator(model, mesh, section: Mapping | None, decode_fn: Callable | None,
                    splits: Sequence[str], load_split: Callable[[str], tuple]) -> Callable:
  """The training loop's ``evaluate`` hook: ``(params, step) -> {"<split>/<metric>": float}``.

  Args:
    model: the ``Unimo`` module; mesh: the device mesh.
    section: the config's ``evaluation`` section (``EvalSettings`` fields and the keys of
      ``main``); decode_fn: token ids -> text (for BLEU/CIDEr).
    splits: the splits to evaluate.
    load_split: ``split -> (data, meta)``, called once per split on first use (the command
      module passes the data loader in; this module reads no data).

  ``params`` is the train state's parameter tree (``{"model": ..., "cmcl": ...}``).
  """
  ev = Evaluator(model, mesh, EvalSettings.from_config(section), decode_fn=decode_fn)
  cache = {}

  def evaluate(params, step):
    del step
    out = {}
    for split in splits:
      if split not in cache:
        cache[split] = load_split(split)
      data, meta = cache[split]
      res = ev.run(params["model"], data, meta)
      out.update({f"{split}/{k}": v for k, v in res["metrics"].items()})
    return out
  return evaluate
