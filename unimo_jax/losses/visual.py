"""Visual objective: masked region prediction (MRP), for region features and for patches.

UNIMO masks 15% of the regions (plus the regions overlapping them; see
`unimo_jax.masking.region_mask`), zeroes their input features, and asks the model to recover,
at each masked region, (1) its visual feature, by L2 regression `||fc(h_v) - v||^2`, and (2) its
detector class, by cross-entropy on the hard label or by KL to the detector's soft class
distribution. For patch inputs the regression target is the patch's own pixels, normalised per
patch as in MAE, and there is no class term.

Written on the global batch: every term is normalised by the GLOBAL number of masked regions
(`sum(mask)`), and `loss_sum`/`count` are returned for gradient accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from unimo_jax.losses.language import log_softmax_f32
from unimo_jax.model.embeddings import patchify as model_patchify

Array = jax.Array


def region_prediction_loss(pred_features: Array, target_features: Array,
                           class_logits: Array | None, mask: Array,
                           classes: Array | None = None, class_probs: Array | None = None, *,
                           regression_weight: float = 1.0, class_weight: float = 1.0,
                           regression_reduction: str = "sum") -> tuple[Array, dict[str, Array]]:
  """Masked region prediction loss.

  Args:
    pred_features: [B, N, F] regression head output at every region/patch slot (the [IMG]
      slot excluded: N regions, not 1 + N).
    target_features: [B, N, F] the ORIGINAL (unmasked) features, or `patch_targets(...)`.
    class_logits: [B, N, C] class head output, or None for no class term (patches).
    mask: [B, N] 1 where the region was masked (and is a real region), else 0.
    classes: [B, N] int hard detector labels (used when class_probs is None).
    class_probs: [B, N, C] the detector's class distribution; when given the class term is
      KL(class_probs || softmax(class_logits)), UNIMO's soft-label variant.
    regression_weight, class_weight: weights of the two terms.
    regression_reduction: "sum" = the paper's ||pred - v||^2 summed over the F features;
      "mean" = that divided by F (UNITER/MAE style, independent of the feature size).

  Returns (loss, metrics): loss = (regression_weight * sum_masked(l2) + class_weight *
  sum_masked(ce or kl)) / max(count, 1), count = sum(mask). metrics: loss, loss_sum, count,
  regression (mean per masked region), class_loss (mean per masked region; 0 without logits),
  class_accuracy (argmax vs the hard label, or vs the detector's argmax).
  """
  if regression_reduction not in ("sum", "mean"):
    raise ValueError(f"regression_reduction must be 'sum' or 'mean', got {regression_reduction}")
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask)
  denom = jnp.maximum(count, 1.0)

  diff = pred_features.astype(jnp.float32) - target_features.astype(jnp.float32)
  sq = jnp.sum(jnp.square(diff), axis=-1)
  if regression_reduction == "mean":
    sq = sq / diff.shape[-1]
  regression_sum = jnp.sum(sq * mask)

  class_sum = jnp.zeros((), jnp.float32)
  correct = jnp.zeros((), jnp.float32)
  if class_logits is not None:
    logq = log_softmax_f32(class_logits)
    if class_probs is not None:
      p = class_probs.astype(jnp.float32)
      # KL(p || q) = sum p log p - p log q; xlogy gives 0 log 0 = 0 for classes p leaves out.
      per_region = jnp.sum(xlogy(p, p) - p * logq, axis=-1)
      label = jnp.argmax(p, axis=-1)
    elif classes is not None:
      label = classes.astype(jnp.int32)
      per_region = -jnp.take_along_axis(logq, label[..., None], axis=-1)[..., 0]
    else:
      raise ValueError("class_logits given without classes or class_probs")
    class_sum = jnp.sum(per_region * mask)
    correct = jnp.sum((jnp.argmax(class_logits, axis=-1) == label) * mask)

  loss_sum = regression_weight * regression_sum + class_weight * class_sum
  metrics = dict(
      loss=loss_sum / denom,
      loss_sum=loss_sum,
      count=count,
      regression=regression_sum / denom,
      class_loss=class_sum / denom,
      class_accuracy=correct / denom,
  )
  return metrics["loss"], metrics


def patchify(pixels: Array, patch_size: int) -> Array:
  """[B, S, S, C] -> [B, N, p*p*C], patches row-major over the grid, (py, px, c) inside.

  The model's own patchify (its patch embedding's input), so targets and the model's N patch
  slots (and `visual_mask`) share one order by construction.
  """
  _, h, w, _ = pixels.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"image {h}x{w} is not divisible by patch size {patch_size}")
  return model_patchify(pixels, patch_size)


def patch_targets(pixels: Array, patch_size: int, normalize: bool = True,
                  eps: float = 1e-6) -> Array:
  """Regression targets for masked patches: [B, S, S, C] -> [B, N, p*p*C] float32.

  With `normalize` each patch is standardised by its own mean and variance over its p*p*C
  values, `(x - mean) / sqrt(var + eps)` (MAE's normalised-pixel target: better
  representations than raw pixels, and the target scale no longer depends on the image).
  """
  x = patchify(pixels.astype(jnp.float32), patch_size)
  if not normalize:
    return x
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def apply_visual_mask(inputs: Array, visual_mask: Array) -> Array:
  """Zeroes masked regions/patches: inputs [B, N, ...], visual_mask [B, N] (1 = masked).

  The model zeroes its own visual inputs when given `visual_mask`; this helper is for callers
  that prepare masked inputs themselves (e.g. region features before the model).
  """
  keep = 1 - visual_mask.astype(inputs.dtype)
  return inputs * keep.reshape(keep.shape + (1,) * (inputs.ndim - keep.ndim))
