"""Model configuration: one frozen dataclass, presets, validation and a JSON round trip.

The defaults are UNIMO's (post-LN, exact GELU, LayerNorm eps 1e-5, TruncatedNormal(0.02) init,
RoBERTa vocabulary and special-token layout). Presets:

- ``tiny``  : 2 layers, H 64, 4 heads, MLP 128, vocab 1000, 32px images in 8px patches (CPU tests
              and the demo);
- ``base``  : 12 / 768 / 12 / 3072, vocab 50265, 514 positions (RoBERTa-base, UNIMO-base);
- ``large`` : 24 / 1024 / 16 / 4096 (RoBERTa-large, UNIMO-large).

Every preset accepts keyword overrides: ``ModelConfig.tiny(vocab_size=8000, visual_input="regions")``.
"""
import dataclasses
import json
from typing import Any

import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16", "float64")
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of the unified-modal Transformer (all fields JSON-serialisable).

  Text:
    vocab_size: rows of the (tied) word embedding; MASK is ``vocab_size - 1`` by convention.
    max_positions: rows of the learned position table. With ``roberta_positions`` the first real
      token sits at row 2 (row 1 is the padding position), so RoBERTa's 514 rows hold 512 tokens.
    roberta_positions: RoBERTa/fairseq position ids (``pad_id + 1 + index``, pads at ``pad_id``);
      otherwise tokens take rows ``0, 1, ...`` and pads row 0. Either way positions count real
      (non-pad) tokens only, so a gap of padding between a source and a target is skipped.
    pad_id, cls_id, sep_id, mask_id: special ids (UNIMO/RoBERTa layout; ``mask_id=-1`` means
      ``vocab_size - 1``).
  Transformer:
    hidden_size, num_layers, num_heads, mlp_dim: encoder shapes (``hidden_size % num_heads == 0``).
    dropout_rate: on embeddings and on each sub-layer output (no dropout inside the FFN, as UNIMO).
    attention_dropout_rate: on attention probabilities.
    pre_ln: pre-LayerNorm blocks plus a final LayerNorm (stabler at scale); False = UNIMO post-LN.
    layer_norm_eps: 1e-5 everywhere (RoBERTa, UNIMO).
    init_std: stddev of the truncated-normal init of kernels and embeddings.
    dtype: compute dtype ("float32" or "bfloat16"); param_dtype: storage dtype of parameters.
    f32_accumulate: matmuls ask for float32 accumulation (``preferred_element_type``) and cast
      back to ``dtype``: on CPU a bf16 dot with bf16 output runs at a third of the f32-accumulating
      one, and softmax/logits stay accurate.
    remat: rematerialise each layer in the backward pass (memory for compute).
    remat_policy: what a rematerialised layer keeps, a ``jax.checkpoint_policies`` name:
      "nothing_saveable" (only the layer input; recompute everything),
      "dots_with_no_batch_dims_saveable" (keep the projection/FFN matmul outputs, recompute
      attention and elementwise work) or "dots_saveable" (keep every matmul output). With the
      layer scan (``scan_unroll`` < ``num_layers``) every kept residual is stacked into a
      [layers, ...] buffer, zeroed, written and read back; on CPU, remat with
      "dots_with_no_batch_dims_saveable" was faster than no remat at all (4-layer text-MLM
      steps 12-21%, ``benchmarks/step_vs_peers.py`` row ``ours``) and uses less memory.
    scan_unroll: encoder layers per iteration of the layer scan. 1 (default) keeps ONE layer
      body in the compiled program whatever the depth (compile time and program size flat in
      depth: the setting for deep models and pods); ``num_layers`` unrolls the scan completely,
      which lets XLA schedule across layers and drops the loop's per-layer parameter slicing and
      stacking (on a 2-core CPU, 4-layer text-MLM steps ran 8-14% faster,
      ``benchmarks/step_vs_peers.py`` rows ``ours-unrolled``) at compile time growing with
      depth. Any divisor in between trades the two; it never changes the numbers computed.
  Vision:
    visual_input: "patches" (raw pixels, ViT patch embedding) or "regions" (detector features).
    image_size, patch_size, num_channels: patch input; ``(image_size/patch_size)**2`` patches.
    image_token: "mean" (the [IMG] slot is the mean patch embedding, as UNIMO's mean region
      feature) or "learned" (a learned [IMG] vector, patches only).
    patch_positions: "learned" (a trained table of 1+N rows) or "sincos2d" (fixed 2-D sine-cosine
      table of the patch grid as big_vision's ``posemb="sincos2d"``, plus one learned [IMG]
      row). A learned table starts at ``init_std``; the projection of a p*p*C pixel vector starts
      ``sqrt(p*p*C) * pixel rms`` times larger, so from scratch the fixed table (entries in
      [-1, 1]) makes the patch grid visible at once.
    region_feature_dim, num_region_classes: detector feature width F (2048) and classes C (1601).
  CMCL:
    projection_dim: width of the L2-normalised image/text embeddings (after the ReLU pooler).
  """
  # text
  vocab_size: int = 50265
  max_positions: int = 514
  roberta_positions: bool = True
  pad_id: int = 1
  cls_id: int = 0
  sep_id: int = 2
  unk_id: int = 3
  mask_id: int = -1
  # transformer
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pre_ln: bool = False
  layer_norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  f32_accumulate: bool = True
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_unroll: int = 1
  # vision
  visual_input: str = "patches"
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  image_token: str = "mean"
  patch_positions: str = "learned"
  region_feature_dim: int = 2048
  num_region_classes: int = 1601
  # cmcl
  projection_dim: int = 256

  # ---------------------------------------------------------------- presets
  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    base = dict(vocab_size=1000, max_positions=130, roberta_positions=False, hidden_size=64,
                num_layers=2, num_heads=4, mlp_dim=128, image_size=32, patch_size=8,
                region_feature_dim=64, num_region_classes=16, projection_dim=32)
    return cls(**{**base, **overrides}).validate()

  @classmethod
  def base(cls, **overrides) -> "ModelConfig":
    return cls(**overrides).validate()

  @classmethod
  def large(cls, **overrides) -> "ModelConfig":
    base = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)
    return cls(**{**base, **overrides}).validate()

  @classmethod
  def preset(cls, name: str, **overrides) -> "ModelConfig":
    if name not in ("tiny", "base", "large"):
      raise ValueError(f"ModelConfig preset must be tiny|base|large, got {name!r}")
    return getattr(cls, name)(**overrides)

  # ---------------------------------------------------------------- derived
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mask_token_id(self) -> int:
    return self.vocab_size - 1 if self.mask_id < 0 else self.mask_id

  @property
  def position_offset(self) -> int:
    """Row of the first real token in the position table (2 for RoBERTa)."""
    return self.pad_id + 1 if self.roberta_positions else 0

  @property
  def pad_position(self) -> int:
    return self.pad_id if self.roberta_positions else 0

  @property
  def max_text_length(self) -> int:
    """Longest text (in real tokens) the position table holds."""
    return self.max_positions - self.position_offset

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.num_channels

  @property
  def visual_target_dim(self) -> int:
    """Width of the region-feature regression target: F for regions, pixels per patch else."""
    return self.region_feature_dim if self.visual_input == "regions" else self.patch_dim

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  # ---------------------------------------------------------------- checks
  def validate(self) -> "ModelConfig":
    """Returns self, or raises ValueError naming the first inconsistent field."""
    def need(ok, field, why):
      if not ok:
        raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

    for f in ("vocab_size", "max_positions", "hidden_size", "num_layers", "num_heads",
              "mlp_dim", "image_size", "patch_size", "num_channels", "region_feature_dim",
              "num_region_classes", "projection_dim"):
      need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "must be a positive int")
    need(self.hidden_size % self.num_heads == 0, "hidden_size",
         f"must be divisible by num_heads={self.num_heads}")
    for f in ("dropout_rate", "attention_dropout_rate"):
      need(0.0 <= getattr(self, f) < 1.0, f, "must be in [0, 1)")
    need(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0")
    need(self.init_std > 0, "init_std", "must be > 0")
    need(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}")
    need(self.param_dtype in _DTYPES, "param_dtype", f"must be one of {_DTYPES}")
    need(self.remat_policy in REMAT_POLICIES, "remat_policy", f"must be one of {REMAT_POLICIES}")
    need(isinstance(self.scan_unroll, int) and self.scan_unroll >= 1
         and self.num_layers % self.scan_unroll == 0, "scan_unroll",
         f"must be a positive int dividing num_layers={self.num_layers}")
    need(self.visual_input in ("patches", "regions"), "visual_input",
         "must be 'patches' or 'regions'")
    need(self.image_token in ("mean", "learned"), "image_token", "must be 'mean' or 'learned'")
    need(self.image_token == "mean" or self.visual_input == "patches", "image_token",
         "'learned' is for patches; the regions [IMG] slot is the mean feature (UNIMO)")
    need(self.patch_positions in ("learned", "sincos2d"), "patch_positions",
         "must be 'learned' or 'sincos2d'")
    need(self.patch_positions == "learned" or self.hidden_size % 4 == 0, "patch_positions",
         f"'sincos2d' needs hidden_size divisible by 4, got {self.hidden_size}")
    need(self.image_size % self.patch_size == 0, "image_size",
         f"must be a multiple of patch_size={self.patch_size}")
    for f in ("pad_id", "cls_id", "sep_id", "unk_id"):
      need(0 <= getattr(self, f) < self.vocab_size, f, f"must be in [0, vocab_size={self.vocab_size})")
    need(self.mask_id < self.vocab_size, "mask_id", "must be < vocab_size (or -1 = vocab_size-1)")
    need(self.max_positions > self.position_offset + 1, "max_positions",
         f"must exceed the position offset {self.position_offset} + 1")
    return self

  # ---------------------------------------------------------------- io
  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
    return cls(**d).validate()

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes).validate()
