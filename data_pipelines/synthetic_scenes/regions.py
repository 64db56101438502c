"""Region annotations of a synthetic scene: detector-like features, class labels, soft labels.

A real UNIMO pipeline reads Faster R-CNN region features; here each object is one region whose
feature is a fixed random embedding of what a detector would see — shape, colour, size and
box geometry — plus per-region noise:

  feature = (E_shape[s] + E_colour[c] + E_size[z] + P @ geometry) / 2 + noise * N(0, 1)

The tables E and P come from a fixed seed (``TABLE_SEED``) independent of the data seed, so a
feature means the same thing in every split. The class label is the (shape, colour) class
(``shape * len(COLOURS) + colour``, 48 classes) or the shape alone (6 classes); the soft class
distribution is a softmax over classes that favours the true class and, less, classes sharing
its shape or colour, like a detector's posterior.
"""
import functools

import numpy as np

from data_pipelines.synthetic_scenes import scene as scene_lib

TABLE_SEED = 20210101
CLASS_MODES = ("shape_colour", "shape")
FEATURE_NOISE = 0.25


def num_classes(class_mode: str) -> int:
  if class_mode == "shape_colour":
    return len(scene_lib.SHAPES) * len(scene_lib.COLOURS)
  if class_mode == "shape":
    return len(scene_lib.SHAPES)
  raise ValueError(f"class_mode must be one of {CLASS_MODES}, got {class_mode!r}")


def class_names(class_mode: str) -> list:
  if class_mode == "shape":
    return list(scene_lib.SHAPES)
  return [f"{c} {s}" for s in scene_lib.SHAPES for c in scene_lib.COLOURS]


@functools.lru_cache(maxsize=8)
def _tables(dim: int):
  rng = np.random.default_rng(TABLE_SEED + dim)
  return dict(
      shape=rng.normal(size=(len(scene_lib.SHAPES), dim)).astype(np.float32),
      colour=rng.normal(size=(len(scene_lib.COLOURS), dim)).astype(np.float32),
      size=rng.normal(size=(len(scene_lib.SIZES), dim)).astype(np.float32),
      geometry=rng.normal(size=(4, dim)).astype(np.float32),
  )


def object_class(obj: scene_lib.SceneObject, class_mode: str) -> int:
  if class_mode == "shape":
    return obj.shape
  if class_mode == "shape_colour":
    return obj.shape * len(scene_lib.COLOURS) + obj.colour
  raise ValueError(f"class_mode must be one of {CLASS_MODES}, got {class_mode!r}")


def region_annotations(scene: scene_lib.Scene, boxes: np.ndarray, rng: np.random.Generator,
                       feature_dim: int = 64, class_mode: str = "shape_colour"):
  """Region features and labels, one region per object (object order).

  Args:
    scene: the scene.
    boxes: float32 [N, 4] pixel boxes x1, y1, x2, y2 from the renderer.
    rng: source of the feature noise and of the soft-label noise.
  Returns:
    dict(boxes [N,4] f32, features [N,F] f32, classes [N] int64, class_probs [N,C] f32).
  """
  t = _tables(feature_dim)
  size = float(scene.image_size)
  n = len(scene.objects)
  c = num_classes(class_mode)
  feats = np.zeros((n, feature_dim), np.float32)
  classes = np.zeros((n,), np.int64)
  logits = np.zeros((n, c), np.float64)
  shape_of = np.arange(c) if class_mode == "shape" else np.arange(c) // len(scene_lib.COLOURS)
  colour_of = None if class_mode == "shape" else np.arange(c) % len(scene_lib.COLOURS)
  for k, obj in enumerate(scene.objects):
    x1, y1, x2, y2 = boxes[k] / size
    geometry = np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], np.float32)
    feats[k] = (t["shape"][obj.shape] + t["colour"][obj.colour] + t["size"][obj.size]
                + 2.0 * (geometry - 0.5) @ t["geometry"]) / 2
    classes[k] = object_class(obj, class_mode)
    logits[k] = 1.5 * (shape_of == obj.shape)
    if colour_of is not None:
      logits[k] += 1.0 * (colour_of == obj.colour)
    logits[k, classes[k]] += 3.0
  feats += FEATURE_NOISE * rng.normal(size=feats.shape).astype(np.float32)
  logits += 0.5 * rng.normal(size=logits.shape)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  return dict(boxes=boxes.astype(np.float32), features=feats, classes=classes,
              class_probs=probs.astype(np.float32))
