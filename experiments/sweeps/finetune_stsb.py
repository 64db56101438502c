"""STS-B fine-tuning: UNIMO's official grid, batch {16, 32} x lr {1e-5, 2e-5, 3e-5} x 5 seeds
(30 trials; the paper reports the best validation score of the grid).

  unimo-jax sweep --sweep experiments/sweeps/finetune_stsb.py --workdir /runs/stsb --evaluate \
      --set init_from=/models/unimo_base_converted \
      --set data.train=/data/glue/stsb/train.tsv --set data.validation=/data/glue/stsb/dev.tsv
  unimo-jax sweep --workdir /runs/stsb --summary          # summary.md / .csv / .png

The config's base size and recipe (experiments/configs/finetune/glue.py); append
--set model.num_layers=24 ... or use stsb.py:large for UNIMO-large. The step count follows
the batch size (10 epochs), so each trial sets train.total_steps and its 6% warmup too.
"""
from experiments.configs.finetune import glue

CONFIG = "experiments/configs/finetune/stsb.py:base"
COMMAND = "finetune"
METRIC = "validation/pearson"  # after `unimo-jax evaluate` of each trial (--evaluate)


def get_sweep():
  return glue.official_grid("stsb")
