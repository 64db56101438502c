"""``data.jpeg_decode = "pillow"`` (and "auto" with workers): images decoded in Python (Pillow +
numpy) by the row builder.

With "accurate" / "fast" the builder hands encoded bytes on and TensorFlow decodes them in the
training process's tf.data stage (`images.decode_image`). With "pillow" the builder itself
decodes every image of a batch into its ``pixels`` / ``related_pixels`` arrays, so the decode
runs wherever the batch is built: in the row-building worker processes (`workers`) with
``data.workers`` > 0, in this process's tf.data `numpy_function` with 0. Both run this module,
so the pixels are byte-identical for any worker count; the training process then does no
per-image work at all (the point: on a host whose cores are all busy, TF decoding in the
training process competed with the workers, benchmarks/README.md).

How it compares with the TF decoders (tests/test_jpeg_decode.py checks each point):
- JPEG: Pillow's libjpeg-turbo with its defaults (accurate integer IDCT, fancy upsampling), the
  same decode as "accurate" (TF with ``dct_method="INTEGER_ACCURATE"``): the same uint8
  values, bit for bit, for RGB (any chroma subsampling), grayscale and progressive JPEGs, the
  paper-shape 224 px ones included, and for the DCT downscales of large JPEGs (1/2, 1/4, 1/8:
  the same choice, `images.jpeg_ratio_index`, done through Pillow's ``draft``);
  tests/test_jpeg_decode.py checks it. CMYK / YCCK JPEGs are converted to RGB as TF converts
  them, ``(255 - c) (255 - k) // 255`` of Pillow's (un-inverted) CMYK, not by Pillow's formula
  (which rounds: 1 level apart on half the values).
- Resize (only images not stored at S x S): TF's antialiased bilinear resize on float32
  values, bit for bit (`tf_resize`), then the same float32 normalisation, so a resized image
  also has "accurate"'s values.
- PNG / GIF / BMP / WebP: Pillow's readers, ``convert("RGB")`` (alpha dropped, palette and gray
  expanded); 16-bit gray keeps its high byte. TF (2.21) reads GIF, 24/32-bit BMP, 16-bit PNG and
  RGB WebP to the same pixels; it refuses WebP with alpha and 1-bit BMPs (which Pillow reads)
  and reads palette BMPs to other pixels (tests/test_jpeg_decode.py): "pillow" differs there.
- Bytes Pillow cannot decode (or that are truncated) give zeros and a failed flag, as TF's
  failures do: the row is masked and counted as ``undecodable_image``.
- "auto" (the default, when workers build the batches) takes Pillow only where its decode is
  TF's bit for bit (`reads_as_tf`: JPEG, 8-bit PNG, raw) and TF's own ops, run in the worker,
  for everything else (GIF, BMP, 16-bit PNG, ...) and for anything Pillow refuses, so its pixels
  and its failures are the TF stage's: batches are the same with 0 workers (TF stage) and with
  any other count (a WebP with alpha is then undecodable, as it is with 0).
Normalisation is the same float32 formula, ``(x / 255 - mean) / std`` (`Normaliser`): through
a 256-entry table per channel for uint8 pixels (the same float32 operations, once per level
instead of once per pixel), per value for resized float32 pixels.
"""
import io
import struct

import numpy as np

from data_pipelines import images, tf_resize
from data_pipelines.images import JPEG_RATIOS, RAW_MAGIC


_CHANNEL_OFFSETS = np.arange(3, dtype=np.int16) * 256


def normalise_table(mean, std) -> np.ndarray:
  """float32 [3, 256] (or [1, 256] when all channels share mean and std):
  ``(v / 255 - mean[c]) / std[c]`` for every level v, in float32 exactly as
  `images.normalise` computes it per pixel."""
  v = np.arange(256, dtype=np.float32)
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  rows = np.stack([(v / np.float32(255.0) - mean[c]) / std[c] for c in range(3)])
  return rows[:1] if np.all(rows == rows[0]) else rows


class Normaliser:
  """``(x / 255 - mean) / std`` in float32 exactly as `images.normalise`: `table` for uint8
  pixels (`normalise_table`), `floats` for float32 ones (resized)."""

  def __init__(self, mean, std):
    self.table = normalise_table(mean, std)
    self.pixel_mean, self.pixel_std = tuple(mean), tuple(std)  # as configured (for TF ops)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if np.all(mean == mean[0]) and np.all(std == std[0]):  # scalars, as images.normalise
      mean, std = mean[0], std[0]
    self.mean, self.std = mean, std

  def floats(self, img: np.ndarray, out: np.ndarray):
    np.divide(np.subtract(np.divide(img, np.float32(255.0)), self.mean), self.std, out=out)

  def levels(self, px: np.ndarray, out: np.ndarray):
    if self.table.shape[0] == 1:  # the same normalisation for every channel: one lookup
      np.take(self.table[0], px, out=out, mode="clip")
    else:
      np.take(self.table.reshape(-1), px + _CHANNEL_OFFSETS, out=out, mode="clip")


def _pixels(data: bytes, ratio_index: int) -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, 3] (raises on anything undecodable)."""
  if data[:4] == RAW_MAGIC:
    h, w = struct.unpack("<ii", data[4:12])
    return np.frombuffer(data, np.uint8, offset=12).reshape(h, w, 3)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  im = Image.open(io.BytesIO(data))
  r = JPEG_RATIOS[int(ratio_index)] if im.format == "JPEG" else 1
  if r > 1:
    im.draft(None, (max(1, im.width // r), max(1, im.height // r)))
  im.load()
  if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    gray = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if im.mode == "CMYK":  # (Adobe) CMYK / YCCK JPEGs: TF's conversion, not Pillow's
    cmyk = 255 - np.asarray(im).astype(np.uint16)
    return (cmyk[:, :, :3] * cmyk[:, :, 3:] // 255).astype(np.uint8)
  if im.mode != "RGB":
    im = im.convert("RGB")
  return np.asarray(im)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reads_as_tf(data) -> bool:
  """Whether Pillow decodes `data` exactly as TF's decoder does (tests/test_jpeg_decode.py and
  tests/test_worker_transport.py check each kind): JPEG (any subsampling, gray, progressive,
  CMYK, the DCT downscales), PNG of 8 bits per sample (any colour type), and raw pixels."""
  head = bytes(data[:26])
  if head[:4] == RAW_MAGIC or head[:3] == b"\xff\xd8\xff":
    return True
  return head[:8] == _PNG_MAGIC and len(head) == 26 and head[24] == 8  # IHDR bit depth


def tf_decode_into(data, ratio_index: int, out: np.ndarray, norm: Normaliser) -> bool:
  """`images.decode_image`'s TF ops, eagerly, in this process (loads TensorFlow on first use):
  what the training process's TF stage would give, into `out`; False (and zeros) when TF
  cannot decode the bytes either."""
  tf = images.tf  # loaded on first use: workers that never get here never load TensorFlow
  try:
    px = images.decode_image(tf.constant(bytes(data)), tf.constant(int(ratio_index), tf.int32),
                             image_size=out.shape[0], mean=norm.pixel_mean, std=norm.pixel_std,
                             jpeg_decode="accurate")
    out[...] = px.numpy()
  except Exception:  # pylint: disable=broad-except  (any decoder error: a bad image, counted)
    out[...] = 0
    return False
  return True


def decode_into(data, ratio_index: int, out: np.ndarray, norm: Normaliser,
                tf_exact: bool = False) -> bool:
  """Decodes `data` into float32 `out` [S, S, 3] (resized as TF resizes when not S x S,
  normalised by `norm`); False (and zeros) when the bytes do not decode. With `tf_exact`
  (``jpeg_decode = "auto"``), bytes Pillow does not decode as TF does (`reads_as_tf`), or that
  Pillow refuses, go through TF's own ops (`tf_decode_into`): the TF stage's pixels and
  failures for every input."""
  size = out.shape[0]
  if tf_exact and not reads_as_tf(data):
    return tf_decode_into(data, ratio_index, out, norm)
  try:
    px = _pixels(bytes(data), ratio_index)
  except Exception:  # pylint: disable=broad-except  (any reader error: a bad image, counted)
    if tf_exact:  # TF decides: it may read what Pillow refuses
      return tf_decode_into(data, ratio_index, out, norm)
    out[...] = 0
    return False
  if px.shape[:2] == (size, size):
    norm.levels(px, out)
  else:
    norm.floats(tf_resize.resize(px, size, size), out)
  return True


def decode_batch(rows, pixels: np.ndarray, related, failed: np.ndarray, norm: Normaliser,
                 tf_exact: bool = False):
  """Each row's image slots (``_image``, ``_image_ratio``, ``_image_present``, slot 0 the row's
  image, then its related images) -> `pixels` [b, S, S, 3] and `related` [b, Ki, S, S, 3] (or
  None), in place; `failed` [b, 1 + Ki] int32 gets 1 where a present image did not decode.
  Returns ok [b, 1 + Ki] bool (decoded; False for absent slots, whose pixels are zeros).
  `tf_exact`: see `decode_into`."""
  ok = np.zeros(failed.shape, bool)
  for j, r in enumerate(rows):
    for k, (data, ratio, present) in enumerate(zip(r["_image"], r["_image_ratio"],
                                                  r["_image_present"])):
      out = pixels[j] if k == 0 else related[j, k - 1]
      if present:
        ok[j, k] = decode_into(data, ratio, out, norm, tf_exact)
      else:
        out[...] = 0
  failed[...] = (np.asarray([list(r["_image_present"]) for r in rows], bool).reshape(
      failed.shape) & ~ok).astype(np.int32)
  return ok


def mask_invalid(fields: dict, valid: np.ndarray):
  """numpy twin of `streams.mask_invalid` over a batch, in place: ``row_valid`` = `valid` [b],
  every ``*_weights`` times valid, every other ``*_valid`` flag and ``visual_mask`` and-ed."""
  for k, v in fields.items():
    if k.startswith("_"):
      continue
    shaped = valid.reshape((-1,) + (1,) * (v.ndim - 1))
    if k == "row_valid":
      v[...] = valid
    elif k.endswith("_weights"):
      v *= shaped.astype(v.dtype)
    elif k.endswith("_valid") or k == "visual_mask":
      v &= shaped
