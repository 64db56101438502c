"""Task heads of UNIMO's fine-tuning (official ``src/finetune/*``), on top of the encoder.

Every head reads the encoder's h[CLS] and/or h[IMG] (``Unimo.encode_text`` / ``encode_pair``)
through UNIMO's ReLU poolers ``relu(fc(h))`` (``pooled_fc_text`` / ``pooled_fc_image``). The
poolers are the head's own parameters, initialised from the pre-trained model's
``text_projection/pooler`` and ``image_projection/pooler`` (what the UNIMO converter maps
``pooled_fc_*`` to) by ``finetune.init``; so fine-tuning starts from the pre-trained poolers
whatever the source.

- ``TextClassifier``  (GLUE): pooled_text, dropout, ``fc(num_labels)``; num_labels 1 is the
  regression head (STS-B).
- ``EntailmentHead``  (SNLI-VE): ``fc(pooled_text + pooled_image -> hidden)`` (no activation,
  hidden 2048 officially), dropout, ``fc(num_labels)``.
- ``VQAHead``: ``fc(pooled_text * pooled_image -> hidden)``, GELU, LayerNorm, dropout,
  ``fc(num_answers)`` (the official release has no VQA head; this is UNITER's classifier on
  UNIMO's "mul" fusion).
- ``MatchHead`` (Flickr30k cross-encoder): ``fc(dropout(pooled_text * pooled_image) -> 1)``,
  Xavier-initialised as the official code.

``dual=True`` (``task.dual_agreement``; not in the official heads) gives the entailment and
retrieval heads one more input, the CMCL agreement of the pair: ``agreement = P n(t) * n(i)``
[B, P], the product of the L2-normalised CMCL embeddings of the text and the image each encoded
alone, times P (its mean is their cosine, what pre-training's contrastive loss aligned). It
goes through its own zero-initialised ``fc`` (``dual``), added to the fusion layer's output (entailment,
-> hidden) or to the score (retrieval, -> 1), so the head starts as the official one.

Outputs are float32 logits / scores. Parameter logical axes: ``embed`` for H, ``mlp`` for the
hidden width, None for labels (replicated).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from unimo_jax.model import ModelConfig

HEAD_KINDS = ("classification", "regression", "entailment", "vqa", "retrieval")


def _dense(cfg: ModelConfig, features: int, axes: tuple, name: str, init=None) -> nn.Dense:
  init = init or nn.initializers.truncated_normal(cfg.init_std)
  return nn.Dense(features, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         axes[1:]), name=name)


class Pooler(nn.Module):
  """``relu(fc(h))``: [B, H] -> [B, H] float32 (kernel [H, H] like the model's pooler)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h):
    cfg = self.config
    return nn.relu(_dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(
        h.astype(jnp.float32)))


class TextClassifier(nn.Module):
  """cls [B, H] -> logits [B, num_labels]."""
  config: ModelConfig
  num_labels: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, cls, deterministic: bool = True):
    pooled = Pooler(self.config, name="text_pooler")(cls)
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic)
    return _dense(self.config, self.num_labels, ("mlp", None), "out")(pooled)


def _agreement(cfg: ModelConfig, features: int, agreement):
  """The zero-initialised ``dual`` fc of the CMCL agreement [B, P] -> [B, features]."""
  if agreement is None:
    raise ValueError("a head built with dual=True needs the pair's CMCL agreement [B, P]")
  return _dense(cfg, features, (None, None), "dual", nn.initializers.zeros_init())(
      agreement.astype(jnp.float32))


class EntailmentHead(nn.Module):
  """cls, img [B, H] (, agreement [B, P] when ``dual``) -> logits [B, num_labels]."""
  config: ModelConfig
  num_labels: int = 3
  hidden: int = 2048
  dropout_rate: float = 0.1
  dual: bool = False

  @nn.compact
  def __call__(self, cls, img, agreement=None, deterministic: bool = True):
    fused = (Pooler(self.config, name="text_pooler")(cls)
             + Pooler(self.config, name="image_pooler")(img))
    h = _dense(self.config, self.hidden, ("embed", "mlp"), "fuse")(fused)
    if self.dual:
      h = h + _agreement(self.config, self.hidden, agreement)
    h = nn.Dropout(self.dropout_rate)(h, deterministic)
    return _dense(self.config, self.num_labels, ("mlp", None), "out")(h)


class VQAHead(nn.Module):
  """cls, img [B, H] -> answer logits [B, num_answers]."""
  config: ModelConfig
  num_answers: int
  hidden: int = 2048
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, cls, img, deterministic: bool = True):
    cfg = self.config
    fused = (Pooler(cfg, name="text_pooler")(cls) * Pooler(cfg, name="image_pooler")(img))
    h = nn.gelu(_dense(cfg, self.hidden, ("embed", "mlp"), "fuse")(fused), approximate=False)
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                     param_dtype=cfg.weight_dtype, use_fast_variance=False,
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("mlp",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            ("mlp",)), name="norm")(h)
    h = nn.Dropout(self.dropout_rate)(h, deterministic)
    return _dense(cfg, self.num_answers, ("mlp", None), "out")(h)


class MatchHead(nn.Module):
  """cls, img [B, H] (, agreement [B, P] when ``dual``) -> matching score [B] (the
  cross-encoder of retrieval)."""
  config: ModelConfig
  dropout_rate: float = 0.1
  dual: bool = False

  @nn.compact
  def __call__(self, cls, img, agreement=None, deterministic: bool = True):
    cfg = self.config
    fused = Pooler(cfg, name="text_pooler")(cls) * Pooler(cfg, name="image_pooler")(img)
    fused = nn.Dropout(self.dropout_rate)(fused, deterministic)
    score = _dense(cfg, 1, ("embed", None), "out", nn.initializers.xavier_uniform())(fused)
    if self.dual:
      score = score + _agreement(cfg, 1, agreement)
    return score[:, 0]


DUAL_KINDS = ("entailment", "retrieval")  # heads that can read the CMCL agreement


def make_head(kind: str, config: ModelConfig, *, num_labels: int = 2, hidden: int = 2048,
              dropout_rate: float = 0.1, dual: bool = False) -> nn.Module | None:
  """The head module of a task kind (None for captioning / seq2seq: they use the LM head).
  ``dual``: the entailment / retrieval head also reads the CMCL agreement (module docstring)."""
  if dual and kind not in DUAL_KINDS:
    raise ValueError(f"dual agreement exists for {DUAL_KINDS} heads, not {kind!r}")
  if kind in ("captioning", "seq2seq"):
    return None
  if kind == "classification":
    return TextClassifier(config, num_labels, dropout_rate)
  if kind == "regression":
    return TextClassifier(config, 1, dropout_rate)
  if kind == "entailment":
    return EntailmentHead(config, num_labels, hidden, dropout_rate, dual)
  if kind == "vqa":
    return VQAHead(config, num_labels, hidden, dropout_rate)
  if kind == "retrieval":
    return MatchHead(config, dropout_rate, dual)
  raise ValueError(f"task.kind must be one of {HEAD_KINDS + ('captioning', 'seq2seq')}, "
                   f"got {kind!r}")


# pooler name in a head -> the pre-trained model's pooler it starts from
POOLER_SOURCES = {"text_pooler": ("text_projection", "pooler"),
                  "image_pooler": ("image_projection", "pooler")}


def copy_pretrained_poolers(head_params: dict, model_params: dict) -> dict:
  """Head params with every pooler set to the model's pre-trained pooler (plain arrays)."""
  out = dict(head_params)
  for name, (proj, pooler) in POOLER_SOURCES.items():
    if name in out and proj in model_params and pooler in model_params[proj]:
      src = model_params[proj][pooler]
      out[name] = {"dense": {"kernel": src["kernel"], "bias": src["bias"]}}
  return out
