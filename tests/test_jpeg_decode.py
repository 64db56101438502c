"""data.jpeg_decode: "accurate" (the default) is libjpeg's default decode, pixel for pixel; "fast"
(fast integer IDCT, no fancy chroma upsampling) differs from it by a few levels only."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import images, pipeline, schema
from data_pipelines.streams import Stream
import data_fixtures as fx

MEAN = STD = (0.5, 0.5, 0.5)


def _photo(size=224, seed=0):
  """Smooth colour fields plus noise (compresses like a photo), as JPEG q 90."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  base = np.stack([np.sin(6 * x + 1), np.cos(5 * y + 2), np.sin(4 * (x + y))], -1)
  px = (127 + 90 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
  return fx.image_bytes(px, "JPEG", quality=90)


def _levels(data, size, mode):
  out = images.decode_image(tf.constant(data), tf.constant(0), image_size=size, mean=MEAN,
                            std=STD, jpeg_decode=mode)
  return (out.numpy() * 0.5 + 0.5) * 255.0


def test_accurate_is_the_default_decode_pixel_for_pixel():
  data = _photo()
  ref = tf.io.decode_jpeg(data, channels=3).numpy().astype(np.float64)  # TF's defaults
  np.testing.assert_allclose(_levels(data, 224, "accurate"), ref, atol=1e-4)
  assert pipeline.default_config().jpeg_decode == "accurate"


def test_fast_differs_by_a_few_levels():
  data = _photo()
  acc, fast = _levels(data, 224, "accurate"), _levels(data, 224, "fast")
  pil = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"), np.float64)
  diff = np.abs(fast - acc)
  assert 0 < diff.mean() < 1.5 and diff.max() <= 40
  assert np.abs(acc - pil).mean() < np.abs(fast - pil).mean() + 1.0


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
  for ok in ("fast", "pillow"):
    c.data.jpeg_decode = ok
    config_lib.validate(c, num_devices=8, data_defaults=pipeline.default_config(),
                        check_files=False)
  c.data.jpeg_decode = "turbo"
  with pytest.raises(config_lib.ConfigError, match="data.jpeg_decode must be"):
    config_lib.validate(c, num_devices=8, data_defaults=pipeline.default_config(),
                        check_files=False)
