"""Detector region features, one npz per image, with captions in JSON lines (no pixels).

  ROOT/regions/KEY.npz   boxes [n, 4] pixels x1 y1 x2 y2, features [n, F], class_probs [n, C]
                         (or classes [n]), image_w, image_h
  ROOT/train.jsonl       {"key": "KEY", "captions": ["...", ...]}
  ROOT/test.jsonl        the same, held out

  unimo-jax tokenizer train --config experiments/configs/examples/regions_npz.py:root=ROOT \\
      --vocab-size 8000 --out ROOT/tokenizer/spm
  unimo-jax train --config experiments/configs/examples/regions_npz.py:root=ROOT --workdir W
  unimo-jax evaluate --workdir W --split test

Config args beside root: ``regions`` (R kept per image, default 36), ``features`` (F, 2048 for
the bottom-up-attention detector), ``classes`` (C, 1601 Visual Genome classes). Regions are
joined to each caption record by its key; the image stream reads the training records' regions
alone (masked region prediction).
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
  store = dict(kind="region_npz", path=f"{root}/regions")
  train = dict(kind="jsonl", path=f"{root}/train.jsonl", regions=store)
  c.data.streams.text = shared.text_stream(args)
  c.data.streams.image = dict(batch_size=image_b, sources=[dict(train, name="train_regions")])
  c.data.streams.pair = dict(batch_size=pair_b, **shared.lengths("pair", args), sources=[
      dict(train, name="train_pairs", lexicon_negatives=True)])
  c.evaluation.sources = {"test": dict(kind="jsonl", path=f"{root}/test.jsonl", regions=store)}
  c.evaluation.splits = ("test",)
  return c
