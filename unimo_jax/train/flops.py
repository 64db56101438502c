"""Analytic FLOPs of a UNIMO training step, peak FLOP/s per device, and MFU.

Only matrix multiplications are counted (2 FLOPs per multiply-add), as MaxText and the PaLM
paper do; elementwise work (softmax, LayerNorm, GELU, dropout) is left out. A training step is
``3 x`` the forward matmuls (the backward pass computes a gradient for the activations and one for
the weights of every matmul).

Per encoder layer on ``[B, L]`` tokens of width H with MLP width M:
  q, k, v, out projections   2 * B * L * 4 * H * H
  MLP                        2 * B * L * 2 * H * M
  attention scores and AV    2 * 2 * B * L * L * H      (full L x L: masks do not skip work)
Embeddings: patches ``2 B N (p*p*C) H``; regions ``2 B (1+R) (F + 5) H`` (the [IMG] slot is
embedded too); text embeddings are gathers (0). Heads are computed only where the loss needs
them: the LM head ``2 B P (H*H + H*V)`` at P predicted positions, region heads
``2 B N (H*H + H*F') [+ 2 B N (H*H + H*C)]``, CMCL projections ``2 B (H*H + H*d)``, and the CMCL
similarity matrices ``2 * rows * columns * d`` per direction.

The count mirrors ``unimo_objectives`` (which rows each pass holds, padded to which length) through
``objectives.active``; a test checks it against the dot products in the objectives' own jaxpr.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from unimo_jax.train import objectives as obj_lib

# Dense peak FLOP/s per device: (16-bit matmuls, 32-bit matmuls). TPUs run f32 matmuls through
# the bf16 MXU at default precision, so both columns are the bf16 peak. GPUs' f32 column is the
# TF32 tensor-core peak, which XLA uses for f32 dots at default precision.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "tpu v6": (918e12, 918e12),     # v6e (Trillium)
    "tpu v5p": (459e12, 459e12),
    "tpu v5 lite": (197e12, 197e12),  # v5e reports "TPU v5 lite"
    "tpu v5e": (197e12, 197e12),
    "tpu v5": (459e12, 459e12),     # v5p reports "TPU v5"
    "tpu v4": (275e12, 275e12),
    "h200": (989e12, 494e12),
    "h100 pcie": (756e12, 378e12),
    "h100": (989e12, 494e12),       # SXM
    "a100": (312e12, 156e12),
    # Measured on the 2-core development machine (ENVIRONMENT.md): bf16 with f32 accumulation
    # 900 GFLOP/s, f32 440 GFLOP/s, for the whole host (shared by its fake devices).
    "cpu": (900e9, 440e9),
}


def peak_flops_per_device(device_kind: str, dtype: str = "float32", platform: str | None = None,
                          num_local_devices: int = 1, override: float = 0.0) -> float:
  """Peak matmul FLOP/s of one device.

  Args:
    device_kind: ``jax.devices()[0].device_kind`` (e.g. "TPU v4", "NVIDIA H100 80GB HBM3").
    dtype: compute dtype; 16-bit types use the first column of ``PEAK_FLOPS``.
    platform: ``"cpu"`` selects the CPU entry whatever the kind string says.
    num_local_devices: CPU entries are per host; fake CPU devices split them.
    override: a measured or known peak (> 0) that wins over the table.

  Returns:
    FLOP/s, or 0.0 when the device is unknown (MFU is then not reported).
  """
  if override and override > 0:
    return float(override)
  kind = (device_kind or "").lower()
  key = "cpu" if platform == "cpu" or kind == "cpu" else next(
      (k for k in PEAK_FLOPS if k != "cpu" and k in kind), None)
  if key is None:
    return 0.0
  bf16, f32 = PEAK_FLOPS[key]
  peak = bf16 if dtype in ("bfloat16", "float16") else f32
  if key == "cpu":
    peak /= max(1, num_local_devices)
  return peak


_MEASURED_CPU_PEAK: dict[str, float] = {}


def measured_cpu_peak(dtype: str = "float32", n: int = 2048) -> float:
  """Matmul FLOP/s of this host's CPU, measured once per process and dtype: the median of 5
  timed ``[n, n] @ [n, n]`` dots on the first local device (16-bit dtypes accumulate in float32,
  as the model's matmuls). CPUs of one machine kind differ by 2x (ENVIRONMENT.md), so MFU on a
  CPU is against this, not a table entry."""
  import statistics
  import time
  import jax.numpy as jnp
  key = f"{dtype}:{n}"
  if key not in _MEASURED_CPU_PEAK:
    dt = jnp.dtype(dtype if dtype in ("bfloat16", "float16") else "float32")
    a = jax.device_put(jnp.ones((n, n), dt), jax.local_devices()[0])
    f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))
    times = []
    for _ in range(5):
      t = time.perf_counter()
      jax.block_until_ready(f(a, a))
      times.append(time.perf_counter() - t)
    _MEASURED_CPU_PEAK[key] = 2.0 * n ** 3 / statistics.median(times)
  return _MEASURED_CPU_PEAK[key]


def current_peak_flops(dtype: str = "float32", override: float = 0.0) -> float:
  """Peak FLOP/s of one of this process's devices (see ``peak_flops_per_device``); on a CPU the
  host's measured matmul rate (``measured_cpu_peak``) shared by its local devices."""
  d = jax.local_devices()[0]
  if d.platform == "cpu" and not (override and override > 0):
    return measured_cpu_peak(dtype) / jax.local_device_count()
  return peak_flops_per_device(d.device_kind, dtype, d.platform, jax.local_device_count(),
                               override)


# ------------------------------------------------------------------------------ components
def encoder_flops(batch: int, length: int, hidden: int, mlp: int, layers: int) -> float:
  """Forward matmul FLOPs of ``layers`` Transformer layers on ``[batch, length]`` tokens."""
  per_token = 2 * (4 * hidden * hidden + 2 * hidden * mlp)
  attention = 2 * 2 * length * length * hidden
  return float(layers * batch * (length * per_token + attention))


def lm_head_flops(batch: int, predictions: int, hidden: int, vocab: int) -> float:
  """Transform (H -> H) and the tied output layer (H -> V) at ``predictions`` positions."""
  return float(2 * batch * predictions * (hidden * hidden + hidden * vocab))


def visual_embed_flops(batch: int, model: Any, num_regions: int = 0) -> float:
  """Patch or region embedding of ``batch`` images."""
  h = model.hidden_size
  if model.visual_input == "regions":
    return float(2 * batch * (1 + num_regions) * (model.region_feature_dim + 5) * h)
  return float(2 * batch * model.num_patches * model.patch_dim * h)


def region_heads_flops(batch: int, num_visual: int, model: Any) -> float:
  """Region heads at every region/patch slot (``num_visual`` = N, [IMG] excluded)."""
  h = model.hidden_size
  f = 2 * batch * num_visual * (h * h + h * model.visual_target_dim)
  if model.visual_input == "regions":
    f += 2 * batch * num_visual * (h * h + h * model.num_region_classes)
  return float(f)


def projection_flops(batch: int, model: Any) -> float:
  """CMCL ReLU pooler (H -> H) and projection (H -> d)."""
  h = model.hidden_size
  return float(2 * batch * (h * h + h * model.projection_dim))


# ------------------------------------------------------------------------------ the step
def _visual_tokens(model: Any, shapes: Mapping[str, tuple], stream: str) -> tuple[int, int]:
  """(N, R) of a stream: visual slots (without [IMG]) and regions (0 for patches)."""
  if model.visual_input == "regions":
    r = shapes[f"{stream}/region_features"][1]
    return r, r
  return model.num_patches, 0


def _k(shapes, name) -> int:
  return shapes[name][1] if name in shapes else 0


def forward_flops(model: Any, objectives_cfg: Any, shapes: Mapping[str, tuple], phase: int,
                  cmcl_cfg: Any = None) -> dict[str, float]:
  """Forward matmul FLOPs of one step phase, per objective.

  Args:
    model: the ModelConfig.
    objectives_cfg: ``config.objectives`` (see ``objectives.active``).
    shapes: ``{"<stream>/<field>": global shape}`` of the batch.
    phase: ``step % objectives.num_phases``.
    cmcl_cfg: ``config.cmcl`` (which augmentations are encoded); None = all present ones.

  Returns:
    ``{objective: FLOPs}`` for the objectives this phase runs.
  """
  H, M, layers, V = model.hidden_size, model.mlp_dim, model.num_layers, model.vocab_size
  enc = lambda b, l: encoder_flops(b, l, H, M, layers)
  streams = {k.split("/")[0] for k in shapes}
  run = obj_lib.active(objectives_cfg, streams, phase)
  every = obj_lib.all_active(objectives_cfg, streams)
  out: dict[str, float] = {}

  # Language rows of a stream are padded to the longest text and slot count of the stream's
  # language objectives when both run in one step ('both'); alternating objectives run alone,
  # each at its own rows' shape (see unimo_objectives._by_phase).
  fields = {o.name: (f"{o.stream}/{o.prefix}ids", f"{o.stream}/{o.prefix}positions")
            for o in obj_lib.REGISTRY.values() if o.kind == "language"}

  def padded(stream, name, extra_length=0):
    pair = obj_lib.language_objectives(stream)
    present = [n for n in every if n in pair]
    if objectives_cfg[obj_lib.MODE_KEYS[stream]] == "alternate" and len(present) == 2:
      present = [name]
    length = max([shapes[fields[n][0]][1] for n in present] + [extra_length])
    return length, max(shapes[fields[n][1]][1] for n in present)

  for name in obj_lib.language_objectives("text"):
    if name in run:
      b = shapes["text/row_valid"][0]
      text_l, text_p = padded("text", name)
      out[name] = enc(b, text_l) + lm_head_flops(b, text_p, H, V)

  if "pair/row_valid" in shapes:
    b = shapes["pair/row_valid"][0]
    n, r = _visual_tokens(model, shapes, "pair")
    caption = shapes["pair/caption_ids"][1] if "pair_mrp" in every else 0
    joint = lambda length: visual_embed_flops(b, model, r) + enc(b, 1 + n + length)
    pair_l = caption
    for name in obj_lib.language_objectives("pair"):
      if name in run:
        pair_l, pair_p = padded("pair", name, caption)
        out[name] = joint(pair_l) + lm_head_flops(b, pair_p, H, V)
    if "pair_mrp" in run:
      out["pair_mrp"] = joint(pair_l) + region_heads_flops(b, n, model)

  if "image_mrp" in run:
    b = shapes["image/row_valid"][0]
    n, r = _visual_tokens(model, shapes, "image")
    out["image_mrp"] = (visual_embed_flops(b, model, r) + enc(b, 1 + n)
                        + region_heads_flops(b, n, model))

  if "pair_cmcl" in run:
    b, l = shapes["pair/caption_ids"]
    n, r = _visual_tokens(model, shapes, "pair")
    texts = 1 + sum(_k(shapes, f) for f, flag in (
        ("pair/positive_ids", "use_positives"), ("pair/related_text_ids", "use_related_texts"),
        ("pair/negative_ids", "use_negatives")) if cmcl_cfg is None or cmcl_cfg[flag])
    use_images = cmcl_cfg is None or cmcl_cfg["use_related_images"]
    images = 1 + (_k(shapes, "pair/related_valid") if use_images else 0)
    f = enc(b * texts, l) + projection_flops(b * texts, model)
    f += visual_embed_flops(b * images, model, r) + enc(b * images, 1 + n)
    f += projection_flops(b * images, model)
    # similarity matrices: B anchors against every column, in both directions
    f += 2 * b * (b * texts) * model.projection_dim + 2 * b * (b * images) * model.projection_dim
    out["pair_cmcl"] = f
  return out


def step_flops(model: Any, objectives_cfg: Any, shapes: Mapping[str, tuple],
               cmcl_cfg: Any = None) -> dict[str, float]:
  """Training FLOPs per step (3 x forward), averaged over the alternation phases.

  Returns ``{"train": total, "forward": forward total, "<objective>": its training FLOPs}``.
  """
  phases = obj_lib.num_phases(objectives_cfg)
  per: dict[str, float] = {}
  for phase in range(phases):
    for name, f in forward_flops(model, objectives_cfg, shapes, phase, cmcl_cfg).items():
      per[name] = per.get(name, 0.0) + 3.0 * f / phases
  total = sum(per.values())
  return {"train": total, "forward": total / 3.0, **per}


def mfu(flops_per_step: float, steps_per_second: float, peak_per_device: float,
        num_devices: int) -> float:
  """Model FLOP utilisation: achieved FLOP/s over the devices' combined peak (0 if unknown)."""
  if peak_per_device <= 0 or num_devices <= 0:
    return 0.0
  return flops_per_step * steps_per_second / (peak_per_device * num_devices)
