"""A TFDS dataset by name, already prepared under a data_dir (no download happens here).

  unimo-jax tokenizer train --config experiments/configs/examples/tfds.py:root=ROOT \\
      --vocab-size 8000 --out ROOT/tokenizer/spm
  unimo-jax train --config experiments/configs/examples/tfds.py:root=ROOT --workdir W
  unimo-jax evaluate --workdir W --split test        # any split the dataset has

Config args beside root (the tokenizer's folder): ``name`` (default coco_captions/2017),
``data_dir`` (default ~/tensorflow_datasets), ``key`` (the feature naming each image, default
image/id as coco_captions). The features read are ``image``, ``captions`` (a sequence of text,
or of {text} as coco_captions) and, optionally, ``hard_negatives``; other names go through the
source's ``field_map``. TFDS splits are evaluation splits by name: no evaluation.sources needed.
"""
from experiments.configs.examples import shared


def get_config(arg=None):
  args = shared.parse(arg, name="coco_captions/2017", data_dir="~/tensorflow_datasets",
                      key="image/id")
  c = shared.base_config(args)
  _, image_b, pair_b = shared.batch_sizes(args)
  train = dict(kind="tfds", tfds_name=args["name"], split="train", data_dir=args["data_dir"],
               field_map={"key": args["key"]})
  c.data.streams.text = shared.text_stream(args)
  c.data.streams.image = dict(batch_size=image_b, sources=[dict(train, name="train_images")])
  c.data.streams.pair = dict(batch_size=pair_b, **shared.lengths("pair", args), sources=[
      dict(train, name="train_pairs", lexicon_negatives=True)])
  c.evaluation.splits = ("test",)
  return c
