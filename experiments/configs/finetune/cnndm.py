"""cnndm: see seq2seq.py for the recipe, data layout and config args (demo | base | large)."""
from experiments.configs.finetune.seq2seq import seq2seq_config


def get_config(arg=None):
  return seq2seq_config("cnndm", arg)
