"""Cross-modal contrastive learning (CMCL), the multi-positive InfoNCE of UNIMO.

Written on the GLOBAL batch, as if there were one device (big_vision style): callers pass global
arrays (inside a jitted step, with the batch sharded over the mesh's batch axes) and this module
runs ``jax.shard_map`` on the batch axes internally. With ``mesh=None`` it computes unsharded.

Notation. B rows; row r is a pair (image_emb[r], text_emb[r]) with ``pair_valid[r]``. Every
embedding is assumed ALREADY L2-normalised (the model's ``cmcl_text`` / ``cmcl_image`` do it),
so a dot product is the cosine d(V, W). Logits are ``cos / tau``.

Columns. The text columns of the global batch are every valid caption, every valid extra
positive text (paraphrases X+, retrieved texts X_T) and every valid hard-negative text (X-) of
every row. The image columns are every valid image and every valid related image (X_I). Each
column has an owner: captions and extra positives belong to their row, hard negatives to nobody.
A row with ``pair_valid == 0`` (padding, text-only or image-only) is neither an anchor nor a
source of columns; its augmentations are ignored as well.

Loss. For image anchor i (a valid row)
  loss_i = logsumexp_{valid text columns c} l(i, c) - logsumexp_{text columns owned by i} l(i, c)
i.e. -log(sum over positives / sum over positives + all other columns), the positives being in
the denominator too. Symmetrically, caption anchor j uses the image columns (its image and its
related images are positives). ``loss = (mean_i loss_i + mean_j loss_j) / 2`` with means over the
GLOBAL number of valid anchors. Extra positive texts and hard negatives are columns only, never
anchors.

Implementations (``implementation=``):
- ``reference``: the dense [B, columns] computation on one device (also used when mesh is None).
- ``all_gather``: local anchors x all-gathered columns; memory O(local x global columns).
- ``ring``: columns travel by ``ppermute`` around the batch devices inside a ``lax.scan`` with a
  streaming logsumexp and a hand-written backward pass that recomputes each block
  (``contrastive_ring.py``); memory O(local x block).
All three give the same loss, gradients and metrics.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from unimo_jax.losses import contrastive_ring

# Logit given to masked entries: large and finite. -inf would turn the running logsumexp of a
# block with no valid entry into NaN (inf - inf).
FILL = -1e30

IMPLEMENTATIONS = ("all_gather", "ring", "reference")


def init_log_temperature(temperature: float = 0.07) -> jax.Array:
  """Initial value of the learnable log-temperature parameter (a float32 scalar)."""
  return jnp.asarray(math.log(temperature), jnp.float32)


def temperature(log_temperature, temperature_range=(0.001, 0.5)) -> jax.Array:
  """tau = clip(exp(log_temperature), *temperature_range); its gradient is 0 when clipped."""
  lo, hi = temperature_range
  return jnp.clip(jnp.exp(jnp.asarray(log_temperature, jnp.float32)), lo, hi)


class Columns(NamedTuple):
  """The columns one direction of the loss is computed against.

  emb: [n, d] embeddings; owner: [n] int32 global row whose positive the column is (-1: none);
  valid: [n] bool.
  """
  emb: jax.Array
  owner: jax.Array
  valid: jax.Array


def build_columns(primary, row_valid, row_ids, groups) -> Columns:
  """Stacks a direction's local columns.

  primary: [b, d] the rows' own embeddings (positive of their row); row_valid: [b] bool;
  row_ids: [b] int32 global row ids; groups: list of (emb [b, K, d], valid [b, K], positive: bool)
  extra columns per row (owned by the row when ``positive``, by nobody otherwise).
  """
  embs, owners, valids = [primary], [row_ids], [row_valid]
  for emb, valid, positive in groups:
    b, k, d = emb.shape
    embs.append(emb.reshape(b * k, d))
    owner = row_ids if positive else jnp.full_like(row_ids, -1)
    owners.append(jnp.repeat(owner, k))
    valids.append((valid & row_valid[:, None]).reshape(b * k))
  return Columns(jnp.concatenate(embs, 0), jnp.concatenate(owners, 0),
                 jnp.concatenate(valids, 0))


def _masked_lse(logits, mask):
  """logsumexp over the last axis restricted to ``mask``; FILL where the mask is empty.

  Gradient-safe: masked entries get zero gradient and an empty row gives no NaN.
  """
  x = jnp.where(mask, logits, FILL)
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1))
  s = jnp.sum(jnp.where(mask, jnp.exp(x - m[:, None]), 0.0), axis=-1)
  return m + jnp.log(jnp.where(s > 0, s, 1.0))


def dense_direction(anchors, anchor_ids, anchor_valid, cols: Columns, inv_tau):
  """One direction on a full column set: returns the local sums (see ``_finish_direction``).

  anchors: [b, d]; anchor_ids: [b] int32 global row ids; anchor_valid: [b] bool; inv_tau: scalar.
  """
  raw = jnp.dot(anchors, cols.emb.T, preferred_element_type=jnp.float32)
  logits = raw * inv_tau
  valid = jnp.broadcast_to(cols.valid[None, :], logits.shape)
  pos = valid & (cols.owner[None, :] == anchor_ids[:, None])
  lse_all = _masked_lse(logits, valid)
  lse_pos = _masked_lse(logits, pos)
  sg = jax.lax.stop_gradient(logits)
  stats = dict(
      max_all=jnp.max(jnp.where(valid, sg, FILL), axis=-1),
      max_pos=jnp.max(jnp.where(pos, sg, FILL), axis=-1),
      all_sum=jnp.sum(jnp.where(valid, sg, 0.0), axis=-1),
      all_count=jnp.sum(valid, axis=-1).astype(jnp.float32),
      pos_sum=jnp.sum(jnp.where(pos, sg, 0.0), axis=-1),
      pos_count=jnp.sum(pos, axis=-1).astype(jnp.float32))
  return _finish_direction(lse_all, lse_pos, anchor_valid, stats)


def _finish_direction(lse_all, lse_pos, anchor_valid, stats):
  """Per-anchor terms -> local sums {loss, anchors, correct, pos/neg logit sums and counts}.

  An anchor counts when it is valid and has at least one positive column (every valid pair has
  its own caption / image, so the second condition only guards against NaN).
  """
  ok = anchor_valid & (stats["pos_count"] > 0)
  okf = ok.astype(jnp.float32)
  return dict(
      loss=jnp.sum(jnp.where(ok, lse_all - lse_pos, 0.0)),
      anchors=jnp.sum(okf),
      # Top-1: the best column of the row is one of its positives (ties count as correct).
      correct=jnp.sum(jnp.where(ok & (stats["max_pos"] >= stats["max_all"]), 1.0, 0.0)),
      pos_sum=jnp.sum(okf * stats["pos_sum"]),
      pos_count=jnp.sum(okf * stats["pos_count"]),
      neg_sum=jnp.sum(okf * (stats["all_sum"] - stats["pos_sum"])),
      neg_count=jnp.sum(okf * (stats["all_count"] - stats["pos_count"])))


def _gather_columns(cols: Columns, axes) -> Columns:
  return Columns(*(jax.lax.all_gather(x, axes, axis=0, tiled=True) for x in cols))


def _local_cmcl(arrays, inv_tau, *, implementation, axes, num_shards):
  """CMCL on this device's rows; collectives over ``axes`` (empty: unsharded). Returns sums."""
  img, txt, pair_valid = arrays["image"], arrays["text"], arrays["pair_valid"]
  b = img.shape[0]
  offset = jax.lax.axis_index(axes) * b if axes else 0
  row_ids = (offset + jnp.arange(b)).astype(jnp.int32)

  text_groups, image_groups = [], []
  if "positive_texts" in arrays:
    text_groups.append((arrays["positive_texts"], arrays["positive_texts_valid"], True))
  if "negative_texts" in arrays:
    text_groups.append((arrays["negative_texts"], arrays["negative_texts_valid"], False))
  if "positive_images" in arrays:
    image_groups.append((arrays["positive_images"], arrays["positive_images_valid"], True))
  text_cols = build_columns(txt, pair_valid, row_ids, text_groups)
  image_cols = build_columns(img, pair_valid, row_ids, image_groups)

  sums = {}
  for name, anchors, cols in (("i2t", img, text_cols), ("t2i", txt, image_cols)):
    num_columns = jnp.sum(cols.valid.astype(jnp.float32))  # Local: summed over devices below.
    if implementation == "ring" and axes:
      sums[name] = contrastive_ring.ring_direction(
          anchors, row_ids, pair_valid, cols, inv_tau, axes=axes, num_shards=num_shards,
          finish=_finish_direction)
    else:
      if axes:
        cols = _gather_columns(cols, axes)
      sums[name] = dense_direction(anchors, row_ids, pair_valid, cols, inv_tau)
    sums[name]["columns"] = num_columns
  if axes:
    sums = jax.lax.psum(sums, axes)
  return sums


def _metrics(sums, tau):
  """Global sums -> (loss, metrics)."""
  out = {}
  for name in ("i2t", "t2i"):
    s = sums[name]
    n = jnp.maximum(s["anchors"], 1.0)
    out[f"loss_{name}"] = s["loss"] / n
    out[f"accuracy_{name}"] = s["correct"] / n
  loss = 0.5 * (out["loss_i2t"] + out["loss_t2i"])
  both = lambda k: sums["i2t"][k] + sums["t2i"][k]
  out["positive_logit"] = both("pos_sum") / jnp.maximum(both("pos_count"), 1.0)
  out["negative_logit"] = both("neg_sum") / jnp.maximum(both("neg_count"), 1.0)
  out["temperature"] = tau
  out["num_anchors"] = sums["i2t"]["anchors"]
  out["num_text_columns"] = sums["i2t"]["columns"]
  out["num_image_columns"] = sums["t2i"]["columns"]
  out = {k: jax.lax.stop_gradient(v) for k, v in out.items()}
  return loss, out


def _mesh_batch_axes(mesh, batch_axes) -> tuple[str, ...]:
  return tuple(a for a in batch_axes if a in mesh.axis_names)


def cmcl_loss(image_emb, text_emb, *, log_temperature, pair_valid,
              positive_texts=None, positive_texts_valid=None,
              negative_texts=None, negative_texts_valid=None,
              positive_images=None, positive_images_valid=None,
              mesh=None, batch_axes: Sequence[str] = ("data", "fsdp"),
              implementation: str = "all_gather", temperature_range=(0.001, 0.5)):
  """UNIMO's cross-modal contrastive loss on a global batch.

  Args:
    image_emb: [B, d] L2-normalised image embeddings (projected h[IMG]).
    text_emb: [B, d] L2-normalised caption embeddings (projected h[CLS]); row r pairs with
      image_emb[r].
    log_temperature: scalar parameter; tau = clip(exp(.), *temperature_range).
    pair_valid: [B] bool/0-1, the row has both an image and a caption.
    positive_texts: [B, Kp, d] extra positive texts of each image (X+ and X_T), or None.
    positive_texts_valid: [B, Kp] (default: all valid).
    negative_texts: [B, Kn, d] hard-negative texts (X-), or None.
    negative_texts_valid: [B, Kn].
    positive_images: [B, Ki, d] related images, extra positives of each caption (X_I), or None.
    positive_images_valid: [B, Ki].
    mesh: a jax Mesh (Auto axis types) to shard the loss over, or None for the unsharded
      computation. B must be divisible by the product of the batch axes' sizes.
    batch_axes: mesh axes the batch is sharded over (those absent from the mesh are ignored).
    implementation: "all_gather", "ring" or "reference" (unsharded, ignores the mesh).
    temperature_range: (min, max) clip of tau.

  Returns:
    (loss scalar, metrics) with metrics loss_i2t, loss_t2i, accuracy_i2t, accuracy_t2i (top-1:
    the row's best column is a positive), positive_logit / negative_logit (mean logit of
    positive / non-positive valid (anchor, column) pairs over both directions), temperature,
    num_anchors, num_text_columns, num_image_columns.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  B, d = image_emb.shape
  if text_emb.shape != (B, d):
    raise ValueError(f"text_emb {text_emb.shape} does not match image_emb {image_emb.shape}")
  arrays = dict(image=image_emb, text=text_emb, pair_valid=jnp.asarray(pair_valid).astype(bool))
  for name, emb, valid in (("positive_texts", positive_texts, positive_texts_valid),
                           ("negative_texts", negative_texts, negative_texts_valid),
                           ("positive_images", positive_images, positive_images_valid)):
    if emb is None:
      continue
    if emb.ndim != 3 or emb.shape[0] != B or emb.shape[2] != d:
      raise ValueError(f"{name} must be [B={B}, K, d={d}], got {emb.shape}")
    if emb.shape[1] == 0:  # Absent augmentation: no columns (and no zero-size collectives).
      continue
    valid = jnp.ones(emb.shape[:2], bool) if valid is None else jnp.asarray(valid).astype(bool)
    if valid.shape != emb.shape[:2]:
      raise ValueError(f"{name}_valid must be {emb.shape[:2]}, got {valid.shape}")
    arrays[name] = emb
    arrays[name + "_valid"] = valid

  tau = temperature(log_temperature, temperature_range)
  inv_tau = 1.0 / tau
  axes = () if mesh is None or implementation == "reference" else _mesh_batch_axes(mesh, batch_axes)
  if not axes:
    sums = _local_cmcl(arrays, inv_tau, implementation="reference", axes=(), num_shards=1)
    return _metrics(sums, tau)

  num_shards = math.prod(mesh.shape[a] for a in axes)
  if B % num_shards:
    raise ValueError(f"global batch {B} is not divisible by the {num_shards} batch shards")
  spec = P(axes)
  body = lambda arrays, inv_tau: _local_cmcl(
      arrays, inv_tau, implementation=implementation, axes=axes, num_shards=num_shards)
  sums = jax.shard_map(
      body, mesh=mesh, in_specs=({k: spec for k in arrays}, P()), out_specs=P(),
      check_vma=True)(arrays, inv_tau)
  return _metrics(sums, tau)
