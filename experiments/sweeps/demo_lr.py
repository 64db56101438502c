"""Learning rate x initial temperature of the demo (4 trials).

  unimo-jax sweep --sweep experiments/sweeps/demo_lr.py --workdir /tmp/sweep_lr
  unimo-jax sweep --sweep experiments/sweeps/demo_lr.py --workdir gs://b/sweep --print
  unimo-jax sweep --sweep experiments/sweeps/demo_lr.py --workdir /shared/sweep_lr --array
  unimo-jax sweep --workdir /tmp/sweep_lr --summary      # summary.md / .csv / .png
"""
from unimo_jax.train import sweep

CONFIG = "experiments/configs/demo.py"
COMMAND = "train"
METRIC = "test/i2t_r@1"  # summary plot: after `unimo-jax evaluate` of each trial


def get_sweep():
  return sweep.product({"optimizer.learning_rate": [1e-3, 3e-4]},
                       {"cmcl.temperature_init": [0.05, 0.1]})
