"""coco_caption: see multimodal.py for the recipe, data layout and config args (demo | base | large)."""
from experiments.configs.finetune.multimodal import multimodal_config


def get_config(arg=None):
  return multimodal_config("coco_caption", arg)
