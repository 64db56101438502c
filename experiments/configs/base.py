"""UNIMO-base pre-training (12 layers, H 768), initialised from RoBERTa-base, on a pod.

  unimo-jax train --config experiments/configs/base.py:/mnt/unimo_data --workdir gs://bucket/run

``arg`` is the data root holding the prepared corpora (``common.paper_data``). The paper's shapes:
100 detector regions (F 2048, 1601 classes), 512 text tokens, the RoBERTa vocabulary, Adam
(0.9, 0.98, 1e-6), decoupled weight decay, warmup then linear decay, 500k steps.
"""
from experiments.configs import common
from unimo_jax.train.config import default_config


def get_config(arg: str | None = None, *, size: str = "base"):
  root = arg or "/data/unimo"
  c = default_config()
  m = c.model
  shapes = dict(base=(12, 768, 12, 3072), large=(24, 1024, 16, 4096))[size]
  m.num_layers, m.hidden_size, m.num_heads, m.mlp_dim = shapes
  m.vocab_size = 50265             # RoBERTa's; MASK = 50264
  m.max_positions = 514
  m.roberta_positions = True
  m.dropout_rate = 0.1
  m.attention_dropout_rate = 0.1
  m.dtype = "auto"                 # bfloat16 compute, float32 parameters on TPU / GPU
  m.param_dtype = "float32"
  m.visual_input = "regions"
  m.region_feature_dim = 2048
  m.num_region_classes = 1601
  m.projection_dim = 256
  m.remat = True
  m.image_size = 224
  m.patch_size = 16

  c.data = common.paper_data(root, batch_sizes=(512, 256, 512))

  c.objectives.text_mode = "alternate"
  c.objectives.pair_text_mode = "alternate"
  c.objectives.mrp_regression_reduction = "sum"   # the paper's ||fc(h) - v||^2
  c.cmcl.implementation = "ring"

  p = c.optimizer
  p.learning_rate = 1e-4 if size == "base" else 5e-5
  p.warmup_steps = 10_000
  p.schedule = "linear"
  p.end_lr_factor = 0.0
  p.weight_decay = 0.01
  p.clip_norm = 1.0

  t = c.train
  t.total_steps = 500_000
  t.log_every = 100
  t.checkpoint_every = 2_000
  t.keep_checkpoints = 3
  t.keep_period = 50_000
  t.init_from = f"{root}/roberta-{size}-converted"
  t.eval_every = 10_000

  # Parameters and optimizer state sharded over every device (ZeRO-3 / FSDP); the batch is
  # split over the same devices. Add tensor parallelism for large models on big slices.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
