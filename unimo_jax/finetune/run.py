"""Building a fine-tuning run: the same pieces as pre-training (``train.setup``: model config,
mesh, rules, optimizer, sharded state) with the task's parameters and step.

  run = build_finetune_run(config, data.spec)       # a ``setup.Run``
  trainer.train(config, workdir, data=data, run=run) # the pre-training loop, unchanged

The step (``make_finetune_step``) is the pre-training step's contract: jitted ``(state, batch)
-> (state, metrics)``, state donated, dropout key ``fold_in(key(seed), step)`` (so a resumed
run computes exactly the updates of an uninterrupted one), gradient accumulation over
micro-batches normalised by the WHOLE batch's count, and the non-finite guard (a non-finite loss
or gradient drops the update and grows ``nonfinite_streak``). Metrics: ``loss`` (the normalised
training loss), ``count`` and every task sum divided by the count (``accuracy`` from
``correct``, ``vqa_score``, ``nll``, ``abs_error``).

``new_state()`` starts from ``config.init_from`` (``finetune.init``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unimo_jax import parallel
from unimo_jax.finetune import init as init_lib
from unimo_jax.finetune import tasks as tasks_lib
from unimo_jax.model import ModelConfig, visual_length
from unimo_jax.train import flops as flops_lib
from unimo_jax.train import optimizer as opt_lib
from unimo_jax.train import setup as setup_lib
from unimo_jax.train import state as state_lib
from unimo_jax.train import train_step as step_lib
from unimo_jax.train.train_step import mesh_context

_NAMES = {"correct": "accuracy", "vqa_score_sum": "vqa_score", "nll_sum": "nll",
          "abs_error_sum": "abs_error", "contrastive_sum": "contrastive_loss",
          "contrastive_correct": "contrastive_accuracy"}


def _micro_batches(batch, k: int, mesh):
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ... (every device a share)."""
  spec = P(None, tuple(a for a in parallel.BATCH_AXES if a in mesh.shape))

  def split(x):
    x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return {n: split(x) for n, x in batch.items()}


def make_finetune_step(task: tasks_lib.Task, config, tx: optax.GradientTransformation, mesh,
                       state_shardings, batch_shapes: Mapping[str, Any], rules) -> Callable:
  """The jitted fine-tuning step (see the module docstring); ``.jitted`` and ``.lower``."""
  k = int(config.optimizer.grad_accum_steps)
  base_key = jax.random.key(int(config.seed))

  def grads_and_sums(params, batch, rng):
    denom = jnp.maximum(task.count(batch), 1.0)

    def loss_fn(p, mb, r):
      loss_sum, sums = task.loss(p, mb, r, deterministic=False)
      return loss_sum / denom, sums
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (loss, sums), g = grad_fn(params, batch, rng)
      return loss, sums, g
    mbs = _micro_batches(batch, k, mesh)

    def body(carry, xs):
      mb, j = xs
      (l, s), g = grad_fn(params, mb, jax.random.fold_in(rng, j))
      cl, cs, cg = carry
      return (cl + l, jax.tree.map(jnp.add, cs, s), jax.tree.map(jnp.add, cg, g)), None
    (_, s0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], mbs), rng)
    zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), t)
    (loss, sums, g), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros(s0), zeros(g0)),
                                      (mbs, jnp.arange(k)))
    return loss, sums, g

  def step(state, batch):
    rng = jax.random.fold_in(base_key, state.step)
    loss, sums, grads = grads_and_sums(state.params, batch, rng)
    new_state, guard = step_lib.guarded_update(tx, state, grads, loss)
    count = jnp.maximum(sums["count"], 1.0)
    metrics = {_NAMES.get(n, n): v / count for n, v in sums.items() if n != "count"}
    metrics.update(loss=loss, count=sums["count"], **guard)
    return new_state, metrics

  rows = parallel.batch_sharding(mesh)
  in_batch = {n: rows if len(tuple(s.shape)) else parallel.replicated(mesh)
              for n, s in batch_shapes.items()}
  jitted = jax.jit(step, in_shardings=(state_shardings, in_batch),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)

  def run(state, batch):
    with mesh_context(mesh, rules):
      return jitted(state, batch)

  def lower(state, batch):
    with mesh_context(mesh, rules):
      return jitted.lower(state, batch)
  run.jitted, run.lower = jitted, lower
  return run


def task_flops(model_cfg: ModelConfig, kind: str, shapes: Mapping[str, tuple]) -> float:
  """Analytic matmul FLOPs of one training step (3x the forward; ``train.flops``' rules)."""
  c = model_cfg
  b, length = shapes["ids"][0], shapes["ids"][-1]
  rows, total = b, length
  fwd = 0.0
  if kind in tasks_lib.MULTIMODAL:
    regions = shapes["region_features"][1] if "region_features" in shapes else 0
    nv = visual_length(c, regions or None)
    if kind == "retrieval":
      rows = b * (1 + (shapes.get("neg_pixels") or shapes["neg_region_features"])[1]
                  + shapes["neg_ids"][1])
    total = nv + length
    fwd += flops_lib.visual_embed_flops(rows, c, regions)
  fwd += flops_lib.encoder_flops(rows, total, c.hidden_size, c.mlp_dim, c.num_layers)
  if kind in ("captioning", "seq2seq"):
    fwd += flops_lib.lm_head_flops(b, shapes["positions"][1], c.hidden_size, c.vocab_size)
  else:
    fwd += 2.0 * rows * 2 * c.hidden_size * c.hidden_size  # the poolers (heads are small)
  return 3.0 * fwd


@dataclasses.dataclass
class FinetuneRun(setup_lib.Run):
  """A ``setup.Run`` whose parameters are ``{"model", "head"}`` and whose step is the task's."""
  task: tasks_lib.Task | None = None
  init_report: dict | None = None

  def new_state(self, params: Any | None = None) -> state_lib.TrainState:
    """A fresh sharded state from ``config.init_from`` (or the given params)."""
    if params is None:
      fresh, _ = state_lib.create_train_state(self.init_params, self.tx, self.mesh, self.rules,
                                              self.rng)
      host = jax.device_get(fresh.params)
      params, self.init_report = init_lib.initial_params(
          host, str(self.config.init_from), int(self.config.init_step), self.model_cfg)
    return super().new_state(params)

  def stream_rows(self) -> dict[str, int]:
    return {"finetune": self.batch_shapes["ids"].shape[0]}

  def flops(self) -> dict[str, float]:
    shapes = {k: v.shape for k, v in self.batch_shapes.items()}
    train = task_flops(self.model_cfg, self.task.spec.kind, shapes)
    return {"train": train, "forward": train / 3.0}


def build_finetune_run(config, batch_spec: Mapping[str, tuple] | None = None, *,
                       model_cfg: ModelConfig | None = None, vocab_size: int | None = None,
                       mesh=None, process_count: int | None = None) -> FinetuneRun:
  """``setup.build_run`` for a fine-tuning config (no array is created)."""
  if model_cfg is None:
    model_cfg = setup_lib.resolve_model_config(config, vocab_size)
  if mesh is None:
    mesh = parallel.make_mesh(dict(config.mesh))
  rules = parallel.rules_from_config(config.get("axis_rules"))
  tx, schedule = opt_lib.make_optimizer(config.optimizer, config.train.total_steps)
  task = tasks_lib.Task(model_cfg, tasks_lib.TaskSpec.from_config(config.task))
  rng = jax.random.key(int(config.seed))
  abstract, shardings = state_lib.state_shardings(task.init_params, tx, mesh, rules, rng)
  shapes = step = None
  if batch_spec is not None:
    count = jax.process_count() if process_count is None else int(process_count)
    shapes = setup_lib.global_shapes(batch_spec, count)
    step = make_finetune_step(task, config, tx, mesh, shardings, shapes, rules)
  return FinetuneRun(config=config, model_cfg=model_cfg, mesh=mesh, rules=rules, tx=tx,
                     schedule=schedule, init_params=task.init_params, rng=rng,
                     abstract_state=abstract, shardings=shardings, batch_shapes=shapes,
                     step=step, task=task)
