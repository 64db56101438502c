"""The converted region store (`prepare regions` + source kind region_store) against the npz and
TSV readers it replaces: same records to float16 rounding, bad records skipped and counted,
manifests that cannot point outside the store, the same model input through the pipeline."""
import json
import os

import numpy as np
import pytest

from data_pipelines import pipeline, prepare
from data_pipelines.streams import Stream
from data_pipelines.sources import BadRecord, open_source
from data_pipelines.sources import region_store
import data_fixtures as fx

F, C = 6, 5


def _f16(a):
  """The float32 value rounded to float16 and back: what the store's reader gives."""
  return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


@pytest.fixture()
def npz(tmp_path):
  keys = [f"k{i}" for i in range(9)]
  table = fx.write_npz_regions(tmp_path / "npz", keys, np.random.default_rng(0), F, C,
                               nan=("k3",), wrong_shape=("k5",))
  return tmp_path, keys, table


def test_npz_to_store_equals_the_npz_reader_to_float16(npz):
  tmp, keys, table = npz
  m = region_store.write_store(open_source(dict(kind="region_npz", path=str(tmp / "npz")),
                                           name="npz"), str(tmp / "store"), shard_images=3)
  assert m["skipped"] == {"nonfinite_features": 1, "bad_feature_shape": 1}
  assert m["records"] == 7 and len(m["shards"]) == 3 and m["dtype"] == "float16"
  st = open_source(dict(kind="region_store", path=str(tmp / "store")), name="st")
  assert len(st) == 7
  good = [k for k in keys if k not in ("k3", "k5")]
  for i, k in enumerate(good):
    rec, want = st.read(i), table[k]
    assert rec["key"] == k and st.find(k) == i
    r = rec["regions"]
    assert r["features"].dtype == np.float16 and r["class_probs"].dtype == np.float16
    np.testing.assert_array_equal(r["boxes"], want["boxes"])  # exact
    np.testing.assert_array_equal(np.asarray(r["features"], np.float32), _f16(want["features"]))
    np.testing.assert_array_equal(np.asarray(r["class_probs"], np.float32),
                                  _f16(want["class_probs"]))
    # classes come from the float32 probabilities, before rounding
    np.testing.assert_array_equal(r["classes"], np.argmax(want["class_probs"], 1))
    assert (r["width"], r["height"]) == (want["width"], want["height"])


def test_tsv_to_store_keeps_every_key_and_float32_option(tmp_path):
  keys = [f"{i}" for i in range(5)]
  table = fx.write_tsv_regions(tmp_path / "r.tsv", keys, np.random.default_rng(1), F, C,
                               nan=("2",))
  code = prepare.main(["prepare", "regions", "--kind", "region_tsv", "--path",
                       str(tmp_path / "r.tsv"), "--out", str(tmp_path / "st"), "--dtype",
                       "float32"])
  assert code == 0
  m = json.load(open(tmp_path / "st" / "regions.json"))
  assert m["skipped"] == {"nonfinite_features": 1} and m["records"] == 4
  st = open_source(dict(kind="region_store", path=str(tmp_path / "st")), name="st")
  tsv = open_source(dict(kind="region_tsv", path=str(tmp_path / "r.tsv")), name="tsv")
  for k in ("0", "1", "3", "4"):
    i = st.find(k)
    assert i == st.find(f"{k}.jpg")  # the TSV's file name is a key too (COCO joins by it)
    a, b = st.read(i)["regions"], tsv.read(tsv.find(k))["regions"]
    for field in ("boxes", "features", "class_probs"):
      np.testing.assert_array_equal(a[field], b[field])  # float32: exact
    np.testing.assert_array_equal(a["features"], table[k]["features"])
  # a second conversion into the same directory is refused (one line, exit 2)
  assert prepare.main(["prepare", "regions", "--kind", "region_tsv", "--path",
                       str(tmp_path / "r.tsv"), "--out", str(tmp_path / "st")]) == 2


def _store(tmp, n=4, **kw):
  src = fx.write_npz_regions(tmp / "npz", [f"k{i}" for i in range(n)],
                             np.random.default_rng(2), F, C)
  region_store.write_store(open_source(dict(kind="region_npz", path=str(tmp / "npz")),
                                       name="npz"), str(tmp / "store"), **kw)
  return tmp / "store", src


def _edit_manifest(store, **changes):
  p = store / "regions.json"
  m = json.load(open(p))
  m.update(changes)
  json.dump(m, open(p, "w"))
  return m


@pytest.mark.parametrize("name", ["../npz/k0", "/etc/passwd", "a/b", "..", ".hidden"])
def test_shard_names_never_escape_the_store(tmp_path, name):
  store, _ = _store(tmp_path)
  m = json.load(open(store / "regions.json"))
  m["shards"][0]["name"] = name
  _edit_manifest(store, shards=m["shards"])
  with pytest.raises(ValueError, match=r"regions.json: shards.name: .* (not a plain|outside)"):
    open_source(dict(kind="region_store", path=str(store)), name="st")


def test_shard_symlink_outside_the_store_is_refused(tmp_path):
  store, _ = _store(tmp_path)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  os.rename(store / "shard-00000.index.npy", outside / "x.index.npy")
  os.symlink(outside / "x.index.npy", store / "shard-00000.index.npy")
  with pytest.raises(ValueError, match="outside"):
    open_source(dict(kind="region_store", path=str(store)), name="st")


@pytest.mark.parametrize("field,value,message", [
    ("format", "other", "format"), ("dtype", "int8", "dtype"), ("feature_dim", -1, "feature_dim"),
    ("records", 99, "records"), ("shards", {"a": 1}, "shards")])
def test_bad_manifest_is_one_line_naming_the_field(tmp_path, field, value, message):
  store, _ = _store(tmp_path)
  _edit_manifest(store, **{field: value})
  with pytest.raises(ValueError, match=f"regions.json: {message}") as e:
    open_source(dict(kind="region_store", path=str(store)), name="st")
  assert "\n" not in str(e.value)


def test_missing_store_says_how_to_write_one(tmp_path):
  with pytest.raises(ValueError, match="unimo-jax prepare regions"):
    open_source(dict(kind="region_store", path=str(tmp_path)), name="st")


def test_damaged_records_are_bad_records(tmp_path):
  store, _ = _store(tmp_path, shard_images=2)
  feats = np.load(store / "shard-00000.features.npy")
  feats[0, 0] = np.inf
  np.save(store / "shard-00000.features.npy", feats)
  index = np.load(store / "shard-00001.index.npy")
  index[1, 1] = 10 ** 6  # more rows than the shard has
  np.save(store / "shard-00001.index.npy", index)
  st = open_source(dict(kind="region_store", path=str(store)), name="st")
  with pytest.raises(BadRecord) as e:
    st.read(0)
  assert e.value.reason == "nonfinite_features"
  st.read(1)
  st.read(2)
  with pytest.raises(BadRecord) as e:
    st.read(3)
  assert e.value.reason == "bad_feature_shape"
  # a shard whose array does not match the manifest is a one-line error naming the file
  np.save(store / "shard-00001.boxes.npy", np.zeros((3, 4), np.float64))
  with pytest.raises(ValueError, match=r"shard-00001.boxes.npy: float64"):
    open_source(dict(kind="region_store", path=str(store)), name="st").read(2)


def _region_config(root_kind, path, batch=4):
  c = pipeline.default_config()
  c.seed = 5
  c.visual_input, c.num_regions, c.region_feature_dim, c.num_region_classes = "regions", 4, F, C
  c.streams.image.update(dict(batch_size=batch, sources=[dict(name="r", kind=root_kind,
                                                                 path=str(path))]))
  return c


def _batches(cfg, n):
  it = pipeline.make_pipeline(cfg, tokenizer=fx.WhitespaceTokenizer())
  try:
    return [next(it) for _ in range(n)], it.dropped_counts()
  finally:
    it.close()


def test_model_input_equals_the_float32_path_to_float16_rounding(npz):
  """Image-stream batches from the store equal the npz batches with region features and class
  probabilities rounded to float16; every other field (boxes, classes, masks) is identical. The
  npz fixture's two bad records are skipped at conversion (the npz path drops them when read),
  so the store holds only good ones: compare against npz with the bad files removed."""
  tmp, _, _ = npz
  for k in ("k3", "k5"):
    os.remove(tmp / "npz" / f"{k}.npz")
  region_store.write_store(open_source(dict(kind="region_npz", path=str(tmp / "npz")),
                                       name="npz"), str(tmp / "store"), shard_images=4)
  ref, ref_drops = _batches(_region_config("region_npz", tmp / "npz"), 4)
  cfg = _region_config("region_store", tmp / "store")
  got, drops = _batches(cfg, 4)
  # Between the row builder and tf.data the features travel as float16 (exact: they are float16
  # values), and tf.data casts them to the schema's float32.
  st = Stream("image", pipeline.resolve_config(cfg), None, process_index=0, process_count=1)
  wire = dict(zip(st.out_spec, st.batch(0, 0)))
  assert wire["region_features"].dtype == wire["region_class_probs"].dtype == np.float16
  assert ref_drops == drops
  for a, b in zip(ref, got):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
      want = _f16(a[k]) if k.split("/")[-1] in ("region_features", "region_class_probs") else a[k]
      np.testing.assert_array_equal(b[k], want, err_msg=k)
    assert np.any(a["image/region_features"] != b["image/region_features"])  # rounding happened


def test_store_batches_identical_across_workers(npz):
  tmp, _, _ = npz
  region_store.write_store(open_source(dict(kind="region_npz", path=str(tmp / "npz")),
                                       name="npz"), str(tmp / "store"), shard_images=4)
  c = _region_config("region_store", tmp / "store")
  ref, _ = _batches(c, 3)
  c.workers = 2
  got, _ = _batches(c, 3)
  for a, b in zip(ref, got):
    for k in a:
      assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_finite_check_against_numpy(dtype):
  rng = np.random.default_rng(3)
  for bad in (None, np.nan, np.inf, -np.inf, -np.nan):
    a = rng.normal(size=(7, 5)).astype(dtype)
    a[0, 0] = np.finfo(dtype).max
    a[1, 1] = -np.finfo(dtype).max
    a[2, 2] = np.finfo(dtype).tiny / 4  # subnormal
    if bad is not None:
      a[3, 4] = bad
    assert region_store._finite(a) == bool(np.isfinite(a).all())
  assert region_store._finite(np.zeros((0, 5), dtype))
