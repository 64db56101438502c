"""Model inspection shared by ``unimo-jax model-info`` (``unimo_jax.model_info.main``): parameter
counts per component, random inputs and one forward pass per input kind, and the compile time and
per-device memory of a run's compiled train step."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from unimo_jax.model import ModelConfig, Unimo

# component -> top-level parameter collections
_COMPONENTS = (
    ("text embedding", ("text_embed",)),
    ("visual embedding", ("patch_embed", "region_embed")),
    ("encoder", ("encoder",)),
    ("LM head (tied)", ("lm_head",)),
    ("region heads", ("region_head",)),
    ("CMCL projections", ("text_projection", "image_projection")),
)


def count_params(params) -> dict[str, int]:
  """{component: number of parameters} for a (possibly abstract) parameter tree."""
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  out = {name: sum(size(params[k]) for k in keys if k in params) for name, keys in _COMPONENTS}
  out["total"] = size(params)
  out["text path (RoBERTa-comparable)"] = size({k: params[k] for k in
                                                ("text_embed", "encoder", "lm_head")})
  return out


def random_batch(config: ModelConfig, batch: int, length: int, regions: int, seed: int = 0):
  """Random ids [B, L] (with padding) and visual inputs of the config's kind."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, config.vocab_size - 1, (batch, length)).astype(np.int32)
  ids[:, 0] = config.cls_id
  for b, n in enumerate(rng.integers(max(2, length // 2), length + 1, batch)):
    ids[b, n - 1] = config.sep_id
    ids[b, n:] = config.pad_id
  if config.visual_input == "regions":
    visual = dict(
        region_features=rng.normal(size=(batch, regions, config.region_feature_dim)).astype(
            np.float32),
        region_boxes=rng.uniform(size=(batch, regions, 5)).astype(np.float32),
        region_valid=np.ones((batch, regions), bool))
  else:
    s = config.image_size
    visual = dict(pixels=rng.uniform(size=(batch, s, s, config.num_channels)).astype(np.float32))
  return ids, visual


def forwards(config: ModelConfig):
  model = Unimo(config)

  def text(params, ids):
    return model.apply(params, ids, method=Unimo.encode_text)

  def image(params, visual):
    return model.apply(params, visual, method=Unimo.encode_image)

  def pair(params, visual, ids):
    out = model.apply(params, visual, ids, method=Unimo.encode_pair)
    positions = jnp.zeros((ids.shape[0], max(1, ids.shape[1] // 7)), jnp.int32)
    out["lm_logits@P"] = model.apply(params, out["text_hidden"], positions,
                                     method=Unimo.lm_logits)
    out["cmcl_text"] = model.apply(params, out["cls"], method=Unimo.cmcl_text)
    out["cmcl_image"] = model.apply(params, out["img"], method=Unimo.cmcl_image)
    return out

  return text, image, pair


def compile_train_step(config, batch_spec) -> dict:
  """Lowers and compiles (never runs) the train step of a run config over every device.

  Args:
    config: a run config (``experiments/configs/base.py`` for the paper's shapes).
    batch_spec: its per-process batch spec (``data_pipelines.schema.batch_spec``).

  Returns dict(layers, compile_seconds, temp/argument/output GiB per device, devices)."""
  from unimo_jax.train import setup as setup_lib  # pylint: disable=import-outside-toplevel
  run = setup_lib.build_run(config, batch_spec, vocab_size=config.model.vocab_size or 50265,
                            process_count=1)
  t0 = time.time()
  compiled = run.compile()
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  return dict(layers=int(config.model.num_layers), compile_seconds=seconds,
              devices=jax.device_count(), temp_gib=gib(mem.temp_size_in_bytes),
              argument_gib=gib(mem.argument_size_in_bytes),
              output_gib=gib(mem.output_size_in_bytes))


def shapes(tree) -> str:
  return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(tree.items()))
