"""CoLA fine-tuning: UNIMO's official grid, batch {16, 32} x lr {1e-5, 2e-5, 3e-5} x 5 seeds
(30 trials; the paper reports the best validation score of the grid).

  unimo-jax sweep --sweep experiments/sweeps/finetune_cola.py --workdir /runs/cola --evaluate \
      --set init_from=/models/unimo_base_converted \
      --set data.train=/data/glue/cola/train.tsv --set data.validation=/data/glue/cola/dev.tsv
  unimo-jax sweep --workdir /runs/cola --summary          # summary.md / .csv / .png

The config's base size and recipe (experiments/configs/finetune/glue.py); append
--set model.num_layers=24 ... or use cola.py:large for UNIMO-large. The step count follows
the batch size (10 epochs), so each trial sets train.total_steps and its 6% warmup too.
"""
from experiments.configs.finetune import glue
from unimo_jax.train import sweep

CONFIG = "experiments/configs/finetune/cola.py:base"
COMMAND = "finetune"
METRIC = "validation/matthews"  # after `unimo-jax evaluate` of each trial (--evaluate)

SEEDS = (1, 2, 3, 4, 5)


def _steps(batch: int) -> int:
  examples = glue.TASKS["cola"][3]
  return max(1, int(10 * examples / batch))


def get_sweep():
  batches = [16, 32]
  return sweep.product(
      {"data.batch_size": batches, "train.total_steps": [_steps(b) for b in batches],
       "optimizer.warmup_steps": [int(0.06 * _steps(b)) for b in batches]},
      {"optimizer.learning_rate": [1e-5, 2e-5, 3e-5]},
      {"seed": list(SEEDS), "data.seed": list(SEEDS)})
