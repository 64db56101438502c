"""Language metrics on held-out text: span-MLM accuracy and perplexity, seq2seq (infilling) loss,
and the captioning loss of reference captions given their image.

Each ``*_rows`` function is jit-able and returns per-row sums ([B] float32) so that the runner
can drop padding rows and accumulate (sum, count) pairs over a whole split; ``finalize`` turns
the totals into metrics. Batches carry the layouts of ``unimo_jax.masking`` (built by the eval
data loader): ``mlm_*`` (span MLM), ``s2s_*`` (infilling, UniLM mask, original-text position
ids), ``cap_*`` (captioning layout; the image is the source). Positions and attention masks come
from ``unimo_jax.train.rows``, the construction the train step uses.
"""
import math
from typing import Mapping

import jax
import jax.numpy as jnp

from unimo_jax.evaluation.retrieval import VISUAL_KEYS
from unimo_jax.model import Unimo, masks, visual_length
from unimo_jax.train import rows as rows_lib


def _token_sums(logits, targets, weights) -> dict:
  """logits [B, P, V], targets [B, P], weights [B, P] -> per-row nll / correct / count [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"nll": jnp.sum(nll * w, -1), "correct": jnp.sum(correct * w, -1),
          "count": jnp.sum(w, -1)}


def _prefixed(prefix, sums):
  return {f"{prefix}_{k}": v for k, v in sums.items()}


def _bias(mask, cfg):
  return masks.to_bias(mask, cfg.compute_dtype)


def mlm_rows(model, params, batch: Mapping) -> dict:
  """Span MLM on text alone: ``mlm_ids`` [B, L], ``mlm_positions|targets|weights`` [B, P]."""
  cfg = model.config
  v = {"params": params}
  ids = batch["mlm_ids"]
  bias = _bias(rows_lib.attention_mask("bidirectional", ids, cfg), cfg)
  hidden = model.apply(v, ids, attention_bias=bias, positions=rows_lib.positions(ids, cfg),
                       method=Unimo.encode_text)["hidden"]
  logits = model.apply(v, hidden, batch["mlm_positions"], method=Unimo.lm_logits)
  return _prefixed("mlm", _token_sums(logits, batch["mlm_targets"], batch["mlm_weights"]))


def s2s_rows(model, params, batch: Mapping) -> dict:
  """Seq2seq infilling: ``s2s_ids|segments|position_ids`` [B, L2], ``s2s_positions|targets|
  weights`` [B, P2]; -log P(target | source) under the UniLM mask."""
  cfg = model.config
  v = {"params": params}
  ids = batch["s2s_ids"]
  bias = _bias(rows_lib.attention_mask("seq2seq", ids, cfg, segments=batch["s2s_segments"]), cfg)
  positions = rows_lib.positions(ids, cfg, batch.get("s2s_position_ids"))
  hidden = model.apply(v, ids, attention_bias=bias, positions=positions,
                       method=Unimo.encode_text)["hidden"]
  logits = model.apply(v, hidden, batch["s2s_positions"], method=Unimo.lm_logits)
  return _prefixed("s2s", _token_sums(logits, batch["s2s_targets"], batch["s2s_weights"]))


def caption_rows(model, params, batch: Mapping) -> dict:
  """Captioning loss: ``cap_ids`` [B, L] (``[CLS] w.. [SEP]``) after the image, under the
  captioning mask; ``cap_positions|targets|weights`` [B, P]."""
  cfg = model.config
  v = {"params": params}
  visual = {k: batch[k] for k in VISUAL_KEYS if k in batch}
  ids = batch["cap_ids"]
  rv = visual.get("region_valid")
  image = rows_lib.visual_valid(ids.shape[0], visual_length(cfg) if rv is None else
                                1 + rv.shape[1], rv)
  bias = _bias(rows_lib.attention_mask("captioning", ids, cfg, image_valid=image), cfg)
  out = model.apply(v, visual, ids, attention_bias=bias, positions=rows_lib.positions(ids, cfg),
                    method=Unimo.encode_pair)
  logits = model.apply(v, out["text_hidden"], batch["cap_positions"], method=Unimo.lm_logits)
  return _prefixed("cap", _token_sums(logits, batch["cap_targets"], batch["cap_weights"]))


def language_rows(model, params, batch: Mapping) -> dict:
  """Every objective whose fields the batch carries (mlm, s2s, cap), per-row sums."""
  out = {}
  if "mlm_ids" in batch:
    out.update(mlm_rows(model, params, batch))
  if "s2s_ids" in batch:
    out.update(s2s_rows(model, params, batch))
  if "cap_ids" in batch:
    out.update(caption_rows(model, params, batch))
  return out


def sums(rows: Mapping) -> dict:
  """Per-row sums (valid rows only) -> (sum, count) pairs of the reported metrics."""
  out = {}
  for prefix, name in (("mlm", "mlm"), ("s2s", "s2s"), ("cap", "caption")):
    if f"{prefix}_count" not in rows:
      continue
    count = float(jnp.sum(rows[f"{prefix}_count"]))
    out[f"{name}_nll"] = (float(jnp.sum(rows[f"{prefix}_nll"])), count)
    out[f"{name}_accuracy"] = (float(jnp.sum(rows[f"{prefix}_correct"])), count)
  return out


def finalize(pairs: Mapping) -> dict:
  """(sum, count) pairs -> floats, adding ``<name>_perplexity = exp(mean nll)``."""
  out = {}
  for key, (total, count) in pairs.items():
    mean = total / count if count else float("nan")
    out[key] = mean
    if key.endswith("_nll"):
      out[key.replace("_nll", "_perplexity")] = math.exp(min(mean, 700.0)) if count else mean
  return out
