"""Attention masks as pure functions of validity / segment arrays.

Every builder returns a 0/1 int32 mask ``[B, Lq, Lk]`` (1 = query may attend to key);
``to_bias`` turns it into the additive bias the encoder takes, ``[B, 1, Lq, Lk]``.

- ``bidirectional(valid)``: every real token sees every real token (text alone, image alone, a
  pair read as one sequence).
- ``seq2seq(segments)`` (UniLM): 0 pad, 1 source, 2 target. Source sees the source; target sees
  the whole source and the target up to and including itself; the source never sees the target.
- ``captioning(num_visual, text_valid, visual_valid=None)``: the sequence ``[image block | text]``;
  the image block sees only (valid) image tokens; text sees the image and earlier text (causal).

Padded query rows are all zero. ``to_bias`` uses a large FINITE negative, so such a row softmaxes
to a uniform (finite, ignored) distribution instead of NaN.
"""
import jax.numpy as jnp


def _as_bool(x):
  return jnp.asarray(x) > 0


def bidirectional(valid):
  """valid [B, L] (bool/0-1) -> [B, L, L] int32: valid query x valid key."""
  v = _as_bool(valid)
  return (v[:, :, None] & v[:, None, :]).astype(jnp.int32)


def seq2seq(segments):
  """segments [B, L] with 0 pad, 1 source, 2 target -> UniLM mask [B, L, L] int32."""
  seg = jnp.asarray(segments)
  length = seg.shape[-1]
  q, k = seg[:, :, None], seg[:, None, :]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
  sees_source = (k == 1) & (q > 0)
  sees_target = (k == 2) & (q == 2) & causal
  return (sees_source | sees_target).astype(jnp.int32)


def captioning(num_visual: int, text_valid, visual_valid=None):
  """Mask over ``[visual (num_visual) | text (L)]``.

  Args:
    num_visual: length N of the image block ([IMG] + regions/patches).
    text_valid: [B, L] 1 for real text tokens.
    visual_valid: optional [B, N] 1 for real image tokens (padded regions are 0); default all 1.
  Returns:
    [B, N+L, N+L] int32: image rows see valid image keys only; a valid text row sees valid image
    keys and valid text keys at or before it; padded rows see nothing.
  """
  tv = _as_bool(text_valid)
  batch, length = tv.shape
  vv = (jnp.ones((batch, num_visual), bool) if visual_valid is None else _as_bool(visual_valid))
  valid = jnp.concatenate([vv, tv], axis=1)
  total = num_visual + length
  is_text = jnp.arange(total) >= num_visual
  idx = jnp.arange(total)
  # key j visible from query i: j is image, or (both text and j <= i)
  structure = (~is_text[None, :]) | (is_text[:, None] & is_text[None, :] & (idx[None, :] <= idx[:, None]))
  return (structure[None] & valid[:, :, None] & valid[:, None, :]).astype(jnp.int32)


def big_negative(dtype) -> float:
  """Large finite negative for masked logits: half of the dtype's lowest value, so that adding
  it to a logit (or to a second such bias) never overflows to -inf."""
  return float(jnp.finfo(jnp.dtype(dtype)).min) * 0.5


def to_bias(mask, dtype=jnp.float32):
  """0/1 mask [B, Lq, Lk] -> additive bias [B, 1, Lq, Lk] in ``dtype`` (0 or big negative)."""
  m = _as_bool(mask)
  return jnp.where(m, 0.0, big_negative(dtype)).astype(dtype)[:, None]
