"""Transformer building blocks: dense, LayerNorm, self-attention (with a key/value cache), FFN,
the encoder layer and the encoder stack.

Shapes: B batch, L query length, T key length (= L, or the cache length when decoding),
H hidden, h heads, d head width (H = h*d), M FFN width.

Numerics follow UNIMO/RoBERTa: post-LN ``x = LN(x + Dropout(sublayer(x)))`` (``pre_ln`` switches
to ``x = x + Dropout(sublayer(LN(x)))`` with a final LN), exact (erf) GELU, no dropout inside the
FFN, ``q *= d**-0.5``, additive attention bias, softmax in float32 (or wider).

Logical axis names (every parameter is boxed with ``nn.with_logical_partitioning``):
  parameters: ``embed`` (H), ``heads`` (h), ``kv`` (d), ``mlp`` (M, also the inner H of the
  head transforms/poolers), ``vocab`` (V), ``region_feature`` (F, region input), ``patch``
  (p*p*C, patch input); ``None`` for position rows, box (5), head outputs (F, C, projection).
  activations (``nn.with_logical_constraint``): ``batch``, ``length``, ``embed``, ``heads``,
  ``kv``, ``mlp``, ``vocab``.
The training job's rules map them to mesh axes; names absent from the rules are replicated.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from unimo_jax.model.config import ModelConfig

HIDDEN_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")
MLP_AXES = ("batch", "length", "mlp")


def kernel_init(config: ModelConfig, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(
      nn.initializers.truncated_normal(stddev=config.init_std), tuple(axes))


def zeros_init(axes: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def accumulation_dtype(config: ModelConfig):
  """dtype matmuls accumulate in: float32 (or wider) when ``f32_accumulate``, else compute."""
  if config.f32_accumulate:
    return jnp.promote_types(config.compute_dtype, jnp.float32)
  return config.compute_dtype


def gelu(x):
  """Exact (erf) GELU, as BERT/RoBERTa/UNIMO."""
  return jax.nn.gelu(x, approximate=False)


class Dense(nn.Module):
  """``y = x @ kernel + bias`` contracting the last ``len(in_axes)`` dims of ``x``.

  The kernel has shape ``x.shape[-k:] + features`` and logical names ``in_axes + out_axes``
  (e.g. the query projection: ``[H] -> [h, d]`` with names ``embed, heads, kv``). Inputs and
  kernel are cast to the compute dtype; accumulation is in ``accumulation_dtype``; the result is
  cast back to the compute dtype (or ``out_dtype``).
  """
  config: ModelConfig
  features: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]
  use_bias: bool = True
  out_dtype: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    k = len(self.in_axes)
    features = tuple(self.features)
    kernel = self.param("kernel", kernel_init(cfg, self.in_axes + self.out_axes),
                        tuple(x.shape[-k:]) + features, cfg.weight_dtype)
    dtype = cfg.compute_dtype
    contract = (tuple(range(x.ndim - k, x.ndim)), tuple(range(k)))
    y = lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())),
                        preferred_element_type=accumulation_dtype(cfg))
    if self.use_bias:
      bias = self.param("bias", zeros_init(self.out_axes), features, cfg.weight_dtype)
      y = y + bias.astype(y.dtype)
    return y.astype(self.out_dtype or dtype)


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  """LayerNorm over H with statistics in float32 (or wider) and the two-pass variance."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.compute_dtype,
      param_dtype=config.weight_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=zeros_init(("embed",)), name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention with an additive bias and an optional key/value cache."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, kv_cache=None, cache_index=None):
    """Attends ``x`` to itself (or to the cache after writing ``x``'s keys/values into it).

    Args:
      x: [B, L, H].
      bias: additive [B, 1|h, L, T] (``masks.to_bias``) or None (attend everywhere).
      deterministic: no attention dropout when True.
      kv_cache: None, or ``(k, v)`` each [B, T, h, d]: this step's keys/values are written at
        ``cache_index`` (positions ``cache_index .. cache_index+L-1``) and the queries attend to
        all T slots (the bias masks the empty ones).
      cache_index: int32 scalar, where to write.
    Returns:
      ``(out [B, L, H], (k, v))`` with k, v [B, T, h, d]: the full keys/values attended to (the
      updated cache when decoding).
    """
    cfg = self.config
    heads, d = cfg.num_heads, cfg.head_dim
    proj = lambda name: Dense(cfg, (heads, d), ("embed",), ("heads", "kv"), name=name)
    q = nn.with_logical_constraint(proj("query")(x), HEAD_AXES)
    k = nn.with_logical_constraint(proj("key")(x), HEAD_AXES)
    v = nn.with_logical_constraint(proj("value")(x), HEAD_AXES)
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      start = (0, cache_index, 0, 0)
      k = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
    acc = accumulation_dtype(cfg)
    softmax_dtype = jnp.promote_types(acc, jnp.float32)
    q = q * jnp.asarray(d ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype), preferred_element_type=acc)
    logits = logits.astype(softmax_dtype)
    if bias is not None:
      logits = logits + bias.astype(softmax_dtype)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    probs = nn.Dropout(cfg.attention_dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(probs.dtype), preferred_element_type=acc)
    out = nn.with_logical_constraint(out.astype(cfg.compute_dtype), HEAD_AXES)
    out = Dense(cfg, (cfg.hidden_size,), ("heads", "kv"), ("embed",), name="out")(out)
    return out, (k, v)


class MLP(nn.Module):
  """``fc(H->M) -> GELU -> fc(M->H)``, no inner dropout (UNIMO/RoBERTa)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = Dense(cfg, (cfg.mlp_dim,), ("embed",), ("mlp",), name="wi")(x)
    h = nn.with_logical_constraint(gelu(h), MLP_AXES)
    return Dense(cfg, (cfg.hidden_size,), ("mlp",), ("embed",), name="wo")(h)


class EncoderLayer(nn.Module):
  """One Transformer block (post-LN by default, pre-LN when ``config.pre_ln``)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, kv_cache=None, cache_index=None):
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    attention = SelfAttention(cfg, name="attention")
    attention_norm = layer_norm(cfg, "attention_norm")
    mlp, mlp_norm = MLP(cfg, name="mlp"), layer_norm(cfg, "mlp_norm")
    if cfg.pre_ln:
      a, kv = attention(attention_norm(x), bias, deterministic, kv_cache, cache_index)
      x = x + drop(a)
      x = x + drop(mlp(mlp_norm(x)))
    else:
      a, kv = attention(x, bias, deterministic, kv_cache, cache_index)
      x = attention_norm(x + drop(a))
      x = mlp_norm(x + drop(mlp(x)))
    return nn.with_logical_constraint(x, HIDDEN_AXES), kv


class Encoder(nn.Module):
  """``num_layers`` EncoderLayers (params ``layer_0 .. layer_{n-1}``), plus ``final_norm`` when
  ``pre_ln`` (post-LN has none, as UNIMO)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, cache=None, cache_index=None):
    """x [B, L, H], bias [B, 1|h, L, T] or None; cache None or ``(k, v)`` each
    [layers, B, T, h, d]. Returns ``(hidden [B, L, H], (k, v) each [layers, B, T, h, d])``."""
    cfg = self.config
    layer_cls = EncoderLayer
    if cfg.remat and cache is None:
      # argnum 0 is the module itself: (self, x, bias, deterministic, ...)
      layer_cls = nn.remat(EncoderLayer, static_argnums=(3,))
    keys, values = [], []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else (cache[0][i], cache[1][i])
      x, (k, v) = layer_cls(cfg, name=f"layer_{i}")(x, bias, deterministic, layer_cache,
                                                     cache_index)
      keys.append(k)
      values.append(v)
    if cfg.pre_ln:
      x = layer_norm(cfg, "final_norm")(x)
    return x, (jnp.stack(keys), jnp.stack(values))
