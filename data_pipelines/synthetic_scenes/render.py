"""Numpy renderer of synthetic scenes: textured background, flat-coloured shapes, tight boxes.

No fonts, no downloads: every shape is an implicit function or a polygon evaluated at pixel
centres. Objects are not anti-aliased, so an object's pixels are exactly its mask and its box
is the tight box of that mask: ``[x1, y1, x2, y2]`` in pixels with x2/y2 exclusive
(``x2 - x1`` is the width in pixels).
"""
import functools

import numpy as np

from data_pipelines.synthetic_scenes import scene as scene_lib

# Largest per-channel deviation of an object's pixels from its colour (noise is clipped to it).
OBJECT_NOISE = 12.0
# Backgrounds stay inside [0, BACKGROUND_MAX] on every channel and close to grey.
BACKGROUND_MAX = 135.0


def _polygon_mask(x, y, vertices):
  """Even-odd rule point-in-polygon for arrays of points; vertices [V, 2] (x, y)."""
  inside = np.zeros(x.shape, bool)
  v = np.asarray(vertices, np.float64)
  for (x0, y0), (x1, y1) in zip(v, np.roll(v, -1, axis=0)):
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
      xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (x < xi)
  return inside


def _star(r):
  angles = -np.pi / 2 + np.arange(10) * np.pi / 5
  radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def shape_mask(shape: str, dx, dy, r):
  """Mask of a shape of radius ``r`` centred at 0, at offsets (dx, dy) (arrays, pixels).

  Every shape fits in the disc of radius ``r``, so objects in different grid cells never
  overlap.
  """
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    h = 0.85 * r
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if shape == "triangle":
    tri = [(0.0, -r), (0.866 * r, 0.5 * r), (-0.866 * r, 0.5 * r)]
    return _polygon_mask(dx, dy, tri)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  if shape == "cross":
    arm = 0.34 * r
    h = 0.95 * r
    return (((np.abs(dx) <= arm) & (np.abs(dy) <= h)) |
            ((np.abs(dy) <= arm) & (np.abs(dx) <= h)))
  if shape == "star":
    return _polygon_mask(dx, dy, _star(r))
  raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=16)
def _grid(size: int):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  yy.flags.writeable = False
  xx.flags.writeable = False
  return yy, xx


def render_background(seed: int, size: int) -> np.ndarray:
  """A dark, nearly grey texture [size, size, 3] float32 (stripes, checks, blobs or gradient)."""
  rng = np.random.default_rng(seed)
  base = (rng.uniform(35, 90) + rng.uniform(-8, 8, size=3)).astype(np.float32)
  yy, xx = _grid(size)
  kind = int(rng.integers(4))
  if kind == 0:    # stripes
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(4, 12)
    tex = 14 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
  elif kind == 1:  # checks
    p = int(rng.integers(3, 9))
    tex = 12 * (((xx // p + yy // p) % 2) * 2 - 1)
  elif kind == 2:  # smooth blobs: a coarse random grid upsampled by nearest neighbour
    cells = int(rng.integers(3, 7))
    coarse = rng.uniform(-16, 16, size=(cells, cells))
    idx = (np.arange(size) * cells // size)
    tex = coarse[idx][:, idx]
  else:            # gradient
    theta = rng.uniform(0, 2 * np.pi)
    tex = 30 * ((xx * np.cos(theta) + yy * np.sin(theta)) / size - 0.5)
  img = rng.standard_normal(size=(size, size, 3), dtype=np.float32)
  img *= 3.0
  img += base
  img += tex[..., None].astype(np.float32)
  return np.clip(img, 0, BACKGROUND_MAX, out=img)


def render(scene: scene_lib.Scene):
  """Renders a scene.

  Returns:
    image: uint8 [S, S, 3].
    boxes: float32 [N, 4] tight pixel boxes x1, y1, x2, y2 (x2, y2 exclusive), in object order.
    masks: bool [N, S, S] the pixels of each object.
  """
  size = scene.image_size
  img = render_background(scene.background_seed, size)
  noise_rng = np.random.default_rng([scene.background_seed, 1])
  boxes = np.zeros((len(scene.objects), 4), np.float32)
  masks = np.zeros((len(scene.objects), size, size), bool)
  for k, obj in enumerate(scene.objects):
    r = obj.diameter_fraction * size / 2
    cx, cy = obj.center
    # Evaluate the shape only in the window of its enclosing disc (pixel centres at +0.5).
    x0, x1 = max(0, int(cx - r) - 1), min(size, int(cx + r) + 2)
    y0, y1 = max(0, int(cy - r) - 1), min(size, int(cy + r) + 2)
    wy, wx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    window = shape_mask(scene_lib.SHAPES[obj.shape], wx - cx, wy - cy, r)
    rows = np.flatnonzero(window.any(axis=1))
    cols = np.flatnonzero(window.any(axis=0))
    if rows.size == 0:  # cannot happen for sizes >= 24 px; guards against odd custom sizes
      raise ValueError(f"object {k} renders to no pixel at image size {size}")
    boxes[k] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
    masks[k, y0:y1, x0:x1] = window
    mask = masks[k]
    count = int(mask.sum())
    noise = np.clip(noise_rng.normal(0, 5, size=(count, 3)), -OBJECT_NOISE, OBJECT_NOISE)
    img[mask] = scene_lib.COLOUR_RGB[obj.colour][None, :] + noise
  return np.clip(np.round(img), 0, 255).astype(np.uint8), boxes, masks
