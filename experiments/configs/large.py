"""UNIMO-large pre-training (24 layers, H 1024, 16 heads), initialised from RoBERTa-large.

  unimo-jax train --config experiments/configs/large.py:/mnt/unimo_data --workdir gs://bucket/run
"""
from experiments.configs import base


def get_config(arg: str | None = None):
  return base.get_config(arg, size="large")
