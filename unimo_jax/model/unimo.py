"""The unified-modal Transformer (UNIMO): one encoder for text, images and image-text pairs.

Sequences: text ``[CLS] w1..wN [SEP] PAD..``; image ``[IMG] v1..vN``; pair
``[IMG] v1..vN [CLS] w1..wN [SEP] PAD..`` (image first, as UNIMO). h[CLS] represents a text,
h[IMG] an image.

Use with ``model.apply(params, ..., method=Unimo.<entry point>)``:

  encode_text(ids [B,L], attention_bias=None, deterministic=True, positions=None,
              position_span=None) -> dict(hidden [B,L,H], cls [B,H])
  encode_image(visual, visual_mask=None, deterministic=True)
      -> dict(hidden [B,1+N,H], img [B,H], visual_valid [B,1+N])
  encode_pair(visual, ids, attention_bias=None, visual_mask=None, deterministic=True)
      -> dict(hidden [B,1+N+L,H], img, cls, text_hidden [B,L,H], visual_hidden [B,1+N,H],
              visual_valid [B,1+N])
  lm_logits(hidden [B,L,H], positions [B,P]) -> [B,P,V] float32 (tied head, only at positions)
  region_heads(hidden [B,N,H]) -> dict(features [B,N,F | p*p*C], class_logits [B,N,C] (regions))
  cmcl_text(cls [B,H]) / cmcl_image(img [B,H]) -> [B,projection_dim], unit L2 norm, float32
  prefill(max_decode_length, ids=None, visual=None, visual_mask=None,
          restart_positions=False) -> (outputs, cache)
  decode_step(ids [B], cache) -> (dict(logits [B,V], hidden [B,H]), cache)   (see decoding.py)

``visual`` is ``{"pixels": [B,S,S,C]}`` (patches) or ``{"region_features": [B,R,F],
"region_boxes": [B,R,5], "region_valid": [B,R]}`` (regions), per ``config.visual_input``.
Default attention is bidirectional over the real tokens; pass ``masks.to_bias(...)`` for
seq2seq / captioning. Dropout needs ``rngs={"dropout": key}`` when ``deterministic=False``.
``model.init(rng, visual, ids)`` (``__call__``) creates every parameter; ``init_variables``
does it with dummy inputs.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimo_jax.model import decoding, masks
from unimo_jax.model.config import ModelConfig
from unimo_jax.model.embeddings import PatchEmbedding, RegionEmbedding, TextEmbedding
from unimo_jax.model.heads import LMHead, Projection, RegionHeads, gather_positions
from unimo_jax.model.layers import Encoder

REGION_KEYS = ("region_features", "region_boxes", "region_valid")


class Unimo(nn.Module):
  """UNIMO encoder + heads. Parameters (top level): text_embed, patch_embed | region_embed,
  encoder, lm_head, region_head, text_projection, image_projection."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.text_embed = TextEmbedding(cfg)
    if cfg.visual_input == "regions":
      self.region_embed = RegionEmbedding(cfg)
    else:
      self.patch_embed = PatchEmbedding(cfg)
    self.encoder = Encoder(cfg)
    self.lm_head = LMHead(cfg)
    self.region_head = RegionHeads(cfg)
    self.text_projection = Projection(cfg)
    self.image_projection = Projection(cfg)

  # ------------------------------------------------------------------ embeddings
  def _check_text(self, length: int, extra: int = 0):
    limit = self.config.max_text_length
    if length + extra > limit:
      raise ValueError(f"text length {length} (+{extra} decoded) exceeds the position "
                       f"table ({limit} tokens; ModelConfig.max_positions)")

  def _check_span(self, span: int, what: str):
    limit = self.config.max_text_length
    if span > limit:
      raise ValueError(f"{what} uses {span} text positions, more than the position table's "
                       f"{limit} (ModelConfig.max_positions)")

  def embed_text(self, ids, positions=None, deterministic: bool = True,
                 position_span: int | None = None):
    """ids [B, L] -> [B, L, H].

    ``position_span`` (static) goes with explicit ``positions`` whose layout restarts them
    (seq2seq: the target counts from 0 again): the number of distinct text positions the
    layout can use, checked against the table instead of the length L."""
    if position_span is None:
      self._check_text(ids.shape[-1])
    else:
      if positions is None:
        raise ValueError("position_span needs explicit positions")
      self._check_span(int(position_span), f"a layout of {ids.shape[-1]} tokens")
    return self.text_embed(ids, positions, deterministic)

  def embed_visual(self, visual: dict, visual_mask=None, deterministic: bool = True):
    """visual dict -> (embeddings [B, 1+N, H], valid [B, 1+N] bool)."""
    cfg = self.config
    if cfg.visual_input == "regions":
      missing = [k for k in REGION_KEYS if k not in visual]
      if missing:
        raise ValueError(f"visual_input='regions' needs {REGION_KEYS}; missing {missing}")
      return self.region_embed(visual["region_features"], visual["region_boxes"],
                               visual["region_valid"], visual_mask, deterministic)
    if "pixels" not in visual:
      raise ValueError("visual_input='patches' needs visual['pixels'] [B, S, S, C]")
    return self.patch_embed(visual["pixels"], visual_mask, deterministic)

  # ------------------------------------------------------------------ encoders
  def encode_text(self, ids, attention_bias=None, deterministic: bool = True, positions=None,
                  position_span: int | None = None):
    """Text alone. ids [B, L]; attention_bias [B, 1|h, L, L] or None (bidirectional over
    non-pad tokens); ``positions`` / ``position_span`` as ``embed_text``. Returns
    dict(hidden [B, L, H], cls [B, H])."""
    x = self.embed_text(ids, positions, deterministic, position_span)
    if attention_bias is None:
      attention_bias = masks.to_bias(masks.bidirectional(ids != self.config.pad_id), x.dtype)
    hidden, _ = self.encoder(x, attention_bias, deterministic)
    return dict(hidden=hidden, cls=hidden[:, 0])

  def encode_image(self, visual: dict, visual_mask=None, deterministic: bool = True):
    """Image alone, bidirectional over valid visual tokens. Returns dict(hidden [B, 1+N, H],
    img [B, H], visual_valid [B, 1+N])."""
    x, valid = self.embed_visual(visual, visual_mask, deterministic)
    bias = masks.to_bias(masks.bidirectional(valid), x.dtype)
    hidden, _ = self.encoder(x, bias, deterministic)
    return dict(hidden=hidden, img=hidden[:, 0], visual_valid=valid)

  def encode_pair(self, visual: dict, ids, attention_bias=None, visual_mask=None,
                  deterministic: bool = True, positions=None):
    """Image then text as one sequence ``[IMG] v.. [CLS] w.. [SEP]``.

    attention_bias [B, 1|h, 1+N+L, 1+N+L] or None (bidirectional over valid tokens); for
    captioning use ``masks.to_bias(masks.captioning(1+N, text_valid, visual_valid))``.
    Returns dict(hidden [B, 1+N+L, H], img [B, H], cls [B, H], text_hidden [B, L, H],
    visual_hidden [B, 1+N, H], visual_valid [B, 1+N]).
    """
    xv, vvalid = self.embed_visual(visual, visual_mask, deterministic)
    xt = self.embed_text(ids, positions, deterministic)
    x = jnp.concatenate([xv, xt.astype(xv.dtype)], axis=1)
    if attention_bias is None:
      valid = jnp.concatenate([vvalid, ids != self.config.pad_id], axis=1)
      attention_bias = masks.to_bias(masks.bidirectional(valid), x.dtype)
    hidden, _ = self.encoder(x, attention_bias, deterministic)
    n = xv.shape[1]
    return dict(hidden=hidden, img=hidden[:, 0], cls=hidden[:, n], text_hidden=hidden[:, n:],
                visual_hidden=hidden[:, :n], visual_valid=vvalid)

  # ------------------------------------------------------------------ heads
  def lm_logits(self, hidden, positions):
    """hidden [B, L, H], positions [B, P] -> logits [B, P, V] (float32), computed only at the
    P gathered positions."""
    return self.lm_head(gather_positions(hidden, positions), self.text_embed.embedding_table())

  def region_heads(self, hidden):
    """hidden [B, N, H] -> dict(features [B, N, F | p*p*C], class_logits [B, N, C] (regions))."""
    return self.region_head(hidden)

  def cmcl_text(self, cls):
    """h[CLS] [B, H] -> L2-normalised [B, projection_dim]."""
    return self.text_projection(cls)

  def cmcl_image(self, img):
    """h[IMG] [B, H] -> L2-normalised [B, projection_dim]."""
    return self.image_projection(img)

  def __call__(self, visual: dict, ids, deterministic: bool = True):
    """Touches every parameter (used by ``init``): pair encoding, every head, both
    projections. Returns a dict of their outputs."""
    out = self.encode_pair(visual, ids, deterministic=deterministic)
    first = jnp.zeros((ids.shape[0], 1), jnp.int32)
    return dict(
        lm_logits=self.lm_logits(out["text_hidden"], first),
        region=self.region_heads(out["visual_hidden"][:, 1:]),
        text_embedding=self.cmcl_text(out["cls"]),
        image_embedding=self.cmcl_image(out["img"]),
    )

  # ------------------------------------------------------------------ decoding
  def prefill(self, max_decode_length: int, ids=None, visual=None, visual_mask=None,
              restart_positions: bool = False):
    """Encodes a prefix once (image block and/or a padded text source, bidirectional among
    its valid tokens) and returns ``(dict(hidden [B, S, H]), cache)`` with room for
    ``max_decode_length`` more tokens. See ``decoding.py``.

    ``restart_positions``: decoded tokens count their positions from 0 again (UNIMO's seq2seq
    targets) instead of continuing after the source, so the source and the decoded tokens
    are each checked against the position table, not their sum."""
    if ids is None and visual is None:
      raise ValueError("prefill needs ids and/or visual")
    parts, valid = [], []
    text_count = None
    if visual is not None:
      xv, vv = self.embed_visual(visual, visual_mask, True)
      parts.append(xv)
      valid.append(vv)
    if ids is not None:
      if restart_positions:
        self._check_text(ids.shape[-1])
        self._check_span(max_decode_length, f"decoding {max_decode_length} tokens")
      else:
        self._check_text(ids.shape[-1], max_decode_length)
      real = ids != self.config.pad_id
      parts.append(self.text_embed(ids, None, True))
      valid.append(real)
      text_count = real.sum(-1).astype(jnp.int32)
    else:
      self._check_text(0, max_decode_length)
    x = jnp.concatenate([p.astype(parts[0].dtype) for p in parts], axis=1)
    valid = jnp.concatenate(valid, axis=1)
    if text_count is None:
      text_count = jnp.zeros((x.shape[0],), jnp.int32)
    bias = masks.to_bias(masks.bidirectional(valid), x.dtype)
    hidden, (k, v) = self.encoder(x, bias, True, return_kv=True)
    if restart_positions:  # the first decoded token (bos) takes the first text position
      text_count = jnp.zeros_like(text_count)
    cache = decoding.cache_from_prefix(self.config, k, v, valid, text_count, max_decode_length)
    return dict(hidden=hidden), cache

  def decode_step(self, ids, cache: dict, positions=None):
    """One token per row: ids [B] int -> (dict(logits [B, V] float32 for the NEXT token,
    hidden [B, H]), updated cache). Eval mode (no dropout). ``positions`` [B] overrides the
    cache's running text position (for layouts whose targets reuse source positions); the
    running position still advances by one."""
    cfg = self.config
    index = cache["index"]
    pos = cache["position"] if positions is None else jnp.asarray(positions, jnp.int32)
    x = self.text_embed(ids[:, None], pos[:, None], True)
    valid = jax.lax.dynamic_update_slice(
        cache["valid"], jnp.ones((ids.shape[0], 1), bool), (0, index))
    bias = masks.to_bias(valid[:, None, :], x.dtype)
    hidden, (k, v) = self.encoder(x, bias, True, cache=(cache["k"], cache["v"]),
                                  cache_index=index)
    logits = self.lm_head(hidden, self.text_embed.embedding_table())[:, 0]
    new_cache = dict(k=k.astype(cfg.compute_dtype), v=v.astype(cfg.compute_dtype), valid=valid,
                     index=index + 1, position=cache["position"] + 1)
    return dict(logits=logits, hidden=hidden[:, 0]), new_cache


# ---------------------------------------------------------------------- helpers
def dummy_visual(config: ModelConfig, batch_size: int = 1, num_regions: int = 4) -> dict:
  """Zero visual inputs of the right structure (for init / eval_shape)."""
  if config.visual_input == "regions":
    return dict(
        region_features=jnp.zeros((batch_size, num_regions, config.region_feature_dim)),
        region_boxes=jnp.zeros((batch_size, num_regions, 5)),
        region_valid=jnp.ones((batch_size, num_regions), bool))
  s = config.image_size
  return dict(pixels=jnp.zeros((batch_size, s, s, config.num_channels)))


def init_variables(config: ModelConfig, rng, batch_size: int = 1, text_length: int = 4):
  """``{"params": ...}`` with ``nn.LogicallyPartitioned`` boxes (``nn.unbox`` for plain arrays;
  ``nn.get_partition_spec`` for the logical specs). Cheap under ``jax.eval_shape``."""
  ids = jnp.full((batch_size, text_length), config.cls_id, jnp.int32)
  return Unimo(config).init(rng, dummy_visual(config, batch_size), ids)


def init_params(config: ModelConfig, rng):
  """Plain (unboxed) parameter tree, initialised by one compiled program (op-by-op init of a
  few dozen differently shaped truncated normals compiles each one separately: much slower)."""
  return jax.jit(lambda r: nn.unbox(init_variables(config, r))["params"])(rng)


def visual_length(config: ModelConfig, num_regions: int | None = None) -> int:
  """1 + N: the image block's length ([IMG] + patches, or [IMG] + ``num_regions``)."""
  if config.visual_input == "regions":
    if num_regions is None:
      raise ValueError("regions: visual_length needs num_regions")
    return 1 + num_regions
  return 1 + config.num_patches
