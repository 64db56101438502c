"""Evaluation of a fine-tuned run on one split (the data come from the caller).

``evaluate_split(task, params, batches, meta, mesh, settings, tokenizer)`` -> metrics dict:

  classification  accuracy, f1, matthews (+ loss)
  regression      pearson, spearman, mse
  entailment      accuracy
  vqa             vqa_accuracy (argmax answer against the gold answers), vqa_score (soft)
  retrieval       dual-encoder (CMCL embeddings) R@1/5/10 both ways, and the cross-encoder's
                  R@1/5/10 both ways: ``rerank_k = 0`` (the official protocol) scores every
                  (image, caption) pair, images * texts cross pairs in batches of
                  ``cross_batch_size``; ``rerank_k = K`` re-scores each query's dual-encoder top
                  K, (images + texts) * K pairs. ``cross_pairs`` and ``cross_seconds`` record
                  the cost. ``rerank_fusion = w`` ranks by ``cross + w * cosine`` (the dual
                  encoder's, as ALBEF / BLIP add ITC to ITM; 0 = the cross score alone). The dual encoder is the run's starting checkpoint (``init_from``,
                  zero-shot) by default (``evaluation.dual_encoder``): cross-encoder
                  fine-tuning leaves the CMCL projections untrained while it moves the encoder
                  under them
  captioning      bleu1..4, cider of beam-searched captions against every reference
  seq2seq         rouge1/2/L, bleu4 of beam-searched targets (bos [CLS], eos [MASK], target
                  positions from 0, min length, length penalty, trigram blocking)

``batches`` is an iterable of per-process numpy batches in file order with ``index`` and
``row_valid`` (``data_pipelines.finetune.RowBatches(repeat=False)``); ``meta`` carries what is
not in the rows (answer strings, reference texts, the retrieval image/caption tables).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

import jax
import numpy as np

from unimo_jax import parallel
from unimo_jax.evaluation import captioning as captioning_lib
from unimo_jax.evaluation import decoding
from unimo_jax.evaluation import runner
from unimo_jax.finetune import layouts
from unimo_jax.finetune import metrics as m
from unimo_jax.finetune.tasks import Task
from unimo_jax.model import Unimo, reorder_cache


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  beam_size: int = 1
  max_length: int = 20
  alpha: float = 0.0
  min_length: int = 1
  block_trigrams: bool = False
  rerank_k: int = 10          # retrieval: 0 = every pair (official), K = the dual top K
  cross_batch_size: int = 32  # retrieval: cross-encoder pairs per batch (bounds the memory)
  rerank_fusion: float = 0.0  # retrieval: ranking score = cross + rerank_fusion * dual cosine

  @classmethod
  def from_config(cls, section) -> "GenerationSettings":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(section).items() if k in names})


def _map(fn, params, batches, mesh) -> dict:
  return runner.map_rows(jax.jit(fn), params, batches, mesh)


def _head_outputs(task: Task, params, batches, mesh) -> dict:
  return _map(lambda p, b: {"out": task.outputs(p, b)}, params, batches, mesh)


def evaluate_split(task: Task, params, batches, meta: Mapping[str, Any], mesh,
                   settings: GenerationSettings = GenerationSettings(), tokenizer=None,
                   dual_params=None) -> dict:
  """Metrics of ``task`` on one split (see the module docstring). ``dual_params``: retrieval's
  dual encoder (``{"model": ...}``, e.g. the pre-trained checkpoint the run started from);
  default the evaluated params' own."""
  kind = task.spec.kind
  with jax.set_mesh(mesh):
    if kind in ("classification", "regression", "entailment", "vqa"):
      batches = list(batches)
      out = _head_outputs(task, params, batches, mesh)
      rows = _rows(batches)
      if kind == "regression":
        pred, label = out["out"], rows["label"]
        return dict(pearson=m.pearson(pred, label), spearman=m.spearman(pred, label),
                    mse=float(np.mean((pred - label) ** 2)), count=len(pred))
      if kind == "vqa":
        best = np.argmax(out["out"], -1)
        answers = meta["answers"]
        gold = meta["gold"]  # each question's annotators' answers
        soft = rows["answer_scores"][np.arange(len(best)), best]
        return dict(vqa_accuracy=layouts.vqa_accuracy([answers[i] for i in best], gold),
                    vqa_score=float(np.mean(soft)), count=len(best))
      pred, label = np.argmax(out["out"], -1), rows["label"]
      res = dict(accuracy=m.accuracy(pred, label), count=len(pred))
      if kind == "classification":
        n = task.spec.num_labels
        res.update(f1=m.f1(pred, label, n), matthews=m.matthews(pred, label, n))
      return res
    if kind == "retrieval":
      return _retrieval(task, params, meta, mesh, settings, dual_params)
    if kind == "captioning":
      return _captioning(task, params, meta, mesh, settings, tokenizer)
    return _seq2seq(task, params, batches, meta, mesh, settings, tokenizer)


def _rows(batches) -> dict:
  """The real rows of the (single-process view of) batches, in index order."""
  keep = [b["row_valid"] for b in batches]
  out = {}
  for k in ("label", "answer_scores", "index"):
    if k in batches[0]:
      vals = np.concatenate([b[k][v] for b, v in zip(batches, keep)])
      out[k] = vals
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    out = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in
           out.items()}
  order = np.argsort(out["index"], kind="stable")
  return {k: v[order] for k, v in out.items()}


# ------------------------------------------------------------------------------ retrieval
def _chunks(arrays: Mapping[str, np.ndarray], size: int):
  n = len(next(iter(arrays.values())))
  for lo in range(0, n, size):
    rows = np.arange(lo, min(n, lo + size))
    batch = {k: v[rows] for k, v in arrays.items()}
    batch["index"] = rows.astype(np.int64)
    yield runner.pad_rows(batch, size)


def _retrieval(task: Task, params, meta, mesh, settings, dual_params=None) -> dict:
  """Dual-encoder R@K (CMCL embeddings of ``dual_params``, default ``params``) and the
  cross-encoder (``params``) re-ranking of its top K."""
  scenes = meta["scenes"]
  table, valid = meta["caption_table"]
  img_of, cap_of = np.nonzero(valid)
  texts = table[img_of, cap_of]
  size = runner.global_batch_size(32, mesh)
  model, mp = task.model, params

  def embed_images(p, b):
    v = {k: b[k] for k in scenes.visual}
    h = model.apply({"params": p["model"]}, v, method=Unimo.encode_image)["img"]
    return {"e": model.apply({"params": p["model"]}, h, method=Unimo.cmcl_image)}

  def embed_texts(p, b):
    h = model.apply({"params": p["model"]}, b["ids"], method=Unimo.encode_text)["cls"]
    return {"e": model.apply({"params": p["model"]}, h, method=Unimo.cmcl_text)}
  dp = mp if dual_params is None else dual_params
  img_e = _map(embed_images, dp, _chunks(scenes.visual, size), mesh)["e"]
  txt_e = _map(embed_texts, dp, _chunks({"ids": texts}, size), mesh)["e"]
  dual = img_e @ txt_e.T                                  # [images, texts]
  hits = img_of[None, :] == np.arange(len(img_e))[:, None]
  k = int(settings.rerank_k)
  cross = CrossScorer(task, mp, scenes.visual, texts, mesh,
                      runner.global_batch_size(int(settings.cross_batch_size), mesh))
  out = {}
  out.update(m.recalls(m.ranks_from_scores(dual, hits), prefix="dual/i2t_"))
  out.update(m.recalls(m.ranks_from_scores(dual.T, hits.T), prefix="dual/t2i_"))
  t0 = time.time()
  fuse = float(settings.rerank_fusion)
  fused = lambda i, t: cross(i, t) + fuse * dual[np.asarray(i), np.asarray(t)] if fuse else \
      cross(i, t)
  if k == 0:  # the official protocol: the cross-encoder ranks every candidate
    scores = cross.all_pairs() + fuse * dual              # [images, texts]
    out.update(m.recalls(m.ranks_from_scores(scores, hits), prefix="i2t_"))
    out.update(m.recalls(m.ranks_from_scores(scores.T, hits.T), prefix="t2i_"))
  else:
    out.update(m.recalls(m.rerank_ranks(dual, hits, k, fused), prefix="i2t_"))
    out.update(m.recalls(m.rerank_ranks(dual.T, hits.T, k, lambda t, i: fused(i, t)),
                         prefix="t2i_"))
  seconds = time.time() - t0
  logging.info("retrieval: the cross-encoder scored %d pairs (%s) in %.1f s", cross.scored,
               "every pair" if k == 0 else f"top {k}", seconds)
  out.update(images=len(img_e), texts=len(texts), rerank_k=k, rerank_fusion=fuse,
             cross_pairs=cross.scored,
             cross_seconds=seconds, full_cross_pairs=len(img_e) * len(texts))
  return out


class CrossScorer:
  """Cross-encoder scores of (image, caption) pairs, ``size`` pairs per batch: a batch's pixels
  are gathered when it is fed, so host and device memory stay O(size) whatever the number of
  pairs (images * texts for the full protocol). ``scored`` counts the pairs scored so far."""

  def __init__(self, task: Task, params, visual: Mapping[str, np.ndarray], texts: np.ndarray,
               mesh, size: int):
    self.params, self.visual, self.texts, self.mesh, self.size = params, visual, texts, mesh, size
    self.fn = jax.jit(lambda p, b: {"s": task.outputs(p, b)})
    self.scored = 0

  def _batches(self, n: int, rows_of):
    for lo in range(0, n, self.size):
      image_rows, text_rows = rows_of(lo, min(n, lo + self.size))
      batch = {k: v[image_rows] for k, v in self.visual.items()}
      batch["ids"] = self.texts[text_rows]
      batch["index"] = np.arange(lo, lo + len(text_rows), dtype=np.int64)
      yield runner.pad_rows(batch, self.size)

  def _score(self, n: int, rows_of) -> np.ndarray:
    self.scored += n
    if not n:
      return np.zeros((0,), np.float32)
    return runner.map_rows(self.fn, self.params, self._batches(n, rows_of), self.mesh)["s"]

  def __call__(self, image_rows, text_rows) -> np.ndarray:
    """scores [n] of the pairs (image_rows[i], text_rows[i])."""
    image_rows, text_rows = np.asarray(image_rows), np.asarray(text_rows)
    return self._score(len(image_rows), lambda lo, hi: (image_rows[lo:hi], text_rows[lo:hi]))

  def all_pairs(self) -> np.ndarray:
    """scores [images, texts] of every pair (pair p is image p // texts, text p % texts)."""
    n_img = len(next(iter(self.visual.values())))
    n_txt = len(self.texts)
    flat = self._score(n_img * n_txt, lambda lo, hi: divmod(np.arange(lo, hi), n_txt))
    return flat.reshape(n_img, n_txt)


# ------------------------------------------------------------------------------ generation
def _captioning(task: Task, params, meta, mesh, settings, tokenizer) -> dict:
  scenes = meta["scenes"]
  size = runner.global_batch_size(16, mesh)
  cs = captioning_lib.CaptionSettings(max_length=settings.max_length,
                                      beam_size=settings.beam_size, alpha=settings.alpha,
                                      min_length=settings.min_length,
                                      block_trigrams=settings.block_trigrams)

  def gen(p, b):
    d = captioning_lib.generate(task.model, p["model"], {k: b[k] for k in scenes.visual}, cs)
    return {"tokens": d.tokens[:, 0], "lengths": d.lengths[:, 0]}
  out = _map(gen, params, _chunks(scenes.visual, size), mesh)
  texts = captioning_lib.decode_tokens(out["tokens"], out["lengths"], tokenizer.decode,
                                       task.cfg.sep_id)
  ids = [int(i) for i in meta["image_ids"]]
  scores = captioning_lib.caption_scores(dict(zip(ids, texts)),
                                         dict(zip(ids, meta["references"])))
  scores.pop("cider_per_image", None)
  return dict(scores, count=len(texts), examples=texts[:3])


def _seq2seq(task: Task, params, batches, meta, mesh, settings, tokenizer) -> dict:
  cfg = task.cfg
  eos = cfg.mask_token_id
  forbidden = tuple(sorted({cfg.pad_id, cfg.cls_id, cfg.unk_id}))
  kw = dict(max_length=settings.max_length, bos_id=cfg.cls_id, eos_id=eos, pad_id=cfg.pad_id,
            alpha=settings.alpha, min_length=settings.min_length,
            block_trigrams=settings.block_trigrams, forbidden_ids=forbidden)
  model = task.model

  def gen(p, b):
    v = {"params": p["model"]}
    # targets restart their positions at 0 (token t of the target sits at row offset + t),
    # so a 512-token source and 128 decoded tokens need 512 positions, not 640
    _, cache = model.apply(v, settings.max_length, ids=b["source_ids"], method=Unimo.prefill,
                           restart_positions=True)

    def step_fn(tokens, step, c):
      del step  # the cache's running position is offset + step
      out, c = model.apply(v, tokens, c, method=Unimo.decode_step)
      return out["logits"], c
    n = b["source_ids"].shape[0]
    if settings.beam_size == 1:
      d = decoding.greedy_search(step_fn, cache, n, **kw)
    else:
      d = decoding.beam_search(step_fn, cache, n, beam_size=settings.beam_size,
                               reorder_fn=reorder_cache, **kw)
    return {"tokens": d.tokens[:, 0], "lengths": d.lengths[:, 0]}
  keep = ("source_ids", "index", "row_valid")
  out = _map(gen, params, [{k: b[k] for k in keep} for b in batches], mesh)
  texts = captioning_lib.decode_tokens(out["tokens"], out["lengths"], tokenizer.decode, eos)
  refs = [meta["targets"][int(i)] for i in out["index"]]
  res = m.rouge(texts, refs)
  bleu = captioning_lib.caption_scores(dict(enumerate(texts)), {i: [r] for i, r in
                                                                enumerate(refs)})
  res.update(bleu4=bleu["bleu4"], count=len(texts), examples=texts[:3])
  return res


def put_params(params, mesh):
  """Host params -> replicated on the evaluation mesh."""
  return jax.device_put(params, parallel.replicated(mesh))
