"""TFDS builder of synthetic_scenes: ``SyntheticScenes`` with configs pairs / text / images.

Built locally from ``generate.py`` (no download), cached under ``data_dir`` and stored as
TFRecord (readable by ``as_dataset``). Config names: ``pairs``, ``text``, ``images`` for the
demo size, ``<kind>_<size>`` for the other size presets (``pairs_tiny``, ``text_small``, ...);
any other ``SceneOptions`` can be built by passing ``config=ScenesConfig(options=...)``.

    import data_pipelines.synthetic_scenes  # registers "synthetic_scenes"
    tfds.load("synthetic_scenes/pairs", split="train", data_dir=D)

Features of ``pairs`` (N objects/regions, M relation triples; images and text are unpaired
subsets: ``images`` has image, image_id, objects, relations, regions; ``text`` has text_id, text):
  image            uint8 [S, S, 3]
  image_id         int64 (unique across all splits and configs)
  captions         string [4]: true paraphrases, one per template
  hard_negatives   string [K]: false rewrites of the captions (scene-graph exact), K <= 6
  hard_negative_kinds string [K]: size|colour|shape|relation|location|swap_size|swap_colour|
                   swap_shape
  regions          boxes [N,4] f32 pixels x1y1x2y2 (x2,y2 exclusive), features [N,F] f32,
                   classes [N] int64, class_probs [N,C] f32
  qa               question string [Q], answer string [Q]
  objects          shape, colour, size, row, col int64 [N]; center f32 [N,2] (x, y pixels)
  relations        subject, predicate, object int64 [M] (predicate indexes scene.RELATIONS)
Index -> name tables (shapes, colours, sizes, relations, class_names) are in the metadata.
"""
import dataclasses
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.synthetic_scenes import generate
from data_pipelines.synthetic_scenes import regions as regions_lib
from data_pipelines.synthetic_scenes import scene as scene_lib

VERSION = tfds.core.Version("1.0.0")
# Large arrays are stored as raw bytes: TFDS would otherwise write uint8 pixels as an int64
# list (1.5 ms per 64x64 image to serialise, 8x the size on disk).
_RAW = tfds.features.Encoding.BYTES
# Processes generating examples while the main process encodes and writes them.
WORKERS = int(os.environ.get("SYNTHETIC_SCENES_WORKERS", "2"))


@dataclasses.dataclass(kw_only=True)
class ScenesConfig(tfds.core.BuilderConfig):
  """A TFDS config wrapping ``SceneOptions``; its name is ``options.name``."""
  name: str = ""
  options: generate.SceneOptions = dataclasses.field(default_factory=generate.SceneOptions)

  def __post_init__(self):
    if not self.name:
      self.name = self.options.name
    if self.version is None:
      self.version = VERSION
    if not self.description:
      o = self.options
      self.description = (f"synthetic scenes, {o.kind}, size {o.size}, {o.image_size}px, "
                          f"F={o.feature_dim}, {o.class_mode} classes, seed {o.seed}")


def _configs():
  out = []
  for size in generate.SIZES:
    for kind in generate.KINDS:
      out.append(ScenesConfig(options=generate.SceneOptions(kind=kind, size=size)))
  return out


def _vector(dtype, *trailing):
  return tfds.features.Tensor(shape=(None,) + trailing, dtype=dtype)


def _graph_features():
  # Plain tensors rather than Sequence(dict)/ClassLabel: TFDS encodes those 5x slower, and the
  # index -> name tables are in scene.py and in the dataset metadata.
  return dict(
      objects=dict(shape=_vector(np.int64), colour=_vector(np.int64), size=_vector(np.int64),
                   row=_vector(np.int64), col=_vector(np.int64),
                   center=_vector(np.float32, 2)),
      relations=dict(subject=_vector(np.int64), predicate=_vector(np.int64),
                     object=_vector(np.int64)),
  )


def features_for(options: generate.SceneOptions) -> tfds.features.FeaturesDict:
  """The FeaturesDict of a config (documented in the module docstring)."""
  if options.kind == "text":
    return tfds.features.FeaturesDict(dict(text_id=np.int64, text=tfds.features.Text()))
  s, f, c = options.image_size, options.feature_dim, options.num_classes
  feats = dict(
      image=tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=_RAW),
      image_id=np.int64,
      regions=dict(
          boxes=_vector(np.float32, 4),
          features=tfds.features.Tensor(shape=(None, f), dtype=np.float32, encoding=_RAW),
          classes=_vector(np.int64),
          class_probs=tfds.features.Tensor(shape=(None, c), dtype=np.float32, encoding=_RAW),
      ),
      **_graph_features(),
  )
  if options.kind == "pairs":
    feats.update(
        captions=_vector(np.object_),
        hard_negatives=_vector(np.object_),
        hard_negative_kinds=_vector(np.object_),
        qa=dict(question=_vector(np.object_), answer=_vector(np.object_)),
    )
  return tfds.features.FeaturesDict(feats)


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
  """Procedurally rendered scenes of coloured shapes with captions, scene graphs and regions."""

  VERSION = VERSION
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = "pairs"
  # TFDS derives this from the package through `importlib_resources`, which TFDS 4.9.10 does
  # not declare as a dependency; stating it also tells TFDS there is no checksums file.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    # TFRecord: readable with as_dataset (ArrayRecord output is not) and seekable by offset.
    super().__init__(file_format=file_format or "tfrecord", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    options = self.builder_config.options
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features_for(options),
        # Records stay in index order (record i of a split is example i), so readers can seek
        # by index and the plain-python generator reproduces the files one for one.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            image_size=options.image_size, feature_dim=options.feature_dim,
            class_mode=options.class_mode, num_classes=options.num_classes,
            held_out=sorted(f"{c} {s}" for c, s in scene_lib.HELD_OUT), seed=options.seed,
            shapes=list(scene_lib.SHAPES), colours=list(scene_lib.COLOURS),
            sizes=list(scene_lib.SIZES), relations=list(scene_lib.RELATIONS),
            class_names=regions_lib.class_names(options.class_mode)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in self.builder_config.options.splits}

  def _generate_examples(self, split):
    options = self.builder_config.options
    # Image configs are render-bound: generate them in worker processes when there are
    # enough examples to pay for starting them (about 1 s).
    large = options.kind != "text" and options.num_examples(split) >= 1000
    workers = min(WORKERS, os.cpu_count() or 1) if large else 1
    yield from generate.generate_examples(options, split, workers=workers)
