"""Which data and objectives help (UNIMO's ablations, at demo scale): the pair stream alone,
without the text corpus, without unpaired images, and everything.
"""
CONFIG = "experiments/configs/demo.py"


def get_sweep():
  return [
      {},
      {"data.streams.text.batch_size": 0},
      {"data.streams.image.batch_size": 0},
      {"data.streams.text.batch_size": 0, "data.streams.image.batch_size": 0},
  ]
