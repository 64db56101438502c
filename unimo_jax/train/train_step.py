"""The UNIMO train step: every objective on its stream, weighted, one optimizer update.

Written on the GLOBAL batch (``"<stream>/<field>"`` arrays sharded over the mesh's batch axes);
sharding is a property of the arrays, the loss code never sees a device. Each objective's loss
is normalised by its GLOBAL count of targets (masked tokens, masked regions, contrastive
anchors), including across gradient-accumulation micro-batches: every micro-batch's loss is
scaled by ``its count / the whole batch's count``, so the sum over micro-batches is exactly the
loss of the whole batch (for CMCL, in-batch negatives are those of the micro-batch).

Parameters: ``{"model": <Unimo params>, "cmcl": {"log_temperature": f32[]}}``.

The objectives (``unimo_objectives``) run in four merged encoder passes; with UNIMO's
alternation the phase ``state.step % 2`` selects each stream's language rows (MLM or seq2seq)
inside one program. Metrics are named ``<objective>/<metric>``; objectives not run in a phase
report NaN (the logger averages over the steps where they ran).

Non-finite guard: if the loss or the gradient norm is not finite the update is dropped
(parameters and optimizer state unchanged), ``nonfinite_streak`` grows and the loop decides to
stop; a finite step resets the streak.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimo_jax import parallel
from unimo_jax.losses import contrastive
from unimo_jax.model import ModelConfig
from unimo_jax.model.unimo import init_variables
from unimo_jax.train import objectives as obj_lib
from unimo_jax.train.state import TrainState
from unimo_jax.train.unimo_objectives import UnimoObjectives, objective_counts  # noqa: F401

Batch = Mapping[str, jax.Array]


def init_params_fn(model_cfg: ModelConfig, temperature_init: float) -> Callable[[jax.Array], Any]:
  """``rng -> params`` with logical-axis boxes on the model's parameters (for state creation)."""
  def init(rng):
    return {"model": init_variables(model_cfg, rng)["params"],
            "cmcl": {"log_temperature": contrastive.init_log_temperature(temperature_init)}}
  return init


# ------------------------------------------------------------------------------ the step
def _micro_batches(batch: Batch, k: int, mesh: Mesh) -> Batch:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ... so every device
  holds an equal share of every micro-batch (rows are sharded in contiguous blocks)."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    spec = P(None, tuple(a for a in parallel.BATCH_AXES if a in mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return {name: split(x) for name, x in batch.items()}



def guarded_update(tx: optax.GradientTransformation, state, grads, loss) -> tuple[Any, dict]:
  """One optimizer update of ``state`` (a ``TrainState``) unless ``loss`` or the gradient norm
  is non-finite, in which case parameters and optimizer state are kept and the streak counts.

  Returns ``(new_state, metrics)`` with grad_norm, param_norm (of the parameters returned),
  nonfinite (1.0 on a skipped step) and nonfinite_streak. Shared by pre-training and
  fine-tuning steps."""
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply(params_and_opt):
    params, opt_state = params_and_opt
    if hasattr(tx, "fused_apply"):  # optimizer.FusedAdamW: one pass over each parameter
      return tx.fused_apply(grads, opt_state, params, grad_norm)
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt

  # As a cond (not a `where` between the updated and the old trees) and with the norm taken of
  # the returned parameters, nothing reads the donated old buffers after the update, so XLA
  # updates them in place; the `where` and a norm of the old parameters made it copy every
  # parameter and both Adam moments first (3x the model's size each step; S1 of
  # benchmarks/step_vs_peers.py 2.93 -> 2.81 s).
  new_params, new_opt = lax.cond(ok, apply, lambda a: a, (state.params, state.opt_state))
  streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=new_params, opt_state=new_opt, nonfinite_streak=streak,
      nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
  return new_state, dict(grad_norm=grad_norm, param_norm=optax.tree.norm(new_params),
                         nonfinite=(~ok).astype(jnp.float32), nonfinite_streak=streak)

def make_train_step(model_cfg: ModelConfig, config: Any, tx: optax.GradientTransformation,
                    mesh: Mesh, state_shardings: TrainState, batch_shapes: Mapping[str, Any],
                    rules=parallel.DEFAULT_RULES) -> Callable[[TrainState, Batch],
                                                              tuple[TrainState, dict]]:
  """Builds the jitted ``(state, batch) -> (state, metrics)`` step (state donated).

  Args:
    model_cfg: the ModelConfig.
    config: the run config (objectives, cmcl, optimizer.grad_accum_steps, seed).
    tx: the optimizer.
    mesh, state_shardings: the mesh and the TrainState's shardings.
    batch_shapes: ``{"<stream>/<field>": global shape}`` (decides which objectives can run).
    rules: logical-axis rules for the model's activation constraints.
  """
  objectives = UnimoObjectives(model_cfg, config, mesh)
  streams = sorted({k.split("/")[0] for k in batch_shapes})
  phases = obj_lib.num_phases(config.objectives)
  plans = [obj_lib.active(config.objectives, streams, p) for p in range(phases)]
  every = tuple(o for o in obj_lib.OBJECTIVES if any(o in plan for plan in plans))
  k = int(config.optimizer.grad_accum_steps)
  base_key = jax.random.key(int(config.seed))

  def loss_fn(params, mb, rng, phase, totals):
    """Loss and metrics of one (micro-)batch; ``phase`` selects the alternating objectives."""
    counts = objective_counts(mb, model_cfg, every)
    scales = {n: jnp.where(totals[n] > 0, counts[n] / jnp.maximum(totals[n], 1.0), 0.0)
              for n in every}
    return objectives(params, mb, rng, every, scales, phase)

  def grads_and_metrics(params, batch, rng, phase):
    """Gradients and metrics over the k micro-batches, normalised by whole-batch counts."""
    totals = objective_counts(batch, model_cfg, every)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (loss, metrics), grads = grad_fn(params, batch, rng, phase, totals)
      return loss, metrics, grads
    mbs = _micro_batches(batch, k, mesh)

    def body(carry, xs):
      mb, j = xs
      (l, m), g = grad_fn(params, mb, jax.random.fold_in(rng, j), phase, totals)
      acc_l, acc_m, acc_g = carry
      return (acc_l + l, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g)), None

    (_, m0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], mbs), rng, phase,
                                 totals)
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
    init = (jnp.zeros((), jnp.float32), zeros(m0), zeros(g0))
    (loss, metrics, grads), _ = jax.lax.scan(body, init, (mbs, jnp.arange(k)))
    return loss, metrics, grads

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(base_key, state.step)
    loss, metrics, grads = grads_and_metrics(state.params, batch, rng, state.step % phases)
    new_state, guard = guarded_update(tx, state, grads, loss)
    metrics = dict(metrics, loss=loss, **guard)
    return new_state, metrics

  batch_sharding = parallel.batch_sharding(mesh)
  in_batch = {n: batch_sharding if len(shape) else parallel.replicated(mesh)
              for n, shape in ((n, tuple(getattr(s, "shape", s))) for n, s in batch_shapes.items())}
  jitted = jax.jit(step, in_shardings=(state_shardings, in_batch),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)

  def run(state: TrainState, batch: Batch):
    with mesh_context(mesh, rules):
      return jitted(state, batch)

  def lower(state, batch):
    with mesh_context(mesh, rules):
      return jitted.lower(state, batch)

  run.jitted = jitted
  run.lower = lower
  run.objectives = objectives
  run.plans = plans
  return run


class mesh_context:
  """The mesh and logical-axis rules the model's sharding constraints read while tracing."""

  def __init__(self, mesh: Mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._stack = []

  def __enter__(self):
    import flax.linen as nn
    for cm in (jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)):
      cm.__enter__()
      self._stack.append(cm)
    return self

  def __exit__(self, *exc):
    while self._stack:
      self._stack.pop().__exit__(*exc)
