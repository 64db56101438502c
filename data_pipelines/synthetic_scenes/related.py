"""Ground truth of relatedness between synthetic_scenes items (pairs, unpaired images, corpus).

Every item of every stream is a pure function of (seed, stream, index), and its id encodes both
(``id = stream * ID_STRIDE + index``), so the scene behind any record can be recomputed from its
key alone: a pair's or an unpaired image's scene (``generate.scene_for``), and the scene a corpus
document was written about (``text.corpus_document`` samples it first from the same stream).
Two items are RELATED when their scenes share an object kind, i.e. a (colour, shape) — the
paper's "overlapping objects" for X_I, and for X_T a document about a scene with an object of the
pair's scene. About one item in ten of the demo collections is related to a given pair, so a
precision@k far above that base rate means a scorer finds related items.
"""
import dataclasses

import numpy as np

from data_pipelines.synthetic_scenes import generate
from data_pipelines.synthetic_scenes import scene as scene_lib

_SPLIT_OF_STREAM = {v: k for k, v in generate.STREAMS.items()}


def options_from_name(name: str) -> generate.SceneOptions:
  """The SceneOptions of a TFDS config name (``SceneOptions.name``'s inverse): "pairs_tiny",
  "images_s48_seed3", "synthetic_scenes/text"."""
  parts = name.split("/")[-1].split("_")
  kw = dict(kind=parts[0])
  for p in parts[1:]:
    if p in generate.SIZES:
      kw["size"] = p
    elif p == "shape":
      kw["class_mode"] = "shape"
    elif p.startswith("seed") and p[4:].isdigit():
      kw["seed"] = int(p[4:])
    elif p[:1] in ("s", "f", "k") and p[1:].isdigit():
      kw[{"s": "image_size", "f": "feature_dim", "k": "num_negatives"}[p[0]]] = int(p[1:])
    else:
      raise ValueError(f"{name!r} is not a synthetic_scenes config name (part {p!r})")
  return generate.SceneOptions(**kw)


def scene_of_key(options: generate.SceneOptions, key) -> scene_lib.Scene:
  """The scene behind the record with this id (any stream of ``options``' seed)."""
  stream, index = divmod(int(key), generate.ID_STRIDE)
  if stream not in _SPLIT_OF_STREAM:
    raise ValueError(f"{key!r} is not a synthetic_scenes id")
  split = _SPLIT_OF_STREAM[stream]
  if split == "text":  # corpus_document: the scene is the first draw of the document's stream
    rng = np.random.default_rng([options.seed, stream, index])
    return scene_lib.sample_scene(rng, image_size=options.image_size)
  kind = "images" if split == "images" else "pairs"
  opts = dataclasses.replace(options, kind=kind)
  return generate.scene_for(opts, "train" if kind == "images" else split, index)[0]


def object_kinds(scene: scene_lib.Scene) -> frozenset:
  """The (colour, shape) kinds of a scene's objects."""
  return frozenset((o.colour, o.shape) for o in scene.objects)


def kinds_of_keys(options: generate.SceneOptions, keys) -> list:
  return [object_kinds(scene_of_key(options, k)) for k in keys]


def related(a: frozenset, b: frozenset) -> bool:
  return bool(a & b)


def precision_at_k(query_kinds, neighbour_kinds, collection_kinds=None) -> dict:
  """precision@k of neighbour lists against the shared-object ground truth.

  Args:
    query_kinds: per query, its frozenset of object kinds.
    neighbour_kinds: per query, the list of its neighbours' kinds (best first; may be short).
    collection_kinds: every collection item's kinds, for the base rate (a random pick).
  Returns:
    dict(precision, queries (with >= 1 neighbour), neighbours, base_rate (if collection given)).
  """
  hits = total = queries = 0
  for q, ns in zip(query_kinds, neighbour_kinds):
    if ns:
      queries += 1
      hits += sum(related(q, n) for n in ns)
      total += len(ns)
  out = dict(precision=hits / total if total else float("nan"), queries=queries,
             neighbours=total)
  if collection_kinds is not None and len(collection_kinds) and len(query_kinds):
    # each query's share of related collection items, averaged over queries
    kinds = sorted({k for c in collection_kinds for k in c})
    col = np.zeros((len(collection_kinds), len(kinds)), bool)
    pos = {k: i for i, k in enumerate(kinds)}
    for i, c in enumerate(collection_kinds):
      col[i, [pos[k] for k in c]] = True
    rates = []
    for q in query_kinds:
      cols = [pos[k] for k in q if k in pos]
      rates.append(col[:, cols].any(1).mean() if cols else 0.0)
    out["base_rate"] = float(np.mean(rates))
  return out
