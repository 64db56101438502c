"""Sources of raw records: `open_source(spec)` for every kind the pipeline reads.

A source spec (one entry of ``data.streams.<s>.sources``) is a mapping:
  name        unique name, used in error messages and drop counts (default: the kind + index)
  kind        tfds | webdataset | coco | image_folder | text | jsonl | region_npz | region_tsv |
              region_store (converted by `unimo-jax prepare regions`: `region_store`) |
              token_store (a text corpus tokenised by `unimo-jax prepare tokens`: `token_store`)
  weight      mixture weight within its stream (default 1.0)
  path        file, directory, glob or list of them (every kind but tfds)
  tfds_name   e.g. "coco_captions/2017" or "synthetic_scenes/pairs" (kind tfds); split, data_dir,
              prepare (build first: only for builders that need no download; with several
              processes, prepare once beforehand, e.g. `unimo-jax prepare`, as they would race)
  image_dir   images of a coco / jsonl source (without it the source has no images: captions
              with region features joined by key)
  field_map   {raw key: feature/json key}, for tfds and jsonl
  regions     {kind: region_npz | region_tsv | region_store, path}: region features joined by image
              key (needed with visual_input "regions" when the source has no regions of its own)
  neighbours  JSON lines side file of related images / texts (see `base.load_neighbours`)
  related_images  pairs: {source spec} of the image collection the neighbours' image keys may
              name besides the pair source's own (`related.RelatedImages`)
  tfidf_negatives    pairs: side file of TF-IDF-nearest captions of other images, keyed by the
                     numeric example id (`rewriting.write_tfidf_side_file`, `unimo-jax prepare`)
  lexicon_negatives  pairs: fill missing hard negatives with word-level rewrites of the caption
"""
from data_pipelines.sources.base import BadRecord, Source, load_neighbours
from data_pipelines.sources.files import (CocoCaptionsSource, ImageFolderSource, JsonlSource,
                                          TextSource)
from data_pipelines.sources.region_store import RegionStoreSource
from data_pipelines.sources.regions import NpzRegionSource, RegionJoin, TsvRegionSource
from data_pipelines.sources.related import RelatedImages
from data_pipelines.sources.tfds_source import TfdsSource, load_builder
from data_pipelines.sources.token_store import TokenStoreSource
from data_pipelines.sources.webdataset import WebDatasetSource

KINDS = ("tfds", "webdataset", "coco", "image_folder", "text", "jsonl", "region_npz",
         "region_tsv", "region_store", "token_store")

__all__ = ["BadRecord", "Source", "open_source", "load_neighbours", "load_builder", "KINDS",
           "TfdsSource", "WebDatasetSource", "CocoCaptionsSource", "ImageFolderSource",
           "TextSource", "JsonlSource", "NpzRegionSource", "TsvRegionSource", "RegionStoreSource",
           "RegionJoin", "TokenStoreSource",
           "RelatedImages"]


def _need(spec, key, name):
  if spec.get(key) in (None, ""):
    raise ValueError(f"source {name!r} (kind {spec.get('kind')!r}) needs {key!r}")
  return spec[key]


def open_source(spec, *, name: str) -> Source:
  """Opens (and indexes) the source described by `spec` (see the module docstring)."""
  kind = spec.get("kind")
  if kind == "tfds":
    src = TfdsSource(name, _need(spec, "tfds_name", name), split=spec.get("split", "train"),
                     data_dir=spec.get("data_dir"), prepare=bool(spec.get("prepare", False)),
                     field_map=spec.get("field_map"))
  elif kind == "webdataset":
    src = WebDatasetSource(name, _need(spec, "path", name))
  elif kind == "coco":
    src = CocoCaptionsSource(name, _need(spec, "path", name), image_dir=spec.get("image_dir"))
  elif kind == "image_folder":
    src = ImageFolderSource(name, _need(spec, "path", name))
  elif kind == "text":
    src = TextSource(name, _need(spec, "path", name))
  elif kind == "jsonl":
    src = JsonlSource(name, _need(spec, "path", name), image_dir=spec.get("image_dir"),
                      field_map=spec.get("field_map"))
  elif kind == "region_npz":
    src = NpzRegionSource(name, _need(spec, "path", name))
  elif kind == "region_tsv":
    src = TsvRegionSource(name, _need(spec, "path", name))
  elif kind == "region_store":
    src = RegionStoreSource(name, _need(spec, "path", name))
  elif kind == "token_store":
    src = TokenStoreSource(name, _need(spec, "path", name))
  else:
    raise ValueError(f"source {name!r}: unknown kind {kind!r}; kinds are {KINDS}")
  if spec.get("regions"):
    rspec = dict(spec["regions"])
    store = open_source(rspec, name=f"{name}.regions")
    src = RegionJoin(src, store)
  if spec.get("related_images"):
    rspec = dict(spec["related_images"])
    src = RelatedImages(src, open_source(rspec, name=str(rspec.get("name") or f"{name}.related")))
  return src
