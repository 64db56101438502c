"""Language objectives: span MLM and seq2seq (infilling, captioning) token losses.

Both objectives score the LM head at a fixed number P of gathered positions per row
(`Unimo.lm_logits(hidden, positions)`), so a loss is a token cross-entropy over `[B, P, V]`
logits with a 0/1 weight per slot. The functions are written on the GLOBAL batch (the caller
jits them on sharded global arrays), so `sum(weights)` is the global number of targets: the loss
is normalised by it, never by a per-device mean. `loss_sum` and `count` are returned as well so
that gradient accumulation over micro-batches can renormalise by the total count.

Numerics: the log-softmax is computed in float32 whatever the logits' dtype (bf16 logits lose
the small probabilities otherwise), with the max subtracted first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def log_softmax_f32(logits: Array) -> Array:
  """Numerically stable log-softmax over the last axis, computed in float32."""
  x = logits.astype(jnp.float32)
  x = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  return x - jnp.log(jnp.sum(jnp.exp(x), axis=-1, keepdims=True))


def token_cross_entropy(logits: Array, targets: Array,
                        label_smoothing: float = 0.0) -> tuple[Array, Array]:
  """Per-token cross-entropy. logits [..., V], targets [...] int -> (loss [...], nll [...]) f32.

  With label smoothing eps the target distribution is (1 - eps) * onehot + eps / V (uniform over
  the whole vocabulary, as `optax.smooth_labels`), so
  loss = (1 - eps) * nll + eps * mean_v(-log p_v). `nll` is the unsmoothed -log p(target), the
  quantity to report as perplexity.
  """
  logp = log_softmax_f32(logits)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if not label_smoothing:
    return nll, nll
  uniform = -jnp.mean(logp, axis=-1)
  return (1.0 - label_smoothing) * nll + label_smoothing * uniform, nll


def _weighted_token_loss(logits: Array, targets: Array, weights: Array,
                         label_smoothing: float) -> tuple[Array, dict[str, Array]]:
  weights = weights.astype(jnp.float32)
  loss_tok, nll = token_cross_entropy(logits, targets, label_smoothing)
  count = jnp.sum(weights)
  # max(count, 1): an all-padding batch gives loss 0 and zero gradients, never NaN.
  denom = jnp.maximum(count, 1.0)
  loss_sum = jnp.sum(loss_tok * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  metrics = dict(
      loss=loss_sum / denom,
      loss_sum=loss_sum,
      nll_sum=jnp.sum(nll * weights),
      count=count,
      correct=correct,
      accuracy=correct / denom,
  )
  return metrics["loss"], metrics


def masked_lm_loss(logits: Array, targets: Array, weights: Array,
                   label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Span MLM loss over the masked positions.

  Args:
    logits: [B, P, V] LM-head logits at the masked positions (any float dtype).
    targets: [B, P] int original token ids.
    weights: [B, P] 1 for a real prediction, 0 for padding slots (and padding rows).
    label_smoothing: eps of the uniform label smoothing (0 = plain cross-entropy).

  Returns (loss, metrics): loss = sum(w * ce) / sum(w) (0 when sum(w) = 0); metrics hold
  loss, loss_sum, nll_sum (unsmoothed), count = sum(w), correct and accuracy (argmax match).
  """
  return _weighted_token_loss(logits, targets, weights, label_smoothing)


def seq2seq_loss(logits: Array, targets: Array, weights: Array,
                 label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """-log P(target | source) per target token, for infilling and captioning.

  Same contract as `masked_lm_loss`: logits [B, P, V] are the LM head at the teacher-forcing
  positions built by `unimo_jax.masking.infilling`/`captioning_layout` (position t predicts
  token t + 1, under the seq2seq or captioning attention mask), targets [B, P] the next tokens
  (fragment tokens and eos), weights [B, P]. Normalised by the global number of target tokens.
  """
  return _weighted_token_loss(logits, targets, weights, label_smoothing)


def renormalize(metrics_list: list[dict[str, Array]]) -> dict[str, Array]:
  """Combines the metrics of micro-batches: the loss over the TOTAL count, not a mean of means.

  With gradient accumulation, scale each micro-batch's gradient of `loss_sum` by
  1 / total count (the sum of `count`) to get the gradient of the combined loss.
  """
  total = {k: sum(m[k] for m in metrics_list)
           for k in ("loss_sum", "nll_sum", "count", "correct")}
  denom = jnp.maximum(total["count"], 1.0)
  total["loss"] = total["loss_sum"] / denom
  total["accuracy"] = total["correct"] / denom
  return total
