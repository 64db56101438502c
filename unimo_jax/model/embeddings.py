"""Input embeddings: text, detector regions, image patches. Each has its own LayerNorm.

- Text: ``word[ids] + position[pos]`` (no token types), LN, dropout. Positions count real
  (non-pad) tokens: ``offset + #real tokens before``, pads at ``pad_position`` (RoBERTa:
  offset 2, pad 1). The word table is tied to the LM head (``TextEmbedding.embedding_table``).
- Regions (UNIMO): ``fc(F->H)(feature) + fc(5->H)(box)``, LN, dropout, no positions. Slot 0 is
  [IMG]: the mean feature of the kept (valid, unmasked) regions with box ``[0, 0, 1, 1, 1]``.
- Patches (ViT): ``fc(p*p*C -> H)`` of each non-overlapping patch (= a stride-p convolution) plus a
  learned position table of ``1 + N`` rows (row 0 for [IMG]), or with
  ``patch_positions="sincos2d"`` a fixed 2-D sine-cosine table of the patch grid and one learned
  [IMG] row; slot 0 is the mean of the kept patch embeddings (or a learned vector with
  ``image_token="learned"``).

Masked-region prediction zeroes the masked regions' features / patches' pixels (``visual_mask``
1 = masked) before the projection, and keeps them out of the [IMG] mean so it leaks nothing.
"""
import flax.linen as nn
import jax.numpy as jnp

from unimo_jax.model.config import ModelConfig
from unimo_jax.model.dropout import Dropout
from unimo_jax.model.layers import HIDDEN_AXES, Dense, kernel_init, layer_norm


def text_positions(ids, config: ModelConfig):
  """ids [B, L] -> position ids [B, L]: real tokens ``offset, offset+1, ...`` in order, pads at
  ``pad_position``. Padding inside the sequence (between a source and a target) is skipped."""
  real = ids != config.pad_id
  count = jnp.cumsum(real.astype(jnp.int32), axis=-1) - 1
  return jnp.where(real, config.position_offset + count, config.pad_position).astype(jnp.int32)


def patchify(pixels, patch_size: int):
  """[B, S, S, C] -> [B, N, p*p*C], patches in row-major grid order, pixels (row, col, channel)
  inside a patch. Also the regression target layout of patch-mode masked region prediction."""
  b, s, s2, c = pixels.shape
  g, g2 = s // patch_size, s2 // patch_size
  x = pixels.reshape(b, g, patch_size, g2, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * g2, patch_size * patch_size * c)


def sincos_2d(grid: int, width: int, temperature: float = 10_000.0):
  """Fixed position table [grid*grid, width] of a row-major patch grid (big_vision's sincos2d).

  Each quarter of the width is sin(x w), cos(x w), sin(y w), cos(y w) with x the column, y the
  row and w = temperature^(-k / (width/4 - 1)), k = 0..width/4-1.
  """
  if width % 4:
    raise ValueError(f"sincos2d positions need hidden_size divisible by 4, got {width}")
  y, x = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
  quarter = width // 4
  omega = 1.0 / temperature ** (jnp.arange(quarter) / max(quarter - 1, 1))
  xw = x.reshape(-1, 1) * omega[None]
  yw = y.reshape(-1, 1) * omega[None]
  return jnp.concatenate([jnp.sin(xw), jnp.cos(xw), jnp.sin(yw), jnp.cos(yw)], axis=1)


def _input_dtype(config: ModelConfig):
  """Raw visual inputs stay at least float32 until the first projection (means, zeroing)."""
  return jnp.promote_types(config.compute_dtype, jnp.float32)


def _kept_mean(x, keep):
  """Mean of x [B, N, D] over rows where keep [B, N]; zero when nothing is kept."""
  w = keep.astype(x.dtype)[..., None]
  return (x * w).sum(1) / jnp.maximum(w.sum(1), 1)


class TextEmbedding(nn.Module):
  """Word + position embedding, LN, dropout; also owns the tied output table."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.word = self.param("word", kernel_init(cfg, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)
    self.position = self.param("position", kernel_init(cfg, (None, "embed")),
                               (cfg.max_positions, cfg.hidden_size), cfg.weight_dtype)
    self.norm = layer_norm(cfg, "norm")
    self.dropout = Dropout(cfg.dropout_rate)

  def __call__(self, ids, positions=None, deterministic: bool = True):
    """ids [B, L] int -> [B, L, H]. ``positions`` [B, L] overrides ``text_positions(ids)``.
    Out-of-range ids/positions are clipped (the callers check lengths statically)."""
    cfg = self.config
    if positions is None:
      positions = text_positions(ids, cfg)
    x = (jnp.take(self.word, ids, axis=0, mode="clip")
         + jnp.take(self.position, positions, axis=0, mode="clip"))
    x = self.norm(x.astype(cfg.compute_dtype))
    x = self.dropout(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, HIDDEN_AXES)

  def embedding_table(self):
    """The word table [V, H] (for the tied LM head)."""
    return self.word


class RegionEmbedding(nn.Module):
  """Detector regions -> ``[IMG] v1..vR`` embeddings [B, 1+R, H] (UNIMO's image_emb/image_loc)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, features, boxes, valid, visual_mask=None, deterministic: bool = True):
    """features [B, R, F], boxes [B, R, 5] (x1/W, y1/H, x2/W, y2/H, area), valid [B, R],
    visual_mask [B, R] or None (1 = masked: feature zeroed). Returns (emb [B, 1+R, H],
    valid [B, 1+R] bool)."""
    cfg = self.config
    dtype = _input_dtype(cfg)
    valid = valid > 0
    keep = valid if visual_mask is None else valid & ~(visual_mask > 0)
    features = jnp.where(keep[..., None], features, 0).astype(dtype)
    boxes = jnp.where(valid[..., None], boxes, 0).astype(dtype)
    b = features.shape[0]
    img_feature = _kept_mean(features, keep)[:, None]
    img_box = jnp.broadcast_to(jnp.asarray([0, 0, 1, 1, 1], dtype), (b, 1, 5))
    features = jnp.concatenate([img_feature, features], axis=1)
    boxes = jnp.concatenate([img_box, boxes], axis=1)
    x = (Dense(cfg, (cfg.hidden_size,), ("region_feature",), ("embed",), name="feature")(features)
         + Dense(cfg, (cfg.hidden_size,), (None,), ("embed",), name="box")(boxes))
    x = layer_norm(cfg, "norm")(x)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
    return nn.with_logical_constraint(x, HIDDEN_AXES), valid


class PatchEmbedding(nn.Module):
  """Raw pixels -> ``[IMG] p1..pN`` embeddings [B, 1+N, H] (ViT patch embedding)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, pixels, visual_mask=None, deterministic: bool = True):
    """pixels [B, S, S, C] float, visual_mask [B, N] or None (1 = masked: patch pixels zeroed).
    Returns (emb [B, 1+N, H], valid [B, 1+N] all True)."""
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"pixels must be [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                       f"(ModelConfig.image_size/num_channels), got {tuple(pixels.shape)}")
    patches = patchify(pixels.astype(_input_dtype(cfg)), cfg.patch_size)
    b, n, _ = patches.shape
    keep = jnp.ones((b, n), bool) if visual_mask is None else ~(visual_mask > 0)
    patches = jnp.where(keep[..., None], patches, 0)
    x = Dense(cfg, (cfg.hidden_size,), ("patch",), ("embed",), name="patch")(patches)
    if cfg.image_token == "mean":
      img = _kept_mean(x, keep)[:, None]
    else:
      token = self.param("image_token", kernel_init(cfg, ("embed",)), (cfg.hidden_size,),
                         cfg.weight_dtype)
      img = jnp.broadcast_to(token.astype(x.dtype), (b, 1, cfg.hidden_size))
    if cfg.patch_positions == "sincos2d":
      img_position = self.param("img_position", kernel_init(cfg, (None, "embed")),
                                (1, cfg.hidden_size), cfg.weight_dtype)
      grid = cfg.image_size // cfg.patch_size
      position = jnp.concatenate([img_position.astype(jnp.float32),
                                  sincos_2d(grid, cfg.hidden_size)], axis=0)
    else:
      position = self.param("position", kernel_init(cfg, (None, "embed")),
                            (1 + n, cfg.hidden_size), cfg.weight_dtype)
    x = jnp.concatenate([img, x], axis=1) + position.astype(x.dtype)[None]
    x = layer_norm(cfg, "norm")(x)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, HIDDEN_AXES), jnp.ones((b, 1 + n), bool)
