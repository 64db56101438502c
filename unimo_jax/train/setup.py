"""Building a run: a config and a batch spec -> model config, mesh, rules, optimizer, sharded
state and the compiled step.

``build_run`` is the one way to do it, for training, evaluation, benchmarks and tests alike:

  run = build_run(config, data.spec)        # data.spec: per-process {name: (shape, dtype)}
  state = run.new_state()                   # or checkpointer.restore(run.abstract_state)
  compiled = run.compile()                  # (state, global batch) -> (state, metrics)

Nothing here reads data or touches TensorFlow: the batch spec is all the step needs to know
about the input (which streams run, their global shapes), and the tokenizer only contributes
its vocabulary size (``vocab_size``) when ``config.model.vocab_size`` is 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from unimo_jax import parallel
from unimo_jax.model import ModelConfig
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import flops as flops_lib
from unimo_jax.train import optimizer as opt_lib
from unimo_jax.train import state as state_lib
from unimo_jax.train import train_step as step_lib


def resolve_model_config(config, vocab_size: int | None = None) -> ModelConfig:
  """``config.model`` -> ModelConfig, filling ``vocab_size = 0`` and ``dtype = "auto"``."""
  fields = config.model.to_dict()
  if fields.get("vocab_size", 0) == 0:
    if not vocab_size:
      raise ValueError("model.vocab_size is 0 (take the tokenizer's) but no tokenizer is known")
    fields["vocab_size"] = int(vocab_size)
  if fields.get("dtype") == "auto":
    # bf16 with f32 accumulation is the fast path on TPU/GPU; on CPU the small-width step is
    # dominated by elementwise work that bf16 does not speed up (measured: see README / report).
    fields["dtype"] = "bfloat16" if jax.default_backend() in ("tpu", "gpu") else "float32"
  return ModelConfig.from_dict(fields)


def check_tokenizer(model_cfg: ModelConfig, tokenizer) -> None:
  """The tokenizer and the model must agree on the vocabulary and every special id."""
  pairs = [("vocab_size", tokenizer.vocab_size, model_cfg.vocab_size),
           ("mask_id", tokenizer.mask_id, model_cfg.mask_token_id),
           ("pad_id", tokenizer.pad_id, model_cfg.pad_id),
           ("cls_id", tokenizer.cls_id, model_cfg.cls_id),
           ("sep_id", tokenizer.sep_id, model_cfg.sep_id)]
  for name, tok, mod in pairs:
    if int(tok) != int(mod):
      raise ValueError(f"tokenizer {name}={tok} but model {name}={mod} (config.model)")


def read_run(workdir: str, step: int | None = None,
             vocab_size: Callable[[Any], int] | None = None) -> tuple[Any, ModelConfig]:
  """(config as a ConfigDict, ModelConfig) of a run's workdir.

  The config is ``config.json`` (else the one saved with checkpoint ``step``, default the
  newest readable); the ModelConfig is ``model_config.json``, else ``resolve_model_config``
  of the config with ``vocab_size(config)`` (e.g. the tokenizer's) when its vocabulary is 0.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  else:
    config = ml_collections.ConfigDict(ckpt_lib.read_config(workdir, step))
  mpath = os.path.join(workdir, "model_config.json")
  if os.path.exists(mpath):
    with open(mpath) as f:
      return config, ModelConfig.from_json(f.read())
  size = vocab_size(config) if vocab_size and not config.model.get("vocab_size") else None
  return config, resolve_model_config(config, size)


def global_shapes(spec: Mapping[str, tuple], process_count: int) -> dict:
  """Per-process ``{name: (shape, dtype)}`` -> global ``ShapeDtypeStruct``s (rows x processes)."""
  out = {}
  for name, (shape, dtype) in spec.items():
    shape = tuple(shape)
    if shape:
      shape = (shape[0] * process_count,) + shape[1:]
    out[name] = jax.ShapeDtypeStruct(shape, np.dtype(dtype))
  return out


@dataclasses.dataclass
class Run:
  """Everything a run is made of, before any data flows (built by ``build_run``).

  Attributes:
    config: the run config.
    model_cfg: the resolved ModelConfig.
    mesh, rules: the device mesh and the logical-axis rules.
    tx, schedule: the optimizer and its learning-rate schedule (``step -> lr``).
    init_params: ``rng -> params`` (boxed with logical axes), params = {"model", "cmcl"}.
    rng: the initialisation key ``key(config.seed)``.
    abstract_state: the TrainState as ``ShapeDtypeStruct``s carrying their shardings (what a
      checkpoint restore needs).
    shardings: the TrainState's tree of ``NamedSharding``.
    batch_shapes: global ``{"<stream>/<field>": ShapeDtypeStruct}`` of one step's batch (None
      when built without a batch spec: no step).
    step: the jitted ``(state, batch) -> (state, metrics)`` (``train_step.make_train_step``;
      ``.jitted``, ``.lower``, ``.plans``), or None without a batch spec.
  """
  config: Any
  model_cfg: ModelConfig
  mesh: Mesh
  rules: Any
  tx: optax.GradientTransformation
  schedule: Callable[[int], Any]
  init_params: Callable[[jax.Array], Any]
  rng: jax.Array
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  batch_shapes: dict | None
  step: Callable | None

  def new_state(self, params: Any | None = None) -> state_lib.TrainState:
    """A fresh sharded state (``params``: start from these instead of the initialiser)."""
    state, _ = state_lib.create_train_state(self.init_params, self.tx, self.mesh, self.rules,
                                            self.rng, params=params)
    return state

  def abstract_batch(self) -> dict:
    """The global batch as ``ShapeDtypeStruct``s with the step's input shardings."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=parallel.batch_sharding(self.mesh) if v.shape
                                    else parallel.replicated(self.mesh))
            for k, v in self.batch_shapes.items()}

  def compile(self):
    """The step compiled for ``abstract_state`` and ``abstract_batch`` (no array needed)."""
    return self.step.lower(self.abstract_state, self.abstract_batch()).compile()

  def stream_rows(self) -> dict[str, int]:
    """Global rows per step of each stream."""
    return {k.split("/")[0]: v.shape[0] for k, v in self.batch_shapes.items()
            if k.endswith("/row_valid")}

  def flops(self) -> dict[str, float]:
    """Analytic FLOPs of one step (``flops.step_flops``: "train", "forward", per objective)."""
    return flops_lib.step_flops(self.model_cfg, self.config.objectives,
                                {k: v.shape for k, v in self.batch_shapes.items()},
                                self.config.cmcl)


def build_run(config, batch_spec: Mapping[str, tuple] | None = None, *,
              model_cfg: ModelConfig | None = None, vocab_size: int | None = None,
              mesh: Mesh | None = None, process_count: int | None = None) -> Run:
  """Builds a run from a validated config and the input's batch spec (no array is created).

  Args:
    config: the run config (``unimo_jax.train.config``).
    batch_spec: PER-PROCESS ``{"<stream>/<field>": (shape, dtype)}`` of the input (the data
      iterator's ``spec``, or ``data_pipelines.schema.batch_spec``); None builds no step (e.g.
      evaluation, which needs only the parameter shardings).
    model_cfg: the ModelConfig (default: ``resolve_model_config(config, vocab_size)``).
    vocab_size: the tokenizer's vocabulary size, used when ``config.model.vocab_size`` is 0.
    mesh: the device mesh (default: ``config.mesh`` over every device).
    process_count: processes feeding the batch (default: ``jax.process_count()``).
  """
  if model_cfg is None:
    model_cfg = resolve_model_config(config, vocab_size)
  if mesh is None:
    mesh = parallel.make_mesh(dict(config.mesh))
  rules = parallel.rules_from_config(config.get("axis_rules"))
  tx, schedule = opt_lib.make_optimizer(config.optimizer, config.train.total_steps)
  init_params = step_lib.init_params_fn(model_cfg, float(config.cmcl.temperature_init))
  rng = jax.random.key(int(config.seed))
  abstract, shardings = state_lib.state_shardings(init_params, tx, mesh, rules, rng)
  shapes = step = None
  if batch_spec is not None:
    count = jax.process_count() if process_count is None else int(process_count)
    shapes = global_shapes(batch_spec, count)
    step = step_lib.make_train_step(model_cfg, config, tx, mesh, shardings, shapes, rules)
  return Run(config=config, model_cfg=model_cfg, mesh=mesh, rules=rules, tx=tx,
             schedule=schedule, init_params=init_params, rng=rng, abstract_state=abstract,
             shardings=shardings, batch_shapes=shapes, step=step)
