"""decode_image skips the resize of images already at the model's size: same pixels as resizing."""
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
    dec = tf.cast(tf.io.decode_image(data, channels=3), tf.float32)
    want = tf.image.resize(dec, [24, 24], method="bilinear", antialias=True)
    want = ((want / 255.0 - 0.5) / 0.5).numpy()
    assert got.shape == (24, 24, 3) and got.tobytes() == want.tobytes(), fmt
  # A different size still resizes.
  out = images.decode_image(tf.constant(fx.image_bytes(px)), tf.constant(0), image_size=16,
                            mean=(0.5,) * 3, std=(0.5,) * 3)
  assert out.shape == (16, 16, 3)
