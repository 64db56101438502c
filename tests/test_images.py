"""Image header checks and TF decoding against PIL / numpy references."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import images
import data_fixtures as fx

MEAN = STD = (0.5, 0.5, 0.5)


def _decode(data, size, ratio=None):
  if ratio is None:
    fmt, w, h, _ = images.inspect_image(data)
    ratio = images.jpeg_ratio_index(w, h, size) if fmt == "jpeg" else 0
  out = images.decode_image(tf.constant(data), tf.constant(ratio), image_size=size, mean=MEAN,
                            std=STD)
  return out.numpy()


def _to_uint8_range(x):
  return (np.asarray(x) * 0.5 + 0.5) * 255.0


@pytest.fixture(scope="module")
def rng():
  return np.random.default_rng(0)


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}),
                                    ("WEBP", {})])
def test_inspect_reads_size_of_every_format(fmt, kw, rng):
  px = fx.random_pixels(rng, 37, 53)
  data = fx.image_bytes(px, fmt, mode="P" if fmt == "GIF" else None, **kw)
  got_fmt, w, h, problem = images.inspect_image(data)
  assert (got_fmt, w, h, problem) == (fmt.lower().replace("jpeg", "jpeg"), 53, 37, None)


def test_inspect_flags_truncated_garbage_and_empty(rng):
  px = fx.random_pixels(rng, 40, 40)
  jpg, png = fx.image_bytes(px, "JPEG"), fx.image_bytes(px, "PNG")
  assert images.inspect_image(jpg[: len(jpg) // 2])[3] == "truncated_image"
  assert images.inspect_image(jpg[:20])[3] == "truncated_image"  # cut before the frame header
  assert images.inspect_image(png[: len(png) - 30])[3] == "truncated_image"
  assert images.inspect_image(b"definitely not an image")[3] == "undecodable_image"
  assert images.inspect_image(b"")[3] == "undecodable_image"
  # A JPEG padded with zeros after its end marker is complete.
  assert images.inspect_image(jpg + b"\x00" * 16)[3] is None


def test_png_same_size_decodes_exactly(rng):
  px = fx.random_pixels(rng, 16, 16)
  got = _decode(fx.image_bytes(px, "PNG"), 16)
  np.testing.assert_allclose(got, (px / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_rgba_drops_alpha_and_grayscale_repeats(rng):
  px = fx.random_pixels(rng, 16, 16)
  rgba = np.dstack([px, rng.integers(0, 255, (16, 16), dtype=np.uint8)])
  got = _decode(fx.image_bytes(rgba, "PNG"), 16)
  np.testing.assert_allclose(_to_uint8_range(got), px, atol=1e-3)
  gray = np.asarray(Image.fromarray(px).convert("L"))
  got = _decode(fx.image_bytes(gray, "PNG"), 16)
  for c in range(3):
    np.testing.assert_allclose(_to_uint8_range(got[..., c]), gray, atol=1e-3)


def test_cmyk_jpeg_matches_pil(rng):
  px = fx.random_pixels(rng, 32, 32)
  data = fx.image_bytes(px, "JPEG", mode="CMYK", quality=95)
  assert Image.open(io.BytesIO(data)).mode == "CMYK"
  ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
  got = _to_uint8_range(_decode(data, 32))
  assert np.abs(got - ref).mean() < 3.0  # libjpeg vs PIL colour conversion, out of 255


def test_sixteen_bit_png(rng):
  px16 = (fx.random_pixels(rng, 16, 16)[..., 0].astype(np.uint16) * 257)
  buf = io.BytesIO()
  Image.fromarray(px16).save(buf, "PNG")
  got = _to_uint8_range(_decode(buf.getvalue(), 16))
  np.testing.assert_allclose(got[..., 0], px16 / 257.0, atol=1.01)


def test_large_jpeg_uses_dct_scaling_and_matches_reference(rng):
  px = fx.random_pixels(rng, 1800, 2400)
  data = fx.image_bytes(px, "JPEG", quality=90)
  _, w, h, problem = images.inspect_image(data)
  assert (w, h, problem) == (2400, 1800, None)
  assert images.JPEG_RATIOS[images.jpeg_ratio_index(w, h, 64)] == 8  # 1800 / 8 = 225 >= 64
  ref = np.asarray(Image.fromarray(px).resize((64, 64), Image.BOX), np.float64)
  got = _to_uint8_range(_decode(data, 64))
  assert np.abs(got - ref).mean() < 4.0


def test_jpeg_ratio_keeps_short_side_at_least_image_size():
  assert images.jpeg_ratio_index(100, 100, 64) == 0
  assert images.jpeg_ratio_index(640, 480, 224) == 1  # 240 >= 224, 120 < 224
  assert images.jpeg_ratio_index(None, None, 64) == 0


def test_raw_pixels_roundtrip(rng):
  px = fx.random_pixels(rng, 12, 12)
  data = images.encode_raw(px)
  assert images.inspect_image(data) == ("raw", 12, 12, None)
  np.testing.assert_allclose(_to_uint8_range(_decode(data, 12, ratio=0)), px, atol=1e-3)
  gray = _to_uint8_range(_decode(images.encode_raw(px[..., 0]), 12, ratio=0))
  for c in range(3):
    np.testing.assert_allclose(gray[..., c], px[..., 0], atol=1e-3)
  assert images.inspect_image(data[:-1])[3] == "truncated_image"
  with pytest.raises(ValueError):
    images.encode_raw(px.astype(np.float32))


def test_damaged_png_is_caught_by_its_crc(rng):
  png = fx.image_bytes(fx.random_pixels(rng, 16, 16), "PNG")
  assert images.inspect_image(fx.damaged_png(png))[3] == "undecodable_image"


def test_safe_decode_masks_undecodable_data_instead_of_raising(rng):
  px = fx.random_pixels(rng, 16, 16)
  good = fx.image_bytes(px, "PNG")
  bad = fx.undecodable_png(16, 16)
  assert images.inspect_image(bad) == ("png", 16, 16, None)  # only the decoder can tell
  with pytest.raises(tf.errors.InvalidArgumentError):
    _decode(bad, 16)

  def run(data, present=True):
    p, ok = images.safe_decode_image(tf.constant(data), tf.constant(0), tf.constant(present),
                                     image_size=16, mean=MEAN, std=STD)
    return p.numpy(), bool(ok.numpy())

  p, ok = run(good)
  assert ok and np.allclose(_to_uint8_range(p), px, atol=1e-3)
  p, ok = run(bad)
  assert not ok and not p.any()
  p, ok = run(b"", present=False)
  assert not ok and not p.any()
