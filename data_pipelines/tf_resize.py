"""numpy twin of ``tf.image.resize(img, [h, w], "bilinear", antialias=True)``, bit for bit.

TF computes this resize with its ScaleAndTranslate kernel (triangle kernel, antialiased): per
output row (then column) a span of input rows with float32 weights
``triangle(|src + 0.5 - (x + 0.5) / scale| / max(1 / scale, 1))``, normalised by the reciprocal
of their float32 sum; rows are gathered first into a ``[h, W, C]`` intermediate, then columns,
each output zero-initialised and accumulated in span order in float32 (a multiply, then an
add). `spans` redoes that arithmetic in float32 scalars, and `resize` the two gathers as one
vectorised multiply-add per span position (adding ``0 * x`` for the zero weights past a short
span, which changes nothing), so the values equal TF's exactly (tests/test_jpeg_decode.py
checks down- and up-scaling, square and not). `pil_decode` uses it so that ``jpeg_decode =
"pillow"`` resizes as the TF decoders do.
"""
import functools

import numpy as np

_F = np.float32


@functools.lru_cache(maxsize=256)
def spans(in_size: int, out_size: int):
  """(starts int64 [out], weights float32 [out, span]) of one axis, as TF's `ComputeSpansCore`
  with the triangle kernel (radius 1), antialiasing on, no translation."""
  scale = _F(out_size) / _F(in_size)
  inv_scale = _F(1.0 / np.float64(scale))  # TF: a double division, stored as float
  kernel_scale = max(inv_scale, _F(1.0))
  span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
  one_over_kernel_scale = _F(1.0) / kernel_scale
  starts = np.zeros(out_size, np.int64)
  weights = np.zeros((out_size, span), np.float32)
  for x in range(out_size):
    sample = (_F(x) + _F(0.5)) * inv_scale
    if sample < 0 or sample > in_size:
      continue
    lo = min(max(int(np.ceil(sample - kernel_scale - _F(0.5))), 0), in_size - 1)
    hi = min(max(int(np.floor(sample + kernel_scale - _F(0.5))), 0), in_size - 1) + 1
    ws, total = [], _F(0.0)
    for src in range(lo, hi):
      d = abs((_F(src) + _F(0.5) - sample) * one_over_kernel_scale)
      w = _F(1.0) - d if d < _F(1.0) else _F(0.0)
      total = _F(total + w)
      ws.append(w)
    if abs(total) >= _F(1000.0) * np.finfo(np.float32).tiny:
      inv = _F(1.0) / total
      weights[x, :len(ws)] = [_F(w * inv) for w in ws]
    starts[x] = lo
  starts.setflags(write=False)
  weights.setflags(write=False)
  return starts, weights


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] (any real dtype; cast to float32 as TF casts before resizing) -> float32
  [height, width, C], TF's antialiased bilinear values."""
  img = np.asarray(img, np.float32)
  h, w = img.shape[:2]
  row_starts, row_weights = spans(h, height)
  col_starts, col_weights = spans(w, width)
  rows = np.zeros((height, w, img.shape[2]), np.float32)
  for i in range(row_weights.shape[1]):
    rows += row_weights[:, i, None, None] * img[np.minimum(row_starts + i, h - 1)]
  out = np.zeros((height, width, img.shape[2]), np.float32)
  for i in range(col_weights.shape[1]):
    out += col_weights[None, :, i, None] * rows[:, np.minimum(col_starts + i, w - 1)]
  return out
