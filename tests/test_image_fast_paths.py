"""Fast paths of image decoding give the same pixels: same-size resize skipped, scalar norm."""
import numpy as np
import tensorflow as tf

from data_pipelines import images
import data_fixtures as fx


def test_same_size_decode_equals_the_resized_reference():
  rng = np.random.default_rng(0)
  px = fx.random_pixels(rng, 24, 24)
  for fmt in ("PNG", "JPEG"):
    data = fx.image_bytes(px, fmt)
    got = images.decode_image(tf.constant(data), tf.constant(0), image_size=24, mean=(0.5,) * 3,
                              std=(0.5,) * 3).numpy()
    dec = tf.cast(tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
                  if fmt == "JPEG" else tf.io.decode_image(data, channels=3), tf.float32)
    want = tf.image.resize(dec, [24, 24], method="bilinear", antialias=True)
    want = ((want / 255.0 - 0.5) / 0.5).numpy()
    assert got.shape == (24, 24, 3) and got.tobytes() == want.tobytes(), fmt
  # A different size still resizes.
  out = images.decode_image(tf.constant(fx.image_bytes(px)), tf.constant(0), image_size=16,
                            mean=(0.5,) * 3, std=(0.5,) * 3)
  assert out.shape == (16, 16, 3)


def test_normalise_equals_numpy_per_channel():
  """Equal per-channel constants take a scalar path: the same float32 values either way."""
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (5, 7, 3)).astype(np.float32)
  for mean, std in (((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                    ((0.45,) * 3, (0.27,) * 3)):
    got = images.normalise(tf.constant(img), mean=mean, std=std).numpy()
    want = (img / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), mean
