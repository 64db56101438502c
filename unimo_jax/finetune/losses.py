"""Fine-tuning losses: label / regression / soft-score / ranking objectives of UNIMO's tasks.

Every loss is written on the GLOBAL batch and returns SUMS plus the count that normalises them
(``loss_sum``, ``count``, and metric sums such as ``correct``), never a per-device mean: the
step divides by the global count, across gradient-accumulation micro-batches too. ``weights``
[B] is 1 for a real row and 0 for a padding row (a reader pads its last batch).

- ``classification``: softmax cross-entropy over C labels (GLUE, SNLI-VE), optional uniform
  label smoothing.
- ``regression``: squared error of one output (STS-B, ``num_labels = 1``).
- ``soft_binary_cross_entropy``: VQA answer classification against soft scores
  ``min(#annotators / 3, 1)`` (UNITER / Oscar practice), summed over the answer vocabulary and
  averaged over questions; ``vqa_score`` is the VQA accuracy of the argmax answer.
- ``circle_loss``: Sun et al. 2020 with one positive per row (UNIMO's Flickr30k recipe: margin
  0.2, scale 1.0, the weights alpha held constant in the backward pass); ``ranking`` combines
  the positive's score against its negative images and its negative captions (mean of the two
  circle losses), or a softmax over ``[positive, negatives]`` of each kind.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from unimo_jax.losses.language import log_softmax_f32

Array = jax.Array


def _w(weights, shape0):
  return (jnp.ones((shape0,), jnp.float32) if weights is None
          else jnp.asarray(weights).astype(jnp.float32))


def classification(logits: Array, labels: Array, weights: Array | None = None,
                   label_smoothing: float = 0.0) -> dict[str, Array]:
  """logits [B, C], labels [B] int, weights [B] -> dict(loss_sum, count, correct).

  Smoothing eps mixes the one-hot target with the uniform distribution over the C labels."""
  w = _w(weights, logits.shape[0])
  logp = log_softmax_f32(logits)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return dict(loss_sum=jnp.sum(nll * w), count=jnp.sum(w), correct=jnp.sum(correct * w))


def regression(predictions: Array, targets: Array, weights: Array | None = None
               ) -> dict[str, Array]:
  """predictions [B] (or [B, 1]), targets [B] float, weights [B] -> dict(loss_sum = sum of
  squared errors, count, abs_error_sum)."""
  p = predictions.reshape(predictions.shape[0]).astype(jnp.float32)
  t = targets.astype(jnp.float32)
  w = _w(weights, p.shape[0])
  err = p - t
  return dict(loss_sum=jnp.sum(err * err * w), count=jnp.sum(w),
              abs_error_sum=jnp.sum(jnp.abs(err) * w))


def vqa_score(logits: Array, scores: Array) -> Array:
  """VQA accuracy of the argmax answer: logits [B, A], soft scores [B, A] -> [B] in [0, 1]."""
  best = jnp.argmax(logits, axis=-1)
  return jnp.take_along_axis(scores.astype(jnp.float32), best[:, None], axis=-1)[:, 0]


def soft_binary_cross_entropy(logits: Array, scores: Array, weights: Array | None = None
                              ) -> dict[str, Array]:
  """Answer classification with soft targets.

  logits [B, A], scores [B, A] in [0, 1] (``min(#annotators/3, 1)`` per answer), weights [B].
  Per question: ``sum_a BCE(sigmoid(logit_a), score_a)`` (log-sigmoid form, stable for any
  logit). Returns dict(loss_sum, count, vqa_score_sum)."""
  x = logits.astype(jnp.float32)
  y = scores.astype(jnp.float32)
  w = _w(weights, x.shape[0])
  # -[y log s(x) + (1-y) log(1 - s(x))] = softplus(x) - y x
  per_row = jnp.sum(jax.nn.softplus(x) - y * x, axis=-1)
  return dict(loss_sum=jnp.sum(per_row * w), count=jnp.sum(w),
              vqa_score_sum=jnp.sum(vqa_score(x, y) * w))


def _masked_logsumexp(x: Array, valid: Array) -> Array:
  """logsumexp over the last axis of the valid entries (-inf-free; all-invalid -> very small)."""
  big = jnp.finfo(jnp.float32).min / 4
  x = jnp.where(valid, x, big)
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  s = jnp.sum(jnp.where(valid, jnp.exp(x - m), 0.0), axis=-1)
  return jnp.log(jnp.maximum(s, 1e-30)) + m[..., 0]


def circle_loss(positive: Array, negatives: Array, negative_valid: Array | None = None,
                margin: float = 0.2, scale: float = 1.0) -> Array:
  """Circle loss (Sun et al. 2020) of one positive score against N negative scores.

  positive [B], negatives [B, N], negative_valid [B, N] -> loss [B]:
    a_p = relu(1 + m - s_p), a_n = relu(s_n + m)   (constants in the backward pass)
    loss = softplus(logsumexp_n(scale a_n (s_n - m)) - scale a_p (s_p - (1 - m)))
  A row without any valid negative has only the positive term.
  """
  sp = positive.astype(jnp.float32)
  sn = negatives.astype(jnp.float32)
  valid = jnp.ones(sn.shape, bool) if negative_valid is None else negative_valid.astype(bool)
  ap = jax.lax.stop_gradient(jax.nn.relu(1.0 + margin - sp))
  an = jax.lax.stop_gradient(jax.nn.relu(sn + margin))
  logit_p = -scale * ap * (sp - (1.0 - margin))
  logit_n = scale * an * (sn - margin)
  lse_n = _masked_logsumexp(logit_n, valid)
  return jax.nn.softplus(lse_n + logit_p)


def softmax_ranking(positive: Array, negatives: Array, negative_valid: Array | None = None
                    ) -> Array:
  """-log softmax of the positive among [positive, valid negatives]: [B], [B, N] -> [B]."""
  sp = positive.astype(jnp.float32)[:, None]
  sn = negatives.astype(jnp.float32)
  valid = jnp.ones(sn.shape, bool) if negative_valid is None else negative_valid.astype(bool)
  allv = jnp.concatenate([jnp.ones_like(sp, bool), valid], axis=1)
  return _masked_logsumexp(jnp.concatenate([sp, sn], axis=1), allv) - sp[:, 0]


def ranking(positive: Array, negative_images: Array, negative_texts: Array,
            weights: Array | None = None, image_valid: Array | None = None,
            text_valid: Array | None = None, kind: str = "circle", margin: float = 0.2,
            scale: float = 1.0) -> dict[str, Array]:
  """Cross-encoder retrieval loss of each positive pair.

  positive [B] (the pair's score), negative_images [B, N] (the caption with other images),
  negative_texts [B, M] (the image with other captions); ``*_valid`` mask absent negatives.
  Per row: the mean of the loss against the image negatives and against the caption
  negatives (``kind`` "circle" or "softmax"). Returns dict(loss_sum, count, correct) where a
  row is correct when the positive outscores every valid negative of both kinds."""
  w = _w(weights, positive.shape[0])
  if kind == "circle":
    f = lambda n, v: circle_loss(positive, n, v, margin, scale)
  elif kind == "softmax":
    f = lambda n, v: softmax_ranking(positive, n, v)
  else:
    raise ValueError(f"ranking loss kind must be 'circle' or 'softmax', got {kind!r}")
  per_row = 0.5 * (f(negative_images, image_valid) + f(negative_texts, text_valid))
  big = jnp.finfo(jnp.float32).min

  def beaten(n, v):
    n = n.astype(jnp.float32)
    return jnp.max(jnp.where(jnp.ones(n.shape, bool) if v is None else v, n, big), axis=-1)
  best_neg = jnp.maximum(beaten(negative_images, image_valid), beaten(negative_texts, text_valid))
  correct = (positive.astype(jnp.float32) > best_neg).astype(jnp.float32)
  return dict(loss_sum=jnp.sum(per_row * w), count=jnp.sum(w), correct=jnp.sum(correct * w))


def in_batch_contrastive(image: Array, text: Array, negative_images: Array,
                         negative_texts: Array, weights: Array | None = None,
                         image_valid: Array | None = None, text_valid: Array | None = None,
                         temperature: float = 0.05) -> dict[str, Array]:
  """Symmetric InfoNCE of the dual encoder on a retrieval batch (CMCL's loss, fine-tuned).

  image, text [B, P]: the unit CMCL embeddings of row r's positive pair; negative_images
  [B, N, P], negative_texts [B, M, P]: those of its sampled negatives. Image anchor r ranks
  text r against every valid caption of the batch (the B positives and all B*M negatives);
  text anchor r ranks image r against the B positive images and all B*N negative images.
  Logits are cosines / ``temperature``. A padding row (weight 0) is neither an anchor nor a
  column, nor are its negatives; ``*_valid`` mask absent negatives. Returns
  dict(contrastive_sum, contrastive_correct): sums over anchors of the mean of the two
  directions' losses and of "both directions rank their positive first"."""
  w = _w(weights, image.shape[0])
  b, p = image.shape
  row = w > 0

  def direction(anchors, positives, negatives, negative_valid):
    k = negatives.shape[1]
    nv = jnp.ones((b, k), bool) if negative_valid is None else negative_valid.astype(bool)
    cols = jnp.concatenate([positives, negatives.reshape(b * k, p)], 0).astype(jnp.float32)
    cols_valid = jnp.concatenate([row, (nv & row[:, None]).reshape(-1)])
    logits = anchors.astype(jnp.float32) @ cols.T / temperature     # [B, B + B k]
    own = jnp.diagonal(logits[:, :b])
    loss = _masked_logsumexp(logits, cols_valid[None, :]) - own
    others = jnp.where(cols_valid[None, :] & ~jnp.eye(b, b + b * k, dtype=bool), logits,
                       jnp.finfo(jnp.float32).min)
    return loss, own > jnp.max(others, axis=1)

  l_i2t, c_i2t = direction(image, text, negative_texts, text_valid)
  l_t2i, c_t2i = direction(text, image, negative_images, image_valid)
  per_row = 0.5 * (l_i2t + l_t2i)
  both = (c_i2t & c_t2i).astype(jnp.float32)
  return dict(contrastive_sum=jnp.sum(per_row * w), contrastive_correct=jnp.sum(both * w))
