"""`images.safe_decode_batch` and the stream's TF decode stage against a per-image reference:
each image decoded alone (libjpeg's accurate IDCT through `tf.io.decode_jpeg`, Pillow for PNG,
normalised in numpy), zeros for an undecodable or absent one; an undecodable main image masks
its row and every failed decode is counted once as ``undecodable_image``."""
import collections
import io
import json

import numpy as np
import tensorflow as tf
from PIL import Image

from data_pipelines import images, pipeline
import data_fixtures as fx

S = 16
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)  # per channel: the broadcast form of normalise


def _jpeg(px, **kw):
  return fx.image_bytes(px, "JPEG", quality=90, **kw)


def corrupt_jpeg(px) -> bytes:
  """A JPEG that passes the header check (SOI, frame header, EOI) but whose Huffman table is
  bogus: only the decoder can tell."""
  good = _jpeg(px)
  j = good.find(b"\xff\xc4")
  return good[:j + 5] + b"\xff" * 16 + good[j + 21:]


def _normalise(uint8, mean=MEAN, std=STD):
  x = uint8.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _reference(data, ratio, present, size=S):
  """One image alone -> (pixels [S, S, 3], ok)."""
  if not present:
    return np.zeros((size, size, 3), np.float32), False
  try:
    if data[:4] == images.RAW_MAGIC:
      h, w = np.frombuffer(data[4:12], "<i4")
      px = np.frombuffer(data[12:], np.uint8).reshape(h, w, 3)
    elif data[:3] == b"\xff\xd8\xff":
      px = tf.io.decode_jpeg(data, channels=3, ratio=images.JPEG_RATIOS[ratio],
                             dct_method="INTEGER_ACCURATE").numpy()
    else:
      px = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  except (tf.errors.InvalidArgumentError, OSError):
    return np.zeros((size, size, 3), np.float32), False
  if px.shape[:2] != (size, size):
    px = tf.image.resize(px.astype(np.float32), [size, size], antialias=True).numpy()
    return _normalise(px), True  # normalise of float levels, the same formula
  return _normalise(px), True


def _run(blobs, ratios, present, size=S):
  pixels, ok = images.safe_decode_batch(tf.constant(blobs, tf.string), tf.constant(ratios),
                                        tf.constant(present), image_size=size, mean=MEAN,
                                        std=STD)
  return pixels.numpy(), ok.numpy()


def _check(blobs, ratios, present):
  pixels, ok = _run(blobs, ratios, present)
  assert pixels.shape == (len(blobs), S, S, 3) and ok.shape == (len(blobs),)
  for j, (b, r, p) in enumerate(zip(blobs, ratios, present)):
    ref, ref_ok = _reference(b, r, p)
    assert ok[j] == ref_ok, j
    np.testing.assert_allclose(pixels[j], ref, atol=2e-6, rtol=0, err_msg=str(j))
    if ref_ok and b[:3] == b"\xff\xd8\xff" and r == 0 and len(b) and Image.open(
        io.BytesIO(b)).size == (S, S):
      np.testing.assert_array_equal(pixels[j], ref)  # no resize: the same float32 arithmetic
  return pixels, ok


def test_mixed_batch_with_corrupt_and_absent_images_matches_each_image_alone():
  rng = np.random.default_rng(0)
  px = [fx.random_pixels(rng, S, S) for _ in range(4)]
  blobs = [
      _jpeg(px[0]),                                     # plain S x S JPEG
      corrupt_jpeg(px[1]),                              # corrupt, S x S header
      _jpeg(px[2], mode="L"),                           # grayscale JPEG
      b"garbage that is never decoded",                 # absent (present False)
      fx.image_bytes(px[3], "PNG"),                     # another format
      _jpeg(fx.random_pixels(rng, 2 * S, 2 * S)),       # DCT ratio 1/2 -> S x S
      corrupt_jpeg(fx.random_pixels(rng, 2 * S, 2 * S)),  # corrupt on the ratio path
      _jpeg(fx.random_pixels(rng, 20, 28)),             # needs a resize
      _jpeg(px[0][::-1]),                               # plain again, after the others
      images.encode_raw(px[1]),                         # raw S x S pixels
      images.encode_raw(fx.random_pixels(rng, 9, 12)),  # raw, needs a resize
  ]
  ratios = [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
  present = [True, True, True, False, True, True, True, True, True, True, True]
  _, ok = _check(blobs, ratios, present)
  assert ok.tolist() == [True, False, True, False, True, True, False, True, True, True, True]
  raws = [images.encode_raw(fx.random_pixels(rng, S, S)) for _ in range(3)]
  _, ok = _check(raws, [0] * 3, [True] * 3)  # the demo's batches (synthetic_scenes)
  assert ok.all()


def test_all_plain_batch_and_a_corrupt_one_in_the_middle():
  rng = np.random.default_rng(1)
  blobs = [_jpeg(fx.random_pixels(rng, S, S)) for _ in range(6)]
  _, ok = _check(blobs, [0] * 6, [True] * 6)
  assert ok.all()
  blobs[3] = corrupt_jpeg(fx.random_pixels(rng, S, S))
  pixels, ok = _check(blobs, [0] * 6, [True] * 6)
  assert ok.tolist() == [True, True, True, False, True, True] and not pixels[3].any()


def test_every_image_corrupt_or_absent_gives_zeros():
  rng = np.random.default_rng(2)
  bad = [corrupt_jpeg(fx.random_pixels(rng, S, S)), fx.undecodable_png(S, S),
         corrupt_jpeg(fx.random_pixels(rng, 2 * S, 2 * S))]
  for blobs, ratios, present in ((bad, [0, 0, 1], [True] * 3),
                                 (bad, [0, 0, 1], [False] * 3),
                                 (bad[:1], [0], [True]),
                                 ([b"", b"x"], [0, 0], [False, True])):
    pixels, ok = _run(blobs, ratios, present)
    assert not ok.any() and not pixels.any() and pixels.shape == (len(blobs), S, S, 3)


def test_one_image_form_is_the_batch_of_one():
  rng = np.random.default_rng(3)
  good, bad = _jpeg(fx.random_pixels(rng, S, S)), corrupt_jpeg(fx.random_pixels(rng, S, S))
  for data, present in ((good, True), (bad, True), (good, False)):
    p, ok = images.safe_decode_image(tf.constant(data), tf.constant(0), tf.constant(present),
                                     image_size=S, mean=MEAN, std=STD)
    ref, ref_ok = _reference(data, 0, present)
    assert bool(ok.numpy()) == ref_ok
    np.testing.assert_array_equal(p.numpy(), ref)


# -- the stream ---------------------------------------------------------------------------------

def _pairs(root, rng, n=8, bad=3):
  """n pairs with S x S JPEGs (record `bad`'s corrupt); neighbours: record k's related image is
  record k + 1's, record 0's names a missing record (absent), record 5's the corrupt one."""
  (root / "img").mkdir()
  keys = [f"k{i}" for i in range(n)]
  blobs = {}
  with open(root / "pairs.jsonl", "w") as f, open(root / "nb.jsonl", "w") as g:
    for i, k in enumerate(keys):
      px = fx.random_pixels(rng, S, S)
      blobs[k] = corrupt_jpeg(px) if i == bad else _jpeg(px)
      (root / "img" / f"{k}.jpg").write_bytes(blobs[k])
      f.write(json.dumps(dict(key=k, image=f"{k}.jpg", captions=[fx.sentence(rng)])) + "\n")
      related = "nowhere" if i == 0 else keys[bad] if i == 5 else keys[(i + 1) % n]
      g.write(json.dumps(dict(key=k, images=[related], texts=["two big shapes"])) + "\n")
  return keys, blobs


def _config(root, workers=0):
  c = pipeline.default_config()
  c.image_size, c.patch_size = S, 4
  c.pixel_mean, c.pixel_std = MEAN, STD
  c.max_attempts = 1  # the corrupt record's slot is not redrawn: one epoch meets it once
  c.workers = workers
  c.num_positives, c.num_negatives, c.num_related_images, c.num_related_texts = 1, 1, 1, 1
  c.streams.text.batch_size = c.streams.image.batch_size = 0
  c.streams.pair.update(dict(batch_size=8, max_length=14, max_predictions=2,
                             s2s_max_predictions=14, sources=[dict(
                                 name="pairs", kind="jsonl", path=str(root / "pairs.jsonl"),
                                 image_dir=str(root / "img"), neighbours=str(root / "nb.jsonl"))]))
  return c


def test_stream_masks_the_corrupt_row_and_counts_each_failure_once(tmp_path):
  keys, blobs = _pairs(tmp_path, np.random.default_rng(4))
  it = pipeline.make_pipeline(_config(tmp_path), tokenizer=fx.WhitespaceTokenizer())
  batch = next(it)  # one epoch: every record once
  counts = it.dropped_counts()
  it.close()
  order = [keys.index(k) for k in _keys_of(it_batch=batch, blobs=blobs, keys=keys)]
  assert sorted(order) == list(range(8))
  failures = 0
  for row, i in enumerate(order):
    ref, ok = _reference(blobs[keys[i]], 0, True)
    np.testing.assert_array_equal(batch["pair/pixels"][row], ref)
    assert batch["pair/row_valid"][row] == ok
    for k, v in batch.items():
      if k.endswith("_weights") and not ok:
        assert not v[row].any(), k
    related = "nowhere" if i == 0 else keys[3] if i == 5 else keys[(i + 1) % 8]
    rel, rel_ok = _reference(blobs.get(related, b""), 0, related in blobs)
    np.testing.assert_array_equal(batch["pair/related_pixels"][row, 0], rel)
    assert batch["pair/related_valid"][row, 0] == (rel_ok and ok)
    failures += (not ok) + (related in blobs and not rel_ok)
  assert failures == 3  # record 3 as a row, and as the related image of records 2 and 5
  assert counts == {"pairs": {"undecodable_image": 3}}


def _keys_of(it_batch, blobs, keys):
  """Which record each row is: its pixels (or zeros: the corrupt record)."""
  out = []
  refs = {k: _reference(blobs[k], 0, True)[0] for k in keys}
  for row in it_batch["pair/pixels"]:
    out.append(next(k for k in keys if np.array_equal(refs[k], row)))
  return out


def test_stream_batches_are_the_same_with_workers(tmp_path):
  _pairs(tmp_path, np.random.default_rng(5))
  out = {}
  for workers in (0, 2):
    it = pipeline.make_pipeline(_config(tmp_path, workers), tokenizer=fx.WhitespaceTokenizer())
    out[workers] = ([next(it) for _ in range(2)], it.dropped_counts())
    it.close()
  (a, ca), (b, cb) = out[0], out[2]
  assert ca == cb and ca["pairs"]["undecodable_image"] == 6
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k
  assert collections.Counter(a[0]["pair/row_valid"].tolist())[False] == 1
