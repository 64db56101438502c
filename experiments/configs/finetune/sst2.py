"""SST2: see glue.py for the recipe, data layout and config args (demo | base | large)."""
from experiments.configs.finetune.glue import glue_config


def get_config(arg=None):
  return glue_config("sst2", arg)
