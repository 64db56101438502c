"""Your own image-text WebDataset: training shards and held-out test shards.

  ROOT/train-000000.tar ...   members KEY.jpg (or .png ...) with KEY.txt (one caption) and/or
                              KEY.json ({"captions": [...], "hard_negatives": [...]})
  ROOT/test-000000.tar ...    the same layout, never trained on

  unimo-jax tokenizer train --config experiments/configs/examples/webdataset.py:root=ROOT \\
      --vocab-size 8000 --out ROOT/tokenizer/spm
  unimo-jax train --config experiments/configs/examples/webdataset.py:root=ROOT --workdir W
  unimo-jax evaluate --workdir W --split test

The pair stream reads the training shards (CMCL, caption MLM, captioning), the image stream the
same shards' images alone (masked patch prediction), the text stream their captions as a text
corpus (or ``corpus=FILE``). Hard negatives: the shards' own, then word-level rewrites.
"""
from experiments.configs.examples import shared


def get_config(arg=None):
  args = shared.parse(arg)
  root = args["root"]
  c = shared.base_config(args)
  _, image_b, pair_b = shared.batch_sizes(args)
  shards = dict(kind="webdataset", path=f"{root}/train-*.tar")
  c.data.streams.text = shared.text_stream(args, [dict(shards, name="train_captions")])
  c.data.streams.image = dict(batch_size=image_b, sources=[dict(shards, name="train_images")])
  c.data.streams.pair = dict(batch_size=pair_b, **shared.lengths("pair", args), sources=[
      dict(shards, name="train_pairs", lexicon_negatives=True)])
  c.evaluation.sources = {"test": dict(kind="webdataset", path=f"{root}/test-*.tar")}
  c.evaluation.splits = ("test",)
  return c
