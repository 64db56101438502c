"""Evaluation splits as numpy arrays: images, every caption, every hard negative, language layouts.

``load_eval_split(data_config, split, eval_config=...)`` reads one evaluation split through the
same readers, tokenizer, image decoding and masking as training, and returns ``(arrays, meta)``
in the layout ``unimo_jax.evaluation.runner`` documents. Which records a split name means
(``split_source``):

  evaluation.sources = {"test": {"kind": "webdataset", "path": "/data/test-*.tar"},
                        "val": "/data/val-*.tar"}      # a path: the training pair source's kind

names held-out files for any source kind; a TFDS pair source also has its own splits
(``test``, ``test_compositional`` for synthetic_scenes). A split name that is neither is a
one-line error listing what exists, and a split whose files (or TFDS name and split) are read by
a training stream is refused in one line unless ``evaluation.allow_train_source`` (the
command's ``--allow-train-source``) is set. Arrays:

  pixels [N, S, S, 3] f32 (patches) | region_features [N, R, F], region_boxes [N, R, 5],
      region_valid [N, R] (regions)
  image_id [N] int64                      (the record key when it is an integer, else the row)
  caption_ids [N, C, L] int32, caption_valid [N, C] bool     all captions (C = most per image)
  caption_key [N, C] int64                  equal for equal caption strings across the split
                                            (-1 empty slot): retrieval's deduplication key
  negative_ids [N, K, L] int32, negative_valid [N, K] bool   all hard negatives
  negative_kind [N, K] int32                index into meta["kind_names"] (-1: unknown)
  mlm_* / s2s_*                             span MLM and infilling of one caption, text alone
  cap_ids / cap_positions / cap_targets / cap_weights   captioning layout of that caption
  label [N] int32, prompt_ids [K, T, L], prompt_valid [K, T]   when the records carry class
                                            labels: zero-shot classification with T prompt
                                            templates per class (evaluation.zero_shot)

meta: ``captions`` (list of lists of str, the references; slot j of the arrays is caption j),
``negatives`` (list of lists), ``kind_names``, ``class_names``, ``name`` (source and split),
``source`` (the files or TFDS split read), ``records`` (the source's record count), ``dropped``
{reason: n}.
Every random choice draws from ``default_rng([seed, EVAL_STREAM, row])``, so a split's arrays
are a pure function of the seed.
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
  return tokenizers.load_tokenizer(spec)  # expands ~


def _section(eval_config) -> dict:
  if eval_config is None:
    return {}
  return dict(eval_config.to_dict() if hasattr(eval_config, "to_dict") else eval_config)


def _training_pair_spec(cfg, source=None) -> dict:
  specs = list(cfg["streams"]["pair"].get("sources", []))
  named = [s for s in specs if source is None or s.get("name") == source]
  if not named:
    raise ValueError(f"no pair source {source!r} in the data config" if source else
                     "the data config has no pair source (data.streams.pair.sources) and "
                     "evaluation.sources names none for this split")
  return dict(named[0])


# Keys of a training source that describe its training use, not its records.
_TRAIN_ONLY = ("name", "weight", "tfidf_negatives", "neighbours", "lexicon_negatives",
               "related_images")


def eval_sources(cfg, eval_config=None) -> dict:
  """``evaluation.sources`` as {split: full source spec}.

  A value may be a complete source spec (it has ``kind``), a spec without ``kind`` (its keys
  replace those of the first training pair source, so ``{"path": "test-*.tar"}`` is enough for
  shards like the training ones), or a plain path/glob string (the same, as ``path``).
  """
  out = {}
  for split, value in _section(eval_config).get("sources", {}).items():
    if isinstance(value, str):
      value = {"path": value}
    value = dict(value.to_dict() if hasattr(value, "to_dict") else value)
    if "kind" not in value:
      base = {k: v for k, v in _training_pair_spec(cfg).items() if k not in _TRAIN_ONLY}
      value = {**base, **value}
    value.setdefault("name", f"eval_{split}")
    out[str(split)] = value
  return out


def describe(spec) -> str:
  """One line naming a source's records: ``tfds NAME:SPLIT`` or ``KIND PATH``."""
  if spec.get("kind") == "tfds":
    return f"tfds {spec.get('tfds_name')}:{spec.get('split', 'train')}"
  path = spec.get("path")
  path = ", ".join(map(str, path)) if isinstance(path, (list, tuple)) else str(path)
  return f"{spec.get('kind')} {path}"


def _files_of(spec) -> set:
  """What identifies a source's records: real file paths, or the TFDS (name, split, dir)."""
  if spec.get("kind") == "tfds":
    d = spec.get("data_dir")
    return {("tfds", str(spec.get("tfds_name")), str(spec.get("split", "train")),
             os.path.realpath(os.path.expanduser(d)) if d else "")}
  from data_pipelines.sources import files  # pylint: disable=import-outside-toplevel
  path = spec.get("path")
  if path in (None, ""):
    return set()
  if spec.get("kind") == "image_folder":
    return {("file", os.path.realpath(os.path.expanduser(str(path))))}
  try:
    return {("file", os.path.realpath(f)) for f in files.expand_paths(path, "source")}
  except ValueError:
    return set()


def check_not_training(cfg, split: str, spec: dict):
  """ValueError (one line) when the evaluation source reads records a training stream reads."""
  mine = _files_of(spec)
  for stream, scfg in cfg["streams"].items():
    if not int(scfg.get("batch_size", 0) or 0):
      continue
    for k, train in enumerate(scfg.get("sources", [])):
      shared = mine & _files_of(train)
      if shared:
        what = sorted(shared)[0]
        what = what[1] if what[0] == "file" else f"{what[1]}:{what[2]}"
        raise ValueError(
            f"evaluation split {split!r} reads the training source "
            f"{train.get('name') or f'{stream}.{k}'!r} of stream {stream} ({what}); set "
            "evaluation.sources." + split + " to held-out data, or pass --allow-train-source "
            "(evaluation.allow_train_source=True) to evaluate on it anyway")


def split_source(data_config, split: str, eval_config=None, source=None) -> dict:
  """The source spec of evaluation split ``split``.

  In order: ``source`` (a spec mapping, or the name of a pair source whose TFDS split is
  replaced), ``evaluation.sources[split]``, the first pair source when it is TFDS and has that
  split. Anything else is a ValueError of one line naming the split and what exists.
  """
  cfg = pipeline.resolve_config(data_config)
  if isinstance(source, dict):
    return dict(source)
  if source is None:
    mapped = eval_sources(cfg, eval_config)
    if split in mapped:
      return mapped[split]
  else:
    mapped = {}
  spec = _training_pair_spec(cfg, source)
  name = spec.get("name") or "pair.0"
  if spec.get("kind") == "tfds":
    spec["split"] = split
    try:
      have = sorted(sources.load_builder(spec["tfds_name"], spec.get("data_dir")).info.splits)
    except ValueError:
      return spec  # not prepared yet: opening it says so (or prepares it)
    if split not in have:
      raise ValueError(
          f"evaluation split {split!r} is unknown: pair source {name!r} (tfds "
          f"{spec['tfds_name']}) has splits {have}" + (
              f" and evaluation.sources has {sorted(mapped)}" if mapped else
              "; map other names to files in evaluation.sources"))
    return spec
  raise ValueError(
      f"evaluation split {split!r} is unknown: pair source {name!r} ({describe(spec)}) has no "
      "splits of its own" + (f" and evaluation.sources has {sorted(mapped)}" if mapped else
                             "; name its held-out files with --source " + split + "=PATH, or "
                             "per split in the config's evaluation.sources"))


def default_splits(data_config, source=None, eval_config=None) -> list:
  """The evaluation splits: the names of ``evaluation.sources`` when it has any; for a TFDS
  pair source ``test`` and ``test_compositional`` when present (synthetic_scenes), else
  ``validation``; otherwise a ValueError saying to configure ``evaluation.sources``."""
  cfg = pipeline.resolve_config(data_config)
  mapped = eval_sources(cfg, eval_config) if source is None else {}
  if mapped:
    return list(mapped)
  spec = _training_pair_spec(cfg, source)
  if spec.get("kind") != "tfds":
    raise ValueError(
        f"pair source {spec.get('name') or 'pair.0'!r} ({describe(spec)}) has no held-out "
        "split; name one in the config's evaluation.sources, e.g. {'test': {'kind': "
        f"'{spec.get('kind')}', 'path': ...}}}}")
  have = set(sources.load_builder(spec["tfds_name"], spec.get("data_dir")).info.splits)
  out = [s for s in ("test", "test_compositional") if s in have] or (
      ["validation"] if "validation" in have else [])
  if not out:
    raise ValueError(f"pair source {spec.get('name') or 'pair.0'!r} ({describe(spec)}) has "
                     f"only the splits {sorted(have)}; name a held-out one with --split or in "
                     "evaluation.sources")
  return out


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


def _zero_shot_arrays(arrays, recs, codec, length, settings, split) -> tuple:
  """Adds ``label`` [N], ``prompt_ids`` [K, T, L], ``prompt_valid`` [K, T] when the records
  carry labels; returns the class names (empty: no zero-shot classification).

  settings (``evaluation.zero_shot``): ``classes`` (names; a label is a name or an index into
  them; default: the split's distinct string labels, sorted) and ``templates`` (``{}`` is the
  class name; default ``unimo_jax.evaluation.zero_shot.DEFAULT_TEMPLATES``).
  """
  import logging  # pylint: disable=import-outside-toplevel
  from unimo_jax.evaluation import zero_shot  # pylint: disable=import-outside-toplevel (no TF)
  labels = [r.get("label") for r in recs]
  if all(lb is None for lb in labels):
    return ()
  classes = [str(c) for c in settings.get("classes", ())]
  if not classes:
    named = sorted({str(lb) for lb in labels if lb is not None})
    if all(n.lstrip("-").isdigit() for n in named):
      logging.warning("evaluation split %s: labels are class indices; name the classes in "
                      "evaluation.zero_shot.classes for zero-shot classification", split)
      return ()
    classes = named
  index = {c: k for k, c in enumerate(classes)}

  def label_id(lb):
    if lb is None:
      return -1
    if str(lb) in index:
      return index[str(lb)]
    if str(lb).lstrip("-").isdigit() and 0 <= int(lb) < len(classes):
      return int(lb)
    return -1

  templates = tuple(settings.get("templates", zero_shot.DEFAULT_TEMPLATES))
  ids, valid = zip(*(codec.texts([t.format(c) for t in templates], len(templates), length)
                     for c in classes))
  arrays["label"] = np.asarray([label_id(lb) for lb in labels], np.int32)
  arrays["prompt_ids"] = np.stack(ids)
  arrays["prompt_valid"] = np.stack(valid)
  return tuple(classes)


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
                    seed: int = 0, eval_config=None, allow_train_source: bool | None = None):
  """Reads one evaluation split (see the module docstring).

  Args:
    data_config: the ``data`` config section (ConfigDict or dict).
    split: the split of the pair source.
    tokenizer: a tokenizer object (default: ``data.tokenizer``).
    source: a pair-source spec or name (default: ``split_source``'s choice).
    limit: read at most this many records (0 = all).
    max_captions, max_negatives: caps on C and K.
    eval_config: the ``evaluation`` section (its ``sources`` and ``allow_train_source``).
    allow_train_source: evaluate even when the split's source is a training source (default:
      ``evaluation.allow_train_source``, else False: a one-line ValueError).
  Returns:
    (arrays, meta). Records a reader rejects are skipped and counted in ``meta["dropped"]``;
    ``meta["source"]`` names the files read and ``meta["records"]`` counts the source's records.
  """
  cfg = pipeline.resolve_config(data_config)
  spec = split_source(cfg, split, eval_config, source)
  if allow_train_source is None:
    allow_train_source = bool(_section(eval_config).get("allow_train_source", False))
  if not allow_train_source:
    check_not_training(cfg, split, spec)
  tok = _tokenizer(cfg, tokenizer)
  src = sources.open_source(spec, name=f"{spec.get('name', 'pairs')}:{split}")
  src.restrict({"image", "regions", "captions", "hard_negatives", "label"})
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
        # Captions the tokenizer makes nothing of can be no candidate: left out here so that
        # caption slot j is rec["captions"][j] everywhere (arrays, references, figures).
        rec["captions"] = [c for c in rec.get("captions", []) if len(tok.encode(c))]
        if not rec["captions"]:
          raise BadRecord("empty_text", "captions")
        rng = np.random.default_rng([seed, EVAL_STREAM, i])
        pair = pair_rows.build(rec, rng)
        caption = rec["captions"][int(rng.integers(len(rec["captions"])))]
        text = text_rows.build({"text": caption}, rng)
      except BadRecord as e:
        dropped[e.reason] = dropped.get(e.reason, 0) + 1
        continue
      recs.append((i, rec, pair, text))
  finally:
    records = len(src)
    src.close()
  for reason, count in getattr(src, "index_drops", {}).items():
    dropped[reason] = dropped.get(reason, 0) + count
  c = max(1, min(max_captions, max((len(r["captions"]) for _, r, _, _ in recs), default=1)))
  k = min(max_negatives, max((len(r.get("hard_negatives", [])) for _, r, _, _ in recs),
                             default=0))
  kind_names = sorted({kd for kinds in kinds_by_key.values() for kd in kinds})
  out = {"caption_ids": [], "caption_valid": [], "caption_key": [], "negative_ids": [],
         "negative_valid": [], "negative_kind": [], "image_id": []}
  texts = {}  # caption string -> its split-wide key (equal strings, equal keys)
  stats = {}  # texts cut to the pair length
  layout = {}
  blobs, ratios = [], []
  for i, rec, pair, text in recs:
    ids, valid = codec.texts(rec["captions"], c, length, stats)
    out["caption_ids"].append(ids)
    out["caption_valid"].append(valid)
    out["caption_key"].append(np.asarray(
        [texts.setdefault(rec["captions"][j], len(texts)) if valid[j] else -1
         for j in range(c)], np.int64))
    negs = list(rec.get("hard_negatives", []))
    ids, valid = codec.texts(negs, k, length, stats)
    # A negative the model sees as one of the image's captions (equal ids, e.g. after a cut that
    # removed the rewritten word) is no negative: it would be a tie, counted as a loss.
    same = (ids[:, None, :] == out["caption_ids"][-1][None, :, :]).all(-1) & (
        out["caption_valid"][-1][None, :])
    stats["negatives_equal_to_caption"] = stats.get("negatives_equal_to_caption", 0) + int(
        (same.any(1) & valid).sum())
    valid = valid & ~same.any(1)
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
  class_names = _zero_shot_arrays(arrays, [r for _, r, _, _ in recs], codec, length,
                                  _section(eval_config).get("zero_shot") or {}, split)
  if stats.get("negatives_equal_to_caption"):
    import logging  # pylint: disable=import-outside-toplevel
    logging.warning("evaluation split %s: %d hard negatives equal a caption of their image as "
                    "token ids (after the cut to %d tokens) and are left out", split,
                    stats["negatives_equal_to_caption"], length)
  if stats.get("truncated"):
    import logging  # pylint: disable=import-outside-toplevel
    logging.warning("evaluation split %s: %d caption / negative texts are longer than "
                    "data.streams.pair.max_length %d and were cut (two captions equal after the "
                    "cut tie in retrieval)", split, stats["truncated"], length)
  meta = dict(captions=[list(r["captions"]) for _, r, _, _ in recs],
              negatives=[list(r.get("hard_negatives", [])) for _, r, _, _ in recs],
              kind_names=tuple(kind_names), dropped=dropped,
              name=f"{spec.get('tfds_name', spec.get('name', 'pairs'))}:{split}",
              rows=[i for i, _, _, _ in recs], source=describe(spec), records=int(records),
              truncated=int(stats.get("truncated", 0)), class_names=class_names,
              negatives_equal_to_caption=int(stats.get("negatives_equal_to_caption", 0)))
  return arrays, meta
