"""COCO-style caption JSON + an image folder (COCO, Flickr30k in Karpathy's split, your own).

  ROOT/images/...                      every image file of both splits
  ROOT/annotations/captions_train.json {"images": [{"id", "file_name"}, ...],
  ROOT/annotations/captions_test.json   "annotations": [{"image_id", "caption"}, ...]}

  unimo-jax tokenizer train --config experiments/configs/examples/coco.py:root=ROOT \\
      --vocab-size 8000 --out ROOT/tokenizer/spm
  unimo-jax train --config experiments/configs/examples/coco.py:root=ROOT --workdir W
  unimo-jax evaluate --workdir W --split test

One record per image with all its captions (a caption is drawn per step; the others are the
positives X+). The image stream reads the training images alone; the text stream is off unless
``corpus=FILE`` names a text corpus.
"""
from experiments.configs.examples import shared


def get_config(arg=None):
  args = shared.parse(arg)
  root = args["root"]
  c = shared.base_config(args)
  _, image_b, pair_b = shared.batch_sizes(args)
  train = dict(kind="coco", path=f"{root}/annotations/captions_train.json",
               image_dir=f"{root}/images")
  c.data.streams.text = shared.text_stream(args)
  c.data.streams.image = dict(batch_size=image_b, sources=[dict(train, name="train_images")])
  c.data.streams.pair = dict(batch_size=pair_b, **shared.lengths("pair", args), sources=[
      dict(train, name="train_pairs", lexicon_negatives=True)])
  c.evaluation.sources = {"test": dict(kind="coco", image_dir=f"{root}/images",
                                       path=f"{root}/annotations/captions_test.json")}
  c.evaluation.splits = ("test",)
  return c
