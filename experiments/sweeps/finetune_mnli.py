"""MNLI fine-tuning: UNIMO's official grid, batch {16, 32} x lr {1e-5, 2e-5, 3e-5} x 5 seeds
(30 trials; the paper reports the best validation score of the grid).

  unimo-jax sweep --sweep experiments/sweeps/finetune_mnli.py --workdir /runs/mnli --evaluate \
      --set init_from=/models/unimo_base_converted \
      --set data.train=/data/glue/mnli/train.tsv --set data.validation=/data/glue/mnli/dev.tsv
  unimo-jax sweep --workdir /runs/mnli --summary          # summary.md / .csv / .png

The config's base size and recipe (experiments/configs/finetune/glue.py); append
--set model.num_layers=24 ... or use mnli.py:large for UNIMO-large. The step count follows
the batch size (10 epochs), so each trial sets train.total_steps and its 6% warmup too.
"""
from experiments.configs.finetune import glue

CONFIG = "experiments/configs/finetune/mnli.py:base"
COMMAND = "finetune"
METRIC = "validation/accuracy"  # after `unimo-jax evaluate` of each trial (--evaluate)


def get_sweep():
  return glue.official_grid("mnli")
