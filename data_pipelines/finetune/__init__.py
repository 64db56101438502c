"""Fine-tuning data: task files and synthetic_scenes tasks as batches for the trainer.

``make_data(config, split, tokenizer, training=...)`` -> ``(RowBatches, meta)``: per-process
numpy batches with ``spec`` / ``get_state`` / ``set_state`` / ``dropped_counts`` (exact resume,
``batches``), and ``meta`` holding what evaluation needs beyond the rows (reference strings,
answer vocabulary, image ids). ``config`` is the fine-tuning run config
(``unimo_jax.finetune.config``); its ``data`` section:

  source            "tsv" (text tasks: files train / validation / test) | "tfds" (GLUE
                    classification / regression, ``tfds_text``, and seq2seq,
                    ``tfds_seq2seq``, from TFDS) | "synthetic_scenes"
                    | "jsonl" (image tasks: files train / validation / test, ``files``)
                    | "unimo_lines" (SNLI-VE and captioning in UNIMO's official ``;`` lines
                    with region features, ``unimo_lines``)
  train, validation, test   TSV, JSONL or official-line paths; for "tfds" the TFDS split
                    names (MNLI: validation_matched, test_matched); an evaluation split
                    named otherwise (validation_mismatched) is read as that TFDS split
  tfds_name, tfds_data_dir  "tfds": the dataset (``glue/sst2``, ``cnn_dailymail``) and the
                    folder it was prepared in ("" = TFDS's default, ~/tensorflow_datasets);
                    nothing is downloaded
  source_key, target_key    "tfds" seq2seq: the source / target text features ("" = the
                    dataset's entry in ``unimo_jax.finetune.config.SEQ2SEQ_TFDS_KEYS``:
                    cnn_dailymail article -> highlights, gigaword / xsum document -> summary)
  image_dir, image_size     jsonl: the folder the records' images are in; the model's input side
  tokenizer         tokenizer spec (``data_pipelines.tokenizers.load_tokenizer``)
  batch_size        GLOBAL rows per training step; eval_batch_size for evaluation
  max_length        text tokens (classification, hypotheses, questions, captions)
  max_source, max_target   seq2seq blocks
  label_names       classification labels by name (else ints 0..num_labels-1 in the file)
  scenes            synthetic_scenes: size, image_size (stored), input_size (model), seed,
                    train_limit / eval_limit (scenes read, 0 = all)
  num_negative_images, num_negative_texts   retrieval negatives per positive
  hard_negatives    retrieval: draw them among each positive's K hardest (0: among all, the
                    official recipe); the pools come from ``make_data``'s ``hard_pools``
  answers           VQA answer vocabulary (empty: every answer of the training scenes)
  visual_input, pixel_mean, pixel_std, num_regions, region_feature_dim   the visual input
  seed              order of the training rows (epochs of a seeded permutation)
"""
from __future__ import annotations

from typing import Any

from data_pipelines.finetune.batches import RowBatches

SPLITS = ("train", "validation", "test")


def _scenes(d, split, training):
  from data_pipelines.finetune import scenes  # pylint: disable=import-outside-toplevel
  s = d.scenes
  limit = int(s.train_limit if training else s.eval_limit)
  return scenes.Scenes(split, size=s.size, image_size=int(s.image_size), seed=int(s.seed),
                       limit=limit, visual_input=d.visual_input,
                       input_size=int(s.input_size) or None, num_regions=int(d.num_regions),
                       feature_dim=int(d.region_feature_dim), pixel_mean=tuple(d.pixel_mean),
                       pixel_std=tuple(d.pixel_std))


def answer_vocabulary(config) -> list[str]:
  """The VQA answers: the config's; else every answer of the training scenes (sorted), or the
  ``task.num_labels`` answers annotators gave most often in the training JSONL (ties by name)."""
  d = config.data
  if d.answers:
    return list(d.answers)
  if d.source == "jsonl":
    import collections  # pylint: disable=import-outside-toplevel
    import json  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel
    counts = collections.Counter()
    with open(os.path.expanduser(d.train), "rb") as f:
      for raw in f:
        try:
          counts.update(str(a).strip().lower() for a in json.loads(raw).get("answers", []))
        except (ValueError, AttributeError):
          continue
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return sorted(a for a, _ in ranked[:int(config.task.num_labels)])
  from data_pipelines.synthetic_scenes import generate  # pylint: disable=import-outside-toplevel
  s = d.scenes
  options = generate.SceneOptions(kind="pairs", size=s.size, image_size=int(s.image_size),
                                  feature_dim=int(d.region_feature_dim), seed=int(s.seed))
  n = options.num_examples("train")
  n = min(n, int(s.train_limit)) if s.train_limit else n
  answers = set()
  for i in range(n):
    answers.update(generate.language_fields(options, "train", i)[1]["qa"]["answer"])
  return sorted(answers)


def make_data(config, split: str, tokenizer, *, training: bool, process_index: int = 0,
              process_count: int = 1, hard_pools=None) -> tuple[RowBatches, dict[str, Any]]:
  """Batches of ``split`` for the task of ``config.task`` (see the module docstring).
  ``hard_pools``: retrieval training with ``data.hard_negatives`` > 0 draws its negatives from
  the pools this callable builds (``scenes.retrieval_rows``)."""
  d, kind = config.data, config.task.kind
  hard = int(d.get("hard_negatives", 0)) if kind == "retrieval" and training else 0
  if hard and hard_pools is None:
    raise ValueError("data.hard_negatives > 0 needs the pools' builder (make_data's hard_pools, "
                     "which `unimo-jax finetune` passes)")
  batch = int(d.batch_size if training else d.eval_batch_size)
  kw = dict(seed=int(d.seed), repeat=training, shuffle=training, process_index=process_index,
            process_count=process_count, name=f"{kind}/{split}")
  meta: dict[str, Any] = {}
  if (kind == "entailment" and d.source in ("synthetic_scenes", "jsonl")
      and int(config.task.num_labels) != 3):
    raise ValueError(f"task.num_labels={config.task.num_labels}, but {d.source} entailment has "
                     f"SNLI-VE's 3 labels (entailment, neutral, contradiction)")
  if d.source == "tfds":
    from data_pipelines.finetune import tfds_text  # pylint: disable=import-outside-toplevel
    tfds_split = d.get(split) if split in SPLITS else split
    if not tfds_split:
      raise ValueError(f"data.{split} is empty: name the TFDS split of {d.tfds_name} to read")
    name = f"{d.tfds_name}:{tfds_split}"
    if kind == "seq2seq":
      from data_pipelines.finetune import tfds_seq2seq  # pylint: disable=import-outside-toplevel
      rows, dropped, sources, targets = tfds_seq2seq.seq2seq_rows(
          d.tfds_name, tfds_split, d.tfds_data_dir, tokenizer, max_source=int(d.max_source),
          max_target=int(d.max_target), source_key=d.get("source_key", ""),
          target_key=d.get("target_key", ""))
      meta.update(sources=sources, targets=targets)
      return RowBatches(rows, batch, dropped={name: dropped}, **kw), meta
    if kind not in ("classification", "regression"):
      raise ValueError(f"data.source 'tfds' holds GLUE classification / regression and "
                       f"seq2seq, not {kind!r}")
    rows, dropped, idx = tfds_text.classification_rows(
        d.tfds_name, tfds_split, d.tfds_data_dir, tokenizer, max_length=int(d.max_length),
        kind=kind, num_labels=int(config.task.num_labels), label_names=tuple(d.label_names))
    meta["idx"] = idx
    return RowBatches(rows, batch, dropped={name: dropped}, **kw), meta
  if d.source == "tsv":
    from data_pipelines.finetune import text  # pylint: disable=import-outside-toplevel
    path = d.get(split)
    if not path:
      raise ValueError(f"data.{split} is empty: the {kind} task reads a TSV file per split")
    if kind in ("classification", "regression"):
      rows, dropped = text.classification_rows(
          path, tokenizer, max_length=int(d.max_length), kind=kind,
          num_labels=int(config.task.num_labels), label_names=tuple(d.label_names))
    elif kind == "seq2seq":
      rows, dropped, sources, targets = text.seq2seq_rows(
          path, tokenizer, max_source=int(d.max_source), max_target=int(d.max_target))
      meta.update(sources=sources, targets=targets)
    else:
      raise ValueError(f"data.source 'tsv' holds text tasks (classification, regression, "
                       f"seq2seq), not {kind!r}")
    return RowBatches(rows, batch, dropped={path: dropped}, **kw), meta
  from data_pipelines.finetune import scenes  # pylint: disable=import-outside-toplevel
  length = int(d.max_length)
  if d.source == "unimo_lines":
    from data_pipelines.finetune import unimo_lines  # pylint: disable=import-outside-toplevel
    path = d.get(split)
    if not path:
      raise ValueError(f"data.{split} is empty: the {kind} task reads a file of UNIMO's lines "
                       f"per split")
    sc = unimo_lines.RegionLines(path, kind, tokenizer, num_regions=int(d.num_regions),
                                 feature_dim=int(d.region_feature_dim),
                                 num_labels=int(config.task.num_labels))
    meta["image_ids"] = sc.ids
    if kind == "entailment":
      rows, dropped = unimo_lines.entailment_rows(sc, tokenizer, length)
    elif kind == "captioning":
      rows = scenes.captioning_id_rows([(i, t) for i, t in sc.texts], tokenizer, length)
      dropped = dict(sc.dropped)
      meta.update(scenes=sc, references=sc.captions)
    else:
      raise ValueError(f"data.source 'unimo_lines' holds entailment and captioning, not "
                       f"{kind!r}")
    if not sc.texts:
      rows = {}
    return RowBatches(rows, batch, dropped={path: dropped}, extra=scenes.with_images(sc),
                      **kw), meta
  if d.source == "jsonl":
    from data_pipelines.finetune import files  # pylint: disable=import-outside-toplevel
    path = d.get(split)
    if not path:
      raise ValueError(f"data.{split} is empty: the {kind} task reads a JSONL file per split")
    if kind not in files.FIELDS:
      raise ValueError(f"data.source 'jsonl' holds {tuple(files.FIELDS)}, not {kind!r}")
    sc = files.ImageRecords(path, kind, d.image_dir, image_size=int(d.image_size),
                            pixel_mean=tuple(d.pixel_mean), pixel_std=tuple(d.pixel_std))
    name = path
    if kind == "entailment":
      rows, dropped = files.entailment_rows(sc, tokenizer, length)
      meta["image_ids"] = sc.ids
      return RowBatches(rows, batch, dropped={name: dropped}, extra=scenes.with_images(sc),
                        **kw), meta
    dropped_by = {name: dict(sc.dropped)}
  elif d.source != "synthetic_scenes":
    raise ValueError(f"data.source must be 'tsv', 'tfds', 'synthetic_scenes', 'jsonl' or "
                     f"'unimo_lines', got {d.source!r}")
  else:
    sc = _scenes(d, split, training)
    name = f"synthetic_scenes/{split}"
    dropped_by = {}
  meta["image_ids"] = sc.ids
  if kind == "vqa":
    answers = answer_vocabulary(config)
    if len(answers) != int(config.task.num_labels):
      raise ValueError(f"task.num_labels={config.task.num_labels} but the VQA answer vocabulary "
                       f"has {len(answers)} answers (set task.num_labels or data.answers)")
    rows, dropped, gold = scenes.vqa_rows(sc, tokenizer, answers, length)
    meta.update(answers=answers, **gold)
    dropped_by.setdefault(name, {}).update(dropped)
    return RowBatches(rows, batch, dropped=dropped_by, extra=scenes.with_images(sc),
                      **kw), meta
  if kind == "entailment":
    rows, dropped = scenes.entailment_rows(sc, tokenizer, length)
    return RowBatches(rows, batch, dropped={name: dropped}, extra=scenes.with_images(sc),
                      **kw), meta
  if kind == "retrieval":
    rows, extra = scenes.retrieval_rows(sc, tokenizer, length,
                                        num_negative_images=int(d.num_negative_images),
                                        num_negative_texts=int(d.num_negative_texts),
                                        hard_pools=hard_pools if hard else None)
    meta.update(scenes=sc, caption_table=scenes.caption_table(sc, tokenizer, length))
    return RowBatches(rows, batch, extra=extra, dropped=dropped_by, **kw), meta
  if kind == "captioning":
    rows = scenes.captioning_rows(sc, tokenizer, length)
    meta.update(scenes=sc, references=sc.captions)
    return RowBatches(rows, batch, extra=scenes.with_images(sc), dropped=dropped_by,
                      **kw), meta
  raise ValueError(f"data.source 'synthetic_scenes' holds {scenes.TASKS}, not {kind!r}")


__all__ = ["RowBatches", "make_data", "answer_vocabulary", "SPLITS"]
