"""The fine-tuning run config: every field with its default, and its one-line validation.

Task files (``experiments/configs/finetune/*.py``) start from ``default_config()``. Sections:

  seed, model, optimizer, train, mesh, axis_rules   as pre-training (``unimo_jax.train.config``;
                the optimizer defaults are UNIMO's fine-tuning recipe: Adam b2 0.98, eps 1e-6,
                linear warmup then linear decay, clip 1.0)
  init_from     where the encoder starts: a pre-training (or fine-tuning) workdir, a converted
                dir (``unimo-jax convert roberta|unimo``: ``model_config.json`` +
                ``params.msgpack``), or "" (from scratch)
  init_step     checkpoint step of an ``init_from`` workdir (0 = its latest)
  task          ``unimo_jax.finetune.tasks.TaskSpec``: kind, num_labels, head_hidden,
                head_dropout, label_smoothing, ranking_loss, circle_margin, circle_scale,
                dual_agreement, contrastive_weight, contrastive_temperature
  data          the task reader (``data_pipelines.finetune``: every field documented there;
                ``SEQ2SEQ_TFDS_KEYS`` gives the source / target features of the TFDS
                summarisation datasets)
  evaluation    what ``unimo-jax evaluate`` computes on a fine-tuned run: splits, beam search
                (beam_size, max_length, alpha, min_length, block_trigrams), retrieval
                (rerank_k: the dual-encoder's top K re-scored by the cross-encoder, or 0 for
                every (image, caption) pair scored by it, the official protocol;
                cross_batch_size: pairs per cross-encoder batch; dual_encoder: that dual
                encoder is init_from's ("init") or the run's; rerank_fusion: w >= 0, ranking
                by cross + w * that dual encoder's cosine)
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from unimo_jax import parallel
from unimo_jax.finetune import tasks as tasks_lib
from unimo_jax.train import config as train_config

ConfigError = train_config.ConfigError


def default_config() -> ml_collections.ConfigDict:
  base = train_config.default_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = base.model
  c.init_from = ""
  c.init_step = 0
  c.task = ml_collections.ConfigDict(dataclasses.asdict(tasks_lib.TaskSpec(kind="classification")))

  d = c.data = ml_collections.ConfigDict()
  d.source = "tsv"                  # 'tsv' | 'tfds' | 'synthetic_scenes' | 'jsonl' | 'unimo_lines'
  d.train = ""                      # a file per split ('tfds': the TFDS split names)
  d.validation = ""
  d.test = ""
  d.tfds_name = ""                  # 'tfds': e.g. 'glue/sst2', 'cnn_dailymail', 'gigaword'
  d.tfds_data_dir = ""              # 'tfds': where it was prepared ('' = TFDS's default)
  d.source_key = ""                 # 'tfds' seq2seq: the source / target text features
  d.target_key = ""                 #   ('' = SEQ2SEQ_TFDS_KEYS' entry of the dataset)
  d.image_dir = ""                  # jsonl: the folder of the records' images
  d.image_size = 224                # jsonl: images are resized to the model's input side
  d.tokenizer = ""
  d.batch_size = 16
  d.eval_batch_size = 32
  d.max_length = 128
  d.max_source = 64
  d.max_target = 32
  d.label_names = []
  d.answers = []
  d.num_negative_images = 10        # official Flickr30k recipe: 10 + 10 negatives
  d.num_negative_texts = 10
  d.hard_negatives = 0              # retrieval: negatives among each positive's K hardest by the
                                    # starting dual encoder (0: among all, the official recipe)
  d.visual_input = "patches"
  d.pixel_mean = (0.5, 0.5, 0.5)
  d.pixel_std = (0.5, 0.5, 0.5)
  d.num_regions = 4
  d.region_feature_dim = 64
  d.seed = 0
  d.scenes = ml_collections.ConfigDict(dict(size="demo", image_size=64, input_size=0, seed=0,
                                            train_limit=0, eval_limit=0))

  c.optimizer = base.optimizer
  c.optimizer.learning_rate = 2e-5
  c.optimizer.weight_decay = 0.01
  c.train = base.train
  c.train.checkpoint_every = 0
  c.mesh = base.mesh
  c.axis_rules = base.axis_rules
  e = c.evaluation = ml_collections.ConfigDict()
  e.splits = ["validation"]
  e.beam_size = 1
  e.max_length = 20
  e.alpha = 0.0
  e.min_length = 1
  e.block_trigrams = False
  e.rerank_k = 10                   # retrieval: the cross-encoder re-scores the dual top K;
                                    # 0 = it scores every (image, caption) pair (official)
  e.cross_batch_size = 32           # retrieval: cross-encoder pairs per batch
  e.dual_encoder = "init"           # retrieval top-K from: 'init' (init_from's) | 'finetuned'
  e.rerank_fusion = 0.0             # retrieval: rank by cross + w * dual cosine (0: cross only)
  return c


SOURCES = ("tsv", "tfds", "synthetic_scenes", "jsonl", "unimo_lines")
TEXT_SOURCES = ("tsv", "tfds")
FILE_SOURCES = ("tsv", "jsonl", "unimo_lines")  # data.train / validation / test are paths

# TFDS summarisation datasets -> (source, target) text features, checked against the TFDS
# builders' own features (tests/test_finetune_tfds_seq2seq.py); others name data.source_key
# and data.target_key
SEQ2SEQ_TFDS_KEYS = {
    "cnn_dailymail": ("article", "highlights"),
    "gigaword": ("document", "summary"),
    "xsum": ("document", "summary"),
    "multi_news": ("document", "summary"),
    "billsum": ("text", "summary"),
    "samsum": ("dialogue", "summary"),
    "scientific_papers": ("article", "abstract"),
    "wikihow": ("text", "headline"),
    "aeslc": ("email_body", "subject_line"),
}


def tfds_prepared_dir(name: str, data_dir: str) -> str:
  """Where TFDS keeps ``name`` (``glue/sst2[:version]``) under ``data_dir`` ("" = TFDS's
  default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  root = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  base, _, version = name.partition(":")
  return os.path.join(os.path.expanduser(root), *base.split("/"), *([version] if version else []))


def seq2seq_tfds_keys(name: str, source_key: str = "", target_key: str = "") -> tuple[str, str]:
  """(source, target) feature names of the TFDS dataset ``name`` (``cnn_dailymail[:3.4.0]``,
  ``scientific_papers/arxiv``): the keys given, else its ``SEQ2SEQ_TFDS_KEYS`` entry; a
  one-line ValueError naming the field when neither says."""
  base = name.partition(":")[0].split("/")[0]
  known = SEQ2SEQ_TFDS_KEYS.get(base)
  keys = []
  for field, given, k in (("data.source_key", source_key, 0), ("data.target_key", target_key, 1)):
    if not given and known is None:
      raise ValueError(f"{field} is empty and TFDS {name!r} is not a known seq2seq dataset "
                       f"({', '.join(sorted(SEQ2SEQ_TFDS_KEYS))}): name its "
                       f"{'source' if k == 0 else 'target'} text feature")
    keys.append(given or known[k])
  if keys[0] == keys[1]:
    raise ValueError(f"data.source_key and data.target_key are both {keys[0]!r} "
                     f"(TFDS {name!r})")
  return keys[0], keys[1]


def _fail(msg: str):
  raise ConfigError(msg.replace("\n", " "))


def validate(config, *, num_devices: int, process_count: int = 1, check_files: bool = True):
  """Raises ``ConfigError`` with one line naming the first bad field."""
  cfg = train_config.plain(config)
  train_config.unknown_keys(cfg, train_config.plain(default_config()), "")
  mcfg = train_config.check_model(cfg["model"])
  try:
    spec = tasks_lib.TaskSpec.from_config(cfg["task"])
  except (ValueError, TypeError) as e:
    _fail(str(e))
  d = cfg["data"]
  if d["source"] not in SOURCES:
    _fail(f"data.source must be one of {', '.join(SOURCES)}, got {d['source']!r}")
  text_kinds = ("classification", "regression", "seq2seq")
  if (d["source"] in TEXT_SOURCES) != (spec.kind in text_kinds):
    _fail(f"task.kind={spec.kind!r} does not read data.source={d['source']!r} (text tasks read "
          f"'tsv' or 'tfds', image tasks 'synthetic_scenes', 'jsonl' or 'unimo_lines')")
  if d["source"] == "tfds":
    if not d["tfds_name"]:
      _fail("data.tfds_name is empty (the TFDS dataset, e.g. 'glue/sst2', 'cnn_dailymail')")
    if spec.kind == "seq2seq":
      try:
        seq2seq_tfds_keys(str(d["tfds_name"]), str(d.get("source_key", "")),
                          str(d.get("target_key", "")))
      except ValueError as e:
        _fail(str(e))
  for key in ("source_key", "target_key"):
    if d.get(key) and not (d["source"] == "tfds" and spec.kind == "seq2seq"):
      _fail(f"data.{key}={d[key]!r} names a TFDS feature: it is read by seq2seq with "
            f"data.source 'tfds' only (here task.kind={spec.kind!r}, data.source="
            f"{d['source']!r})")
  if d["source"] == "unimo_lines":
    if spec.kind not in ("entailment", "captioning"):
      _fail(f"data.source 'unimo_lines' holds UNIMO's SNLI-VE and captioning lines, not "
            f"task.kind={spec.kind!r}")
    if mcfg.visual_input != "regions":
      _fail("data.source 'unimo_lines' carries region features: it needs "
            "model.visual_input='regions'")
    if int(d["region_feature_dim"]) != mcfg.region_feature_dim:
      _fail(f"data.region_feature_dim={d['region_feature_dim']} differs from "
            f"model.region_feature_dim={mcfg.region_feature_dim}")
  if d["source"] == "jsonl" and mcfg.visual_input != "patches":
    _fail("data.source 'jsonl' decodes images: it needs model.visual_input='patches'")
  if d["source"] == "jsonl" and int(d["image_size"]) != mcfg.image_size:
    _fail(f"data.image_size={d['image_size']} differs from model.image_size={mcfg.image_size}")
  if spec.kind in tasks_lib.MULTIMODAL and d["visual_input"] != mcfg.visual_input:
    _fail(f"data.visual_input={d['visual_input']!r} differs from model.visual_input="
          f"{mcfg.visual_input!r}")
  if d["source"] == "synthetic_scenes" and mcfg.visual_input == "patches":
    size = int(d["scenes"]["input_size"]) or int(d["scenes"]["image_size"])
    if size != mcfg.image_size:
      _fail(f"data.scenes.input_size={size} differs from model.image_size={mcfg.image_size}")
  if spec.kind == "seq2seq":
    # the target's positions restart at 0: each block must fit the table, not their sum
    lengths = [("data.max_source", int(d["max_source"])),
               ("data.max_target", int(d["max_target"])),
               ("evaluation.max_length (decoded tokens)", int(cfg["evaluation"]["max_length"]))]
    for name, n in lengths[:2]:
      if n < 3:
        _fail(f"{name}={n} leaves no room for text ([CLS] ... [SEP] / [MASK] take 2)")
  else:
    lengths = [("data.max_length", int(d["max_length"]))]
  for name, n in lengths:
    if n > mcfg.max_text_length:
      _fail(f"{name}={n} exceeds the model's {mcfg.max_text_length} text positions "
            f"(model.max_positions)")
  try:
    shape = parallel.mesh_shape(dict(cfg["mesh"]), num_devices)
  except ValueError as e:
    _fail(f"{e} (config.mesh)")
  dp = shape[0] * shape[1]
  k = int(cfg["optimizer"]["grad_accum_steps"])
  if k < 1:
    _fail(f"optimizer.grad_accum_steps must be >= 1, got {k}")
  for key in ("batch_size", "eval_batch_size"):
    b = int(d[key])
    if b < 1 or b % process_count or b % (dp * (k if key == "batch_size" else 1)):
      _fail(f"data.{key}={b} must be a positive multiple of {dp} data-parallel devices"
            + (f" x {k} micro-batches" if k > 1 and key == "batch_size" else "")
            + f" and of {process_count} process(es)")
  t = cfg["train"]
  if int(t["total_steps"]) < 1:
    _fail("train.total_steps must be >= 1")
  train_config.check_optimizer(cfg["optimizer"], int(t["total_steps"]))
  if int(t["log_every"]) < 1:
    _fail("train.log_every must be >= 1")
  if t["init_from"]:
    _fail("train.init_from is pre-training's; fine-tuning starts from config.init_from")
  if t["progress_bar"] not in ("auto", "on", "off"):
    _fail("train.progress_bar must be auto|on|off")
  for key, spec in (("rerank_k", train_config.COUNT),
                    ("cross_batch_size", train_config.POSITIVE_INT),
                    ("beam_size", train_config.POSITIVE_INT)):
    if key in cfg["evaluation"]:
      train_config.check_number(f"evaluation.{key}", cfg["evaluation"][key], spec)
  fusion = cfg["evaluation"].get("rerank_fusion", 0.0)
  if isinstance(fusion, bool) or not isinstance(fusion, (int, float)) or not fusion >= 0:
    _fail(f"evaluation.rerank_fusion={fusion!r} must be a number >= 0 (0: the cross score alone)")
  if cfg["evaluation"].get("dual_encoder", "init") not in ("init", "finetuned"):
    _fail("evaluation.dual_encoder must be 'init' or 'finetuned'")
  hard = d.get("hard_negatives", 0)
  if not isinstance(hard, int) or hard < 0:
    _fail(f"data.hard_negatives={hard!r} must be an int >= 0 (0: uniform negatives)")
  if hard and cfg["task"]["kind"] != "retrieval":
    _fail(f"data.hard_negatives={hard} mines retrieval negatives; task.kind is "
          f"{cfg['task']['kind']!r}")
  if int(cfg["init_step"]) < 0:
    _fail("init_step must be >= 0 (0 = the latest checkpoint)")
  try:
    parallel.rules_from_config(cfg["axis_rules"])
  except ValueError as e:
    _fail(f"axis_rules: {e}")
  if check_files:
    problem = train_config.tokenizer_path_problem(str(d["tokenizer"]))
    if problem:
      _fail(problem)
    if cfg["init_from"] and not os.path.exists(os.path.expanduser(cfg["init_from"])):
      _fail(f"init_from: {cfg['init_from']} does not exist")
    if d["source"] in FILE_SOURCES and not d["train"]:
      _fail(f"data.train is empty (the task's training {d['source'].upper()} file)")
    for split in ("train", "validation", "test"):
      if (d["source"] in FILE_SOURCES and d[split]
          and not os.path.isfile(os.path.expanduser(d[split]))):
        _fail(f"data.{split}: {d[split]} does not exist")
    if d["source"] == "tfds":
      if d["tfds_data_dir"] and not os.path.isdir(os.path.expanduser(d["tfds_data_dir"])):
        _fail(f"data.tfds_data_dir: {d['tfds_data_dir']} is not a folder")
      where = tfds_prepared_dir(str(d["tfds_name"]), str(d["tfds_data_dir"]))
      if not os.path.isdir(where):
        base, _, config = str(d["tfds_name"]).partition(":")[0].partition("/")
        _fail(f"data.tfds_name {d['tfds_name']!r} is not prepared in {os.path.dirname(where)} "
              f"(nothing is downloaded at run time): run `tfds build {base}"
              + (f" --config {config}" if config else "")
              + " --data_dir DIR` where the network is reachable, copy DIR here and set "
              "data.tfds_data_dir=DIR")
    if d["source"] == "jsonl" and not os.path.isdir(os.path.expanduser(d["image_dir"])):
      _fail(f"data.image_dir: {d['image_dir'] or '(empty)'} is not a folder")
