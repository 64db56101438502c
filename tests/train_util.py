"""Shared set-up for the training tests: a tiny run config, its batch spec, state and step."""
import jax
import ml_collections

from data_pipelines import schema
from unimo_jax.model import ModelConfig
from unimo_jax.train import config as config_lib
from unimo_jax.train import random_data
from unimo_jax.train import setup as setup_lib

VOCAB = 200


def data_section(visual_input="patches", batch=8, kp=2, kn=2, ki=1, kt=1):
  """A complete data section (every key the schema reads), tiny shapes."""
  src = [dict(name="random", kind="text", path="unused")]
  return dict(
      seed=0, tokenizer="", visual_input=visual_input, image_size=16, patch_size=8,
      num_regions=5, region_feature_dim=12, num_region_classes=6, num_positives=kp,
      num_negatives=kn, num_related_images=ki, num_related_texts=kt,
      streams=dict(
          text=dict(batch_size=batch, max_length=12, max_predictions=3, s2s_max_length=14,
                    s2s_max_predictions=5, objectives=("mlm", "s2s"), sources=src),
          image=dict(batch_size=batch, sources=src),
          pair=dict(batch_size=batch, max_length=10, max_predictions=3, s2s_max_predictions=9,
                    objectives=("mlm", "s2s"), sources=src)))


def run_config(visual_input="patches", batch=8, dropout=0.0, **data_kw):
  c = config_lib.default_config()
  c.model.update(dict(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_positions=20, image_size=16, patch_size=8, visual_input=visual_input,
                      region_feature_dim=12, num_region_classes=6, projection_dim=16,
                      dropout_rate=dropout, attention_dropout_rate=dropout))
  c.data = ml_collections.ConfigDict(data_section(visual_input, batch, **data_kw))
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.optimizer.learning_rate = 1e-3
  return c


def model_config(c) -> ModelConfig:
  return setup_lib.resolve_model_config(c)


def batch_spec(c, process_count=1):
  return schema.batch_spec(c.data.to_dict(), process_count)


def batches(c, seed=0, process_index=0, process_count=1):
  return random_data.RandomBatches(batch_spec(c, process_count), VOCAB, seed=seed,
                                   process_index=process_index)


def global_shapes(c):
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_spec(c).items()}


def setup(c, mesh):
  """(state, step_fn) for config c on mesh (``setup.build_run``, as the trainer builds it)."""
  run = setup_lib.build_run(c, batch_spec(c), mesh=mesh, process_count=1)
  return run.new_state(), run.step


def find_key(tree, key):
  """The first value stored under ``key`` in a nest of dicts, lists, tuples and named tuples
  (an optimizer state's fields: ``find_key(opt_state, "nu")``)."""
  if hasattr(tree, "_fields") and key in tree._fields:
    return getattr(tree, key)
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    children = list(tree.values())
  elif isinstance(tree, (list, tuple)):
    children = list(tree)
  else:
    return None
  for child in children:
    found = find_key(child, key)
    if found is not None:
      return found
  return None
