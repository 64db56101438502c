"""The demo with retrieved related images X_I and related texts X_T in CMCL (Ki = Kt = 1).

  unimo-jax prepare synthetic_scenes --data-dir DIR
  unimo-jax prepare neighbours --config experiments/configs/demo_related.py
  unimo-jax train --config experiments/configs/demo_related.py --workdir /tmp/unimo_related

``prepare neighbours`` writes the side file this config reads (default
DIR/side/synthetic_scenes/<pairs config>/neighbours-train.jsonl): for every training pair the
unpaired images sharing the most detected objects with it (``objects``) and the corpus texts
nearest its captions by TF-IDF (``tfidf``). The pair source joins the unpaired image collection
(``related_images``) so that the neighbours' image keys resolve. Everything else is the demo.
Config args (comma-separated): those of ``demo.py`` plus ``neighbours=FILE`` (the side file),
``images=objects|embedding`` and ``texts=tfidf|embedding`` (the scorers; ``embedding`` needs
``prepare neighbours --workdir W`` of a trained run).
"""
import os

from experiments.configs import common
from experiments.configs import demo

_OWN = ("neighbours", "images", "texts")


def neighbours_path(pair_spec: dict) -> str:
  """Where ``prepare neighbours`` writes the side file of a synthetic pair source."""
  return os.path.join(pair_spec["data_dir"], "side", pair_spec["tfds_name"],
                      "neighbours-train.jsonl")


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  own = common.parse_arg(",".join(p for p in parts if p.partition("=")[0] in _OWN),
                         neighbours="", images="objects", texts="tfidf")
  c = demo.get_config(",".join(p for p in parts if p.partition("=")[0] not in _OWN) or None)
  d = c.data
  d.num_related_images = 1     # Ki: retrieved related images X_I, extra positives of the caption
  d.num_related_texts = 1      # Kt: retrieved related texts X_T, extra positives of the image
  pair = dict(d.streams.pair.sources[0])
  pair["neighbours"] = own["neighbours"] or neighbours_path(pair)
  image = dict(d.streams.image.sources[0])
  pair["related_images"] = {k: v for k, v in image.items() if k != "weight"}
  d.streams.pair.sources = [pair]
  c.neighbours = dict(images=own["images"], texts=own["texts"], k_images=4, k_texts=4)
  return c
