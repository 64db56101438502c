"""UNIMO's pre-training objectives on a global batch, with the encoder passes merged.

Every objective needs an encoder pass, but passes of the same kind and length are one call on
concatenated rows (fewer, larger matmuls; a smaller program to compile):

  pass      rows (concatenated)                                         sequence
  text      text-stream language rows (span MLM and/or seq2seq)         [CLS] w.. [SEP]
  texts     CMCL: captions, positive and hard-negative texts            [CLS] w.. [SEP]
  images    image-stream MRP rows (masked) + CMCL images (pair images   [IMG] v..
            and their related images)
  pairs     pair MRP rows (clean caption, masked image) + pair          [IMG] v.. [CLS] w.. [SEP]
            language rows (MLM and/or captioning)

UNIMO alternates MLM and seq2seq. When a stream alternates (``objectives.text_mode`` /
``pair_text_mode`` = 'alternate') the step's phase picks which objective's rows the stream's
pass encodes: a static (Python int) phase builds that pass alone; a traced one is a
``lax.cond`` between the two passes, so each step runs one objective's rows at their own shape
(``_by_phase``); the objective not run reports NaN metrics and adds nothing. With
'both' the two sets of rows are concatenated into the pass. Rows of different lengths are padded
to the longest (padding is masked out).

Each objective's loss is normalised by its global count (the loss functions do it) and
multiplied by ``scales[name]`` (micro-batch count / whole-batch count; 1 without accumulation).
Metrics are ``<objective>/<metric>``, means multiplied by the scale so that summing micro-batches
gives count-weighted means; counts are plain sums.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from unimo_jax.losses import contrastive, language, visual
from unimo_jax.model import ModelConfig, Unimo, masks
from unimo_jax.train import objectives as obj_lib
from unimo_jax.train import rows as rows_lib

Batch = Mapping[str, jax.Array]

# Metrics that are counts (summed over micro-batches) or sums (dropped: the means carry them).
SUMMED = ("count", "num_anchors", "num_text_columns", "num_image_columns")
DROPPED = ("loss_sum", "nll_sum", "correct")



def _is_language(name: str) -> bool:
  return obj_lib.REGISTRY[name].kind == "language"


# ------------------------------------------------------------------------------ batch helpers
def row_valid(batch: Batch, stream: str) -> jax.Array:
  return batch[f"{stream}/row_valid"].astype(jnp.float32)


def visual_inputs(batch: Batch, stream: str, model_cfg: ModelConfig,
                  related: bool = False) -> dict:
  """The model's visual dict of a stream (``related``: the X_I images, Ki folded into B)."""
  pre = f"{stream}/related_" if related else f"{stream}/"
  keys = ("region_features", "region_boxes", "region_valid") if (
      model_cfg.visual_input == "regions") else ("pixels",)
  out = {}
  for k in keys:
    x = batch[pre + k]
    out[k] = x.reshape((-1,) + x.shape[2:]) if related else x
  return out


def token_weights(batch: Batch, stream: str, prefix: str) -> jax.Array:
  return batch[f"{stream}/{prefix}weights"].astype(jnp.float32) * row_valid(batch, stream)[:, None]


def region_mask(batch: Batch, stream: str, model_cfg: ModelConfig) -> jax.Array:
  """[B, N] float: masked AND real regions of valid rows (the MRP targets)."""
  m = batch[f"{stream}/visual_mask"].astype(bool)
  if model_cfg.visual_input == "regions":
    m = m & batch[f"{stream}/region_valid"].astype(bool)
  return m.astype(jnp.float32) * row_valid(batch, stream)[:, None]


def objective_counts(batch: Batch, model_cfg: ModelConfig, names) -> dict[str, jax.Array]:
  """The normaliser of each objective's loss on ``batch`` (what its loss divides by)."""
  counts = {}
  for name in names:
    o = obj_lib.REGISTRY[name]
    if o.kind == "language":
      counts[name] = token_weights(batch, o.stream, o.prefix).sum()
    elif o.kind == "mrp":
      counts[name] = region_mask(batch, o.stream, model_cfg).sum()
    elif o.kind == "cmcl":
      counts[name] = row_valid(batch, o.stream).sum()
  return counts


def _visual_valid(batch: Batch, stream: str, model_cfg: ModelConfig, n: int) -> jax.Array:
  """[B, 1+N] bool: [IMG] and the real regions (all patches are real)."""
  regions = batch[f"{stream}/region_valid"] if model_cfg.visual_input == "regions" else None
  return rows_lib.visual_valid(batch[f"{stream}/row_valid"].shape[0], n, regions)


def _pad_to(x: jax.Array, length: int, axis: int, value) -> jax.Array:
  extra = length - x.shape[axis]
  if extra <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _concat_visual(parts: list[dict]) -> dict:
  return {k: jnp.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


# ------------------------------------------------------------------------------ objectives
class UnimoObjectives:
  """``(params, batch, rng, names, scales, phase) -> (loss, metrics)`` for UNIMO.

  Args:
    model_cfg: the ModelConfig.
    config: the run config (``objectives``, ``cmcl`` sections).
    mesh: the device mesh (CMCL gathers its columns across the batch axes), or None.
  """

  def __init__(self, model_cfg: ModelConfig, config: Any, mesh: Mesh | None):
    self.cfg = model_cfg
    self.model = Unimo(model_cfg)
    self.obj = config.objectives
    self.cmcl = config.cmcl
    self.mesh = mesh
    self.weights = obj_lib.weights(self.obj)

  def _apply(self, params, rng, method, *args, **kwargs):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params["model"]}, *args, rngs=rngs, method=method,
                            **kwargs)

  # ---------------------------------------------------------------- language rows
  def _language_rows(self, batch: Batch, name: str, n_visual: int) -> dict:
    """Inputs of one language objective's rows: ids [B,L], mask [B,T,T] (T = L, or n_visual + L
    for pairs), positions [B,L], slots (positions / targets / weights [B,P])."""
    o = obj_lib.REGISTRY[name]
    stream, prefix, cfg = o.stream, o.prefix, self.cfg
    ids = batch[f"{stream}/{prefix}ids"]
    # seq2seq rows carry their original-text positions (0-based) from the data
    pos = rows_lib.positions(ids, cfg, batch.get(f"{stream}/{prefix}position_ids")
                             if prefix == "s2s_" else None)
    segments = batch.get(f"{stream}/s2s_segments")
    image = _visual_valid(batch, stream, cfg, n_visual) if stream == "pair" else None
    # a caption is all target: its text rows are the target segment
    text_valid = segments > 0 if o.attention == "captioning" else None
    mask = rows_lib.attention_mask(o.attention, ids, cfg, segments=segments, image_valid=image,
                                   text_valid=text_valid)
    return dict(ids=ids, mask=mask, pos=pos, slots=batch[f"{stream}/{prefix}positions"],
                targets=batch[f"{stream}/{prefix}targets"],
                weights=token_weights(batch, stream, prefix))

  def _pad_rows(self, rows: dict, length: int, slots: int, n_visual: int) -> dict:
    """Pads one set of language rows to text length ``length`` and ``slots`` predictions."""
    cfg = self.cfg
    t = n_visual + length
    mask = rows["mask"]
    return dict(ids=_pad_to(rows["ids"], length, 1, cfg.pad_id),
                mask=_pad_to(_pad_to(mask, t, 1, 0), t, 2, 0),
                pos=_pad_to(rows["pos"], length, 1, cfg.pad_position),
                slots=_pad_to(rows["slots"], slots, 1, 0),
                targets=_pad_to(rows["targets"], slots, 1, 0),
                weights=_pad_to(rows["weights"], slots, 1, 0.0))

  def _language_groups(self, batch: Batch, names, mode: str, phase, n_visual: int = 0):
    """The row groups of a stream's language objectives.

    Returns a list of ``(objectives, selector, rows)``: one group per objective, or, when the
    stream alternates and both objectives are wanted, one group holding the rows of the
    objective of ``phase`` (a Python int here: ``_by_phase`` branches on a traced one), with
    ``selector`` True and ``objectives`` = [phase-0 objective, phase-1 objective]. With two
    groups ('both') they share one text length and slot count.
    """
    present = [n for n in names if _is_language(n)]
    if not present:
      return []
    # `names` hold only weighted objectives (objectives.active), so two present means both
    # alternate; a lone one runs every step.
    if mode == "alternate" and len(present) == 2:
      if not isinstance(phase, int):
        raise TypeError("alternating language rows need a static phase (see _by_phase)")
      return [(tuple(present), True, self._language_rows(batch, present[phase], n_visual))]
    rows = {n: self._language_rows(batch, n, n_visual) for n in present}
    length = max(r["ids"].shape[1] for r in rows.values())
    slots = max(r["slots"].shape[1] for r in rows.values())
    return [((n,), False, self._pad_rows(r, length, slots, n_visual)) for n, r in rows.items()]

  def _language_losses(self, params, groups, hidden_rows, phase, scales):
    """Losses of language groups from the hidden states of their rows."""
    total, metrics = jnp.zeros((), jnp.float32), {}
    for (names, selected, rows), hidden in zip(groups, hidden_rows):
      logits = self._apply(params, None, Unimo.lm_logits, hidden, rows["slots"])
      loss, m = language.masked_lm_loss(logits, rows["targets"], rows["weights"],
                                        self.obj.label_smoothing)
      if not selected:
        (name,) = names
        total += self.weights[name] * scales[name] * loss
        metrics.update(self._scaled(name, m, scales[name]))
        continue
      # the rows are those of names[phase]; the other objective reports NaN metrics
      for i, name in enumerate(names):
        scaled = self._scaled(name, m, scales[name])
        if i == phase:
          total += self.weights[name] * scales[name] * loss
          metrics.update(scaled)
        else:
          metrics.update({k: jnp.full_like(v, jnp.nan) for k, v in scaled.items()})
    return total, metrics

  @staticmethod
  def _scaled(name, m, scale) -> dict:
    out = {}
    for k, v in m.items():
      if k in DROPPED:
        continue
      out[f"{name}/{k}"] = (v if k in SUMMED else v * scale).astype(jnp.float32)
    return out

  # ---------------------------------------------------------------- masked region prediction
  def _mrp(self, params, batch, stream, visual_hidden, scale):
    cfg = self.cfg
    heads = self._apply(params, None, Unimo.region_heads, visual_hidden)
    if cfg.visual_input == "regions":
      target = batch[f"{stream}/region_features"]
      probs = batch.get(f"{stream}/region_class_probs") if self.obj.mrp_soft_labels else None
      classes = batch.get(f"{stream}/region_classes")
    else:
      target = visual.patch_targets(batch[f"{stream}/pixels"], cfg.patch_size,
                                    normalize=self.obj.mrp_normalize_patches)
      probs = classes = None
    loss, m = visual.region_prediction_loss(
        heads["features"], target, heads.get("class_logits"), region_mask(batch, stream, cfg),
        classes=classes, class_probs=probs, regression_weight=self.obj.mrp_regression_weight,
        class_weight=self.obj.mrp_class_weight,
        regression_reduction=self.obj.mrp_regression_reduction)
    if cfg.visual_input != "regions":  # patches have no classes: drop the constant-0 metrics
      m = {k: v for k, v in m.items() if not k.startswith("class_")}
    name = f"{stream}_mrp"
    return self.weights[name] * scale * loss, self._scaled(name, m, scale)

  # ---------------------------------------------------------------- CMCL
  def _cmcl_texts(self, batch):
    """Caption, positives (X+, X_T) and hard negatives (X-) of each pair: ids [B, T, L] and
    the groups ``(kind, count, valid [B, k])`` in order."""
    b = batch["pair/caption_ids"].shape[0]
    groups = [("caption", 1, jnp.ones((b, 1), bool))]
    ids = [batch["pair/caption_ids"][:, None]]
    for flag, ids_key, valid_key, kind in (
        ("use_positives", "pair/positive_ids", "pair/positive_valid", "pos"),
        ("use_related_texts", "pair/related_text_ids", "pair/related_text_valid", "pos"),
        ("use_negatives", "pair/negative_ids", "pair/negative_valid", "neg")):
      if self.cmcl[flag] and ids_key in batch and batch[ids_key].shape[1] > 0:
        groups.append((kind, batch[ids_key].shape[1], batch[valid_key].astype(bool)))
        ids.append(batch[ids_key])
    return jnp.concatenate(ids, axis=1), groups

  def _cmcl_loss(self, params, batch, text_emb, groups, image_emb, ki, scale):
    def pick(kind):
      cols, valid, start = [], [], 0
      for g_kind, k, g_valid in groups:
        if g_kind == kind:
          cols.append(text_emb[:, start:start + k])
          valid.append(g_valid)
        start += k
      if not cols:
        return None, None
      return jnp.concatenate(cols, axis=1), jnp.concatenate(valid, axis=1)

    c = self.cmcl
    pos, pos_valid = pick("pos")
    neg, neg_valid = pick("neg")
    log_t = params["cmcl"]["log_temperature"]
    if not c.learn_temperature:
      log_t = jax.lax.stop_gradient(log_t)
    loss, m = contrastive.cmcl_loss(
        image_emb[:, 0], text_emb[:, 0], log_temperature=log_t,
        pair_valid=batch["pair/row_valid"].astype(bool),
        positive_texts=pos, positive_texts_valid=pos_valid,
        negative_texts=neg, negative_texts_valid=neg_valid,
        positive_images=image_emb[:, 1:] if ki else None,
        positive_images_valid=batch["pair/related_valid"].astype(bool) if ki else None,
        mesh=self.mesh, implementation=c.implementation,
        temperature_range=(c.temperature_min, c.temperature_max))
    return self.weights["pair_cmcl"] * scale * loss, self._scaled("pair_cmcl", m, scale)

  # ---------------------------------------------------------------- the four encoder passes
  def _text_pass(self, params, batch, rng, names, scales, phase, det) -> list:
    """The text stream's language rows (span MLM and/or seq2seq) in one text encoding."""
    groups = self._language_groups(
        batch, [n for n in names if obj_lib.REGISTRY[n].stream == "text"], self.obj.text_mode,
        phase)
    if not groups:
      return []
    b = groups[0][2]["ids"].shape[0]
    ids = jnp.concatenate([g[2]["ids"] for g in groups], axis=0)
    bias = masks.to_bias(jnp.concatenate([g[2]["mask"] for g in groups], axis=0),
                         self.cfg.compute_dtype)
    pos = jnp.concatenate([g[2]["pos"] for g in groups], axis=0)
    hidden = self._apply(params, rng, Unimo.encode_text, ids, attention_bias=bias,
                         deterministic=det, positions=pos)["hidden"]
    return [self._language_losses(params, groups, [hidden[i * b:(i + 1) * b]
                                                   for i in range(len(groups))], phase, scales)]

  def _cmcl_text_pass(self, params, batch, rng, det):
    """CMCL texts (caption, positives, hard negatives) encoded alone: (embeddings [B, T, d],
    their groups)."""
    b = batch["pair/caption_ids"].shape[0]
    text_ids, text_groups = self._cmcl_texts(batch)
    t = text_ids.shape[1]
    cls = self._apply(params, rng, Unimo.encode_text, text_ids.reshape(b * t, -1),
                      deterministic=det)["cls"]
    text_emb = self._apply(params, None, Unimo.cmcl_text, cls).reshape(b, t, -1)
    return text_emb, text_groups

  def _image_pass(self, params, batch, rng, names, scales, cmcl_texts, det) -> list:
    """Image-stream MRP rows (masked) and the CMCL images (pair images + related images) in one
    image encoding; ``cmcl_texts`` is ``_cmcl_text_pass``'s result (None without CMCL)."""
    cfg = self.cfg
    parts, vmasks, sizes = [], [], []
    if "image_mrp" in names:
      parts.append(visual_inputs(batch, "image", cfg))
      vmasks.append(batch["image/visual_mask"])
      sizes.append(vmasks[-1].shape[0])
    ki = 0
    if cmcl_texts is not None:
      b = batch["pair/caption_ids"].shape[0]
      vis = visual_inputs(batch, "pair", cfg)
      if self.cmcl.use_related_images and "pair/related_valid" in batch:
        ki = batch["pair/related_valid"].shape[1]
      if ki:
        rel = visual_inputs(batch, "pair", cfg, related=True)
        vis = {k: jnp.concatenate([vis[k][:, None], rel[k].reshape((b, ki) + rel[k].shape[1:])],
                                  axis=1).reshape((b * (1 + ki),) + vis[k].shape[1:])
               for k in vis}
      parts.append(vis)
      vmasks.append(jnp.zeros((b * (1 + ki), batch["pair/visual_mask"].shape[1]), bool))
      sizes.append(b * (1 + ki))
    if not parts:
      return []
    out = self._apply(params, rng, Unimo.encode_image, _concat_visual(parts),
                      visual_mask=jnp.concatenate(vmasks, axis=0).astype(bool),
                      deterministic=det)
    results, start = [], 0
    if "image_mrp" in names:
      results.append(self._mrp(params, batch, "image", out["hidden"][:sizes[0], 1:],
                               scales["image_mrp"]))
      start = sizes[0]
    if cmcl_texts is not None:
      text_emb, text_groups = cmcl_texts
      image_emb = self._apply(params, None, Unimo.cmcl_image, out["img"][start:])
      results.append(self._cmcl_loss(params, batch, text_emb, text_groups,
                                     image_emb.reshape(b, 1 + ki, -1), ki, scales["pair_cmcl"]))
    return results

  def _pair_pass(self, params, batch, rng, names, scales, phase, det) -> list:
    """Pair MRP rows (clean caption, masked image) and the pair language rows (MLM and/or
    captioning) in one joint image+text encoding."""
    cfg = self.cfg
    pair_names = [n for n in names
                  if obj_lib.REGISTRY[n].stream == "pair" and _is_language(n)]
    if "pair_mrp" not in names and not pair_names:
      return []
    n_vis = 1 + (batch["pair/region_valid"].shape[1] if cfg.visual_input == "regions"
                 else cfg.num_patches)
    groups = self._language_groups(batch, pair_names, self.obj.pair_text_mode, phase, n_vis)
    b = batch["pair/caption_ids"].shape[0]
    ids, mask, pos, vm = [], [], [], []
    length = max([g[2]["ids"].shape[1] for g in groups] + (
        [batch["pair/caption_ids"].shape[1]] if "pair_mrp" in names else []))
    groups = [(g_names, sel, self._pad_rows(rows, length, rows["slots"].shape[1], n_vis))
              for g_names, sel, rows in groups]
    if "pair_mrp" in names:
      cap = batch["pair/caption_ids"]
      m = rows_lib.attention_mask("bidirectional", cap, cfg,
                                  image_valid=_visual_valid(batch, "pair", cfg, n_vis))
      t = n_vis + length
      ids.append(_pad_to(cap, length, 1, cfg.pad_id))
      mask.append(_pad_to(_pad_to(m, t, 1, 0), t, 2, 0))
      pos.append(_pad_to(rows_lib.positions(cap, cfg), length, 1, cfg.pad_position))
      vm.append(batch["pair/visual_mask"].astype(bool))
    for _, _, rows in groups:
      ids.append(rows["ids"])
      mask.append(rows["mask"])
      pos.append(rows["pos"])
      vm.append(jnp.zeros_like(batch["pair/visual_mask"], bool))
    k = len(ids)
    vis = visual_inputs(batch, "pair", cfg)
    out = self._apply(params, rng, Unimo.encode_pair, _concat_visual([vis] * k),
                      jnp.concatenate(ids, axis=0),
                      attention_bias=masks.to_bias(jnp.concatenate(mask, axis=0),
                                                   cfg.compute_dtype),
                      visual_mask=jnp.concatenate(vm, axis=0), deterministic=det,
                      positions=jnp.concatenate(pos, axis=0))
    results, first = [], 0
    if "pair_mrp" in names:
      results.append(self._mrp(params, batch, "pair", out["visual_hidden"][:b, 1:],
                               scales["pair_mrp"]))
      first = 1
    text_hidden = out["text_hidden"]
    results.append(self._language_losses(
        params, groups, [text_hidden[(first + i) * b:(first + i + 1) * b]
                         for i in range(len(groups))], phase, scales))
    return results

  def _by_phase(self, pass_fn, stream, names, phase, *args, deterministic):
    """``pass_fn(*args, phase, deterministic)``; when ``stream`` alternates its two language
    objectives and ``phase`` is traced, a ``lax.cond`` on it between the pass built for phase 0
    and for phase 1. Each branch encodes only its objective's rows (at their own length and
    prediction slots), so a step costs what its phase's objective costs; selecting the rows with
    ``where`` would pad both phases to the longer layout (e.g. MLM rows to the seq2seq rows'
    length and every-token prediction slots)."""
    mlm, s2s = obj_lib.language_objectives(stream)
    mode = self.obj[obj_lib.MODE_KEYS[stream]]
    if (isinstance(phase, int) or mode != "alternate" or mlm not in names
        or s2s not in names):
      return pass_fn(*args, phase, deterministic)
    return jax.lax.cond(phase == 0, lambda: pass_fn(*args, 0, deterministic),
                        lambda: pass_fn(*args, 1, deterministic))

  # ---------------------------------------------------------------- everything
  def __call__(self, params, batch: Batch, rng, names, scales, phase=0,
               deterministic: bool = False):
    """Weighted, scaled sum of the objectives ``names`` (alternating ones selected by
    ``phase``, a Python or traced int). Returns ``(loss, metrics)``.

    The passes run in a fixed order (text, CMCL texts, images, pairs), each with its own
    dropout key, and the losses are summed in that order."""
    names = tuple(names)
    keys = (jax.random.split(rng, 4) if rng is not None else [None] * 4)
    results = self._by_phase(self._text_pass, "text", names, phase, params, batch, keys[0],
                             names, scales, deterministic=deterministic)
    cmcl_texts = (self._cmcl_text_pass(params, batch, keys[1], deterministic)
                  if "pair_cmcl" in names else None)
    results += self._image_pass(params, batch, keys[2], names, scales, cmcl_texts, deterministic)
    results += self._by_phase(self._pair_pass, "pair", names, phase, params, batch, keys[3],
                              names, scales, deterministic=deterministic)
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for loss, m in results:
      total = total + loss
      metrics.update(m)
    return total, metrics
