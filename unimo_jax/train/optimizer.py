"""AdamW with UNIMO's settings, learning-rate schedules and the weight-decay mask.

UNIMO (and RoBERTa before it) trains with Adam ``β1 = 0.9, β2 = 0.98, ε = 1e-6``, decoupled weight
decay that skips biases and LayerNorm parameters, gradient clipping at global norm 1.0, and a
linear warmup followed by a linear decay. All of these are config fields (``config.optimizer``):

  learning_rate      peak learning rate after warmup
  warmup_steps       linear warmup from 0 to the peak
  schedule           'linear' | 'cosine' | 'constant' | 'step' after warmup
  end_lr_factor      final learning rate as a fraction of the peak (linear / cosine)
  step_boundaries    'step': where the learning rate drops, as update steps (ints) or as
                     fractions of the run's total steps (floats in (0, 1)); e.g. Flickr30k's
                     official "x0.1 at epochs 24 and 32 of 40" is (0.6, 0.8)
  step_factor        'step': the learning rate is multiplied by this at each boundary
  b1, b2, eps        Adam moments
  weight_decay       decoupled weight decay (AdamW), masked by ``decay_mask``
  clip_norm          global-norm clipping threshold; 0 turns clipping off
  grad_accum_steps   micro-batches per update (see below)

The transformation is optax's ``clip_by_global_norm -> adamw`` chain wrapped as a
``FusedAdamW``: the same ``init`` / ``update`` / state tree (checkpoints and shardings are
optax's), plus ``fused_apply``, which the train and fine-tuning steps call to compute the new
parameters and moments in one element-wise pass per parameter instead of one per transformation.

Gradient accumulation is an explicit loop over micro-batches inside the jitted train step
(``train_step.accumulate_gradients``), not ``optax.MultiSteps``:

- one call of the step is one optimizer update, so the step counter, the learning-rate schedule,
  the data position saved in checkpoints and the logged metrics all count updates, and the loop
  needs no special case;
- ``MultiSteps`` would keep a parameter-sized gradient buffer in the optimizer state between
  calls, which is then checkpointed and sharded like the moments; the explicit loop's
  accumulator is a temporary of one step;
- the host transfers one global batch per update instead of k small ones.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

# Parameters whose path matches this are never decayed (LayerNorm scales and biases, whatever
# their shape). Matched case-insensitively against each path component.
_NO_DECAY_NAME = re.compile(r"(^bias$|^scale$|layer_?norm|^ln|_ln$|norm$|temperature)", re.I)


def _path_names(path) -> list[str]:
  names = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        names.append(str(getattr(p, attr)))
        break
  return names


def decay_mask(params: Any) -> Any:
  """True for parameters that take weight decay: matrices and embeddings.

  Biases, LayerNorm scales/offsets, scalars (e.g. the CMCL log-temperature) and every parameter
  under a module whose name says it is a norm are excluded, as in RoBERTa / UNIMO.
  """
  def keep(path, x):
    if jnp.ndim(x) < 2:
      return False
    return not any(_NO_DECAY_NAME.search(n) for n in _path_names(path))
  return jax.tree_util.tree_map_with_path(keep, params)


SCHEDULES = ("linear", "cosine", "constant", "step")


def step_boundary_steps(boundaries: Sequence[float], total_steps: int,
                        warmup_steps: int = 0) -> list[int]:
  """``optimizer.step_boundaries`` -> the update steps where the learning rate drops.

  Ints are steps; floats in (0, 1) are fractions of ``total_steps`` (rounded to the nearest
  step). The result must be strictly increasing, after the warmup and within the run; any
  problem is a ``ValueError`` of one line naming the field.
  """
  values = list(boundaries)
  if not values:
    raise ValueError("optimizer.step_boundaries is empty: the 'step' schedule needs at least "
                     "one boundary (update steps, or fractions of train.total_steps)")
  ints = [isinstance(v, int) and not isinstance(v, bool) for v in values]
  floats = [isinstance(v, float) for v in values]
  if all(floats):
    if not all(0.0 < v < 1.0 for v in values):
      raise ValueError(f"optimizer.step_boundaries: fractions of train.total_steps must be in "
                       f"(0, 1), got {tuple(values)}")
    steps = [int(round(v * int(total_steps))) for v in values]
  elif all(ints):
    steps = [int(v) for v in values]
  else:
    raise ValueError(f"optimizer.step_boundaries must be all ints (update steps) or all floats "
                     f"(fractions of train.total_steps), got {tuple(values)}")
  if any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f"optimizer.step_boundaries must increase strictly, got steps {steps}")
  if steps[0] <= int(warmup_steps):
    raise ValueError(f"optimizer.step_boundaries: the first drop (step {steps[0]}) must come "
                     f"after the warmup (optimizer.warmup_steps={warmup_steps})")
  if steps[-1] >= int(total_steps):
    raise ValueError(f"optimizer.step_boundaries: step {steps[-1]} is not inside the run "
                     f"(train.total_steps={total_steps})")
  return steps


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "linear", end_lr_factor: float = 0.0,
                           step_boundaries: Sequence[float] = (),
                           step_factor: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then ``schedule`` decay to the end value.

  Step ``s`` (0-based update count) gets ``learning_rate * s / warmup_steps`` during warmup; the
  decay runs from ``warmup_steps`` to ``total_steps`` and stays at ``end_lr_factor *
  learning_rate`` afterwards. ``'step'``: the peak, multiplied by ``step_factor`` once for
  every boundary ``b`` (``step_boundary_steps``) with ``s >= b`` (the update at step ``b``
  already uses the lower rate, as a drop "at epoch 24" means from the first update after 24
  epochs on).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be {'|'.join(SCHEDULES)}, got {schedule!r}")
  if schedule == "step":
    drops = jnp.asarray(step_boundary_steps(step_boundaries, total_steps, warmup_steps),
                        jnp.int32)
    peak, factor, warm = float(learning_rate), float(step_factor), int(warmup_steps)

    def stepped(count):
      count = jnp.asarray(count)
      passed = jnp.sum(count >= drops)
      lr = peak * jnp.asarray(factor, jnp.float32) ** passed.astype(jnp.float32)
      if warm > 0:
        lr = jnp.where(count < warm, peak * count.astype(jnp.float32) / warm, lr)
      return lr
    return stepped
  end = learning_rate * end_lr_factor
  decay_steps = max(1, int(total_steps) - int(warmup_steps))
  if schedule == "linear":
    decay = optax.linear_schedule(learning_rate, end, decay_steps)
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_lr_factor)
  else:
    decay = optax.constant_schedule(learning_rate)
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, int(warmup_steps))
  return optax.join_schedules([warmup, decay], [int(warmup_steps)])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer of ``config.optimizer``.

  Args:
    cfg: a ConfigDict (or any attribute object) with the fields listed in the module docstring.
    total_steps: number of updates of the run (the end of the decay).

  Returns:
    ``(tx, schedule)``: the optax transformation (clip -> AdamW with masked decay, as a
    ``FusedAdamW``: optax's chain plus its one-pass ``fused_apply``, which the train steps
    use) and the learning-rate schedule, for logging.
  """
  schedule = learning_rate_schedule(cfg.learning_rate, total_steps, cfg.warmup_steps,
                                    cfg.schedule, cfg.end_lr_factor,
                                    tuple(getattr(cfg, "step_boundaries", ()) or ()),
                                    float(getattr(cfg, "step_factor", 0.1)))
  clip = float(cfg.clip_norm) if cfg.clip_norm and cfg.clip_norm > 0 else 0.0
  parts = [optax.clip_by_global_norm(clip)] if clip else []
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  chain = optax.chain(*parts)
  return FusedAdamW(chain.init, chain.update, schedule=schedule, b1=float(cfg.b1),
                    b2=float(cfg.b2), eps=float(cfg.eps), weight_decay=float(cfg.weight_decay),
                    clip_norm=clip), schedule


class FusedAdamW(optax.GradientTransformation):
  """The optax chain ``clip_by_global_norm -> adamw(mask=decay_mask)`` (its ``init``, ``update``
  and state, unchanged: checkpoints, shardings and ``tree_map_params`` see optax's own tree)
  plus ``fused_apply``: the same update written as one element-wise expression per parameter.

  Through optax the step makes a pass over every parameter-sized tree per transformation (the
  clipped gradients, the two moments, the Adam direction, the decayed direction, the scaled
  update, then ``apply_updates``), and the clip recomputes the global norm the step already
  has. ``fused_apply`` computes the new parameters and moments from (gradient, moments,
  parameter) directly, so XLA emits a few loop fusions per parameter that each read the inputs
  once (S1 of benchmarks/step_vs_peers.py: see benchmarks/README.md)."""

  def __new__(cls, init, update, **hyper):
    self = super().__new__(cls, init, update)
    self.hyper = hyper
    return self

  def fused_apply(self, grads, opt_state, params, grad_norm=None):
    """``(new_params, new_opt_state)``: what ``update`` followed by ``optax.apply_updates``
    returns, up to float rounding. ``grad_norm`` is the gradients' global norm if known."""
    h = self.hyper
    if h["clip_norm"]:
      if grad_norm is None:
        grad_norm = optax.tree.norm(grads)
      factor = jnp.where(grad_norm < h["clip_norm"], 1.0, h["clip_norm"] / grad_norm)
    else:
      factor = jnp.ones((), jnp.float32)
    adam = _find_state(opt_state, optax.ScaleByAdamState)
    sched = _find_state(opt_state, optax.ScaleByScheduleState)
    count = optax.safe_increment(adam.count)
    lr = jnp.asarray(h["schedule"](sched.count if sched is not None else adam.count))
    b1, b2, eps, wd = h["b1"], h["b2"], h["eps"], h["weight_decay"]
    bc1 = 1 - b1 ** count
    bc2 = 1 - b2 ** count
    decay = decay_mask(params)

    def leaf(g, mu, nu, p, decayed):
      f = jnp.promote_types(p.dtype, jnp.float32)
      g = g.astype(f) * factor.astype(f)
      mu = (1 - b1) * g + b1 * mu.astype(f)
      nu = (1 - b2) * (g * g) + b2 * nu.astype(f)
      u = (mu / bc1.astype(f)) / (jnp.sqrt(nu / bc2.astype(f)) + eps)
      if decayed and wd:
        u = u + wd * p.astype(f)
      return (p.astype(f) - lr.astype(f) * u).astype(p.dtype), mu, nu

    out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, decay)
    pick = lambda i, like: jax.tree.map(lambda o, x: o[i].astype(x.dtype), out, like,
                                        is_leaf=lambda o: isinstance(o, tuple))
    new_params = pick(0, params)
    new_adam = adam._replace(count=count, mu=pick(1, adam.mu), nu=pick(2, adam.nu))

    def rebuild(state):
      if isinstance(state, optax.ScaleByAdamState):
        return new_adam
      if isinstance(state, optax.ScaleByScheduleState):
        return state._replace(count=optax.safe_increment(state.count))
      if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(rebuild(s) for s in state))
      if isinstance(state, tuple):
        return tuple(rebuild(s) for s in state)
      return state
    return new_params, rebuild(opt_state)


def _find_state(state, kind):
  """The first ``kind`` (an optax state NamedTuple) inside a chain's nested state, or None."""
  if isinstance(state, kind):
    return state
  if isinstance(state, tuple):
    for s in state:
      found = _find_state(s, kind)
      if found is not None:
        return found
  return None


def tree_map_params(tx: optax.GradientTransformation, fn: Callable[..., Any], opt_state: Any,
                    *params_like: Any, non_params: Callable[[Any], Any]) -> Any:
  """Maps ``fn`` over the parameter-shaped parts of an optimizer state (moments), and
  ``non_params`` over everything else (counts). Used to give optimizer state the shardings of
  the parameters it mirrors.
  """
  return optax.tree_map_params(tx, fn, opt_state, *params_like, transform_non_params=non_params)
