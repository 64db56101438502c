"""Model inputs of language rows: position ids, visual validity and attention masks.

One construction for the train step (``unimo_objectives``) and the language evaluators
(``unimo_jax.evaluation.language``), so that a held-out loss is computed on exactly the inputs
training sees. Three layouts (``unimo_jax.masking`` builds their token rows):

  bidirectional  span MLM: text alone, or ``[IMG] v.. [CLS] w.. [SEP]`` with the image
  seq2seq        infilling: UniLM mask over ``segments`` (0 pad, 1 source, 2 target)
  captioning     ``[image block | text]``: the image sees itself, text the image and earlier text
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unimo_jax.model import ModelConfig, masks, text_positions

ATTENTIONS = ("bidirectional", "seq2seq", "captioning")


def positions(ids: jax.Array, cfg: ModelConfig, position_ids: jax.Array | None = None):
  """ids [B, L] -> position ids [B, L] int32.

  ``position_ids``: 0-based original-text positions from the data (infilling keeps a target's
  place in the text), shifted by the model's ``position_offset``; without them, consecutive
  positions over the real tokens (``text_positions``). Padding gets ``pad_position``.
  """
  if position_ids is None:
    return text_positions(ids, cfg)
  return jnp.where(ids != cfg.pad_id, position_ids + cfg.position_offset,
                   cfg.pad_position).astype(jnp.int32)


def visual_valid(batch_size: int, num_visual: int, region_valid: jax.Array | None = None):
  """[B, num_visual] bool: the [IMG] slot and the real regions (every patch is real)."""
  if region_valid is None:
    return jnp.ones((batch_size, num_visual), bool)
  rv = region_valid.astype(bool)
  return jnp.concatenate([jnp.ones_like(rv[:, :1]), rv], axis=1)


def attention_mask(attention: str, ids: jax.Array, cfg: ModelConfig, *,
                   segments: jax.Array | None = None, image_valid: jax.Array | None = None,
                   text_valid: jax.Array | None = None) -> jax.Array:
  """The 0/1 mask [B, T, T] of a language row (T = L, or N + L with an image block).

  Args:
    attention: one of ``ATTENTIONS``.
    ids: [B, L] token ids.
    cfg: the ModelConfig (pad id).
    segments: [B, L] seq2seq segments (``seq2seq`` only).
    image_valid: [B, N] validity of the image block (``visual_valid``); None = text alone
      (bidirectional only).
    text_valid: [B, L] the text tokens to attend over (default: ``ids != pad_id``).
  """
  if attention not in ATTENTIONS:
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
  if text_valid is None:
    text_valid = ids != cfg.pad_id
  if attention == "seq2seq":
    return masks.seq2seq(segments)
  if attention == "captioning":
    if image_valid is None:
      raise ValueError("a captioning row needs image_valid (its image block)")
    return masks.captioning(image_valid.shape[1], text_valid, image_valid)
  if image_valid is not None:
    return masks.bidirectional(jnp.concatenate([image_valid, text_valid], axis=1))
  return masks.bidirectional(text_valid)
