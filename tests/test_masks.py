"""Attention-mask builders against hand-written matrices."""
import jax.numpy as jnp
import numpy as np

from unimo_jax.model import masks


def test_bidirectional_with_padding():
  valid = np.array([[1, 1, 0], [0, 0, 0]])
  want = np.array([
      [[1, 1, 0],
       [1, 1, 0],
       [0, 0, 0]],
      [[0, 0, 0],
       [0, 0, 0],
       [0, 0, 0]],
  ])
  np.testing.assert_array_equal(masks.bidirectional(valid), want)


def test_seq2seq_unilm():
  # source s0 s1, pad, target t0 t1, pad
  segments = np.array([[1, 1, 0, 2, 2, 0]])
  want = np.array([[
      # s0 s1 p t0 t1 p   (keys)
      [1, 1, 0, 0, 0, 0],  # s0 sees the source only
      [1, 1, 0, 0, 0, 0],  # s1
      [0, 0, 0, 0, 0, 0],  # pad row sees nothing
      [1, 1, 0, 1, 0, 0],  # t0 sees source + itself
      [1, 1, 0, 1, 1, 0],  # t1 sees source + t0, t1
      [0, 0, 0, 0, 0, 0],
  ]])
  np.testing.assert_array_equal(masks.seq2seq(segments), want)


def test_captioning_image_block_sees_only_itself():
  # 3 visual tokens (the last a padded region), text w0 w1 pad
  text_valid = np.array([[1, 1, 0]])
  visual_valid = np.array([[1, 1, 0]])
  want = np.array([[
      # v0 v1 v2 w0 w1 p
      [1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0],  # padded region
      [1, 1, 0, 1, 0, 0],  # w0: image + itself
      [1, 1, 0, 1, 1, 0],  # w1: image + w0, w1
      [0, 0, 0, 0, 0, 0],
  ]])
  np.testing.assert_array_equal(masks.captioning(3, text_valid, visual_valid), want)
  # default visual_valid: every image token real
  got = np.asarray(masks.captioning(2, np.array([[1]])))
  np.testing.assert_array_equal(got, [[[1, 1, 0], [1, 1, 0], [1, 1, 1]]])


def test_to_bias_shape_values_and_no_nan_on_padded_rows():
  mask = np.array([[[1, 0], [0, 0]]])
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    bias = masks.to_bias(mask, dtype)
    assert bias.shape == (1, 1, 2, 2) and bias.dtype == dtype
    b = np.asarray(bias, np.float32)
    assert b[0, 0, 0, 0] == 0 and np.all(b[0, 0, 1] < -1e4) and np.all(np.isfinite(b))
    # a fully padded row softmaxes to something finite, and two biases do not overflow
    logits = jnp.asarray([[3.0, -2.0], [1.0, 5.0]], dtype) + bias[0, 0] + bias[0, 0]
    probs = np.asarray(jnp.exp(logits - logits.max(-1, keepdims=True)), np.float32)
    assert np.all(np.isfinite(probs))
