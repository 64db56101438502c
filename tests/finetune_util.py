"""Random fine-tuning batches of every task kind (numpy), for the task and step tests."""
import numpy as np

from unimo_jax.model import ModelConfig, visual_length


def tiny_config(**kw) -> ModelConfig:
  base = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, vocab_size=64,
              max_positions=40, image_size=16, patch_size=8, dropout_rate=0.1,
              attention_dropout_rate=0.1, projection_dim=16)
  return ModelConfig.tiny(**{**base, **kw})


def _ids(r, cfg, b, length, lo=4):
  ids = np.full((b, length), cfg.pad_id, np.int32)
  for i in range(b):
    n = int(r.integers(2, length - 1))
    ids[i, 0] = cfg.cls_id
    ids[i, 1:n] = r.integers(lo, cfg.vocab_size - 1, n - 1)
    ids[i, n] = cfg.sep_id
  return ids


def _visual(r, cfg, shape):
  if cfg.visual_input == "regions":
    n = 3
    return dict(region_features=r.normal(size=shape + (n, cfg.region_feature_dim)).astype(
        np.float32), region_boxes=r.uniform(size=shape + (n, 5)).astype(np.float32),
        region_valid=np.ones(shape + (n,), bool))
  s = cfg.image_size
  return dict(pixels=r.normal(size=shape + (s, s, cfg.num_channels)).astype(np.float32))


def random_batch(kind: str, cfg: ModelConfig, b: int = 8, seed: int = 0, length: int = 8,
                 num_labels: int = 3, negatives: int = 2, last_invalid: bool = True) -> dict:
  r = np.random.default_rng(seed)
  out = dict(row_valid=np.ones(b, bool))
  if last_invalid:
    out["row_valid"][-1] = False
  if kind in ("classification", "regression"):
    out["ids"] = _ids(r, cfg, b, length)
    out["label"] = (r.normal(size=b).astype(np.float32) if kind == "regression"
                    else r.integers(0, num_labels, b).astype(np.int32))
  elif kind in ("entailment", "vqa", "retrieval"):
    out.update(_visual(r, cfg, (b,)))
    out["ids"] = _ids(r, cfg, b, length)
    if kind == "entailment":
      out["label"] = r.integers(0, num_labels, b).astype(np.int32)
    elif kind == "vqa":
      out["answer_scores"] = r.choice([0, 1 / 3, 2 / 3, 1], size=(b, num_labels)).astype(
          np.float32)
    else:
      neg = _visual(r, cfg, (b, negatives))
      out.update({f"neg_{k}": v for k, v in neg.items()})
      out["neg_ids"] = _ids(r, cfg, b * negatives, length).reshape(b, negatives, length)
      out["neg_image_valid"] = np.ones((b, negatives), bool)
      out["neg_text_valid"] = np.ones((b, negatives), bool)
      out["neg_text_valid"][0, -1] = False
  elif kind == "captioning":
    from unimo_jax import masking
    out.update(_visual(r, cfg, (b,)))
    rows = [masking.captioning_layout(row, max_length=length, max_predictions=length,
                                      bos_id=cfg.cls_id, eos_id=cfg.sep_id, pad_id=cfg.pad_id)
            for row in _ids(r, cfg, b, length)]
    out["ids"] = np.stack([x["input_ids"] for x in rows])
    for k in ("position_ids", "positions", "targets", "weights"):
      out[k] = np.stack([x[k] for x in rows])
  elif kind == "seq2seq":
    from unimo_jax.finetune import layouts
    rows = []
    for i in range(b):
      src = r.integers(4, cfg.vocab_size - 1, int(r.integers(1, 6)))
      tgt = r.integers(4, cfg.vocab_size - 1, int(r.integers(1, 5)))
      rows.append(layouts.seq2seq_layout(src, tgt, max_source=length, max_target=length // 2 + 2,
                                         cls_id=cfg.cls_id, sep_id=cfg.sep_id,
                                         mask_id=cfg.mask_token_id, pad_id=cfg.pad_id))
    for k in rows[0]:
      out[k] = np.stack([x[k] for x in rows])
  else:
    raise ValueError(kind)
  return out


def n_visual(cfg):
  return visual_length(cfg, 3)
