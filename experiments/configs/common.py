"""Shared pieces of the experiment configs: data sections for synthetic_scenes and real corpora.

Config files are plain Python (``get_config(arg)`` returning a ConfigDict), the convention of
big_vision and the flax examples; ``unimo_jax.train.config.default_config`` documents every field.
These helpers build only the ``data`` section, with plain values, so loading a config never
imports TensorFlow.
"""
import os

import ml_collections

# Where the README's `unimo-jax prepare synthetic_scenes --data-dir ...` builds the demo data
# (TFDS configs, the SentencePiece tokenizer, side files).
DEMO_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "unimo_jax", "synthetic_scenes")


def parse_arg(arg: str | None, **defaults) -> dict:
  """``"smoke,data_dir=/x"`` -> ``{"smoke": True, "data_dir": "/x"}`` over ``defaults``.

  Config files take one string argument (``--config file.py:ARG``); this reads flags and
  key=value pairs from it, with the types of the defaults.
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} unknown; expected {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = True if not eq else (value.lower() in ("1", "true", "yes") if kind is bool
                                    else kind(value))
  return out


def synthetic_tokenizer(data_dir: str = DEMO_DATA_DIR, size: str = "demo",
                        image_size: int = 64) -> str:
  """The tokenizer `unimo-jax prepare synthetic_scenes` trains for these data."""
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  name = "pairs" + (f"_{size}" if size != "demo" else "") + (
      f"_s{image_size}" if image_size != 64 else "")
  model = "spm" if name == "pairs" else f"spm_{name}"
  return f"sentencepiece:{data_dir}/tokenizer/{model}.model"


def synthetic_source(kind: str, size: str = "demo", data_dir: str = DEMO_DATA_DIR,
                     image_size: int = 64, weight: float = 1.0) -> dict:
  """A synthetic_scenes TFDS source (built locally on first use: ``prepare=True``).

  kind: "pairs" | "text" | "images"; the TFDS config name is the kind for the demo defaults and
  ``<kind>_<size>`` (plus ``_s<image_size>``) otherwise, as ``SceneOptions.name``.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  name = kind
  if size != "demo":
    name += f"_{size}"
  if image_size != 64:
    name += f"_s{image_size}"
  spec = dict(name=f"synthetic_{kind}", kind="tfds", tfds_name=f"synthetic_scenes/{name}",
              split="train", data_dir=data_dir, prepare=True, weight=weight)
  if kind == "pairs":
    # TF-IDF-nearest captions of other scenes: extra sentence-level hard negatives (UNIMO's
    # retrieval rewriting), written by `unimo-jax prepare`; a missing file means none.
    from data_pipelines import rewriting  # pylint: disable=import-outside-toplevel (no TF)
    spec["tfidf_negatives"] = rewriting.tfidf_side_path(data_dir, f"synthetic_scenes/{name}",
                                                        "train")
  return spec


def synthetic_data(*, visual_input: str = "patches", size: str = "demo", image_size: int = 64,
                   input_size: int | None = None, patch_size: int = 8,
                   batch_sizes=(32, 32, 32), text_length: int = 64, caption_length: int = 32,
                   data_dir: str = DEMO_DATA_DIR) -> ml_collections.ConfigDict:
  """All three streams on synthetic_scenes.

  image_size: the side of the prepared scenes (which TFDS config is read); input_size: the side
  the pipeline resizes them to for the model (default: image_size).
  batch_sizes: GLOBAL (text, image, pair) rows per step. The synthetic regions have F=64
  features and 48 shape-colour classes; scenes hold at most 3 objects (4 region slots).
  """
  text_b, image_b, pair_b = batch_sizes
  d = ml_collections.ConfigDict()
  d.seed = 0
  d.tokenizer = synthetic_tokenizer(data_dir, size, image_size)
  d.visual_input = visual_input
  d.image_size = input_size or image_size
  d.patch_size = patch_size
  d.num_regions = 4
  d.region_feature_dim = 64
  d.num_region_classes = 48
  d.num_positives = 2        # Kp: other template captions of the same scene (paraphrases X+)
  d.num_negatives = 4        # Kn: exact scene-graph rewrites (hard negatives X-)
  d.num_related_images = 0   # Ki: no neighbours file for synthetic_scenes by default
  d.num_related_texts = 0    # Kt
  d.streams = ml_collections.ConfigDict()
  d.streams.text = dict(batch_size=text_b, max_length=text_length, max_predictions=12,
                        s2s_max_length=text_length, s2s_max_predictions=24,
                        sources=[synthetic_source("text", size, data_dir, image_size)])
  d.streams.image = dict(batch_size=image_b,
                         sources=[synthetic_source("images", size, data_dir, image_size)])
  d.streams.pair = dict(batch_size=pair_b, max_length=caption_length, max_predictions=6,
                        s2s_max_predictions=caption_length,
                        sources=[synthetic_source("pairs", size, data_dir, image_size)])
  return d


def paper_data(root: str, *, batch_sizes=(512, 256, 512), tokenizer: str = "") -> ml_collections.ConfigDict:
  """UNIMO's pre-training data as local sources under ``root`` (prepared by the user).

  Text: BookWiki + OpenWebText as text files; images: OpenImages / COCO unlabeled with region
  features (npz per image); pairs: COCO, Visual Genome, Conceptual Captions, SBU with region
  features (the official base64 TSV). 100 regions of F=2048 features and 1601 Visual Genome
  classes, 512 text tokens (UNIMO.md).
  """
  text_b, image_b, pair_b = batch_sizes
  regions = dict(kind="region_tsv", path=f"{root}/regions/*.tsv")
  d = ml_collections.ConfigDict()
  d.seed = 0
  d.tokenizer = tokenizer or f"bpe:{root}/roberta_bpe"
  d.visual_input = "regions"
  d.image_size = 224
  d.patch_size = 16
  d.num_regions = 100
  d.region_feature_dim = 2048
  d.num_region_classes = 1601
  d.region_overlap_threshold = 0.3
  d.num_positives = 2
  d.num_negatives = 4
  d.num_related_images = 1
  d.num_related_texts = 1
  d.streams = ml_collections.ConfigDict()
  d.streams.text = dict(batch_size=text_b, max_length=512, max_predictions=80,
                        s2s_max_length=512, s2s_max_predictions=160, sources=[
                            dict(name="bookwiki", kind="text", path=f"{root}/bookwiki/*.txt",
                                 weight=1.0),
                            dict(name="openwebtext", kind="text",
                                 path=f"{root}/openwebtext/*.txt", weight=1.0)])
  d.streams.image = dict(batch_size=image_b, sources=[
      dict(name="openimages", kind="image_folder", path=f"{root}/openimages/images",
           regions=dict(kind="region_npz", path=f"{root}/openimages/regions"), weight=1.0),
      dict(name="coco_unlabeled", kind="image_folder", path=f"{root}/coco/unlabeled2017",
           regions=dict(kind="region_npz", path=f"{root}/coco/regions_unlabeled"), weight=1.0)])
  d.streams.pair = dict(batch_size=pair_b, max_length=64, max_predictions=10,
                        s2s_max_predictions=64, sources=[
                            dict(name="coco", kind="coco",
                                 path=f"{root}/coco/annotations/captions_train2017.json",
                                 image_dir=f"{root}/coco/train2017", regions=regions, weight=1.0,
                                 neighbours=f"{root}/neighbours/coco.jsonl"),
                            dict(name="visual_genome", kind="jsonl",
                                 path=f"{root}/visual_genome/captions.jsonl",
                                 image_dir=f"{root}/visual_genome/images", regions=regions,
                                 weight=1.0),
                            dict(name="cc3m", kind="webdataset", path=f"{root}/cc3m/*.tar",
                                 regions=regions, weight=2.0),
                            dict(name="sbu", kind="webdataset", path=f"{root}/sbu/*.tar",
                                 regions=regions, weight=1.0)])
  return d
