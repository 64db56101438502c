"""gigaword: see seq2seq.py for the recipe, data layout and config args (demo | base | large).

TSV files by default (``gigaword.py:base,data_dir=D``: ``D/gigaword/{train,dev,test}.tsv``).
TFDS ``gigaword`` prepared beforehand (``tfds build gigaword --data_dir D`` where the
network is reachable; nothing is downloaded at run time) with the config arg ``tfds``:

  unimo-jax finetune --config experiments/configs/finetune/gigaword.py:base,tfds,tfds_dir=D \\
      --workdir W --config.init_from=/models/unimo_base_converted
"""
from experiments.configs.finetune.seq2seq import seq2seq_config


def get_config(arg=None):
  return seq2seq_config("gigaword", arg)
