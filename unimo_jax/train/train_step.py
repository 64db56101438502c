"""The UNIMO train step: every objective on its stream, weighted, one optimizer update.

Written on the GLOBAL batch (``"<stream>/<field>"`` arrays sharded over the mesh's batch axes);
sharding is a property of the arrays, the loss code never sees a device. Each objective's loss
is normalised by its GLOBAL count of targets (masked tokens, masked regions, contrastive
anchors), including across gradient-accumulation micro-batches: every micro-batch's loss is
scaled by ``its count / the whole batch's count``, so the sum over micro-batches is exactly the
loss of the whole batch (for CMCL, in-batch negatives are those of the micro-batch).

Parameters: ``{"model": <Unimo params>, "cmcl": {"log_temperature": f32[]}}``.

Objectives of a phase (``objectives.active``) are chosen in Python; with alternation the step
switches between the phases with ``lax.switch`` on ``state.step % 2`` (one compiled program).
Metrics are named ``<objective>/<metric>``; objectives not run in a phase report NaN (the
logger averages over the steps where they ran).

Non-finite guard: if the loss or the gradient norm is not finite the update is dropped
(parameters and optimizer state unchanged), ``nonfinite_streak`` grows and the loop decides to
stop; a finite step resets the streak.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimo_jax import parallel
from unimo_jax.losses import contrastive, language, visual
from unimo_jax.model import ModelConfig, Unimo, masks
from unimo_jax.model.unimo import init_variables
from unimo_jax.train import objectives as obj_lib
from unimo_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]

# Per-objective metrics that are sums or counts, not means: summed over micro-batches (counts)
# or dropped (sums, whose information the means carry).
_SUMMED = ("count", "num_anchors", "num_text_columns", "num_image_columns")
_DROPPED = ("loss_sum", "nll_sum", "correct")


def init_params_fn(model_cfg: ModelConfig, temperature_init: float) -> Callable[[jax.Array], Any]:
  """``rng -> params`` with logical-axis boxes on the model's parameters (for state creation)."""
  def init(rng):
    return {"model": init_variables(model_cfg, rng)["params"],
            "cmcl": {"log_temperature": contrastive.init_log_temperature(temperature_init)}}
  return init


# ------------------------------------------------------------------------------ batch helpers
def _row(batch: Batch, stream: str) -> jax.Array:
  return batch[f"{stream}/row_valid"].astype(jnp.float32)


def _visual(batch: Batch, stream: str, model_cfg: ModelConfig, related: bool = False) -> dict:
  """The model's visual dict of a stream (``related``: the X_I images, Ki folded into B)."""
  pre = f"{stream}/related_" if related else f"{stream}/"
  keys = ("region_features", "region_boxes", "region_valid") if (
      model_cfg.visual_input == "regions") else ("pixels",)
  out = {}
  for k in keys:
    x = batch[pre + k]
    out[k] = x.reshape((-1,) + x.shape[2:]) if related else x
  return out


def _token_weights(batch: Batch, stream: str, prefix: str) -> jax.Array:
  return batch[f"{stream}/{prefix}weights"].astype(jnp.float32) * _row(batch, stream)[:, None]


def _region_mask(batch: Batch, stream: str, model_cfg: ModelConfig) -> jax.Array:
  """[B, N] float: masked AND real regions of valid rows (the MRP targets)."""
  m = batch[f"{stream}/visual_mask"].astype(bool)
  if model_cfg.visual_input == "regions":
    m = m & batch[f"{stream}/region_valid"].astype(bool)
  return m.astype(jnp.float32) * _row(batch, stream)[:, None]


def objective_counts(batch: Batch, model_cfg: ModelConfig, names) -> dict[str, jax.Array]:
  """The normaliser of each objective's loss on ``batch`` (what its loss divides by)."""
  counts = {}
  for name in names:
    if name == "text_mlm":
      counts[name] = _token_weights(batch, "text", "mlm_").sum()
    elif name == "text_s2s":
      counts[name] = _token_weights(batch, "text", "s2s_").sum()
    elif name == "pair_mlm":
      counts[name] = _token_weights(batch, "pair", "mlm_").sum()
    elif name == "pair_caption":
      counts[name] = _token_weights(batch, "pair", "s2s_").sum()
    elif name in ("image_mrp", "pair_mrp"):
      counts[name] = _region_mask(batch, name.split("_")[0], model_cfg).sum()
    elif name == "pair_cmcl":
      counts[name] = _row(batch, "pair").sum()
  return counts


def _text_positions(batch: Batch, key: str, ids: jax.Array, model_cfg: ModelConfig):
  """Optional 0-based position ids from the pipeline -> rows of the model's position table."""
  if key not in batch:
    return None
  real = ids != model_cfg.pad_id
  return jnp.where(real, batch[key] + model_cfg.position_offset,
                   model_cfg.pad_position).astype(jnp.int32)


# ------------------------------------------------------------------------------ objectives
class UnimoObjectives:
  """Computes each pre-training objective's (loss, metrics) from params and a global batch.

  Args:
    model_cfg: the ModelConfig.
    config: the run config (``objectives``, ``cmcl`` sections).
    mesh: the device mesh (CMCL gathers its columns across the batch axes).
  """

  def __init__(self, model_cfg: ModelConfig, config: Any, mesh: Mesh | None):
    self.model_cfg = model_cfg
    self.model = Unimo(model_cfg)
    self.obj = config.objectives
    self.cmcl = config.cmcl
    self.mesh = mesh

  def _apply(self, params, rng, method, *args, **kwargs):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params["model"]}, *args, rngs=rngs, method=method,
                            **kwargs)

  def _lm(self, params, hidden, positions):
    return self._apply(params, None, Unimo.lm_logits, hidden, positions)

  def text_mlm(self, params, batch, rng, det):
    ids = batch["text/mlm_ids"]
    h = self._apply(params, rng, Unimo.encode_text, ids, deterministic=det)["hidden"]
    logits = self._lm(params, h, batch["text/mlm_positions"])
    return language.masked_lm_loss(logits, batch["text/mlm_targets"],
                                   _token_weights(batch, "text", "mlm_"),
                                   self.obj.label_smoothing)

  def text_s2s(self, params, batch, rng, det):
    ids = batch["text/s2s_ids"]
    bias = masks.to_bias(masks.seq2seq(batch["text/s2s_segments"]),
                         self.model_cfg.compute_dtype)
    pos = _text_positions(batch, "text/s2s_position_ids", ids, self.model_cfg)
    h = self._apply(params, rng, Unimo.encode_text, ids, attention_bias=bias, deterministic=det,
                    positions=pos)["hidden"]
    logits = self._lm(params, h, batch["text/s2s_positions"])
    return language.seq2seq_loss(logits, batch["text/s2s_targets"],
                                 _token_weights(batch, "text", "s2s_"), self.obj.label_smoothing)

  def _mrp(self, params, batch, stream, visual_hidden):
    cfg = self.model_cfg
    heads = self._apply(params, None, Unimo.region_heads, visual_hidden)
    if cfg.visual_input == "regions":
      target = batch[f"{stream}/region_features"]
      probs = batch.get(f"{stream}/region_class_probs") if self.obj.mrp_soft_labels else None
      classes = batch.get(f"{stream}/region_classes")
    else:
      target = visual.patch_targets(batch[f"{stream}/pixels"], cfg.patch_size,
                                    normalize=self.obj.mrp_normalize_patches)
      probs = classes = None
    loss, metrics = visual.region_prediction_loss(
        heads["features"], target, heads.get("class_logits"), _region_mask(batch, stream, cfg),
        classes=classes, class_probs=probs, regression_weight=self.obj.mrp_regression_weight,
        class_weight=self.obj.mrp_class_weight,
        regression_reduction=self.obj.mrp_regression_reduction)
    if cfg.visual_input != "regions":  # patches have no classes: drop the constant-0 metrics
      metrics = {k: v for k, v in metrics.items() if not k.startswith("class_")}
    return loss, metrics

  def image_mrp(self, params, batch, rng, det):
    vis = _visual(batch, "image", self.model_cfg)
    out = self._apply(params, rng, Unimo.encode_image, vis,
                      visual_mask=batch["image/visual_mask"], deterministic=det)
    return self._mrp(params, batch, "image", out["hidden"][:, 1:])

  def pair_mrp(self, params, batch, rng, det):
    vis = _visual(batch, "pair", self.model_cfg)
    out = self._apply(params, rng, Unimo.encode_pair, vis, batch["pair/caption_ids"],
                      visual_mask=batch["pair/visual_mask"], deterministic=det)
    return self._mrp(params, batch, "pair", out["visual_hidden"][:, 1:])

  def pair_mlm(self, params, batch, rng, det):
    vis = _visual(batch, "pair", self.model_cfg)
    out = self._apply(params, rng, Unimo.encode_pair, vis, batch["pair/mlm_ids"],
                      deterministic=det)
    logits = self._lm(params, out["text_hidden"], batch["pair/mlm_positions"])
    return language.masked_lm_loss(logits, batch["pair/mlm_targets"],
                                   _token_weights(batch, "pair", "mlm_"), self.obj.label_smoothing)

  def pair_caption(self, params, batch, rng, det):
    cfg = self.model_cfg
    vis = _visual(batch, "pair", cfg)
    ids = batch["pair/s2s_ids"]
    if cfg.visual_input == "regions":
      vvalid = jnp.concatenate([jnp.ones_like(batch["pair/region_valid"][:, :1], bool),
                                batch["pair/region_valid"].astype(bool)], axis=1)
    else:
      vvalid = None
    n = 1 + (batch["pair/region_valid"].shape[1] if cfg.visual_input == "regions"
             else cfg.num_patches)
    bias = masks.to_bias(masks.captioning(n, batch["pair/s2s_segments"] > 0, vvalid),
                         cfg.compute_dtype)
    pos = _text_positions(batch, "pair/s2s_position_ids", ids, cfg)
    out = self._apply(params, rng, Unimo.encode_pair, vis, ids, attention_bias=bias,
                      deterministic=det, positions=pos)
    logits = self._lm(params, out["text_hidden"], batch["pair/s2s_positions"])
    return language.seq2seq_loss(logits, batch["pair/s2s_targets"],
                                 _token_weights(batch, "pair", "s2s_"), self.obj.label_smoothing)

  def pair_cmcl(self, params, batch, rng, det):
    cfg, c = self.model_cfg, self.cmcl
    b = batch["pair/caption_ids"].shape[0]
    row = batch["pair/row_valid"].astype(bool)
    # Texts: the caption, then positives (X+ and X_T), then hard negatives (X-), encoded alone
    # in one batch of B * T sequences.
    groups = [("caption", batch["pair/caption_ids"][:, None], jnp.ones((b, 1), bool))]
    for flag, ids_key, valid_key, kind in (
        ("use_positives", "pair/positive_ids", "pair/positive_valid", "pos"),
        ("use_related_texts", "pair/related_text_ids", "pair/related_text_valid", "pos"),
        ("use_negatives", "pair/negative_ids", "pair/negative_valid", "neg")):
      if c[flag] and ids_key in batch and batch[ids_key].shape[1] > 0:
        groups.append((kind, batch[ids_key], batch[valid_key].astype(bool)))
    ids = jnp.concatenate([g[1] for g in groups], axis=1)
    t = ids.shape[1]
    rng_t, rng_i = jax.random.split(rng) if rng is not None else (None, None)
    cls = self._apply(params, rng_t, Unimo.encode_text, ids.reshape(b * t, -1),
                      deterministic=det)["cls"]
    text_emb = self._apply(params, None, Unimo.cmcl_text, cls).reshape(b, t, -1)
    # Images: the pair's image and its related images (X_I), encoded alone.
    vis = _visual(batch, "pair", cfg)
    ki = batch["pair/related_valid"].shape[1] if (
        c.use_related_images and "pair/related_valid" in batch) else 0
    if ki:
      rel = _visual(batch, "pair", cfg, related=True)
      vis = {k: jnp.concatenate([vis[k][:, None], rel[k].reshape((b, ki) + rel[k].shape[1:])],
                                axis=1).reshape((b * (1 + ki),) + vis[k].shape[1:])
             for k in vis}
    img = self._apply(params, rng_i, Unimo.encode_image, vis, deterministic=det)["img"]
    image_emb = self._apply(params, None, Unimo.cmcl_image, img).reshape(b, 1 + ki, -1)

    def pick(kind):
      cols, valid, start = [], [], 0
      for g in groups:
        k = g[1].shape[1]
        if g[0] == kind:
          cols.append(text_emb[:, start:start + k])
          valid.append(g[2])
        start += k
      if not cols:
        return None, None
      return jnp.concatenate(cols, axis=1), jnp.concatenate(valid, axis=1)

    pos, pos_valid = pick("pos")
    neg, neg_valid = pick("neg")
    log_t = params["cmcl"]["log_temperature"]
    if not c.learn_temperature:
      log_t = jax.lax.stop_gradient(log_t)
    return contrastive.cmcl_loss(
        image_emb[:, 0], text_emb[:, 0], log_temperature=log_t, pair_valid=row,
        positive_texts=pos, positive_texts_valid=pos_valid,
        negative_texts=neg, negative_texts_valid=neg_valid,
        positive_images=image_emb[:, 1:] if ki else None,
        positive_images_valid=batch["pair/related_valid"].astype(bool) if ki else None,
        mesh=self.mesh, implementation=c.implementation,
        temperature_range=(c.temperature_min, c.temperature_max))

  def __call__(self, params, batch: Batch, rng, names, scales, deterministic=False):
    """Weighted sum of the ``names`` objectives, each scaled by ``scales[name]``.

    Returns ``(loss, metrics)`` where metrics hold ``<name>/<metric>`` for each objective, with
    means multiplied by the scale (so summing micro-batches gives count-weighted means).
    """
    weights = obj_lib.weights(self.obj)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name in names:
      # Keyed by the objective, not its position, so regrouping objectives keeps the masks.
      key = (jax.random.fold_in(rng, obj_lib.OBJECTIVES.index(name)) if rng is not None
             else None)
      loss, m = getattr(self, name)(params, batch, key, deterministic)
      s = scales[name]
      total = total + weights[name] * loss * s
      for k, v in m.items():
        if k in _DROPPED:
          continue
        metrics[f"{name}/{k}"] = v if k in _SUMMED else v * s
    return total, metrics


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
  # Objectives of every phase are computed once, outside the switch; only the alternating
  # ones live in its branches (the switch compiles every branch).
  common = tuple(o for o in every if all(o in plan for plan in plans))
  alternating = [tuple(o for o in plan if o not in common) for plan in plans]
  k = int(config.optimizer.grad_accum_steps)
  base_key = jax.random.key(int(config.seed))

  def metric_names(name, params, batch):
    _, m = jax.eval_shape(
        lambda p, b: objectives(p, b, None, (name,), {name: jnp.float32(1)}, deterministic=True),
        params, batch)
    return list(m)

  def loss_fn(params, mb, rng, phase, totals):
    """Loss and metrics of one (micro-)batch: common objectives + this phase's others."""
    counts = objective_counts(mb, model_cfg, every)
    scales = {n: jnp.where(totals[n] > 0, counts[n] / jnp.maximum(totals[n], 1.0), 0.0)
              for n in every}
    loss, metrics = objectives(params, mb, rng, common, scales)
    metrics = {key: v.astype(jnp.float32) for key, v in metrics.items()}
    if phases > 1 and any(alternating):
      # Each branch reports the metrics of every alternating objective, NaN where it did not
      # run, so that both branches return the same structure.
      names = {n: metric_names(n, params, mb) for plan in alternating for n in plan}

      def branch(plan):
        def run(params, mb, rng, scales):
          l, m = objectives(params, mb, rng, plan, scales)
          out = {key: jnp.full((), jnp.nan, jnp.float32) for n in names if n not in plan
                 for key in names[n]}
          out.update({key: v.astype(jnp.float32) for key, v in m.items()})
          return l, out
        return run

      alt_loss, alt_metrics = jax.lax.switch(phase, [branch(p) for p in alternating], params, mb,
                                             rng, scales)
      loss = loss + alt_loss
      metrics.update(alt_metrics)
    return loss, metrics

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
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state), nonfinite_streak=streak,
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   param_norm=optax.tree.norm(state.params),
                   nonfinite=(~ok).astype(jnp.float32), nonfinite_streak=streak)
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
