"""CMCL ablation on the demo: which augmentations of the contrastive loss matter.

Trials: the full loss; without hard negatives (X-); without paraphrase positives (X+); plain
InfoNCE (neither); and the ring implementation of the full loss (same numbers, less memory).
"""
CONFIG = "experiments/configs/demo.py"
COMMAND = "train"
METRIC = "test/hard_negative_acc"  # summary plot: after `unimo-jax evaluate` of each trial


def get_sweep():
  return [
      {},
      {"cmcl.use_negatives": False},
      {"cmcl.use_positives": False},
      {"cmcl.use_negatives": False, "cmcl.use_positives": False},
      {"cmcl.implementation": "ring"},
  ]
