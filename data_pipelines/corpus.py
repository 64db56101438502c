"""The texts of configured sources or files: what ``unimo-jax tokenizer train`` learns from.

Every text a run would tokenize: the ``text`` of text-corpus records and the ``captions`` and
``paraphrases`` of pairs, read through the same sources as training (so WebDataset shards, COCO
caption JSON, JSON lines, TFDS datasets and plain text all work), each distinct string of a
record once. Region and image-only sources have no text and are skipped.

  config_texts(config)          every source of the text and pair streams (a file set read
                                by both, e.g. captions used as a text corpus, once)
  path_texts(paths)             files by extension: .tar (WebDataset), .jsonl (JSON lines),
                                .json (COCO caption JSON, else JSON lines), anything else text
  load_config_file("f.py:arg")  the ConfigDict of an experiment config file
"""
import importlib.util
import json
import logging
import os
from typing import Iterable, Iterator

from data_pipelines import sources

TEXT_FIELDS = ("text", "captions", "paraphrases")


def load_config_file(spec: str):
  """``path/to/config.py[:arg]`` -> ``get_config(arg)`` (the convention of ``unimo-jax train``)."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config {path}: no such file")
  module_spec = importlib.util.spec_from_file_location("_tokenizer_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()


def source_texts(spec: dict, name: str) -> Iterator[str]:
  """The texts of one source (see the module docstring); bad records are skipped."""
  src = sources.open_source(spec, name=name)
  try:
    wanted = set(TEXT_FIELDS) & set(src.fields)
    if not wanted:
      return
    src.restrict(wanted)
    for i in range(len(src)):
      try:
        rec = src.read(i)
      except sources.BadRecord:
        continue
      seen = set()
      for field in TEXT_FIELDS:
        values = rec.get(field)
        for t in ([values] if isinstance(values, str) else values or ()):
          if t not in seen:
            seen.add(t)
            yield t
  finally:
    src.close()


def config_texts(config) -> Iterator[str]:
  """The texts of every source of the config's enabled streams (``config`` or its ``data``)."""
  data = config.data if "data" in config else config
  streams = data.get("streams", {})
  seen = set()
  for stream in ("text", "pair"):  # the image stream tokenizes nothing
    scfg = streams.get(stream)
    if scfg is None or not int(scfg.get("batch_size", 0) or 0):
      continue
    for k, spec in enumerate(scfg.get("sources", [])):
      spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
      spec.pop("regions", None)  # a region store joined by key has no text
      if spec.get("kind") in ("region_npz", "region_tsv", "region_store", "image_folder"):
        continue
      same = json.dumps({k: spec.get(k) for k in ("kind", "path", "tfds_name", "split",
                                                   "data_dir", "field_map")}, sort_keys=True)
      if same in seen:  # one file set read by two streams (captions as a text corpus)
        continue
      seen.add(same)
      name = spec.get("name") or f"{stream}.{k}"
      logging.info("tokenizer corpus: %s (%s)", name, spec.get("kind"))
      yield from source_texts(spec, name)


def _kind_of(path: str) -> dict:
  if path.endswith(".tar"):
    return dict(kind="webdataset", path=path)
  if path.endswith(".json"):
    try:  # one JSON object with annotations: COCO captions; otherwise JSON lines
      with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    except ValueError:
      obj = None
    return dict(kind="coco_text" if isinstance(obj, dict) and "annotations" in obj else "jsonl",
                path=path)
  if path.endswith(".jsonl"):
    return dict(kind="jsonl", path=path)
  return dict(kind="text", path=path)


def path_texts(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
  """The texts of files named on the command line (kinds by extension, module docstring)."""
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"--input {path}: no such file")
    spec = _kind_of(path)
    if spec["kind"] == "coco_text":  # captions alone; the images are not needed for this
      with open(path, encoding="utf-8") as f:
        for a in json.load(f).get("annotations", []):
          caption = str(a.get("caption", "")).strip()
          if caption:
            yield caption
      continue
    if spec["kind"] == "jsonl" and text_field != "text":
      spec["field_map"] = {"text": text_field}
    yield from source_texts(spec, os.path.basename(path))
