"""AdamW with UNIMO's settings, learning-rate schedules and the weight-decay mask.

UNIMO (and RoBERTa before it) trains with Adam ``β1 = 0.9, β2 = 0.98, ε = 1e-6``, decoupled weight
decay that skips biases and LayerNorm parameters, gradient clipping at global norm 1.0, and a
linear warmup followed by a linear decay. All of these are config fields (``config.optimizer``):

  learning_rate      peak learning rate after warmup
  warmup_steps       linear warmup from 0 to the peak
  schedule           'linear' | 'cosine' | 'constant' decay after warmup
  end_lr_factor      final learning rate as a fraction of the peak (linear / cosine)
  b1, b2, eps        Adam moments
  weight_decay       decoupled weight decay (AdamW), masked by ``decay_mask``
  clip_norm          global-norm clipping threshold; 0 turns clipping off
  grad_accum_steps   micro-batches per update (see below)

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
from typing import Any, Callable

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


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "linear", end_lr_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then ``schedule`` decay to the end value.

  Step ``s`` (0-based update count) gets ``learning_rate * s / warmup_steps`` during warmup; the
  decay runs from ``warmup_steps`` to ``total_steps`` and stays at ``end_lr_factor *
  learning_rate`` afterwards.
  """
  if schedule not in ("linear", "cosine", "constant"):
    raise ValueError(f"optimizer.schedule must be linear|cosine|constant, got {schedule!r}")
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
    ``(tx, schedule)``: the optax transformation (clip -> AdamW with masked decay) and the
    learning-rate schedule, for logging.
  """
  schedule = learning_rate_schedule(cfg.learning_rate, total_steps, cfg.warmup_steps,
                                    cfg.schedule, cfg.end_lr_factor)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def tree_map_params(tx: optax.GradientTransformation, fn: Callable[..., Any], opt_state: Any,
                    *params_like: Any, non_params: Callable[[Any], Any]) -> Any:
  """Maps ``fn`` over the parameter-shaped parts of an optimizer state (moments), and
  ``non_params`` over everything else (counts). Used to give optimizer state the shardings of
  the parameters it mirrors.
  """
  return optax.tree_map_params(tx, fn, opt_state, *params_like, transform_non_params=non_params)
