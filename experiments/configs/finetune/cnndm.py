"""cnndm: see seq2seq.py for the recipe, data layout and config args (demo | base | large).

TSV files by default (``cnndm.py:base,data_dir=D``: ``D/cnndm/{train,dev,test}.tsv``).
TFDS ``cnn_dailymail`` prepared beforehand (``tfds build cnn_dailymail --data_dir D`` where the
network is reachable; nothing is downloaded at run time) with the config arg ``tfds``:

  unimo-jax finetune --config experiments/configs/finetune/cnndm.py:base,tfds,tfds_dir=D \\
      --workdir W --config.init_from=/models/unimo_base_converted
"""
from experiments.configs.finetune.seq2seq import seq2seq_config


def get_config(arg=None):
  return seq2seq_config("cnndm", arg)
