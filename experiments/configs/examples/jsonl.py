"""JSON lines: one object per image (pairs) or per text (a corpus).

  ROOT/images/...        image files, named by the "image" field (a path relative to here)
  ROOT/train.jsonl       {"key": "0001", "image": "0001.jpg", "captions": ["...", ...],
  ROOT/test.jsonl         "hard_negatives": ["...", ...]}      (hard_negatives optional)
  ROOT/corpus.jsonl      {"text": "..."}: the text corpus (one document per line)

  unimo-jax tokenizer train --config experiments/configs/examples/jsonl.py:root=ROOT \\
      --vocab-size 8000 --out ROOT/tokenizer/spm
  unimo-jax train --config experiments/configs/examples/jsonl.py:root=ROOT --workdir W
  unimo-jax evaluate --workdir W --split test

Other key names: a source's ``field_map`` renames them ({"captions": "sentences"}).
"""
from experiments.configs.examples import shared


def get_config(arg=None):
  args = shared.parse(arg)
  root = args["root"]
  c = shared.base_config(args)
  _, image_b, pair_b = shared.batch_sizes(args)
  train = dict(kind="jsonl", path=f"{root}/train.jsonl", image_dir=f"{root}/images")
  c.data.streams.text = shared.text_stream(
      args, [dict(name="corpus", kind="jsonl", path=f"{root}/corpus.jsonl")])
  c.data.streams.image = dict(batch_size=image_b, sources=[dict(train, name="train_images")])
  c.data.streams.pair = dict(batch_size=pair_b, **shared.lengths("pair", args), sources=[
      dict(train, name="train_pairs", lexicon_negatives=True)])
  c.evaluation.sources = {"test": dict(kind="jsonl", path=f"{root}/test.jsonl",
                                       image_dir=f"{root}/images")}
  c.evaluation.splits = ("test",)
  return c
