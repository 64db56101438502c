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

import functools

import jax
import jax.numpy as jnp
import numpy as np

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

  The gradient is written out (``softmax - (1 - eps) onehot - eps / V`` per unit of loss, the
  one-hot an iota compare) instead of autodiff's, which scatters the gathered target back
  through a [..., V] zero broadcast: on the CPU that scatter and its broadcast cost as much as
  the softmax itself at vocabulary width.
  """
  return _cross_entropy(logits, targets.astype(jnp.int32), float(label_smoothing))


def _ce_forward(logits, targets, eps):
  x = logits.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  lse = m + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))
  target_logit = jnp.take_along_axis(x, targets[..., None], axis=-1)
  nll = (lse - target_logit)[..., 0]
  if not eps:
    return (nll, nll), (x, lse)
  uniform = (lse - jnp.mean(x, axis=-1, keepdims=True))[..., 0]
  return ((1.0 - eps) * nll + eps * uniform, nll), (x, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits, targets, eps):
  return _ce_forward(logits, targets, eps)[0]


def _cross_entropy_fwd(logits, targets, eps):
  out, (x, lse) = _ce_forward(logits, targets, eps)
  return out, (x, lse, targets, jnp.zeros((), logits.dtype))


def _cross_entropy_bwd(eps, res, g):
  x, lse, targets, like = res
  g_loss, g_nll = (a[..., None] for a in g)
  # d loss / d x = softmax - (1 - eps) onehot - eps / V ; d nll / d x = softmax - onehot
  onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == targets[..., None]
  dx = (jnp.exp(x - lse) * (g_loss + g_nll)
        - jnp.where(onehot, (1.0 - eps) * g_loss + g_nll, 0.0)
        - (eps / x.shape[-1]) * g_loss)
  return dx.astype(like.dtype), np.zeros(targets.shape, jax.dtypes.float0)


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _weighted_token_loss(logits: Array, targets: Array, weights: Array,
                         label_smoothing: float) -> tuple[Array, dict[str, Array]]:
  weights = weights.astype(jnp.float32)
  loss_tok, nll = token_cross_entropy(logits, targets, label_smoothing)
  count = jnp.sum(weights)
  # max(count, 1): an all-padding batch gives loss 0 and zero gradients, never NaN.
  denom = jnp.maximum(count, 1.0)
  loss_sum = jnp.sum(loss_tok * weights)
  # a target is correct when its logit is the largest (an argmax as a max and a gather: XLA's
  # CPU argmax, a variadic reduce over V, cost 0.1 s a step at vocabulary width); exact ties
  # with another token count as correct
  x = logits.astype(jnp.float32)
  hit = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0] >= jnp.max(
      x, axis=-1)
  correct = jnp.sum(hit * weights)
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
  loss, loss_sum, nll_sum (unsmoothed), count = sum(w), correct and accuracy (the target's
  logit is the largest).
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
