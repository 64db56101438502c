"""Fine-tuning tasks: the forward pass and loss of each downstream task on a GLOBAL batch.

A ``Task`` holds the model (``Unimo``, used only through its public entry points) and the
task's head (``heads``). Parameters are ``{"model": <Unimo params>, "head": <head params>}``
(no "head" for captioning / seq2seq, which use the tied LM head). ``task.loss(params, batch,
rng, deterministic)`` returns ``(loss_sum, sums)``: sums hold ``count`` (rows, or target tokens
for the generative tasks) and the metric sums; the step divides by the GLOBAL count.

Batch fields (leading dimension B; ``row_valid`` [B] is 0 on padding rows):

  classification / regression   ids [B, L] (``[CLS] A [SEP] B [SEP]``), label [B] int32 |
                                float32 (regression)
  entailment                    visual, ids [B, L] (hypothesis), label [B] int32
  vqa                           visual, ids [B, L] (question), answer_scores [B, A] float32
  retrieval                     visual + ids (the positive pair), neg_<visual> [B, N, ...]
                                (N negative images for the caption), neg_ids [B, M, L]
                                (M negative captions for the image), neg_image_valid [B, N],
                                neg_text_valid [B, M]
  captioning                    visual, ids [B, L] (``masking.captioning_layout``),
                                position_ids [B, L], positions / targets / weights [B, P]
  seq2seq                       ids [B, L] (source then target, ``layouts.seq2seq_layout``:
                                the target block is the last P + 1 slots and its positions
                                restart at 0, so L may exceed the position table as long as
                                each block fits), segments [B, L], position_ids [B, L],
                                positions / targets / weights [B, P]

``visual`` is ``pixels`` [B, S, S, C] (patches) or ``region_features`` / ``region_boxes`` /
``region_valid`` (regions), as the model's ``visual_input``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from unimo_jax.finetune import heads as heads_lib
from unimo_jax.finetune import losses
from unimo_jax.losses import language
from unimo_jax.model import ModelConfig, Unimo, init_variables, masks, visual_length

KINDS = ("classification", "regression", "entailment", "vqa", "retrieval", "captioning",
         "seq2seq")
VISUAL_KEYS = ("pixels", "region_features", "region_boxes", "region_valid")
MULTIMODAL = ("entailment", "vqa", "retrieval", "captioning")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a task is (the config's ``task`` section).

  kind: one of ``KINDS``.
  num_labels: classes (classification, entailment) or answers (vqa); 1 for regression.
  head_hidden: width of the entailment / VQA fusion layer (2048 officially).
  head_dropout: dropout in the head (0.1 officially).
  label_smoothing: uniform smoothing of classification / generation targets (0.1 for
    captioning and seq2seq officially).
  ranking_loss: "circle" (official) or "softmax" (retrieval).
  circle_margin, circle_scale: circle-loss m and scale (0.2, 1.0 officially).
  dual_agreement: entailment / retrieval heads also read the pair's CMCL agreement (the text
    and the image encoded alone, ``heads`` module docstring); False is the official head.
  contrastive_weight: retrieval adds this times the dual encoder's in-batch InfoNCE
    (``losses.in_batch_contrastive``: CMCL's loss over the batch's positives and sampled
    negatives) to the ranking loss, so that fine-tuning also trains the dual encoder whose
    top K the cross-encoder re-ranks; 0 is the official recipe (cross-encoder only).
  contrastive_temperature: that loss's fixed temperature.
  """
  kind: str
  num_labels: int = 2
  head_hidden: int = 2048
  head_dropout: float = 0.1
  label_smoothing: float = 0.0
  ranking_loss: str = "circle"
  circle_margin: float = 0.2
  circle_scale: float = 1.0
  dual_agreement: bool = False
  contrastive_weight: float = 0.0
  contrastive_temperature: float = 0.05

  def validate(self) -> "TaskSpec":
    def need(ok, field, why):
      if not ok:
        raise ValueError(f"task.{field}={getattr(self, field)!r}: {why}")
    need(self.kind in KINDS, "kind", f"must be one of {KINDS}")
    need(isinstance(self.num_labels, int) and self.num_labels >= 1, "num_labels",
         "must be a positive int")
    need(self.kind != "regression" or self.num_labels == 1, "num_labels",
         "regression predicts one value (num_labels = 1)")
    need(self.kind not in ("classification", "entailment") or self.num_labels >= 2,
         "num_labels", "classification needs at least 2 labels")
    need(self.head_hidden >= 1, "head_hidden", "must be >= 1")
    need(0.0 <= self.head_dropout < 1.0, "head_dropout", "must be in [0, 1)")
    need(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
    need(self.ranking_loss in ("circle", "softmax"), "ranking_loss",
         "must be 'circle' or 'softmax'")
    need(0.0 <= self.circle_margin < 1.0, "circle_margin", "must be in [0, 1)")
    need(self.circle_scale > 0, "circle_scale", "must be > 0")
    need(not self.dual_agreement or self.kind in heads_lib.DUAL_KINDS, "dual_agreement",
         f"exists for the {heads_lib.DUAL_KINDS} heads, not {self.kind!r}")
    need(self.contrastive_weight >= 0, "contrastive_weight", "must be >= 0")
    need(not self.contrastive_weight or self.kind == "retrieval", "contrastive_weight",
         f"exists for retrieval, not {self.kind!r}")
    need(self.contrastive_temperature > 0, "contrastive_temperature", "must be > 0")
    return self

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "TaskSpec":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(section).items() if k in names}).validate()


def visual_of(batch: Mapping[str, jax.Array], prefix: str = "") -> dict:
  """The model's visual input from a batch (``prefix`` "neg_" for negative images)."""
  return {k: batch[prefix + k] for k in VISUAL_KEYS if prefix + k in batch}


def visual_valid(visual: Mapping[str, jax.Array], cfg: ModelConfig) -> tuple[Any, int]:
  """(valid [B, 1+N] or None, 1+N) of the image block, for the captioning mask."""
  if "region_valid" in visual:
    rv = visual["region_valid"]
    valid = jnp.concatenate([jnp.ones_like(rv[:, :1]), rv], axis=1)
    return valid, valid.shape[1]
  return None, visual_length(cfg)


def model_positions(position_ids, ids, cfg: ModelConfig):
  """0-based position ids -> the model's position rows (pads at ``pad_position``)."""
  return jnp.where(ids != cfg.pad_id, cfg.position_offset + position_ids,
                   cfg.pad_position).astype(jnp.int32)


def seq2seq_position_span(length: int, slots: int, cfg: ModelConfig) -> int:
  """Text positions a seq2seq row (``layouts.seq2seq_layout``) uses: its target block is the
  last ``slots + 1`` of its ``length`` tokens and restarts at position 0, so the row needs
  ``max(source block, target block)`` positions, not their sum (CNN/DM's 512 + 128 fits the
  base model's 512). Raises ``ValueError`` naming the block that does not fit."""
  target = slots + 1
  source = length - target
  for name, n in (("source", source), ("target", target)):
    if n > cfg.max_text_length:
      raise ValueError(f"seq2seq {name} block of {n} tokens exceeds the position table "
                       f"({cfg.max_text_length} text positions; ModelConfig.max_positions; "
                       f"data.max_{name})")
  return max(source, target)


class Task:
  """The forward pass and loss of one task kind."""

  def __init__(self, model_cfg: ModelConfig, spec: TaskSpec):
    self.cfg = model_cfg
    self.spec = spec.validate()
    self.model = Unimo(model_cfg)
    self.head = heads_lib.make_head(spec.kind, model_cfg, num_labels=spec.num_labels,
                                    hidden=spec.head_hidden, dropout_rate=spec.head_dropout,
                                    dual=spec.dual_agreement)

  # ------------------------------------------------------------------ parameters
  def init_params(self, rng) -> dict:
    """``{"model": ..., "head": ...}`` with logical-axis boxes (cheap under eval_shape)."""
    k_model, k_head = jax.random.split(rng)
    params = {"model": init_variables(self.cfg, k_model)["params"]}
    if self.head is not None:
      h = self.cfg.hidden_size
      x = jnp.zeros((1, h), jnp.float32)
      args = (x,) if self.spec.kind in ("classification", "regression") else (x, x)
      if self.spec.dual_agreement:
        args += (jnp.zeros((1, self.cfg.projection_dim), jnp.float32),)
      params["head"] = self.head.init(k_head, *args)["params"]
    return params

  # ------------------------------------------------------------------ encoders
  def _apply(self, params, *args, method, rng=None, deterministic=True, **kw):
    rngs = None if deterministic else {"dropout": rng}
    return self.model.apply({"params": params["model"]}, *args, method=method, rngs=rngs,
                            deterministic=deterministic, **kw)

  def _head(self, params, *args, rng=None, deterministic=True):
    rngs = None if deterministic else {"dropout": rng}
    return self.head.apply({"params": params["head"]}, *args, deterministic=deterministic,
                           rngs=rngs)

  def _pair(self, params, visual, ids, rng, deterministic):
    return self._apply(params, visual, ids, method=Unimo.encode_pair, rng=rng,
                       deterministic=deterministic)

  def embed_texts(self, params, ids, rng=None, deterministic=True) -> jax.Array:
    """Unit CMCL embeddings [B, P] of texts encoded alone (as pre-training's CMCL does)."""
    cls = self._apply(params, ids, method=Unimo.encode_text, rng=rng,
                      deterministic=deterministic)["cls"]
    return self.model.apply({"params": params["model"]}, cls, method=Unimo.cmcl_text)

  def embed_images(self, params, visual, rng=None, deterministic=True) -> jax.Array:
    """Unit CMCL embeddings [B, P] of images encoded alone."""
    img = self._apply(params, visual, method=Unimo.encode_image, rng=rng,
                      deterministic=deterministic)["img"]
    return self.model.apply({"params": params["model"]}, img, method=Unimo.cmcl_image)

  def agreement_of(self, text_emb, image_emb) -> jax.Array:
    """``P * t * i`` [B, P] of unit embeddings: times P so that its mean over P is their cosine
    and its elements are O(1) (unscaled, they are O(1/P), and Adam's fixed-size steps would take
    P times as many updates to weigh them in)."""
    return (text_emb * image_emb).astype(jnp.float32) * float(self.cfg.projection_dim)

  def agreement(self, params, visual, ids, rng=None, deterministic=True) -> jax.Array:
    """The pair's CMCL agreement [B, P]: ``P * n(t) * n(i)``, the product of the unit CMCL
    embeddings of the text and the image, each encoded alone."""
    r_t, r_i = (None, None) if rng is None else jax.random.split(rng)
    return self.agreement_of(self.embed_texts(params, ids, r_t, deterministic),
                             self.embed_images(params, visual, r_i, deterministic))

  # ------------------------------------------------------------------ outputs
  def outputs(self, params, batch, rng=None, deterministic=True, agreement=None) -> jax.Array:
    """Head outputs: logits [B, C] (classification, entailment, vqa), predictions [B]
    (regression), scores [B] of the (visual, ids) pairs (retrieval). ``agreement`` [B, P]:
    the pairs' CMCL agreement when the caller has it (``dual_agreement``), else computed."""
    kind = self.spec.kind
    r_enc, r_head = (None, None) if rng is None else jax.random.split(rng)
    if kind in ("classification", "regression"):
      cls = self._apply(params, batch["ids"], method=Unimo.encode_text, rng=r_enc,
                        deterministic=deterministic)["cls"]
      out = self._head(params, cls, rng=r_head, deterministic=deterministic)
      return out[:, 0] if kind == "regression" else out
    if kind in ("entailment", "vqa", "retrieval"):
      visual = visual_of(batch)
      args = ()
      if self.spec.dual_agreement:
        r_enc, r_dual = (None, None) if r_enc is None else jax.random.split(r_enc)
        if agreement is None:
          agreement = self.agreement(params, visual, batch["ids"], r_dual, deterministic)
        args = (agreement,)
      enc = self._pair(params, visual, batch["ids"], r_enc, deterministic)
      return self._head(params, enc["cls"], enc["img"], *args, rng=r_head,
                        deterministic=deterministic)
    raise ValueError(f"task {kind!r} has no head outputs (it generates text)")

  def count(self, batch) -> jax.Array:
    """The loss's normaliser for this batch: real rows, or real target tokens."""
    if self.spec.kind in ("captioning", "seq2seq"):
      w = batch["weights"].astype(jnp.float32)
      if "row_valid" in batch:
        w = w * batch["row_valid"].astype(jnp.float32)[:, None]
      return jnp.sum(w)
    return jnp.sum(batch["row_valid"].astype(jnp.float32))

  def loss(self, params, batch, rng, deterministic: bool = False
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss_sum, sums)`` over the batch; sums include ``count``."""
    kind, spec = self.spec.kind, self.spec
    w = batch["row_valid"].astype(jnp.float32) if "row_valid" in batch else None
    if kind in ("classification", "entailment"):
      s = losses.classification(self.outputs(params, batch, rng, deterministic), batch["label"],
                                w, spec.label_smoothing)
    elif kind == "regression":
      s = losses.regression(self.outputs(params, batch, rng, deterministic), batch["label"], w)
    elif kind == "vqa":
      s = losses.soft_binary_cross_entropy(self.outputs(params, batch, rng, deterministic),
                                           batch["answer_scores"], w)
    elif kind == "retrieval":
      s = self._retrieval_loss(params, batch, rng, deterministic, w)
    elif kind == "captioning":
      s = self._token_loss(params, batch, rng, deterministic, w, captioning=True)
    else:
      s = self._token_loss(params, batch, rng, deterministic, w, captioning=False)
    return s.pop("loss_sum"), s

  # ------------------------------------------------------------------ retrieval
  def _retrieval_loss(self, params, batch, rng, deterministic, w):
    """Scores every positive with its N negative images and M negative captions in ONE
    encoder pass over B (1 + N + M) pairs, then the ranking loss (plus the dual encoder's
    in-batch contrastive loss when ``contrastive_weight`` > 0)."""
    ids, visual = batch["ids"], visual_of(batch)
    neg_visual, neg_ids = visual_of(batch, "neg_"), batch["neg_ids"]
    b = ids.shape[0]
    n = jax.tree.leaves(neg_visual)[0].shape[1]
    m = neg_ids.shape[1]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    rep = lambda x, k: jnp.repeat(x, k, axis=0)
    all_visual = {k: jnp.concatenate([visual[k], flat(neg_visual[k]), rep(visual[k], m)], 0)
                  for k in visual}
    all_ids = jnp.concatenate([ids, rep(ids, n), flat(neg_ids)], 0)
    spec = self.spec
    agreement, dual = None, None
    if spec.dual_agreement or spec.contrastive_weight:
      # Each image and caption encoded alone ONCE (B + B N images, B + B M captions), then
      # paired as the scored pairs are: positives, caption r with negative images, image r
      # with negative captions.
      rng, r_t, r_i = (None, None, None) if rng is None else jax.random.split(rng, 3)
      cat_visual = {k: jnp.concatenate([visual[k], flat(neg_visual[k])], 0) for k in visual}
      t_all = self.embed_texts(params, jnp.concatenate([ids, flat(neg_ids)], 0), r_t,
                               deterministic)
      i_all = self.embed_images(params, cat_visual, r_i, deterministic)
      t_pos, t_neg = t_all[:b], t_all[b:]
      i_pos, i_neg = i_all[:b], i_all[b:]
      dual = (i_pos, t_pos, i_neg.reshape(b, n, -1), t_neg.reshape(b, m, -1))
      if spec.dual_agreement:
        agreement = self.agreement_of(jnp.concatenate([t_pos, rep(t_pos, n), t_neg], 0),
                                      jnp.concatenate([i_pos, i_neg, rep(i_pos, m)], 0))
    scores = self.outputs(params, dict(all_visual, ids=all_ids), rng, deterministic,
                          agreement=agreement)
    pos = scores[:b]
    neg_img = scores[b:b + b * n].reshape(b, n)
    neg_txt = scores[b + b * n:].reshape(b, m)
    out = losses.ranking(pos, neg_img, neg_txt, w, batch.get("neg_image_valid"),
                         batch.get("neg_text_valid"), spec.ranking_loss, spec.circle_margin,
                         spec.circle_scale)
    if spec.contrastive_weight:
      c = losses.in_batch_contrastive(*dual, w, batch.get("neg_image_valid"),
                                      batch.get("neg_text_valid"), spec.contrastive_temperature)
      out.update(c)
      out["loss_sum"] = out["loss_sum"] + spec.contrastive_weight * c["contrastive_sum"]
    return out

  # ------------------------------------------------------------------ generation
  def token_logits(self, params, batch, rng=None, deterministic=True) -> jax.Array:
    """LM logits [B, P, V] at the teacher-forcing slots of a captioning / seq2seq batch."""
    cfg = self.cfg
    ids = batch["ids"]
    positions = model_positions(batch["position_ids"], ids, cfg)
    if self.spec.kind == "captioning":
      visual = visual_of(batch)
      vvalid, nv = visual_valid(visual, cfg)
      bias = masks.to_bias(masks.captioning(nv, ids != cfg.pad_id, vvalid), cfg.compute_dtype)
      hidden = self._apply(params, visual, ids, method=Unimo.encode_pair, rng=rng,
                           deterministic=deterministic, attention_bias=bias,
                           positions=positions)["text_hidden"]
    else:
      bias = masks.to_bias(masks.seq2seq(batch["segments"]), cfg.compute_dtype)
      hidden = self._apply(params, ids, method=Unimo.encode_text, rng=rng,
                           deterministic=deterministic, attention_bias=bias,
                           positions=positions,
                           position_span=seq2seq_position_span(ids.shape[1],
                                                               batch["positions"].shape[1],
                                                               cfg))["hidden"]
    return self.model.apply({"params": params["model"]}, hidden, batch["positions"],
                            method=Unimo.lm_logits)

  def _token_loss(self, params, batch, rng, deterministic, w, captioning):
    del captioning  # the layout is the task's
    logits = self.token_logits(params, batch, rng, deterministic)
    weights = batch["weights"].astype(jnp.float32)
    if w is not None:
      weights = weights * w[:, None]
    _, m = language.seq2seq_loss(logits, batch["targets"], weights, self.spec.label_smoothing)
    return dict(loss_sum=m["loss_sum"], count=m["count"], correct=m["correct"],
                nll_sum=m["nll_sum"])
