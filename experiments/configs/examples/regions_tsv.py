"""The official UNIMO region TSV (base64 features) with COCO caption JSON, as the paper's data.

  ROOT/regions/*.tsv                     img_filename W H num_boxes boxes features probs
                                         (boxes [n,4], features [n,F], probs [n,C]: base64 of
                                         little-endian float32; one image per line)
  ROOT/annotations/captions_train.json   COCO caption JSON; file_name matches img_filename
  ROOT/annotations/captions_test.json    the held-out images

  unimo-jax tokenizer train --config experiments/configs/examples/regions_tsv.py:root=ROOT \\
      --vocab-size 8000 --out ROOT/tokenizer/spm
  unimo-jax train --config experiments/configs/examples/regions_tsv.py:root=ROOT --workdir W
  unimo-jax evaluate --workdir W --split test

Config args as regions_npz.py (``regions``, ``features``, ``classes``). No image files are
needed: the TSV carries each image's width and height.
"""
from experiments.configs.examples import shared


def get_config(arg=None):
  args = shared.parse(arg, regions=36, features=2048, classes=1601)
  root = args["root"]
  c = shared.base_config(args, visual_input="regions")
  c.data.num_regions = args["regions"]
  c.data.region_feature_dim = args["features"]
  c.data.num_region_classes = args["classes"]
  c.model.region_feature_dim = args["features"]
  c.model.num_region_classes = args["classes"]
  _, image_b, pair_b = shared.batch_sizes(args)
  store = dict(kind="region_tsv", path=f"{root}/regions/*.tsv")
  train = dict(kind="coco", path=f"{root}/annotations/captions_train.json", regions=store)
  c.data.streams.text = shared.text_stream(args)
  c.data.streams.image = dict(batch_size=image_b, sources=[dict(train, name="train_regions")])
  c.data.streams.pair = dict(batch_size=pair_b, **shared.lengths("pair", args), sources=[
      dict(train, name="train_pairs", lexicon_negatives=True)])
  c.evaluation.sources = {"test": dict(
      kind="coco", path=f"{root}/annotations/captions_test.json", regions=store)}
  c.evaluation.splits = ("test",)
  return c
