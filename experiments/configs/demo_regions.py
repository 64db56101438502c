"""The demo with detector-region input (UNIMO's visual input): synthetic_scenes' regions.

Each scene has up to 3 objects, stored as boxes, F=64 features and 48 shape-colour classes with
soft labels; masked region prediction regresses the features and matches the class distribution.
"""
from experiments.configs import demo


def get_config(arg: str | None = None):
  c = demo.get_config(arg)
  c.model.visual_input = "regions"
  c.model.region_feature_dim = 64
  c.model.num_region_classes = 48
  c.data.visual_input = "regions"
  return c
