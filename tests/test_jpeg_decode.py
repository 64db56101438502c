"""data.jpeg_decode: "accurate" is libjpeg's accurate integer IDCT with fancy chroma
upsampling, the same decode as Pillow's: "pillow" and "accurate" give the same pixels, bit for
bit, for every JPEG that needs no resize (any chroma subsampling, grayscale, progressive, the DCT
downscales 1/2, 1/4, 1/8) and for resized images (JPEG, PNG, raw pixels: `tf_resize` is TF's
antialiased bilinear resize bit for bit) and CMYK JPEGs (converted as TF converts them).
TF's own default (`dct_method=""`) is the FAST integer IDCT, not this.
"fast" (fast IDCT, no fancy upsampling) differs from "accurate" by a few levels only.
"auto" (the default) is "accurate"'s pixels wherever the batch is built: Pillow for JPEG and
8-bit PNG (every colour type checked here against TF), TF's own ops for the rest."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import images, pil_decode, pipeline, schema, tf_resize
from data_pipelines.streams import Stream
import data_fixtures as fx

MEAN = STD = (0.5, 0.5, 0.5)


def _photo(size=224, seed=0, width=None, channels=3):
  """Smooth colour fields plus noise (compresses like a photo), uint8 [size, width, channels]."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:width or size] / size
  base = np.stack([np.sin(6 * x + 1), np.cos(5 * y + 2), np.sin(4 * (x + y)),
                   np.cos(3 * x - 2 * y)][:channels], -1)
  return (127 + 90 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)


def _jpeg(px, mode=None, **kw):
  return fx.image_bytes(px, "JPEG", mode=mode, **{"quality": 90, **kw})


def _tf_levels(data, size, mode, ratio=0):
  out = images.decode_image(tf.constant(data), tf.constant(ratio), image_size=size, mean=MEAN,
                            std=STD, jpeg_decode=mode)
  return out.numpy()


def _pillow_levels(data, size, ratio=0):
  out = np.empty((size, size, 3), np.float32)
  assert pil_decode.decode_into(data, ratio, out, pil_decode.Normaliser(MEAN, STD))
  return out


def _normalise(uint8):
  return (uint8.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def test_accurate_is_the_accurate_integer_idct():
  data = _jpeg(_photo())
  ref = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
  np.testing.assert_array_equal(_tf_levels(data, 224, "accurate"), _normalise(ref))
  assert pipeline.default_config().jpeg_decode == "auto"  # "accurate"'s pixels, anywhere
  # TF's default dct_method is libjpeg-turbo's fast IDCT: other pixels, ~1 level apart.
  tf_default = tf.io.decode_jpeg(data, channels=3).numpy()
  np.testing.assert_array_equal(
      tf_default, tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_FAST").numpy())
  diff = np.abs(tf_default.astype(int) - ref)
  assert 0.3 < (diff > 0).mean() and diff.max() <= 8


# (name, JPEG bytes, S, ratio index): no resize is needed (the decode at that ratio is S x S).
def _no_resize_cases():
  px = _photo(64)
  yield "rgb 4:2:0", _jpeg(px), 64, 0
  yield "rgb 4:4:4", _jpeg(px, subsampling=0), 64, 0
  yield "rgb 4:2:2", _jpeg(px, subsampling=1), 64, 0
  yield "grayscale", _jpeg(px, mode="L"), 64, 0
  yield "progressive", _jpeg(px, progressive=True), 64, 0
  yield "quality 50", _jpeg(px, quality=50), 64, 0
  big = _photo(256, seed=1)
  for k, r in enumerate(images.JPEG_RATIOS[1:], 1):  # 1/2, 1/4, 1/8 of 256 px at S = 256 / r
    assert images.jpeg_ratio_index(256, 256, 256 // r) == k
    yield f"ratio 1/{r}", _jpeg(big), 256 // r, k
    yield f"ratio 1/{r} 4:2:2", _jpeg(big, subsampling=1), 256 // r, k
    yield f"ratio 1/{r} grayscale", _jpeg(big, mode="L"), 256 // r, k


@pytest.mark.parametrize("case", list(_no_resize_cases()), ids=lambda c: c[0])
def test_pillow_equals_accurate_bit_for_bit_without_resize(case):
  _, data, size, ratio = case
  r = images.JPEG_RATIOS[ratio]
  # The references, each library on its own: libjpeg through TF, Pillow's draft + convert.
  ref_tf = tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE").numpy()
  im = Image.open(io.BytesIO(data))
  if r > 1:
    im.draft(None, (im.width // r, im.height // r))
  ref_pil = np.asarray(im.convert("RGB"))
  assert ref_tf.shape == ref_pil.shape == (size, size, 3)
  np.testing.assert_array_equal(ref_tf, ref_pil)
  # And the two decoders of the pipeline give those pixels, normalised the same way.
  acc, pil = _tf_levels(data, size, "accurate", ratio), _pillow_levels(data, size, ratio)
  np.testing.assert_array_equal(acc, _normalise(ref_tf))
  np.testing.assert_array_equal(pil, acc)


def test_pillow_equals_accurate_on_cmyk():
  buf = io.BytesIO()
  Image.fromarray(_photo(48, channels=4), "CMYK").save(buf, "JPEG", quality=90)
  cmyk = buf.getvalue()
  ref = tf.io.decode_jpeg(cmyk, channels=3, dct_method="INTEGER_ACCURATE").numpy()
  np.testing.assert_array_equal(_tf_levels(cmyk, 48, "accurate"), _normalise(ref))
  np.testing.assert_array_equal(_pillow_levels(cmyk, 48), _normalise(ref))
  # Pillow's own CMYK -> RGB rounds: not TF's values.
  own = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))
  assert 0 < np.abs(own.astype(int) - ref).max() <= 1


def _png(px):
  buf = io.BytesIO()
  Image.fromarray(px).save(buf, "PNG")
  return buf.getvalue()


# (name, bytes, S, ratio index): images that need a resize after their decode.
def _resize_cases():
  yield "jpeg 60x80 -> 48", _jpeg(_photo(60, width=80)), 48, 0
  yield "raw 64 -> 48 (the demo's)", images.encode_raw(_photo(64)), 48, 0
  yield "png 100x150 -> 224 (up)", _png(_photo(100, width=150)), 224, 0
  big = _jpeg(_photo(480, width=640, seed=2))
  k = images.jpeg_ratio_index(640, 480, 224)
  assert images.JPEG_RATIOS[k] == 2  # decoded at 320 x 240, then resized
  yield "jpeg 640x480 -> 1/2 -> 224", big, 224, k
  yield "gray png 57x91 -> 48", _png(_photo(57, width=91)[:, :, 0]), 48, 0


@pytest.mark.parametrize("case", list(_resize_cases()), ids=lambda c: c[0])
def test_pillow_equals_accurate_bit_for_bit_with_resize(case):
  _, data, size, ratio = case
  np.testing.assert_array_equal(_pillow_levels(data, size, ratio),
                                _tf_levels(data, size, "accurate", ratio))


@pytest.mark.parametrize("shape,out", [((64, 64), (48, 48)), ((300, 200), (224, 224)),
                                       ((100, 150), (224, 224)), ((225, 224), (224, 224)),
                                       ((57, 91), (48, 30)), ((5, 3), (17, 2)), ((1, 9), (4, 4))])
def test_tf_resize_equals_tf_image_resize(shape, out):
  rng = np.random.default_rng(sum(shape) + sum(out))
  for img in (rng.integers(0, 256, shape + (3,)).astype(np.uint8),
              rng.normal(0, 50, shape + (2,)).astype(np.float32)):
    ref = tf.image.resize(tf.cast(img, tf.float32), out, method="bilinear", antialias=True)
    got = tf_resize.resize(img, *out)
    assert got.dtype == np.float32 and got.shape == out + img.shape[2:]
    np.testing.assert_array_equal(got, ref.numpy())


def test_fast_differs_by_a_few_levels():
  data = _jpeg(_photo())
  acc, fast = _tf_levels(data, 224, "accurate"), _tf_levels(data, 224, "fast")
  ref = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_FAST",
                          fancy_upscaling=False).numpy()
  np.testing.assert_array_equal(fast, _normalise(ref))
  diff = np.abs(fast - acc) * 127.5
  assert 0 < diff.mean() < 3.0 and diff.max() <= 40


def test_bad_value_is_one_line(tmp_path):
  c = pipeline.default_config()
  c.jpeg_decode = "fastest"
  fx.write_images(tmp_path / "imgs", 2, np.random.default_rng(0), size=(8, 8))
  c.streams.image.update(dict(batch_size=2, sources=[
      dict(name="imgs", kind="image_folder", path=str(tmp_path / "imgs"))]))
  with pytest.raises(schema.SchemaError, match=r"data.jpeg_decode must be one of"):
    Stream("image", pipeline.resolve_config(c), None, process_index=0, process_count=1)


def test_run_config_validation_names_the_field():
  """A run config with a bad data.jpeg_decode fails validation (before anything compiles)."""
  from experiments.configs import demo
  from unimo_jax.train import config as config_lib
  c = demo.get_config()
  config_lib.validate(c, num_devices=8, data_defaults=pipeline.default_config(),
                      check_files=False)
  for ok in ("auto", "accurate", "fast", "pillow"):
    c.data.jpeg_decode = ok
    config_lib.validate(c, num_devices=8, data_defaults=pipeline.default_config(),
                        check_files=False)
  c.data.jpeg_decode = "turbo"
  with pytest.raises(config_lib.ConfigError, match="data.jpeg_decode must be"):
    config_lib.validate(c, num_devices=8, data_defaults=pipeline.default_config(),
                        check_files=False)


# -- "auto": Pillow where it decodes as TF does, TF's ops in the builder for everything else ----

def _png_variants(size=24):
  """8-bit PNGs of every colour type (what `reads_as_tf` sends to Pillow), name -> bytes."""
  px = _photo(size, seed=3)
  rgba = np.concatenate([px, _photo(size, seed=4)[:, :, :1]], -1)
  pal = Image.fromarray(px).quantize(32)
  pal_trns = pal.copy()
  buf = io.BytesIO()
  pal_trns.save(buf, "PNG", transparency=5)
  out = {"rgb": fx.image_bytes(px), "rgba": fx.image_bytes(rgba, "PNG"),
         "gray": fx.image_bytes(px, mode="L"), "gray_alpha": fx.image_bytes(rgba, mode="LA"),
         "palette_trns": buf.getvalue()}
  buf = io.BytesIO()
  pal.save(buf, "PNG")
  out["palette"] = buf.getvalue()
  return out


def _other_formats(size=24):
  """Inputs `reads_as_tf` keeps away from Pillow, name -> bytes. TF (2.21) reads GIF, BMP,
  16-bit PNG and RGB WebP as Pillow does; it refuses WebP with alpha and 1-bit BMPs, which
  Pillow reads, and reads palette BMPs to other pixels than Pillow's."""
  px = _photo(size, seed=5)
  rgba = np.concatenate([px, _photo(size, seed=4)[:, :, :1]], -1)
  g16 = Image.fromarray(_photo(size, seed=6)[:, :, 0].astype(np.uint16) * 257 + 3)
  buf = io.BytesIO()
  g16.save(buf, "PNG")
  return {"gif": fx.image_bytes(px, "GIF"), "bmp": fx.image_bytes(px, "BMP"),
          "png16": buf.getvalue(), "webp": fx.image_bytes(px, "WEBP"),
          "webp_alpha": fx.image_bytes(rgba, "WEBP"),
          "bmp_palette": fx.image_bytes(px, "BMP", mode="P"),
          "bmp_1bit": fx.image_bytes(px, "BMP", mode="1")}


def test_reads_as_tf_picks_jpeg_8bit_png_and_raw():
  assert pil_decode.reads_as_tf(_jpeg(_photo(16)))
  for name, data in _png_variants().items():
    assert pil_decode.reads_as_tf(data), name
  assert pil_decode.reads_as_tf(images.RAW_MAGIC + np.array([2, 2], "<i4").tobytes() +
                                bytes(12))
  for name, data in _other_formats().items():
    assert not pil_decode.reads_as_tf(data), name
  assert not pil_decode.reads_as_tf(b"")


@pytest.mark.parametrize("name", sorted(_png_variants()))
@pytest.mark.parametrize("size", [24, 16])
def test_pillow_equals_accurate_on_8bit_png(name, size):
  """Every 8-bit PNG colour type (alpha dropped, palette and gray expanded): Pillow's pixels are
  TF's decode_png's, bit for bit, at the stored size and resized."""
  data = _png_variants()[name]
  ref = tf.io.decode_png(data, channels=3).numpy()
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), ref)
  np.testing.assert_array_equal(_pillow_levels(data, size), _tf_levels(data, size, "accurate"))


@pytest.mark.parametrize("name", sorted(_other_formats()))
def test_auto_takes_tf_ops_for_the_other_formats(name):
  """decode_into(tf_exact) on what Pillow does not decode as TF does: TF's own result, pixels or
  failure, where Pillow alone ("pillow") would differ on three of them."""
  data = _other_formats()[name]
  norm = pil_decode.Normaliser(MEAN, STD)
  out = np.full((16, 16, 3), 7.0, np.float32)
  ok = pil_decode.decode_into(data, 0, out, norm, tf_exact=True)
  try:
    ref = _tf_levels(data, 16, "accurate")
  except tf.errors.OpError:
    ref = None
  assert ok == (ref is not None)
  if ref is None:
    assert not out.any()
  else:
    np.testing.assert_array_equal(out, ref)
  pil = np.empty_like(out)
  pil_ok = pil_decode.decode_into(data, 0, pil, norm)
  differs = not pil_ok or ref is None or not np.array_equal(pil, ref)
  assert differs == (name in ("webp_alpha", "bmp_palette", "bmp_1bit")), name


def test_auto_defers_to_tf_when_pillow_refuses():
  """Bytes that look like a PNG but do not decode: Pillow refuses, TF is asked and refuses too
  (zeros, False); a JPEG Pillow refuses would get TF's answer the same way."""
  norm = pil_decode.Normaliser(MEAN, STD)
  out = np.ones((16, 16, 3), np.float32)
  assert not pil_decode.decode_into(fx.undecodable_png(16, 16), 0, out, norm, tf_exact=True)
  assert not out.any()
