"""Plain-python generation of synthetic_scenes examples (no TensorFlow).

Every example is a pure function of (options.seed, stream, index): ``example(options, split,
index)`` gives random access, ``generate_examples(options, split)`` iterates a split in order.
The records are exactly what the TFDS builder stores, field for field (numpy arrays and str),
so a reader may use either path.

Streams: the four pair splits ("train", "validation", "test", "test_compositional"), the text
corpus ("text") and the unpaired image collection ("images"), each with its own random stream
and its own id range (``id = stream * ID_STRIDE + index``), so ids are unique across all of
them.
"""
import dataclasses

import numpy as np

from data_pipelines.synthetic_scenes import captions as captions_lib
from data_pipelines.synthetic_scenes import regions as regions_lib
from data_pipelines.synthetic_scenes import render as render_lib
from data_pipelines.synthetic_scenes import scene as scene_lib
from data_pipelines.synthetic_scenes import text as text_lib

KINDS = ("pairs", "text", "images")
PAIR_SPLITS = ("train", "validation", "test", "test_compositional")
STREAMS = {"train": 0, "validation": 1, "test": 2, "test_compositional": 3, "text": 4,
           "images": 5}
ID_STRIDE = 10**9

# Examples per split for each size preset. "demo" builds in well under a minute on 2 cores.
SIZES = {
    "tiny": dict(train=48, validation=16, test=16, test_compositional=16, text=96, images=32),
    "demo": dict(train=4000, validation=500, test=500, test_compositional=500, text=8000,
                 images=2000),
    "small": dict(train=20000, validation=1000, test=1000, test_compositional=1000,
                  text=50000, images=10000),
    "medium": dict(train=100000, validation=2000, test=2000, test_compositional=2000,
                   text=250000, images=50000),
    "large": dict(train=1000000, validation=5000, test=5000, test_compositional=5000,
                  text=2000000, images=500000),
}


@dataclasses.dataclass(frozen=True)
class SceneOptions:
  """Everything that determines a synthetic_scenes dataset.

  kind: "pairs" (image-text pairs, four splits), "text" (corpus, split "train") or "images"
    (unpaired images with regions, split "train").
  size: a key of ``SIZES``.
  image_size: side S of the square images in pixels (>= 24).
  feature_dim: dimension F of region features.
  class_mode: "shape_colour" (48 region classes) or "shape" (6).
  num_negatives: hard negatives per pair (fewer when a scene admits fewer false rewrites).
  seed: data seed.
  """
  kind: str = "pairs"
  size: str = "demo"
  image_size: int = 64
  feature_dim: int = 64
  class_mode: str = "shape_colour"
  num_negatives: int = 6
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.size not in SIZES:
      raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
    if self.image_size < 24:
      raise ValueError(f"image_size must be >= 24, got {self.image_size}")
    regions_lib.num_classes(self.class_mode)

  @property
  def name(self) -> str:
    """TFDS config name: the kind for the demo defaults, else the kind plus what differs."""
    parts = [self.kind]
    default = SceneOptions(kind=self.kind)
    if self.size != default.size:
      parts.append(self.size)
    for field, short in (("image_size", "s"), ("feature_dim", "f"), ("num_negatives", "k"),
                         ("seed", "seed")):
      if getattr(self, field) != getattr(default, field):
        parts.append(f"{short}{getattr(self, field)}")
    if self.class_mode != default.class_mode:
      parts.append(self.class_mode)
    return "_".join(parts)

  @property
  def splits(self) -> tuple:
    return PAIR_SPLITS if self.kind == "pairs" else ("train",)

  def num_examples(self, split: str) -> int:
    sizes = SIZES[self.size]
    return sizes[split] if self.kind == "pairs" else sizes[self.kind]

  @property
  def num_classes(self) -> int:
    return regions_lib.num_classes(self.class_mode)


def _stream(options: SceneOptions, split: str) -> int:
  if split not in options.splits:
    raise ValueError(f"{options.kind!r} has splits {options.splits}, not {split!r}")
  return STREAMS[split] if options.kind == "pairs" else STREAMS[options.kind]


def scene_for(options: SceneOptions, split: str, index: int):
  """(scene, rng) of one example; the rng continues the example's random stream."""
  stream = _stream(options, split)
  rng = np.random.default_rng([options.seed, stream, index])
  scene = scene_lib.sample_scene(rng, image_size=options.image_size,
                                 compositional=split == "test_compositional")
  return scene, rng


def graph_features(scene: scene_lib.Scene) -> dict:
  """The scene graph as arrays: objects [N] and every true relation triple [M]."""
  objs = scene.objects
  rels = scene.relations()
  return dict(
      objects=dict(
          shape=np.array([o.shape for o in objs], np.int64),
          colour=np.array([o.colour for o in objs], np.int64),
          size=np.array([o.size for o in objs], np.int64),
          row=np.array([o.row for o in objs], np.int64),
          col=np.array([o.col for o in objs], np.int64),
          center=np.array([o.center for o in objs], np.float32).reshape(len(objs), 2),
      ),
      relations=dict(
          subject=np.array([i for i, _, _ in rels], np.int64),
          predicate=np.array([scene_lib.RELATIONS.index(p) for _, p, _ in rels], np.int64),
          object=np.array([j for _, _, j in rels], np.int64),
      ),
  )


def example(options: SceneOptions, split: str, index: int) -> dict:
  """One record (see the TFDS builder for the features)."""
  stream = _stream(options, split)
  example_id = stream * ID_STRIDE + index
  if options.kind == "text":
    rng = np.random.default_rng([options.seed, stream, index])
    return dict(text_id=np.int64(example_id),
                text=text_lib.corpus_document(rng, options.image_size))
  scene, rng = scene_for(options, split, index)
  # The renderer draws from its own stream (the scene's background seed), so the language
  # fields below can be recomputed without rendering (``language_fields``).
  image, boxes, _ = render_lib.render(scene)
  record = dict(image=image, image_id=np.int64(example_id))
  record.update(graph_features(scene))
  if options.kind == "pairs":
    record.update(_language(options, split, scene, rng))
  record["regions"] = regions_lib.region_annotations(
      scene, boxes, rng, feature_dim=options.feature_dim, class_mode=options.class_mode)
  return record


def _language(options, split, scene, rng) -> dict:
  seen_only = split != "test_compositional"
  claim, caps = captions_lib.captions(scene, rng)
  negatives = captions_lib.hard_negatives(claim, scene, rng, options.num_negatives, seen_only)
  qa = text_lib.qa_pairs(scene, rng, seen_only=seen_only)
  return dict(captions=caps, hard_negatives=[t for t, _ in negatives],
              hard_negative_kinds=[k for _, k in negatives],
              qa=dict(question=[q for q, _ in qa], answer=[a for _, a in qa]))


def language_fields(options: SceneOptions, split: str, index: int):
  """(scene, fields) of a pair example without rendering it: fields holds exactly the
  record's captions, hard_negatives, hard_negative_kinds and qa."""
  if options.kind != "pairs":
    raise ValueError("language_fields needs a 'pairs' SceneOptions")
  scene, rng = scene_for(options, split, index)
  return scene, _language(options, split, scene, rng)


def _examples(args):
  options, split, start, stop = args
  return [example(options, split, i) for i in range(start, stop)]


def generate_examples(options, split: str, seed: int = None, start: int = 0, stop: int = None,
                      workers: int = 1, chunk: int = 64):
  """Yields (key, record) for ``split`` in index order.

  ``options`` is a ``SceneOptions`` or a TFDS ``ScenesConfig`` (its ``.options``); ``seed``,
  when given, overrides ``options.seed``. ``start``/``stop`` select an index range. With
  ``workers > 1``, chunks of ``chunk`` examples are generated in that many spawned processes
  (numpy only, no TensorFlow in them); the output is identical and in the same order.
  """
  options = getattr(options, "options", options)
  if seed is not None:
    options = dataclasses.replace(options, seed=seed)
  stop = options.num_examples(split) if stop is None else stop
  if workers <= 1 or stop - start <= chunk:
    for index in range(start, stop):
      yield index, example(options, split, index)
    return
  import multiprocessing  # pylint: disable=import-outside-toplevel
  tasks = [(options, split, a, min(a + chunk, stop)) for a in range(start, stop, chunk)]
  # "spawn": the parent may run TensorFlow threads, which a forked child must not inherit.
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    index = start
    for records in pool.imap(_examples, tasks):
      for record in records:
        yield index, record
        index += 1
