"""Which data and objectives help (UNIMO's ablations, at demo scale): the pair stream alone,
without the text corpus, without unpaired images, and everything.
"""
CONFIG = "experiments/configs/demo.py"
COMMAND = "train"
METRIC = "test/i2t_r@1"  # summary plot: after `unimo-jax evaluate` of each trial


def get_sweep():
  return [
      {},
      {"data.streams.text.batch_size": 0},
      {"data.streams.image.batch_size": 0},
      {"data.streams.text.batch_size": 0, "data.streams.image.batch_size": 0},
  ]
