"""The run config: every field with its default and meaning, and its validation.

Experiment files (``experiments/configs/*.py``) start from ``default_config()`` and change what
they need; ``validate`` then rejects unknown keys (a typo in a config file would otherwise be
silently ignored) and inconsistent values with ONE line naming the field, before anything is
compiled. Sections:

  seed          int: parameter init and dropout (step s uses fold_in(key(seed), s))
  model         every ``unimo_jax.model.ModelConfig`` field (documented there); plus
                ``vocab_size = 0`` (take the tokenizer's) and ``dtype = "auto"`` (bfloat16 on
                TPU/GPU, float32 on CPU, where the step measured faster in float32)
  data          the input pipeline's section (``data_pipelines.pipeline.default_config`` has every
                field): sources, stream batch sizes (GLOBAL rows per step), lengths, Kp/Kn/Ki/Kt
  objectives    which losses run and their weights (``unimo_jax.train.objectives``)
  cmcl          the contrastive loss's assumptions (UNIMO's paper leaves them open; the defaults
                are UNIMO-2's released choices)
  optimizer     AdamW and its schedule (``unimo_jax.train.optimizer``)
  train         loop, checkpoints, logging, non-finite guard, initialisation
  mesh          device mesh sizes (one may be -1), ``unimo_jax.parallel``
  axis_rules    logical axis -> mesh axes rules for parameters and activations
  evaluation    evaluators run by ``unimo-jax evaluate`` and every ``train.eval_every`` steps:
                the keys of ``unimo_jax.evaluation.runner.EvalSettings`` and of
                ``unimo_jax.evaluation.main`` (``splits``, ``limit``, ...; checked here against
                the runner's list); the loop evaluates ``evaluation.train_splits``

Every numeric field is range-checked (batch sizes, keep counts, lengths >= 0, rates in [0, 1],
...). ``validate`` never imports ``data_pipelines``: the command passes the pipeline's data
defaults in (``data_defaults``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import ml_collections

from unimo_jax import parallel
from unimo_jax.train import objectives as obj_lib

FREE_FORM = ("evaluation", "neighbours")  # sections whose keys other modules validate


class ConfigError(ValueError):
  """A config problem, described in one line."""


def default_config() -> ml_collections.ConfigDict:
  """Every field of a run with its default (a tiny CPU-sized run on no data)."""
  from unimo_jax.model import ModelConfig
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig.tiny()))

  # The pipeline fills every data field the config leaves out from its own defaults.
  c.data = ml_collections.ConfigDict()

  o = c.objectives = ml_collections.ConfigDict()
  # 'alternate' (UNIMO: MLM on even steps, seq2seq on odd) | 'both' | 'mlm' | 's2s'
  o.text_mode = "alternate"        # text corpus: span MLM vs seq2seq infilling
  o.pair_text_mode = "alternate"   # pairs: MLM on the caption vs captioning
  o.weights = ml_collections.ConfigDict({name: 1.0 for name in obj_lib.OBJECTIVES})
  o.label_smoothing = 0.0          # uniform label smoothing of MLM / seq2seq targets
  o.mrp_regression_weight = 1.0    # masked region prediction: L2 feature regression term
  o.mrp_class_weight = 1.0         # ... detector class term (regions only)
  o.mrp_regression_reduction = "mean"  # 'sum' over F (the paper's ||.||^2) or 'mean' over F
  o.mrp_soft_labels = True         # KL to the detector's class distribution (else CE on labels)
  o.mrp_normalize_patches = True   # patches: regress per-patch normalised pixels (MAE)

  m = c.cmcl = ml_collections.ConfigDict()
  m.implementation = "all_gather"  # 'all_gather' | 'ring' (O(local x block) memory) | 'reference'
  m.temperature_init = 0.07        # learnable tau, log-parameterised (UNIMO-2)
  m.temperature_min = 0.001        # tau is clipped to [min, max]
  m.temperature_max = 0.5
  m.learn_temperature = True
  m.use_positives = True           # paraphrase rewrites X+ as extra positive texts
  m.use_related_texts = True       # retrieved related texts X_T as extra positive texts
  m.use_negatives = True           # scene-graph / lexicon rewrites X- as hard negatives
  m.use_related_images = True      # retrieved related images X_I as extra positive images

  p = c.optimizer = ml_collections.ConfigDict()
  p.learning_rate = 1e-4
  p.warmup_steps = 10
  p.schedule = "linear"            # 'linear' | 'cosine' | 'constant' | 'step' after warmup
  p.end_lr_factor = 0.0
  # 'step': the learning rate drops x step_factor at each boundary: update steps (ints) or
  # fractions of train.total_steps (floats in (0, 1)), e.g. (0.6, 0.8) = epochs 24, 32 of 40
  p.step_boundaries = ()
  p.step_factor = 0.1
  p.b1 = 0.9
  p.b2 = 0.98                      # UNIMO / RoBERTa
  p.eps = 1e-6
  p.weight_decay = 0.01            # decoupled; never on biases, LayerNorm or the temperature
  p.clip_norm = 1.0                # global norm; 0 = off
  p.grad_accum_steps = 1           # micro-batches per update (each stream's batch is split)

  t = c.train = ml_collections.ConfigDict()
  t.total_steps = 100
  t.log_every = 10                 # metrics averaged over this many steps
  t.checkpoint_every = 50          # 0 = only at the end and on a stop signal
  t.keep_checkpoints = 3           # newest checkpoints kept
  t.keep_period = 0                # also keep every step that is a multiple of this (0 = none)
  t.async_checkpoints = True
  t.max_nonfinite_steps = 5        # consecutive skipped (non-finite) updates before stopping
  t.init_from = ""                 # a converted RoBERTa dir (``unimo-jax convert roberta``)
  t.eval_every = 0                 # run config.evaluation every N steps (0 = never)
  t.peak_flops_per_device = 0.0    # for MFU; 0 = the table in unimo_jax.train.flops
  t.progress_bar = "auto"          # 'auto' (on a terminal) | 'on' | 'off'
  t.compile_report = True          # log the compiled step's memory analysis before step 1

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.axis_rules = [[name, list(axes) if isinstance(axes, tuple) else axes]
                  for name, axes in parallel.DEFAULT_RULES]
  # Declared so that the command line can set them (the rest of the section is free-form).
  c.evaluation = ml_collections.ConfigDict()
  c.evaluation.train_splits = ("validation",)  # splits the loop evaluates every eval_every steps
  c.evaluation.splits = ()         # `unimo-jax evaluate`'s splits (() = the source's test splits)
  c.evaluation.limit = 0           # images per split (0 = all)
  return c


# ------------------------------------------------------------------------------ validation
def _fail(msg: str):
  raise ConfigError(msg.replace("\n", " "))


def unknown_keys(cfg: Mapping, ref: Mapping, prefix: str) -> None:
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if key not in ref:
      close = [k for k in ref if k.lower().startswith(str(key)[:3].lower())]
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      _fail(f"unknown config key {name!r}{hint}")
    if isinstance(value, Mapping) and isinstance(ref[key], Mapping) and ref[key]:
      unknown_keys(value, ref[key], name + ".")


def plain(x):
  if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return x.to_dict()
  return x


def check_model(model: Mapping):
  """The ``model`` section as a ModelConfig (``vocab_size = 0`` and ``dtype = "auto"`` take
  placeholders for the structural checks; the tokenizer and the backend decide them later)."""
  from unimo_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel
  model = dict(model)
  if model.get("vocab_size", 0) == 0:
    model["vocab_size"] = 1000
  if model.get("dtype") == "auto":
    model["dtype"] = "float32"
  try:
    return ModelConfig.from_dict(model)
  except (ValueError, TypeError) as e:
    _fail(f"model: {e}")


def tokenizer_path_problem(spec: str) -> str | None:
  """Why a tokenizer spec cannot be loaded (None if its files exist)."""
  if not spec:
    return "data.tokenizer is empty (a spec like 'sentencepiece:/path/x.model' or 'bpe:/dir')"
  kind, _, path = spec.partition(":")
  path = os.path.expanduser(path)
  if kind == "sentencepiece":
    if not os.path.isfile(path):
      return f"data.tokenizer: {path} does not exist (train one with `unimo-jax tokenizer train`)"
  elif kind == "bpe":
    missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(path, f))]
    if missing:
      return f"data.tokenizer: {path} lacks {', '.join(missing)}"
  else:
    return f"data.tokenizer: unknown kind {kind!r} in {spec!r} (sentencepiece:... or bpe:...)"
  return None


def resolved_data(config, data_defaults: Mapping) -> dict:
  """The data section merged over the pipeline's defaults (plain dicts)."""
  out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in plain(data_defaults).items()}
  out["streams"] = {s: dict(v) for s, v in out.get("streams", {}).items()}
  for k, v in plain(config.data).items():
    if k == "streams":
      for s, sv in v.items():
        out["streams"].setdefault(s, {}).update(sv)
    else:
      out[k] = v
  return out


def enabled_streams(data: Mapping) -> tuple[str, ...]:
  return tuple(s for s in ("text", "image", "pair") if int(
      data["streams"].get(s, {}).get("batch_size", 0)) > 0 and data["streams"][s].get("sources"))


# Numeric fields and their ranges: (integer?, minimum, maximum, minimum excluded?).
_COUNT = (True, 0, None, False)
_POSITIVE_INT = (True, 1, None, False)
COUNT, POSITIVE_INT = _COUNT, _POSITIVE_INT  # for the other sections' validators
_NONNEG = (False, 0, None, False)
_RATE = (False, 0, 1, False)
RANGES = {
    "optimizer.learning_rate": (False, 0, None, True), "optimizer.warmup_steps": _COUNT,
    "optimizer.end_lr_factor": _NONNEG, "optimizer.b1": _RATE, "optimizer.b2": _RATE,
    "optimizer.eps": _NONNEG, "optimizer.weight_decay": _NONNEG, "optimizer.clip_norm": _NONNEG,
    "optimizer.grad_accum_steps": _POSITIVE_INT, "optimizer.step_factor": (False, 0, 1, True),
    "objectives.label_smoothing": _RATE, "objectives.mrp_regression_weight": _NONNEG,
    "objectives.mrp_class_weight": _NONNEG,
    "train.total_steps": _POSITIVE_INT, "train.log_every": _POSITIVE_INT,
    "train.checkpoint_every": _COUNT, "train.keep_checkpoints": _COUNT,
    "train.keep_period": _COUNT, "train.max_nonfinite_steps": _POSITIVE_INT,
    "train.eval_every": _COUNT, "train.peak_flops_per_device": _NONNEG,
    "data.image_size": _POSITIVE_INT, "data.patch_size": _POSITIVE_INT,
    "data.max_image_pixels": _POSITIVE_INT, "data.num_regions": _POSITIVE_INT,
    "data.region_feature_dim": _POSITIVE_INT, "data.num_region_classes": _POSITIVE_INT,
    "data.region_mask_rate": _RATE, "data.region_overlap_threshold": _NONNEG,
    "data.num_positives": _COUNT, "data.num_negatives": _COUNT,
    "data.num_related_images": _COUNT, "data.num_related_texts": _COUNT,
    "data.mixture_period": _POSITIVE_INT, "data.max_attempts": _POSITIVE_INT,
    "data.parallel_batches": _POSITIVE_INT, "data.prefetch": _COUNT,
}
# Per stream (``data.streams.<stream>.<field>``).
STREAM_RANGES = {
    "batch_size": _COUNT, "max_length": _POSITIVE_INT, "max_predictions": _COUNT,
    "s2s_max_length": _POSITIVE_INT, "s2s_max_predictions": _COUNT, "mask_rate": _RATE,
    "infilling_rate": _RATE,
}


def check_number(name: str, value, spec) -> None:
  integer, lo, hi, open_lo = spec
  kind = "an integer" if integer else "a number"
  ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
  if isinstance(value, bool) or not ok_type:
    _fail(f"{name} must be {kind}, got {value!r}")
  bounds = [f"> {lo}" if open_lo else f">= {lo}"] + ([f"<= {hi}"] if hi is not None else [])
  if (value <= lo if open_lo else value < lo) or (hi is not None and value > hi):
    _fail(f"{name} must be {kind} {' and '.join(bounds)}, got {value!r}")


def _lookup(cfg: Mapping, dotted: str):
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return node


def _check_ranges(cfg: Mapping, data: Mapping) -> None:
  """Every numeric field in its range (the data section as resolved over its defaults)."""
  merged = dict(cfg, data=data)
  for name, spec in RANGES.items():
    value = _lookup(merged, name)
    if value is not None:
      check_number(name, value, spec)
  if data.get("jpeg_decode", "auto") not in ("auto", "accurate", "fast", "pillow"):
    _fail("data.jpeg_decode must be 'auto', 'accurate', 'fast' or 'pillow', got "
          f"{data.get('jpeg_decode')!r}")
  for stream, fields in data.get("streams", {}).items():
    for key, spec in STREAM_RANGES.items():
      if key in fields:
        check_number(f"data.streams.{stream}.{key}", fields[key], spec)


def _unknown_data_keys(user: Mapping, ref: Mapping) -> None:
  """Keys of ``config.data`` (and of its streams) the pipeline does not know."""
  for key, value in user.items():
    if key not in ref:
      _fail(f"unknown config key 'data.{key}'")
    if key == "streams":
      for stream, fields in value.items():
        if stream not in ref["streams"]:
          _fail(f"unknown config key 'data.streams.{stream}' (streams: "
                f"{', '.join(ref['streams'])})")
        for field in fields:
          if field not in ref["streams"][stream]:
            _fail(f"unknown config key 'data.streams.{stream}.{field}'")


def _check_evaluation(cfg: Mapping) -> None:
  """The ``evaluation`` section: the evaluators' own settings (``runner.EvalSettings``), the
  split lists and the numbers, before anything is compiled."""
  from unimo_jax.evaluation import runner  # pylint: disable=import-outside-toplevel
  section = dict(cfg.get("evaluation") or {})
  try:
    runner.EvalSettings.from_config(section)
  except (ValueError, TypeError) as e:
    _fail(f"evaluation: {e}")
  for key in ("train_splits", "splits"):
    if key in section:
      value = section[key]
      if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        _fail(f"evaluation.{key} must be a list of split names, got {value!r}")
  if int(cfg["train"]["eval_every"]) and not section.get("train_splits", ("validation",)):
    _fail("train.eval_every is set but evaluation.train_splits is empty")
  for key, spec in (("limit", _COUNT), ("batch_size", _POSITIVE_INT),
                    ("caption_images", _COUNT)):
    if key in section:
      check_number(f"evaluation.{key}", section[key], spec)


def check_optimizer(p: Mapping, total_steps: int) -> None:
  """The ``optimizer`` section: numbers in range, a known schedule, and for ``'step'`` its
  boundaries resolved against ``train.total_steps`` (``optimizer.step_boundary_steps``)."""
  from unimo_jax.train import optimizer as opt_lib  # pylint: disable=import-outside-toplevel
  for name, spec in RANGES.items():
    section, _, key = name.partition(".")
    if section == "optimizer" and key in p:
      check_number(name, p[key], spec)
  if p["schedule"] not in opt_lib.SCHEDULES:
    _fail(f"optimizer.schedule must be {'|'.join(opt_lib.SCHEDULES)}, got {p['schedule']!r}")
  boundaries = p.get("step_boundaries", ())
  if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, (list, tuple)):
    _fail(f"optimizer.step_boundaries must be a list of steps or fractions, got {boundaries!r}")
  if p["schedule"] == "step":
    try:
      opt_lib.step_boundary_steps(boundaries, total_steps, int(p["warmup_steps"]))
    except ValueError as e:
      _fail(str(e))
  elif boundaries:
    _fail(f"optimizer.step_boundaries={tuple(boundaries)} is set but optimizer.schedule="
          f"{p['schedule']!r} (the boundaries are the 'step' schedule's)")


def validate(config, *, num_devices: int, data_defaults: Mapping, process_count: int = 1,
             check_files: bool = True) -> dict:
  """Checks a run config; raises ``ConfigError`` with one line on the first problem.

  Args:
    config: the run ConfigDict.
    num_devices: devices of the whole run (all processes).
    process_count: processes of the run.
    data_defaults: the pipeline's data section with every default
      (``data_pipelines.pipeline.default_config()``; the command passes it in).
    check_files: check that the tokenizer and ``train.init_from`` exist.

  Returns:
    The resolved data section (plain dicts), for the caller's use.
  """
  ref = default_config()
  cfg = plain(config)
  for section in FREE_FORM:
    ref[section] = ml_collections.ConfigDict()
  ref_plain = plain(ref)
  data_ref = plain(data_defaults)
  ref_plain["data"] = {}
  unknown_keys({k: v for k, v in cfg.items() if k not in FREE_FORM + ("data",)}, ref_plain, "")
  _unknown_data_keys(cfg.get("data", {}), data_ref)
  data = resolved_data(config, data_defaults)
  _check_ranges(cfg, data)

  model = cfg["model"]
  mcfg = check_model(model)

  # mesh and batch sizes
  try:
    shape = parallel.mesh_shape(dict(cfg["mesh"]), num_devices)
  except ValueError as e:
    _fail(f"{e} (config.mesh)")
  dp = shape[0] * shape[1]
  streams = enabled_streams(data)
  if not streams:
    _fail("data: no stream has a batch_size > 0 and sources")
  k = int(cfg["optimizer"]["grad_accum_steps"])
  if k < 1:
    _fail(f"optimizer.grad_accum_steps must be >= 1, got {k}")
  for s in streams:
    b = int(data["streams"][s]["batch_size"])
    if b % process_count:
      _fail(f"data.streams.{s}.batch_size={b} is not divisible by the {process_count} processes")
    if b % (dp * k):
      _fail(f"data.streams.{s}.batch_size={b} is not divisible by {dp} data-parallel devices"
            + (f" x {k} micro-batches" if k > 1 else "") + f" (mesh {dict(zip(parallel.MESH_AXES, shape))})")

  # model <-> data consistency
  keys = ("visual_input",) if mcfg.visual_input == "regions" else (
      "visual_input", "image_size", "patch_size")
  for key in keys:
    if data.get(key) != model.get(key):
      _fail(f"data.{key}={data.get(key)!r} differs from model.{key}={model.get(key)!r}")
  if mcfg.visual_input == "regions":
    for key in ("region_feature_dim", "num_region_classes"):
      if int(data[key]) != int(model[key]):
        _fail(f"data.{key}={data[key]} differs from model.{key}={model[key]}")
  for s in streams:
    sc = data["streams"][s]
    for key in ("max_length", "s2s_max_length"):
      if s != "image" and key in sc and int(sc[key]) > mcfg.max_text_length:
        _fail(f"data.streams.{s}.{key}={sc[key]} exceeds the model's {mcfg.max_text_length} "
              f"text positions (model.max_positions)")

  # objectives, cmcl, optimizer, train
  o = cfg["objectives"]
  for key in ("text_mode", "pair_text_mode"):
    if o[key] not in obj_lib.TEXT_MODES:
      _fail(f"objectives.{key} must be one of {obj_lib.TEXT_MODES}, got {o[key]!r}")
  for name, w in o["weights"].items():
    if float(w) < 0:
      _fail(f"objectives.weights.{name} must be >= 0, got {w}")
  if o["mrp_regression_reduction"] not in ("sum", "mean"):
    _fail("objectives.mrp_regression_reduction must be 'sum' or 'mean'")
  run = obj_lib.all_active(ml_collections.ConfigDict(o), streams)
  if not run:
    _fail(f"no objective runs: every weighted objective's stream is off (streams: {streams})")
  for s in streams:
    objs = tuple(data["streams"][s].get("objectives", ("mlm", "s2s")))
    for name in run:
      o = obj_lib.REGISTRY[name]
      if o.kind == "language" and o.stream == s and o.layout not in objs:
        _fail(f"objective {name} runs but data.streams.{s}.objectives={objs} lacks {o.layout!r}")
  m = cfg["cmcl"]
  if m["implementation"] not in ("all_gather", "ring", "reference"):
    _fail(f"cmcl.implementation must be all_gather|ring|reference, got {m['implementation']!r}")
  if not 0 < m["temperature_min"] <= m["temperature_init"] <= m["temperature_max"]:
    _fail("cmcl: need 0 < temperature_min <= temperature_init <= temperature_max")
  check_optimizer(cfg["optimizer"], int(cfg["train"]["total_steps"]))
  t = cfg["train"]
  if t["progress_bar"] not in ("auto", "on", "off"):
    _fail("train.progress_bar must be auto|on|off")
  try:
    parallel.rules_from_config(cfg["axis_rules"])
  except ValueError as e:
    _fail(f"axis_rules: {e}")

  _check_evaluation(cfg)

  if check_files:
    if any(s in streams for s in ("text", "pair")) or int(t["eval_every"]):
      problem = tokenizer_path_problem(str(data.get("tokenizer", "")))
      if problem:
        _fail(problem)
    if t["init_from"] and not os.path.exists(os.path.expanduser(t["init_from"])):
      _fail(f"train.init_from: {t['init_from']} does not exist")
  return data
