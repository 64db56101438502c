"""Worker batches through shared memory, and images decoded in the workers (jpeg_decode "pillow"):
byte-identical batches for 0, 1, 2 workers and after a resume, pixels equal to an independent
Pillow + numpy decode, planted undecodable images counted once, no /dev/shm segment left after
close, a worker crash or SIGTERM."""
import glob
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines import pil_decode, pipeline, shm_ring
from data_pipelines import streams as streams_lib
import data_fixtures as fx
import test_workers as workers_tests
import worker_fixtures as wfx
from test_workers import _alive, _batches, _same

TOK = fx.WhitespaceTokenizer()
S = 16
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
N_IMAGES = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("transport_data")
  rng = np.random.default_rng(5)
  fx.write_corpus(root / "corpus.txt", 20, rng)
  fx.write_pairs_jsonl(root / "pairs.jsonl", root / "pimg", 10, rng, missing_image=1)
  folder = root / "imgs"
  os.makedirs(folder)
  for i in range(N_IMAGES):  # JPEGs at the model's size (no resize), one larger (resized)
    size = (S, S) if i else (2 * S, 3 * S)
    (folder / f"{i:04d}.jpg").write_bytes(fx.image_bytes(fx.random_pixels(rng, *size), "JPEG"))
  # Passes the header check (valid chunks and CRCs) and fails in the decoder.
  (folder / "bad.png").write_bytes(fx.undecodable_png(S, S))
  return root


def _config(root, workers=0, jpeg_decode="pillow", **kw):
  """test_workers' pipeline config on this module's data, 4 images a batch, Pillow decoding."""
  c = workers_tests._config(root, seed=4, workers=workers, jpeg_decode=jpeg_decode, **kw)
  c.streams.image.batch_size = 4
  return c


def _segments(prefix):
  return glob.glob(os.path.join(shm_ring.SHM_DIR, prefix + "*"))


def _in_segment(a):
  """`a` is a view of a mapped segment (not a copy)."""
  base = a.base
  buf = getattr(base, "base", None)
  return isinstance(base, np.ndarray) and isinstance(getattr(buf, "obj", buf), mmap.mmap)


def _reference_pixels(path):
  """Independent decode: Pillow's RGB levels (libjpeg's DCT downscale to >= S), TF's antialiased
  bilinear resize when not S x S, normalised per pixel in float32: (x / 255 - 0.5) / 0.5."""
  im = Image.open(path)
  im.draft("RGB", (S, S))
  px = np.asarray(im.convert("RGB")).astype(np.float32)
  if px.shape[:2] != (S, S):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    px = tf.image.resize(px, [S, S], method="bilinear", antialias=True).numpy()
  return (px / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def test_pillow_decode_identical_for_0_1_2_workers_and_equal_to_pillow(data):
  ref, ref_drops, ref_state = _batches(_config(data, 0), 6)
  for n in (1, 2):
    got, drops, state = _batches(_config(data, n), 6)
    for a, b in zip(ref, got):
      _same(a, b)
    assert drops == ref_drops and state == ref_state
  refs = [_reference_pixels(p) for p in sorted(glob.glob(str(data / "imgs" / "*.jpg")))]
  seen_bad = 0
  for b in ref:
    for px, valid in zip(b["image/pixels"], b["image/row_valid"]):
      if valid:
        assert any(np.array_equal(px, r) for r in refs)
      else:
        seen_bad += 1
        assert not px.any()
  # The planted undecodable PNG: counted once per row that met it, whichever worker built it.
  assert seen_bad > 0 and ref_drops["imgs"].get("undecodable_image") == seen_bad


def test_pillow_resume_in_the_middle_with_workers(data):
  ref, _, _ = _batches(_config(data, 0), 7)
  it = pipeline.make_pipeline(_config(data, 2), tokenizer=TOK)
  try:
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    [next(it) for _ in range(2)]  # pylint: disable=expression-not-assigned
    it.set_state(state)
    again = [next(it) for _ in range(4)]
  finally:
    it.close()
  for a, b in zip(ref[:3] + ref[3:7], first + again):
    _same(a, b)


def test_restores_return_every_segment_of_dropped_work(data):
  """Each `set_state` drops the old generation's tasks (queued ones are skipped by the worker,
  built ones discarded): their segments come back, so restores do not grow the ring."""
  it = pipeline.make_pipeline(_config(data, 2), tokenizer=TOK)
  pool = it._pool  # pylint: disable=protected-access
  try:
    next(it)
    state = it.get_state()
    for _ in range(6):
      next(it)
      it.set_state(state)
    ref, _, _ = _batches(_config(data, 0), 3)
    for k in range(2):
      _same(ref[k + 1], next(it))
    time.sleep(1.0)  # the last generation's in-flight results arrive and are given back
    assert len(pool._segments) <= 3 * (pool.ahead + 3)  # pylint: disable=protected-access
  finally:
    it.close()
  assert _segments(pool.shm_prefix) == []


def test_two_processes_with_pillow_workers_equal_one(data):
  ref, _, _ = _batches(_config(data, 0), 3)
  parts = [_batches(_config(data, 2), 3, process_index=p, process_count=2)[0] for p in (0, 1)]
  for step in range(3):
    for k, v in ref[step].items():
      assert np.concatenate([parts[0][step][k], parts[1][step][k]]).tobytes() == v.tobytes()


def test_batches_are_views_of_shared_segments_recycled_and_unlinked(data):
  """Direct streams come out as views of the pool's segments (no copy in this process); a
  dropped batch's segment is reused (the ring stays small); held batches are never
  overwritten; close unlinks every segment and the views stay readable."""
  ref, _, _ = _batches(_config(data, 0), 14)
  it = pipeline.make_pipeline(_config(data, 2), tokenizer=TOK)
  pool = it._pool  # pylint: disable=protected-access
  try:
    for k in range(8):  # each batch dropped at once
      _same(ref[k], next(it))
    assert 0 < len(_segments(pool.shm_prefix)) <= 3 * (pool.ahead + 3)
    live = pool._segments  # pylint: disable=protected-access
    assert len(live) == len(_segments(pool.shm_prefix))
    held = [next(it) for _ in range(6)]  # held: the ring grows instead of reusing them
    for k in ("image/pixels", "pair/pixels", "text/mlm_ids"):
      assert _in_segment(held[0][k]), k
  finally:
    it.close()
  assert _segments(pool.shm_prefix) == []
  for a, b in zip(ref[8:], held):
    _same(a, b)


def test_region_rows_arrive_as_float32_from_the_workers(tmp_path):
  """Float16 region stores: in-process the row builder keeps float16 and casts after; workers
  write float32 into the segment, so the batches are the same bytes with no cast here."""
  from data_pipelines.sources import open_source  # pylint: disable=import-outside-toplevel
  from data_pipelines.sources import region_store  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  keys = [f"r{i}" for i in range(8)]
  fx.write_npz_regions(tmp_path / "npz", keys, rng, 6, 5)
  region_store.write_store(open_source(dict(kind="region_npz", path=str(tmp_path / "npz")),
                                       name="npz"), str(tmp_path / "store"), shard_images=4)
  c = pipeline.default_config()
  c.visual_input, c.num_regions, c.region_feature_dim, c.num_region_classes = "regions", 4, 6, 5
  c.streams.image.update(dict(batch_size=4, sources=[
      dict(name="st", kind="region_store", path=str(tmp_path / "store"))]))
  ref, _, _ = _batches(c, 4)
  c.workers = 2
  it = pipeline.make_pipeline(c, tokenizer=TOK)
  try:
    for a in ref:
      b = next(it)
      _same(a, b)
      assert _in_segment(b["image/region_features"])
      # independent: the float16 store values widened to float32
      assert np.array_equal(b["image/region_features"],
                            b["image/region_features"].astype(np.float16).astype(np.float32))
  finally:
    it.close()


def test_worker_crash_leaves_no_segment(tmp_path):
  with open(tmp_path / "bad.txt", "w") as f:
    for i in range(40):
      f.write(f"a red circle {'zap' if i == 30 else 'dot'} {i}\n")
  it = pipeline.make_pipeline(workers_tests._crashy_config(tmp_path / "bad.txt"),
                              tokenizer=wfx.FailInWorkerTokenizer("zap", "exit"))
  prefix, pids = it._pool.shm_prefix, it.worker_pids  # pylint: disable=protected-access
  try:
    with pytest.raises(Exception, match="exited with code 7") as e:
      for _ in range(40):
        next(it)
    assert "'crashy'" in str(e.value)
  finally:
    it.close()
  assert _segments(prefix) == []
  assert not any(_alive(p) for p in pids)


_SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
import pathlib
from data_pipelines import pipeline
from test_worker_transport import _config, TOK
it = pipeline.make_pipeline(_config(pathlib.Path({root!r}), 2), tokenizer=TOK)
for _ in range(3):
  next(it)
print(json.dumps([it.worker_pids, it._pool.shm_prefix]), flush=True)
while True:
  next(it)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_training_process_leaves_no_process_and_no_segment(data, tmp_path, sig):
  script = tmp_path / "run.py"
  script.write_text(textwrap.dedent(_SCRIPT.format(paths=[TESTS, ROOT], root=str(data))))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  try:
    pids, prefix = json.loads(proc.stdout.readline())
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert _segments(prefix)
    proc.send_signal(sig)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  deadline = time.time() + 20
  while time.time() < deadline and (any(_alive(p) for p in pids) or _segments(prefix)):
    time.sleep(0.2)
  assert not any(_alive(p) for p in pids), pids
  assert _segments(prefix) == []


def test_decode_ratio_table_and_mask_against_references():
  """DCT downscale as Pillow's draft, normalisation table as the per-pixel float32 formula,
  the numpy mask as the TF one."""
  rng = np.random.default_rng(0)
  big = fx.image_bytes(fx.random_pixels(rng, 8 * S, 8 * S), "JPEG")
  table = pil_decode.Normaliser((0.4, 0.5, 0.6), (0.2, 0.3, 0.5))
  out = np.empty((S, S, 3), np.float32)
  assert pil_decode.decode_into(big, 3, out, table)  # ratio 1/8: already S x S
  im = Image.open(__import__("io").BytesIO(big))
  im.draft("RGB", (S, S))
  px = np.asarray(im.convert("RGB")).astype(np.float32)
  want = (px / np.float32(255) - np.asarray((0.4, 0.5, 0.6), np.float32)) / np.asarray(
      (0.2, 0.3, 0.5), np.float32)
  assert im.size == (S, S) and np.array_equal(out, want)
  assert not pil_decode.decode_into(b"\xff\xd8\xff garbage", 0, out, table) and not out.any()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  fields = dict(row_valid=np.array([True, True, False]),
                mlm_weights=np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32),
                related_valid=np.array([[True], [True], [True]]),
                visual_mask=np.array([[True, False], [True, True], [False, True]]),
                _source=np.array([0, 1, 2], np.int32))
  valid = np.array([True, False, False])
  tf_out = {k: tf.stack([streams_lib.mask_invalid(
      {f: tf.constant(v[j]) for f, v in fields.items()}, tf.constant(valid[j]))[k]
                         for j in range(3)]).numpy() for k in fields}
  mine = {k: v.copy() for k, v in fields.items()}
  pil_decode.mask_invalid(mine, valid)
  for k in fields:
    assert np.array_equal(mine[k], tf_out[k]), k


def test_half_to_float_is_exact_for_every_half():
  from data_pipelines import half_float  # pylint: disable=import-outside-toplevel
  every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
  every = np.concatenate([every] * 3)  # more than one chunk, and a partial last one
  every = every[: (1 << 17) + 12345]
  out = np.full(every.shape, 7.0, np.float32)
  half_float.half_to_float(every, out)
  assert out.view(np.uint32).tobytes() == every.astype(np.float32).view(np.uint32).tobytes()
  # And against IEEE 754 written out (not numpy's cast): the float32 bit pattern of each half,
  # sign / exponent / mantissa rebiased, subnormals normalised, inf and NaN payloads kept.
  h = np.arange(1 << 16, dtype=np.uint32)
  sign, exp, man = h >> 15, (h >> 10) & 0x1F, h & 0x3FF
  ref = np.empty(1 << 16, np.uint32)
  for i in range(1 << 16):
    e, m = int(exp[i]), int(man[i])
    if e == 31:
      bits = (0xFF << 23) | (m << 13)
    elif e:
      bits = ((e - 15 + 127) << 23) | (m << 13)
    elif m:
      p = m.bit_length() - 1  # value m * 2**-24 = 2**(p - 24) * (m / 2**p)
      bits = ((p - 24 + 127) << 23) | (((m << (23 - p)) & 0x7FFFFF))
    else:
      bits = 0
    ref[i] = (int(sign[i]) << 31) | bits
  assert out[: 1 << 16].view(np.uint32).tobytes() == ref.tobytes()
  small = np.zeros((3, 4), np.float32)
  half_float.copy_into(small[:2], every[:8].reshape(2, 4))
  assert np.array_equal(small[:2], every[:8].reshape(2, 4).astype(np.float32))
  assert not small[2].any()


def test_no_room_in_shared_memory_falls_back_to_the_pipe(data, monkeypatch):
  """A full /dev/shm (ENOSPC when a segment is reserved) costs speed, not batches."""
  def full(path, size):
    raise OSError(28, "No space left on device", path)
  ref, ref_drops, _ = _batches(_config(data, 0), 4)
  monkeypatch.setattr(shm_ring, "Segment", full)
  got, drops, _ = _batches(_config(data, 2), 4)
  for a, b in zip(ref, got):
    _same(a, b)
    assert not _in_segment(b["image/pixels"])
  assert drops == ref_drops


@pytest.fixture(scope="module")
def mixed_formats(tmp_path_factory):
  """An image folder of every kind "auto" sorts: JPEGs (one resized, one CMYK), 8-bit PNGs
  (RGBA, palette), GIF, BMP, a 16-bit PNG, WebP, and three that Pillow alone decodes unlike
  TF (WebP with alpha and a 1-bit BMP, which TF refuses; a palette BMP, which TF reads to other
  pixels), and an undecodable PNG."""
  root = tmp_path_factory.mktemp("mixed_formats")
  rng = np.random.default_rng(9)
  fx.write_corpus(root / "corpus.txt", 12, rng)
  fx.write_pairs_jsonl(root / "pairs.jsonl", root / "pimg", 6, rng)
  folder = root / "imgs"
  os.makedirs(folder)
  px = lambda *hw: fx.random_pixels(rng, *hw)  # noqa: E731
  files = {"a.jpg": fx.image_bytes(px(S, S), "JPEG"),
           "b.jpg": fx.image_bytes(px(2 * S, 3 * S), "JPEG"),
           "c.jpg": fx.image_bytes(px(S, S), "JPEG", mode="CMYK"),
           "d.png": fx.image_bytes(np.concatenate([px(S, S), px(S, S)[:, :, :1]], -1)),
           "e.png": fx.image_bytes(px(S, S), mode="P"),
           "f.gif": fx.image_bytes(px(S, S), "GIF"),
           "g.bmp": fx.image_bytes(px(S + 3, S), "BMP"),
           "i.webp": fx.image_bytes(px(S, S), "WEBP"),
           "k.webp": fx.image_bytes(np.concatenate([px(S, S), px(S, S)[:, :, :1]], -1), "WEBP"),
           "l.bmp": fx.image_bytes(px(S, S), "BMP", mode="P"),
           "m.bmp": fx.image_bytes(px(S, S), "BMP", mode="1"),
           "j.png": fx.undecodable_png(S, S)}
  buf = __import__("io").BytesIO()
  Image.fromarray(px(S, S)[:, :, 0].astype(np.uint16) * 257).save(buf, "PNG")
  files["h.png"] = buf.getvalue()
  for name, data in files.items():
    (folder / name).write_bytes(data)
  return root


def test_auto_decode_same_batches_for_0_1_2_workers(mixed_formats):
  """jpeg_decode "auto" (the default): the TF stage decodes with 0 workers, the workers decode
  with 1 and 2 (Pillow for JPEG / 8-bit PNG, TF's ops for GIF, BMP, 16-bit PNG, WebP and what
  Pillow refuses); the batches, drop counts and states are byte-identical all the same (with
  Pillow alone the three odd files would differ: tests/test_jpeg_decode.py)."""
  def config(w):
    c = workers_tests._config(mixed_formats, seed=2, workers=w)
    c.streams.image.batch_size = 5
    return c
  assert config(0).jpeg_decode == "auto"
  it = pipeline.make_pipeline(config(0), tokenizer=TOK)
  assert not it.streams["image"].python_decode  # TF ops in this process
  it.close()
  ref, ref_drops, ref_state = _batches(config(0), 8)
  for n in (1, 2):
    it = pipeline.make_pipeline(config(n), tokenizer=TOK)
    assert it.streams["image"].python_decode  # decoded by the workers
    it.close()
    got, drops, state = _batches(config(n), 8)
    for a, b in zip(ref, got):
      _same(a, b)
    assert drops == ref_drops and state == ref_state
  # Every kind was met; the undecodable PNG and the WebP are the rows TF drops.
  rows = sum(int(b["image/row_valid"].size) for b in ref)
  bad = sum(int((~b["image/row_valid"].astype(bool)).sum()) for b in ref)
  assert rows == 40 and 0 < bad < rows, ref_drops
  assert ref_drops["imgs"].get("undecodable_image") == bad, ref_drops
