"""Evaluation splits as numpy arrays: images, every caption, every hard negative, language layouts.

``load_eval_split(data_config, split)`` reads a split of the config's pair source (by default the
first ``data.streams.pair`` source, with its ``split`` replaced: ``test`` or
``test_compositional`` for synthetic_scenes) through the same readers, tokenizer, image decoding
and masking as training, and returns ``(arrays, meta)`` in the layout
``unimo_jax.evaluation.runner`` documents:

  pixels [N, S, S, 3] f32 (patches) | region_features [N, R, F], region_boxes [N, R, 5],
      region_valid [N, R] (regions)
  image_id [N] int64                      (the record key when it is an integer, else the row)
  caption_ids [N, C, L] int32, caption_valid [N, C] bool     all captions (C = most per image)
  negative_ids [N, K, L] int32, negative_valid [N, K] bool   all hard negatives
  negative_kind [N, K] int32                index into meta["kind_names"] (-1: unknown)
  mlm_* / s2s_*                             span MLM and infilling of one caption, text alone
  cap_ids / cap_positions / cap_targets / cap_weights   captioning layout of that caption

meta: ``captions`` (list of lists of str, the references), ``negatives`` (list of lists),
``kind_names``, ``name`` (source and split). Every random choice draws from
``default_rng([seed, EVAL_STREAM, row])``, so a split's arrays are a pure function of the seed.
"""
import os

import numpy as np

from data_pipelines import examples, images, pipeline, sources
from data_pipelines.sources.base import BadRecord

EVAL_STREAM = 7  # the `stream` of the masking seed, distinct from the training streams 0-2


def _tokenizer(cfg, tokenizer):
  if tokenizer is not None:
    return tokenizer
  from data_pipelines import tokenizers  # pylint: disable=import-outside-toplevel
  spec = cfg.get("tokenizer") or ""
  if not spec:
    raise ValueError("data.tokenizer is empty (a spec like 'sentencepiece:/path.model')")
  kind, sep, path = spec.partition(":")
  return tokenizers.load_tokenizer(f"{kind}:{os.path.expanduser(path)}" if sep else
                                   os.path.expanduser(spec))


def pair_source_spec(cfg, split: str, source=None) -> dict:
  """The source spec to evaluate: ``source`` (a spec mapping or the name of a pair source) or
  the first pair source, with ``split`` set (TFDS) and ``prepare`` kept."""
  specs = list(cfg["streams"]["pair"].get("sources", []))
  if isinstance(source, dict):
    spec = dict(source)
  else:
    named = [s for s in specs if source is None or s.get("name") == source]
    if not named:
      raise ValueError(f"no pair source {source!r} in the data config")
    spec = dict(named[0])
  if spec.get("kind") == "tfds":
    spec["split"] = split
  return spec


def default_splits(data_config, source=None) -> list:
  """The evaluation splits the pair source has: ``test`` and ``test_compositional`` when
  present (synthetic_scenes), else ``validation`` or ``test`` alone; non-TFDS sources: [test]."""
  cfg = pipeline.resolve_config(data_config)
  spec = pair_source_spec(cfg, "test", source)
  if spec.get("kind") != "tfds":
    return ["test"]
  have = set(sources.load_builder(spec["tfds_name"], spec.get("data_dir")).info.splits)
  out = [s for s in ("test", "test_compositional") if s in have]
  return out or [s for s in ("validation", "train") if s in have][:1]


def _negative_kinds(spec, split) -> dict:
  """{record key: [kind, ...]} for TFDS datasets with a ``hard_negative_kinds`` feature."""
  if spec.get("kind") != "tfds":
    return {}
  builder = sources.load_builder(spec["tfds_name"], spec.get("data_dir"))
  if "hard_negative_kinds" not in builder.info.features:
    return {}
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: {"id": ex["image_id"], "kinds": ex["hard_negative_kinds"]})
  return {str(int(ex["id"])): [k.decode() for k in ex["kinds"]] for ex in tfds.as_numpy(ds)}


def _decode_pixels(blobs, ratios, cfg) -> np.ndarray:
  """Encoded images -> [N, S, S, 3] float32, decoded and normalised exactly as in training."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  size = int(cfg["image_size"])
  mean, std = cfg.get("pixel_mean", (0.5,) * 3), cfg.get("pixel_std", (0.5,) * 3)
  if not blobs:
    return np.zeros((0, size, size, 3), np.float32)
  ds = tf.data.Dataset.from_tensor_slices((tf.constant(blobs), tf.constant(ratios, tf.int32)))
  ds = ds.map(lambda b, r: images.decode_image(b, r, image_size=size, mean=mean, std=std))
  return np.concatenate([x.numpy() for x in ds.batch(64)]).astype(np.float32)


def load_eval_split(data_config, split: str = "test", *, tokenizer=None, source=None,
                    limit: int = 0, max_captions: int = 8, max_negatives: int = 16,
                    seed: int = 0):
  """Reads one evaluation split (see the module docstring).

  Args:
    data_config: the ``data`` config section (ConfigDict or dict).
    split: the split of the pair source.
    tokenizer: a tokenizer object (default: ``data.tokenizer``).
    source: a pair-source spec or name (default: the first pair source).
    limit: read at most this many records (0 = all).
    max_captions, max_negatives: caps on C and K.
  Returns:
    (arrays, meta). Records a reader rejects are skipped and counted in ``meta["dropped"]``.
  """
  cfg = pipeline.resolve_config(data_config)
  tok = _tokenizer(cfg, tokenizer)
  spec = pair_source_spec(cfg, split, source)
  src = sources.open_source(spec, name=f"{spec.get('name', 'pairs')}:{split}")
  pair_rows = examples.RowBuilder("pair", cfg, tok)
  text_rows = examples.RowBuilder("text", cfg, tok)
  codec = examples.TextCodec(tok)
  length = int(cfg["streams"]["pair"]["max_length"])
  kinds_by_key = _negative_kinds(spec, split)
  n = len(src) if not limit else min(limit, len(src))
  recs, dropped = [], {}
  try:
    for i in range(n):
      try:
        rec = src.read(i)
        rng = np.random.default_rng([seed, EVAL_STREAM, i])
        pair = pair_rows.build(rec, rng)
        caption = rec["captions"][int(rng.integers(len(rec["captions"])))]
        text = text_rows.build({"text": caption}, rng)
      except BadRecord as e:
        dropped[e.reason] = dropped.get(e.reason, 0) + 1
        continue
      recs.append((i, rec, pair, text))
  finally:
    src.close()
  c = max(1, min(max_captions, max((len(r["captions"]) for _, r, _, _ in recs), default=1)))
  k = min(max_negatives, max((len(r.get("hard_negatives", [])) for _, r, _, _ in recs),
                             default=0))
  kind_names = sorted({kd for kinds in kinds_by_key.values() for kd in kinds})
  out = {"caption_ids": [], "caption_valid": [], "negative_ids": [], "negative_valid": [],
         "negative_kind": [], "image_id": []}
  layout = {}
  blobs, ratios = [], []
  for i, rec, pair, text in recs:
    ids, valid = codec.texts(rec["captions"], c, length)
    out["caption_ids"].append(ids)
    out["caption_valid"].append(valid)
    negs = list(rec.get("hard_negatives", []))
    ids, valid = codec.texts(negs, k, length)
    out["negative_ids"].append(ids)
    out["negative_valid"].append(valid)
    kinds = kinds_by_key.get(rec.get("key"), [])
    out["negative_kind"].append(np.asarray(
        [kind_names.index(kinds[j]) if j < len(kinds) and valid[j] else -1 for j in range(k)],
        np.int32).reshape(k))
    key = rec.get("key", "")
    out["image_id"].append(int(key) if str(key).isdigit() else i)
    if cfg["visual_input"] == "patches":
      blobs.append(pair["_image"][0])
      ratios.append(int(pair["_image_ratio"][0]))
    else:
      for f in ("region_features", "region_boxes", "region_valid"):
        layout.setdefault(f, []).append(pair[f])
    for f, v in text.items():
      if f.startswith(("mlm_", "s2s_")):
        layout.setdefault(f, []).append(v)
    for f in ("ids", "positions", "targets", "weights"):
      layout.setdefault(f"cap_{f}", []).append(pair[f"s2s_{f}"])
  arrays = {f: np.stack(v) if v else np.zeros((0,)) for f, v in out.items()}
  arrays["image_id"] = np.asarray(out["image_id"], np.int64)
  arrays.update({f: np.stack(v) for f, v in layout.items()})
  if cfg["visual_input"] == "patches":
    arrays["pixels"] = _decode_pixels(blobs, ratios, cfg)
  meta = dict(captions=[list(r["captions"]) for _, r, _, _ in recs],
              negatives=[list(r.get("hard_negatives", [])) for _, r, _, _ in recs],
              kind_names=tuple(kind_names), dropped=dropped,
              name=f"{spec.get('tfds_name', spec.get('name', 'pairs'))}:{split}",
              rows=[i for i, _, _, _ in recs])
  return arrays, meta
