"""Transformer building blocks: dense, LayerNorm, self-attention (with a key/value cache), FFN,
the encoder layer and the scanned encoder stack (plus the stacked-parameter layout helpers).

Shapes: B batch, L query length, T key length (= L, or the cache length when decoding),
H hidden, h heads, d head width (H = h*d), M FFN width.

Numerics follow UNIMO/RoBERTa: post-LN ``x = LN(x + Dropout(sublayer(x)))`` (``pre_ln`` switches
to ``x = x + Dropout(sublayer(LN(x)))`` with a final LN), exact (erf) GELU, no dropout inside the
FFN, ``q *= d**-0.5``, additive attention bias, softmax in float32 (or wider).

Logical axis names (every parameter is boxed with ``nn.with_logical_partitioning``):
  parameters: ``layers`` (the leading axis of the scanned encoder's stacked parameters),
  ``embed`` (H), ``heads`` (h), ``kv`` (d), ``mlp`` (M, also the inner H of the head
  transforms/poolers), ``vocab`` (V), ``region_feature`` (F, region input), ``patch``
  (p*p*C, patch input); ``None`` for position rows, box (5), head outputs (F, C, projection).
  activations (``nn.with_logical_constraint``): ``batch``, ``length``, ``embed``, ``heads``,
  ``kv``, ``mlp``, ``vocab``.
The training job's rules map them to mesh axes; names absent from the rules are replicated.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from unimo_jax.model.config import ModelConfig
from unimo_jax.model.dropout import Dropout

HIDDEN_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")
MLP_AXES = ("batch", "length", "mlp")


def kernel_init(config: ModelConfig, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(
      nn.initializers.truncated_normal(stddev=config.init_std), tuple(axes))


def zeros_init(axes: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def accumulation_dtype(config: ModelConfig):
  """dtype matmuls accumulate in: float32 (or wider) when ``f32_accumulate``, else compute."""
  if config.f32_accumulate:
    return jnp.promote_types(config.compute_dtype, jnp.float32)
  return config.compute_dtype


def gelu(x):
  """Exact GELU ``x * (1 + erf(x / sqrt 2)) / 2``, as BERT/RoBERTa/UNIMO (and torch's ``gelu``).

  Written with ``erf``, not ``jax.nn.gelu(approximate=False)``'s ``erfc(-x / sqrt 2)``: XLA:CPU's
  erfc costs 2.4x its erf (4.5 against 1.9 ms on a [4096, 1024] float32 array, 2 cores) and the
  FFN applies it to every token's M-wide activation; the two agree to float32 rounding
  (the erfc form is more accurate only in the far negative tail, where GELU is ~0 either way)."""
  return x * (0.5 * (1.0 + lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype))))


def _dense_dot(x, w, k: int, acc):
  """``x [..., K...] @ w [K..., N...]`` over x's last ``k`` dims and w's first ``k``."""
  contract = (tuple(range(x.ndim - k, x.ndim)), tuple(range(k)))
  return lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_product(x, w, k: int, acc):
  """``_dense_dot`` whose weight gradient transposes the smaller of its two operands.

  The weight gradient ``x^T dy`` contracts the rows of both operands; XLA:CPU's dot library
  takes it only with one operand copied to the transposed layout, and it picks that operand by
  the dot's operand order, not by size. For the projections that widen (query/key/value, the
  FFN's first layer: K < N) it copies ``dy``, the wider one ([2048, 3072] against [2048, 768]
  for S1's FFN); for those that narrow (the FFN's second layer: K > N) it copies ``x``, and
  recomputes GELU into that copy, a strided loop over the [rows, M] activation (50-77 ms per
  layer at S2 on an AMD EPYC). Here the narrower operand is transposed by the model itself,
  behind an ``optimization_barrier`` so that XLA cannot fold the transpose back into the dot:
  ``x^T`` then ``x^T dy`` when K <= N, else ``dy^T`` then ``(dy^T x)^T`` (the last transpose is
  of the weight-sized result). A tie (the attention output, K = N) transposes ``x``: there it
  is a product's output, a plain copy, while ``dy`` carries the dropout mask, which XLA:CPU
  recomputes inside the transposing loop, ~10x slower per byte (benchmarks/README.md). The LM
  head is this product onto the tied table transposed ([H, V]), so the table gradient is
  ``(x^T dlogits)^T`` instead of the [P, V] cross-entropy gradient written transposed. Same
  values and gradients up to float summation order (tests/test_model_grad.py). Used for
  float32 compute on CPU only (``use_dense_product``)."""
  return _dense_dot(x, w, k, acc)


def _dense_product_fwd(x, w, k, acc):
  return _dense_dot(x, w, k, acc), (x, w)


def _dense_product_bwd(k, acc, res, g):
  x, w = res
  lead = x.ndim - k  # dims of x that are not contracted (rows)
  out = w.ndim - k  # output feature dims
  g = g.astype(x.dtype)
  # dx = g w^T over the output dims
  dx = lax.dot_general(g, w, ((tuple(range(lead, g.ndim)), tuple(range(k, w.ndim))), ((), ())),
                       preferred_element_type=acc)
  rows = tuple(range(lead))
  if np.prod(x.shape[lead:]) <= np.prod(w.shape[k:]):
    xt = lax.optimization_barrier(jnp.transpose(x, tuple(range(lead, x.ndim)) + rows))
    dw = lax.dot_general(xt, g, ((tuple(range(k, x.ndim)), rows), ((), ())),
                         preferred_element_type=acc)
  else:
    gt = lax.optimization_barrier(jnp.transpose(g, tuple(range(lead, g.ndim)) + rows))
    dwt = lax.dot_general(gt, x, ((tuple(range(out, gt.ndim)), rows), ((), ())),
                          preferred_element_type=acc)  # [N..., K...]
    dw = jnp.transpose(dwt, tuple(range(out, dwt.ndim)) + tuple(range(out)))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def use_dense_product(dtype) -> bool:
  """Whether projections go through ``dense_product``: float32 compute on the CPU backend (the
  layout it works around is XLA:CPU's; GPU/TPU keep the plain dot)."""
  return jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"


def project(x, w, k: int, config: ModelConfig):
  """``x @ w`` over x's last ``k`` dims in the compute dtype, accumulated in
  ``accumulation_dtype`` (``dense_product`` on CPU float32, else ``lax.dot_general``)."""
  dtype, acc = config.compute_dtype, accumulation_dtype(config)
  x, w = x.astype(dtype), w.astype(dtype)
  if use_dense_product(dtype):  # float32 compute accumulates in float32 either way
    return dense_product(x, w, k, acc)
  return _dense_dot(x, w, k, acc)


class Dense(nn.Module):
  """``y = x @ kernel + bias`` contracting the last ``len(in_axes)`` dims of ``x``.

  The kernel has shape ``x.shape[-k:] + features`` and logical names ``in_axes + out_axes``
  (e.g. the query projection: ``[H] -> [h, d]`` with names ``embed, heads, kv``). Inputs and
  kernel are cast to the compute dtype; accumulation is in ``accumulation_dtype``; the result is
  cast back to the compute dtype (or ``out_dtype``).
  """
  config: ModelConfig
  features: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]
  use_bias: bool = True
  out_dtype: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    k = len(self.in_axes)
    features = tuple(self.features)
    kernel = self.param("kernel", kernel_init(cfg, self.in_axes + self.out_axes),
                        tuple(x.shape[-k:]) + features, cfg.weight_dtype)
    dtype = cfg.compute_dtype
    y = project(x, kernel, k, cfg)
    if self.use_bias:
      bias = self.param("bias", zeros_init(self.out_axes), features, cfg.weight_dtype)
      y = y + bias.astype(y.dtype)
    return y.astype(self.out_dtype or dtype)


@jax.custom_vjp
def add_bias(x, bias):
  """``x + bias`` (bias [N] on x [..., N]) whose bias gradient is a matmul with ones.

  XLA:CPU lowers the autodiff bias gradient, a sum over every leading axis, as a column
  reduction that is pathologically slow at vocabulary width: 325 ms for [1024, 50265] against
  6 ms for ``ones @ g`` on 2 cores (the LM head of a captioning step spent a third of its time
  there). The value and the gradient are the same up to float summation order."""
  return x + bias.astype(x.dtype)


def _add_bias_fwd(x, bias):
  return add_bias(x, bias), bias


def _add_bias_bwd(bias, g):
  lead = tuple(range(g.ndim - 1))
  ones = jnp.ones(g.shape[:-1], g.dtype)
  db = lax.dot_general(ones, g, ((lead, lead), ((), ())),
                       preferred_element_type=jnp.promote_types(g.dtype, jnp.float32))
  return g, db.astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  """LayerNorm over H with statistics in float32 (or wider) and the two-pass variance."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.compute_dtype,
      param_dtype=config.weight_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=zeros_init(("embed",)), name=name)


def explicit_attention(config: ModelConfig, deterministic: bool) -> bool:
  """Whether attention is computed explicitly rather than by ``jax.nn.dot_product_attention``:
  when the probabilities are dropped (it has no dropout), or for float64 compute (it runs the
  softmax in float32, where the mask's float64 big negative overflows to -inf)."""
  dropped = not deterministic and config.attention_dropout_rate > 0.0
  return dropped or jnp.dtype(config.compute_dtype).itemsize > 4


class DenseParams(nn.Module):
  """The kernel [in..., out...] and bias [out...] of a ``Dense`` (same names, init and logical
  axes), for callers that apply several of them as one matmul."""
  config: ModelConfig
  in_shape: tuple[int, ...]
  features: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]

  @nn.compact
  def __call__(self):
    cfg = self.config
    kernel = self.param("kernel", kernel_init(cfg, self.in_axes + self.out_axes),
                        tuple(self.in_shape) + tuple(self.features), cfg.weight_dtype)
    bias = self.param("bias", zeros_init(self.out_axes), tuple(self.features), cfg.weight_dtype)
    return kernel, bias


class SelfAttention(nn.Module):
  """Multi-head self-attention with an additive bias and an optional key/value cache.

  The query, key and value projections are ONE matmul ``x @ [Wq | Wk | Wv]`` (the three kernels,
  stored separately as ``query``/``key``/``value``, are stacked at apply time; one [H, 3H]
  product and its two backward products instead of three each).

  Without dropout on the attention probabilities (evaluation, decoding, or
  ``attention_dropout_rate=0``) attention is ``jax.nn.dot_product_attention`` with
  ``implementation=None``: XLA's fused softmax path on CPU/TPU, cuDNN flash attention on GPU
  where it applies. It has no dropout, so a training step that drops probabilities computes them
  explicitly (logits in float32, ``softmax``, hashed dropout, ``probs @ v``); so does float64
  compute (``explicit_attention``).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, kv_cache=None, cache_index=None,
               return_kv: bool = False):
    """Attends ``x`` to itself (or to the cache after writing ``x``'s keys/values into it).

    Args:
      x: [B, L, H].
      bias: additive [B, 1|h, L, T] (``masks.to_bias``) or None (attend everywhere).
      deterministic: no attention dropout when True.
      kv_cache: None, or ``(k, v)`` each [B, T, h, d]: this step's keys/values are written at
        ``cache_index`` (positions ``cache_index .. cache_index+L-1``) and the queries attend to
        all T slots (the bias masks the empty ones).
      cache_index: int32 scalar, where to write.
      return_kv: also return the keys/values without a cache (to build one from a prefix).
    Returns:
      ``(out [B, L, H], kv)``: kv is ``(k, v)`` each [B, T, h, d], the keys/values attended to
      (the updated cache when decoding), or None when neither decoding nor ``return_kv``.
    """
    cfg = self.config
    heads, d = cfg.num_heads, cfg.head_dim
    dtype = cfg.compute_dtype
    acc = accumulation_dtype(cfg)
    proj = [DenseParams(cfg, (cfg.hidden_size,), (heads, d), ("embed",), ("heads", "kv"),
                        name=n)() for n in ("query", "key", "value")]
    kernel = jnp.stack([w.astype(dtype) for w, _ in proj], axis=1)  # [H, 3, h, d]
    qkv = project(x, kernel, 1, cfg)
    qkv = (qkv + jnp.stack([b for _, b in proj]).astype(acc)).astype(dtype)  # [B, L, 3, h, d]
    qkv = nn.with_logical_constraint(qkv, ("batch", "length", None, "heads", "kv"))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, L, h, d]
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      start = (0, cache_index, 0, 0)
      k = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
    if explicit_attention(cfg, deterministic):
      softmax_dtype = jnp.promote_types(acc, jnp.float32)
      qs = q * jnp.asarray(d ** -0.5, q.dtype)
      logits = jnp.einsum("bqhd,bkhd->bhqk", qs, k.astype(dtype), preferred_element_type=acc)
      logits = logits.astype(softmax_dtype)
      if bias is not None:
        logits = logits + bias.astype(softmax_dtype)
      probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
      probs = Dropout(cfg.attention_dropout_rate)(probs, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype), preferred_element_type=acc)
    else:
      out = jax.nn.dot_product_attention(q, k.astype(dtype), v.astype(dtype), bias=bias,
                                         scale=d ** -0.5, implementation=None)
    out = nn.with_logical_constraint(out.astype(dtype), HEAD_AXES)
    out = Dense(cfg, (cfg.hidden_size,), ("heads", "kv"), ("embed",), name="out")(out)
    return out, ((k, v) if kv_cache is not None or return_kv else None)


class MLP(nn.Module):
  """``fc(H->M) -> GELU -> fc(M->H)``, no inner dropout (UNIMO/RoBERTa)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = Dense(cfg, (cfg.mlp_dim,), ("embed",), ("mlp",), name="wi")(x)
    h = nn.with_logical_constraint(gelu(h), MLP_AXES)
    return Dense(cfg, (cfg.hidden_size,), ("mlp",), ("embed",), name="wo")(h)


class EncoderLayer(nn.Module):
  """One Transformer block (post-LN by default, pre-LN when ``config.pre_ln``).

  The call signature is the scan body's: ``x`` is the carry, the rest are per-step inputs
  (``kv_cache`` scanned over layers, everything else broadcast)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, kv_cache=None, cache_index=None,
               return_kv: bool = False):
    """x [B, L, H] -> (x [B, L, H], kv (see ``SelfAttention``) or None)."""
    cfg = self.config
    drop = lambda y: Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    attention = SelfAttention(cfg, name="attention")
    attention_norm = layer_norm(cfg, "attention_norm")
    mlp, mlp_norm = MLP(cfg, name="mlp"), layer_norm(cfg, "mlp_norm")
    if cfg.pre_ln:
      a, kv = attention(attention_norm(x), bias, deterministic, kv_cache, cache_index, return_kv)
      x = x + drop(a)
      x = x + drop(mlp(mlp_norm(x)))
    else:
      a, kv = attention(x, bias, deterministic, kv_cache, cache_index, return_kv)
      x = attention_norm(x + drop(a))
      x = mlp_norm(x + drop(mlp(x)))
    return nn.with_logical_constraint(x, HIDDEN_AXES), kv


# Parameters of the scanned stack: ``encoder/layers/<EncoderLayer params>``, each with a leading
# [num_layers] axis whose logical name is LAYER_AXIS (no mesh axis in the rules: every device
# holds every layer's slice of its shard).
LAYERS = "layers"
LAYER_AXIS = "layers"


def remat_policy(config: ModelConfig):
  """The ``jax.checkpoint`` policy named by ``config.remat_policy`` (what a layer keeps for the
  backward pass; everything else is recomputed)."""
  return getattr(jax.checkpoint_policies, config.remat_policy)


class Encoder(nn.Module):
  """``num_layers`` EncoderLayers as ONE ``nn.scan`` (the compiled program holds one layer body
  whatever the depth), each rematerialised with ``remat_policy`` when ``config.remat``; plus
  ``final_norm`` when ``pre_ln`` (post-LN has none, as UNIMO).

  Parameters: ``layers/...`` stacked [num_layers, ...] (``stack_layer_params`` builds this
  layout from per-layer trees)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool, cache=None, cache_index=None,
               return_kv: bool = False):
    """x [B, L, H], bias [B, 1|h, L, T] or None; cache None or ``(k, v)`` each
    [layers, B, T, h, d]. Returns ``(hidden [B, L, H], kv)``: kv is ``(k, v)`` each
    [layers, B, T, h, d] when decoding (``cache``) or ``return_kv``, else None."""
    cfg = self.config
    layer = EncoderLayer
    if cfg.remat:
      # argnum 0 is the module: (self, x, bias, deterministic, kv_cache, cache_index, return_kv).
      # Inside scan nothing can be CSE'd across iterations, so prevent_cse's barriers are moot.
      layer = nn.remat(EncoderLayer, policy=remat_policy(cfg), prevent_cse=False,
                       static_argnums=(3, 6))
    stack = nn.scan(layer, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                    length=cfg.num_layers, unroll=cfg.scan_unroll,
                    metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
    x, kv = stack(cfg, name=LAYERS)(x, bias, deterministic, cache, cache_index, return_kv)
    if cfg.pre_ln:
      x = layer_norm(cfg, "final_norm")(x)
    return x, kv


def stack_layer_params(layers: Sequence[Any]) -> dict:
  """THE layout conversion for checkpoint converters: per-layer encoder trees -> our encoder.

  ``layers[i]`` is layer i's tree in ``EncoderLayer``'s naming (``attention/{query,key,value,
  out}/{kernel,bias}``, ``attention_norm``, ``mlp/{wi,wo}``, ``mlp_norm``; Flax kernel shapes
  ``[in..., out...]``). Returns ``{"layers": tree}`` with every leaf stacked on a new leading
  [num_layers] axis: the ``encoder`` subtree of ``Unimo``'s parameters (add ``final_norm``
  beside ``layers`` for pre-LN). Leaves may be numpy or jax arrays; numpy stays numpy.
  """
  if not layers:
    raise ValueError("stack_layer_params: no layers")
  stack = lambda *xs: (np.stack(xs) if all(isinstance(a, np.ndarray) for a in xs)
                       else jnp.stack(xs))
  return {LAYERS: jax.tree.map(stack, *layers)}


def unstack_layer_params(encoder: dict) -> list:
  """Inverse of ``stack_layer_params``: our ``encoder`` subtree -> a list of per-layer trees.
  Also reads the older unscanned layout ``layer_0 .. layer_{n-1}``."""
  if LAYERS in encoder:
    n = jax.tree.leaves(encoder[LAYERS])[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], encoder[LAYERS]) for i in range(n)]
  keys = sorted((k for k in encoder if k.startswith("layer_")), key=lambda k: int(k[6:]))
  return [encoder[k] for k in keys]


def to_scanned_layout(encoder: dict) -> dict:
  """An ``encoder`` subtree in either layout -> the scanned one (``layer_i`` trees, as written
  by this package before layers were scanned, are stacked; ``final_norm`` is kept)."""
  if LAYERS in encoder:
    return encoder
  out = stack_layer_params(unstack_layer_params(encoder))
  if "final_norm" in encoder:
    out["final_norm"] = encoder["final_norm"]
  return out
