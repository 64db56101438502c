"""Images: a cheap header check in Python, then decode / resize / normalise in tf.data.

Two halves:
- `inspect_image(data)` (pure Python, no decode): the format, width and height from the header
  and whether the bytes end where the format says they should. The pipeline uses it to drop
  undecodable, truncated and over-large images (with a reason) BEFORE they reach TensorFlow, and
  to choose a JPEG decode ratio for large images. PNG chunk CRCs are verified, so a damaged PNG
  is caught here; JPEG has no checksums (only its markers are checked).
- `decode_image(data, ratio_index, ...)` (TensorFlow ops, used inside a tf.data map): decodes
  JPEG (grayscale, RGB, CMYK/YCCK: libjpeg converts), PNG (gray, palette, RGBA, 16-bit), GIF
  (first frame), BMP, WebP, and pixels that arrive already decoded (TFDS Tensor images, wrapped
  by `encode_raw`) to RGB uint8, resizes to ``[S, S, 3]`` with antialiasing and
  normalises ``(x / 255 - mean) / std``. A large JPEG is decoded at 1/2, 1/4 or 1/8 scale by
  libjpeg (DCT scaling) when the result is still at least S on its short side, which makes a
  4000x3000 photo cost about what a 500x375 one does. Alpha is dropped (as PIL's convert('RGB')).

A record that passes the header check and still fails to decode (corrupt entropy-coded data)
must not kill the run: `safe_decode_batch` decodes a batch's images in one nested dataset with
`ignore_errors` and returns zeros and ok False for such an image, so its row is masked and
counted.
"""
import struct
import zlib

import numpy as np
from data_pipelines.lazy import tensorflow as tf  # loaded on first use (row workers never do)

# Already-decoded pixels (e.g. a TFDS Tensor feature) travel as RAW_MAGIC, int32 h, w, then
# h*w*3 uint8 bytes, so one string field carries encoded and raw images alike.
RAW_MAGIC = b"RAW1"
# Decode-ratio choices libjpeg offers (index into this tuple is what the pipeline passes).
JPEG_RATIOS = (1, 2, 4, 8)
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers; C4/C8/CC are not
# SOI, a 1 x 1 gray frame header, a scan header, EOI: enough for `tf.io.extract_jpeg_shape`.
_TINY_JPEG = bytes.fromhex("ffd8ffc0000b080001000101011100ffda0008010100003f00ffd9")


def inspect_image(data: bytes):
  """Header facts of encoded image bytes, without decoding.

  Returns ``(format, width, height, problem)``: format in {jpeg, png, gif, bmp, webp} or None;
  width/height ints or None when the header does not say; problem None or a drop reason
  (``undecodable_image``: not a format we read or a broken header; ``truncated_image``: the
  bytes stop before the format's end marker).
  """
  if not data:
    return None, None, None, "undecodable_image"
  if data[:4] == RAW_MAGIC:
    if len(data) < 12:
      return "raw", None, None, "truncated_image"
    h, w = struct.unpack("<ii", data[4:12])
    return "raw", w, h, None if len(data) == 12 + 3 * h * w else "truncated_image"
  if data[:3] == b"\xff\xd8\xff":
    return _inspect_jpeg(data)
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return _inspect_png(data)
  if data[:6] in (b"GIF87a", b"GIF89a"):
    if len(data) < 10:
      return "gif", None, None, "truncated_image"
    w, h = struct.unpack("<HH", data[6:10])
    return "gif", w, h, None if data.rstrip(b"\x00")[-1:] == b";" else "truncated_image"
  if data[:2] == b"BM" and len(data) >= 26:
    size = struct.unpack("<I", data[2:6])[0]
    w, h = struct.unpack("<ii", data[18:26])
    return "bmp", w, abs(h), None if len(data) >= size else "truncated_image"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    size = struct.unpack("<I", data[4:8])[0] + 8
    w = h = None
    if data[12:16] == b"VP8X" and len(data) >= 30:
      w = 1 + int.from_bytes(data[24:27], "little")
      h = 1 + int.from_bytes(data[27:30], "little")
    elif data[12:16] == b"VP8 " and len(data) >= 30:
      w, h = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif data[12:16] == b"VP8L" and len(data) >= 25:
      bits = int.from_bytes(data[21:25], "little")
      w, h = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return "webp", w, h, None if len(data) >= size else "truncated_image"
  return None, None, None, "undecodable_image"


def _inspect_png(data):
  """Walks the PNG chunks, checking each CRC (zlib.crc32 runs at memory speed): a PNG whose
  bytes were damaged or cut is caught here instead of in the decoder."""
  if len(data) < 33 or data[12:16] != b"IHDR":
    return "png", None, None, "truncated_image" if len(data) < 33 else "undecodable_image"
  w, h = struct.unpack(">II", data[16:24])
  i, n = 8, len(data)
  while i + 12 <= n:
    length = struct.unpack(">I", data[i:i + 4])[0]
    end = i + 8 + length
    if end + 4 > n:
      return "png", w, h, "truncated_image"
    if zlib.crc32(data[i + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
      return "png", w, h, "undecodable_image"
    if data[i + 4:i + 8] == b"IEND":
      return "png", w, h, None
    i = end + 4
  return "png", w, h, "truncated_image"


def _inspect_jpeg(data):
  """Walks the JPEG markers up to the frame header (SOFn) for the size; checks the EOI marker."""
  i, n = 2, len(data)
  w = h = None
  while i + 4 <= n:
    if data[i] != 0xFF:
      return "jpeg", None, None, "undecodable_image"
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # markers without a length
      i += 2
      continue
    seg = struct.unpack(">H", data[i + 2:i + 4])[0]
    if marker in _JPEG_SOF:
      if i + 9 > n:
        break
      h, w = struct.unpack(">HH", data[i + 5:i + 9])
      break
    if marker == 0xDA:  # start of scan before any frame header
      return "jpeg", None, None, "undecodable_image"
    i += 2 + seg
  if w is None:
    return "jpeg", None, None, "truncated_image"
  # A complete JPEG ends with EOI (FF D9); some writers pad with zeros or newlines after it.
  if data.rstrip(b"\x00\r\n\t ")[-2:] != b"\xff\xd9":
    return "jpeg", w, h, "truncated_image"
  return "jpeg", w, h, None


def encode_raw(pixels: np.ndarray) -> bytes:
  """uint8 ``[H, W]``, ``[H, W, 1|3|4]`` -> RAW bytes of ``[H, W, 3]`` (gray repeated, alpha dropped).

  Raises ValueError on another rank, channel count or dtype (the caller counts it).
  """
  a = np.asarray(pixels)
  if a.dtype != np.uint8:
    raise ValueError(f"raw image dtype {a.dtype}, expected uint8")
  if a.ndim == 2:
    a = a[:, :, None]
  if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
    raise ValueError(f"raw image shape {a.shape}, expected [H, W, 1|3|4]")
  if a.shape[2] == 1:
    a = np.repeat(a, 3, axis=2)
  a = np.ascontiguousarray(a[:, :, :3])
  return RAW_MAGIC + struct.pack("<ii", a.shape[0], a.shape[1]) + a.tobytes()


def jpeg_ratio_index(width, height, image_size: int) -> int:
  """Largest libjpeg downscale (index into `JPEG_RATIOS`) keeping both sides >= image_size."""
  if not width or not height:
    return 0
  best = 0
  for k, r in enumerate(JPEG_RATIOS):
    if min(width, height) // r >= image_size:
      best = k
  return best


# "accurate" / "fast": TF ops in the training process's tf.data stage (`decode_image`);
# "pillow": Pillow + numpy inside the batch builder, i.e. in the row-building workers
# (`data_pipelines.pil_decode`, which says how its pixels differ); "auto" (the default):
# "accurate"'s pixels for every input, decoded in the builder when data.workers > 0 (Pillow where
# it is TF's decode bit for bit, TF ops for the rest) and by the TF stage when the training
# process builds the batches itself.
JPEG_DECODES = ("auto", "accurate", "fast", "pillow")


def check_jpeg_decode(value) -> str:
  """``data.jpeg_decode``: "auto" (default), "accurate", "fast" or "pillow"; ValueError (one
  line) otherwise."""
  if value not in JPEG_DECODES:
    raise ValueError(f"data.jpeg_decode must be one of {JPEG_DECODES}, got {value!r}")
  return value


def decode_image(data, ratio_index, *, image_size: int, mean, std, jpeg_decode="accurate"):
  """TF ops: encoded bytes (scalar string) -> float32 ``[S, S, 3]`` normalised pixels.

  `ratio_index` (scalar int32) picks the JPEG DCT downscale (see `jpeg_ratio_index`); other
  formats ignore it. Raises (inside tf.data) on undecodable bytes: use `safe_decode_batch`.
  `jpeg_decode` "accurate" is libjpeg's accurate integer IDCT (``dct_method="INTEGER_ACCURATE"``)
  with fancy chroma upsampling: Pillow's decode, bit for bit, so "pillow" gives the same pixels
  for JPEGs that need no resize (tests/test_jpeg_decode.py). TF's own default (``dct_method=""``)
  is libjpeg-turbo's FAST integer IDCT, ~1 level in 255 away on two thirds of the values; until
  this was set, "accurate" decoded that way, so JPEG inputs' pixels moved by ~1 level. The
  demo's synthetic_scenes images are raw uint8 pixels (a TFDS Tensor feature, `encode_raw`):
  no JPEG decode, so its pixels did not change. "fast" uses the fast integer IDCT and plain
  chroma replication: other pixels (benchmarks/README.md gives the measured difference, time).
  """
  fast = check_jpeg_decode(jpeg_decode) == "fast"

  def jpeg(r):
    if fast:
      return lambda: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_FAST",
                                       fancy_upscaling=False)
    return lambda: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")

  def other():
    return tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)

  def raw():
    hw = tf.io.decode_raw(tf.strings.substr(data, 4, 8), tf.int32, little_endian=True)
    pixels = tf.io.decode_raw(tf.strings.substr(data, 12, -1), tf.uint8)
    return tf.reshape(pixels, tf.concat([hw, [3]], 0))

  img = tf.case([
      (tf.equal(tf.strings.substr(data, 0, 4), RAW_MAGIC), raw),
      (tf.io.is_jpeg(data), lambda: tf.switch_case(tf.cast(ratio_index, tf.int32),
                                                  [jpeg(r) for r in JPEG_RATIOS])),
  ], default=other, exclusive=True)
  img = tf.cast(tf.ensure_shape(img, [None, None, 3]), tf.float32)
  # Images stored at the model's size skip the resize: it is the identity there (exactly, on
  # 0..255 values), and on 224 px JPEGs it cost several times the decode (0.8 vs 10 ms measured
  # on a loaded 2-core machine).
  img = tf.cond(tf.reduce_all(tf.equal(tf.shape(img)[:2], [image_size, image_size])),
                lambda: img,
                lambda: tf.image.resize(img, [image_size, image_size], method="bilinear",
                                        antialias=True))
  img = tf.ensure_shape(img, [image_size, image_size, 3])
  return normalise(img, mean=mean, std=std)


def normalise(img, *, mean, std):
  """``(img / 255 - mean) / std`` per channel (img float32 in 0..255)."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if np.all(mean == mean[0]) and np.all(std == std[0]):
    # The same values as scalars: the same float32 arithmetic per pixel, but TF's broadcast of
    # a [1, 1, 3] operand cost more than the JPEG decode (1.5 vs 0.6 ms CPU at 224 px).
    return (img / 255.0 - mean[0]) / std[0]
  mean = tf.constant(mean.reshape(1, 1, 3))
  std = tf.constant(std.reshape(1, 1, 3))
  return (img / 255.0 - mean) / std


def safe_decode_batch(data, ratio_index, present, *, image_size: int, mean, std,
                      jpeg_decode="accurate"):
  """`decode_image` of N images that never raises: ``(pixels [N,S,S,3] f32, ok [N] bool)``.

  `data` [N] string, `ratio_index` [N] int32, `present` [N] bool (False: an absent related
  image, not decoded). An image that fails to decode, and an absent one, gives zeros and ok
  False; every other image gives exactly `decode_image`'s pixels.

  TF has no try/except inside a graph, so the decodes run in ONE nested dataset per call with
  `ignore_errors`, each image carrying its index, and what decoded is scattered back into zeros
  (one nested dataset per image cost ~630 us per image, more than the JPEG decode). Inside it,
  the images that need neither DCT scaling nor a resize (JPEGs of ratio index 0 with an S x S
  header, raw S x S pixels) take `decode_image`'s ops without its `tf.case` / `tf.cond` (each
  cost ~100 us of CPU per image there); the other images follow them through `decode_image`
  itself, and that part of the nested dataset is only built when a batch has such images.
  """
  size = int(image_size)
  data = tf.reshape(data, [-1])
  ratio_index = tf.reshape(tf.cast(ratio_index, tf.int32), [-1])
  present = tf.reshape(tf.cast(present, tf.bool), [-1])
  n = tf.shape(data, out_type=tf.int32)[0]
  fast = check_jpeg_decode(jpeg_decode) == "fast"
  # Routes, vectorised: JPEGs at full scale (`tf.io.is_jpeg`'s test) and raw S x S pixels.
  jpeg = present & tf.equal(ratio_index, 0) & tf.equal(tf.strings.substr(data, 0, 3),
                                                       b"\xff\xd8\xff")
  raw = present & tf.equal(tf.strings.substr(data, 0, 12), RAW_MAGIC + np.asarray(
      [size, size], "<i4").tobytes()) & tf.equal(tf.strings.length(data), 12 + 3 * size * size)
  other = present & ~jpeg & ~raw

  def slices(which, *extra):
    index = tf.cast(tf.reshape(tf.where(which), [-1]), tf.int32)
    return tf.data.Dataset.from_tensor_slices(
        (index, tf.gather(data, index)) + tuple(tf.gather(x, index) for x in extra))

  def square(b):  # an S x S JPEG header
    return tf.reduce_all(tf.equal(tf.io.extract_jpeg_shape(b)[:2], [size, size]))

  def direct_jpeg(i, b):
    # Not S x S: raises before the decode, and the image goes on to `decode_image` below.
    with tf.control_dependencies([tf.debugging.Assert(square(b), [i])]):
      if fast:
        img = tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_FAST", fancy_upscaling=False)
      else:
        img = tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_ACCURATE")
    img = tf.cast(tf.ensure_shape(img, [size, size, 3]), tf.float32)
    return i, normalise(img, mean=mean, std=std)

  def direct_raw(i, b):
    img = tf.reshape(tf.io.decode_raw(tf.strings.substr(b, 12, -1), tf.uint8), [size, size, 3])
    return i, normalise(tf.cast(img, tf.float32), mean=mean, std=std)

  def general(i, b, r):
    return i, decode_image(b, r, image_size=size, mean=mean, std=std, jpeg_decode=jpeg_decode)

  def decoded(ds, fn):
    # The map's parallelism decodes the images of one call side by side (as the per-image
    # AUTOTUNE map of the stream did); `deterministic` keeps them in index order.
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()

  def the_rest(_):
    # Raw pixels, then the other formats and the full-scale JPEGs that are not S x S (a corrupt
    # S x S one failed above, and would fail here the same way); an unreadable JPEG header
    # fails `square` and is dropped by ignore_errors (its decode would fail too). The others
    # read the header of a 1 x 1 JPEG instead of theirs.
    rest = slices(other | jpeg, ratio_index, jpeg).filter(
        lambda i, b, r, j: ~(j & square(tf.where(j, b, _TINY_JPEG))))  # no branch
    return decoded(slices(raw), direct_raw).concatenate(
        decoded(rest.map(lambda i, b, r, j: (i, b, r)), general))

  # `concatenate` makes an iterator when the one before it ends and `batch` stops after the
  # last present image, so a batch of S x S JPEGs never builds the rest (its datasets and
  # functions: ~100 us per image of CPU when built and not used).
  later = tf.data.Dataset.from_tensors(0).flat_map(the_rest)
  # All failed (or none is present): the batch is empty and `concatenate` supplies it.
  none = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32),
                                       tf.zeros([0, size, size, 3], tf.float32)))
  m = tf.maximum(tf.reduce_sum(tf.cast(present, tf.int64)), 1)
  got, pixels = decoded(slices(jpeg), direct_jpeg).concatenate(later).batch(m).concatenate(
      none).take(1).get_single_element()
  ok = tf.reduce_any(tf.equal(tf.range(n)[:, None], got[None, :]), axis=1)
  # The usual batch (every image present, decoded, in order) needs no scatter.
  in_order = tf.equal(tf.shape(got)[0], n) & tf.reduce_all(
      tf.equal(got, tf.range(tf.shape(got)[0])))
  pixels = tf.cond(in_order, lambda: pixels,
                   lambda: tf.scatter_nd(got[:, None], pixels, tf.stack([n, size, size, 3])))
  return tf.ensure_shape(pixels, [data.shape[0], size, size, 3]), tf.ensure_shape(ok, data.shape)


def safe_decode_image(data, ratio_index, present, *, image_size: int, mean, std,
                      jpeg_decode="accurate"):
  """One image through `safe_decode_batch`: ``(pixels [S,S,3] f32, ok bool)``; `present`
  False skips the decode and gives ``(zeros, False)``."""
  pixels, ok = safe_decode_batch(tf.reshape(data, [1]), tf.reshape(ratio_index, [1]),
                                 tf.reshape(present, [1]), image_size=image_size, mean=mean,
                                 std=std, jpeg_decode=jpeg_decode)
  return pixels[0], ok[0]
