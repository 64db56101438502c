"""Output heads: tied LM head, region heads (masked region prediction), CMCL projections.

All heads return float32 (or wider) outputs so that losses are computed accurately under bf16.
"""
import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from unimo_jax.model.config import ModelConfig
from unimo_jax.model.layers import (HIDDEN_AXES, Dense, accumulation_dtype, add_bias, gelu,
                                    dense_product, layer_norm, use_dense_product,
                                    zeros_init)


def gather_positions(hidden, positions):
  """hidden [B, L, H], positions [B, P] int -> [B, P, H] (the rows the loss needs)."""
  return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


class Transform(nn.Module):
  """``LN(GELU(fc(H->H)(x)))``: the shared shape of BERT-style prediction heads."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = gelu(Dense(cfg, (cfg.hidden_size,), ("embed",), ("mlp",), name="dense")(x))
    # Pin the output to the hidden layout (batch-sharded, H whole). Left to propagation, XLA's
    # partitioner got the backward of `LN(gelu(x W)) @ E^T` wrong on a (data 2, fsdp 2,
    # tensor 2) mesh (gradients off by O(1) while the loss matched; tests/test_model_sharded.py).
    return nn.with_logical_constraint(layer_norm(cfg, "norm")(x), HIDDEN_AXES)


class LMHead(nn.Module):
  """UNIMO/RoBERTa LM head: ``Transform(h) @ word_table^T + bias`` (weights tied)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, embedding):
    """x [B, P, H], embedding [V, H] -> logits [B, P, V] in float32 (or wider)."""
    cfg = self.config
    x = Transform(cfg, name="transform")(x)
    acc = jnp.promote_types(accumulation_dtype(cfg), jnp.float32)
    if use_dense_product(x.dtype):
      # x [.., H] @ table^T as a projection onto [H, V]: its table gradient is then computed as
      # (x^T dlogits)^T, not written through the [P, V] cross-entropy gradient transposed
      logits = dense_product(x, embedding.astype(x.dtype).T, 1, acc)
    else:
      logits = lax.dot_general(x, embedding.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=acc)
    bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), cfg.weight_dtype)
    logits = add_bias(logits.astype(acc), bias.astype(acc))
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class RegionHeads(nn.Module):
  """Masked region prediction heads (UNITER's shape: Transform then fc).

  ``features``: regression to the visual input (F region features, or p*p*C patch pixels);
  ``class_logits``: detector classes C (regions only; patch mode has no classes).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    """x [B, N, H] -> dict(features [B, N, F|p*p*C], class_logits [B, N, C] (regions only))."""
    cfg = self.config
    acc = jnp.promote_types(cfg.compute_dtype, jnp.float32)
    out = {}
    h = Transform(cfg, name="feature_transform")(x)
    out["features"] = Dense(cfg, (cfg.visual_target_dim,), ("embed",), (None,),
                            out_dtype=acc, name="feature")(h)
    if cfg.visual_input == "regions":
      h = Transform(cfg, name="class_transform")(x)
      out["class_logits"] = Dense(cfg, (cfg.num_region_classes,), ("embed",), (None,),
                                  out_dtype=acc, name="classes")(h)
    return out


class Projection(nn.Module):
  """CMCL embedding: ``normalize(fc(relu(fc(h))))`` (UNIMO's ReLU pooler, then a projection)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    """x [B, H] -> [B, projection_dim], unit L2 norm, float32 (or wider)."""
    cfg = self.config
    acc = jnp.promote_types(cfg.compute_dtype, jnp.float32)
    pooled = nn.relu(Dense(cfg, (cfg.hidden_size,), ("embed",), ("mlp",), name="pooler")(x))
    z = Dense(cfg, (cfg.projection_dim,), ("mlp",), (None,), out_dtype=acc, name="projection")(
        pooled)
    # eps inside the sqrt keeps the gradient finite for an all-zero vector
    return z * lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)
