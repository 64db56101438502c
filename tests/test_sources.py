"""Every source kind on a fixture written here: records as written, bad ones flagged by reason."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import images
from data_pipelines.sources import BadRecord, open_source
from data_pipelines.sources.base import load_neighbours
import data_fixtures as fx


def _read_all(src):
  """{key: record} of good records and [reason] of bad ones."""
  good, bad = {}, []
  for i in range(len(src)):
    try:
      rec = src.read(i)
      good[rec["key"]] = rec
    except BadRecord as e:
      bad.append(e.reason)
  return good, bad


def test_text_lines_and_planted_bad_lines(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "c.txt"
  lines = fx.write_corpus(path, 7, rng, empty_lines=2, blank_lines=1, non_utf8=2)
  src = open_source(dict(kind="text", path=str(path)), name="corpus")
  assert src.index_drops == {"empty_text": 2}  # empty lines never enter the index
  good, bad = _read_all(src)
  assert [r["text"] for r in good.values()] == lines
  assert sorted(bad) == ["empty_text", "non_utf8_text", "non_utf8_text"]


def test_text_glob_over_files_and_crlf(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"one two\r\nthree\r\n")
  (tmp_path / "b.txt").write_bytes(b"four five")  # no final newline
  src = open_source(dict(kind="text", path=str(tmp_path / "*.txt")), name="t")
  assert [src.read(i)["text"] for i in range(len(src))] == ["one two", "three", "four five"]


def test_jsonl_pairs_and_bad_lines(tmp_path):
  rng = np.random.default_rng(1)
  table = fx.write_pairs_jsonl(tmp_path / "p.jsonl", tmp_path / "img", 5, rng, bad_json=1,
                               missing_image=1, empty_caption=1)
  src = open_source(dict(kind="jsonl", path=str(tmp_path / "p.jsonl"),
                         image_dir=str(tmp_path / "img")), name="pairs")
  good, bad = _read_all(src)
  assert sorted(bad) == ["bad_json", "missing_field"]
  assert good["e0"]["captions"] == []  # empty captions are skipped; the stream rejects it
  for key, caps in table.items():
    assert good[key]["captions"] == caps
    assert len(good[key]["hard_negatives"]) == 2
    assert images.inspect_image(good[key]["image"])[:3] == ("png", 28, 20)


def test_jsonl_field_map_for_a_text_corpus(tmp_path):
  (tmp_path / "t.jsonl").write_text('{"body": "red circle", "id": 7}\n{"body": 3}\n')
  src = open_source(dict(kind="jsonl", path=str(tmp_path / "t.jsonl"),
                         field_map={"text": "body"}), name="docs")
  assert src.read(0)["text"] == "red circle" and src.read(0)["key"] == "7"
  assert src.read(1)["text"] == "3"


def test_webdataset_groups_members_and_drops_truncated_member(tmp_path):
  rng = np.random.default_rng(2)
  t1 = fx.write_webdataset(tmp_path / "a-000.tar", 4, rng, bad_image=1)
  t2 = fx.write_webdataset(tmp_path / "a-001.tar", 3, rng, start=4, truncate_last=True)
  src = open_source(dict(kind="webdataset", path=str(tmp_path / "a-*.tar")), name="wds")
  assert src.index_drops == {"truncated_member": 1}
  assert len(src) == 4 + 1 + 2  # the bad-image record is complete as a tar member
  good, bad = _read_all(src)
  assert not bad
  for key, (jpg, cap, extra) in {**t1, **t2}.items():
    assert good[key]["captions"] == [cap] + extra
    assert good[key]["image"] == jpg
  assert images.inspect_image(good["bad0"]["image"])[3] == "undecodable_image"


def test_coco_captions_grouped_per_image(tmp_path):
  rng = np.random.default_rng(3)
  table = fx.write_coco(tmp_path / "captions.json", tmp_path / "imgs", 4, rng, uncaptioned=1)
  src = open_source(dict(kind="coco", path=str(tmp_path / "captions.json"),
                         image_dir=str(tmp_path / "imgs")), name="coco")
  assert len(src) == 4 and src.index_drops == {"missing_field": 1}
  good, _ = _read_all(src)
  for stem, (image_id, caps) in table.items():
    assert good[stem]["captions"] == caps
    assert str(image_id) in good[stem]["keys"]
    assert images.inspect_image(good[stem]["image"])[:3] == ("jpeg", 40, 30)


def test_image_folder(tmp_path):
  rng = np.random.default_rng(4)
  table = fx.write_images(tmp_path / "imgs" / "sub", 3, rng)
  (tmp_path / "imgs" / "notes.txt").write_text("not an image")
  src = open_source(dict(kind="image_folder", path=str(tmp_path / "imgs")), name="folder")
  assert [src.key(i) for i in range(len(src))] == sorted(table)
  assert src.find("0001") == 1 and src.find("nope") is None


def test_npz_regions_and_bad_features(tmp_path):
  rng = np.random.default_rng(5)
  table = fx.write_npz_regions(tmp_path / "r", ["a", "b", "c", "d"], rng, 8, 5, nan=("c",),
                               wrong_shape=("d",))
  src = open_source(dict(kind="region_npz", path=str(tmp_path / "r")), name="npz")
  good, bad = _read_all(src)
  assert sorted(bad) == ["bad_feature_shape", "nonfinite_features"]
  for k in ("a", "b"):
    r = good[k]["regions"]
    np.testing.assert_array_equal(r["boxes"], table[k]["boxes"])
    np.testing.assert_array_equal(r["features"], table[k]["features"])
    np.testing.assert_array_equal(r["class_probs"], table[k]["class_probs"])
    assert (r["width"], r["height"]) == (40, 30)
  (tmp_path / "r" / "e.npz").write_bytes(b"PK\x03\x04 broken zip")
  assert _read_all(open_source(dict(kind="region_npz", path=str(tmp_path / "r")),
                               name="npz"))[1].count("bad_feature_shape") == 2


def test_official_tsv_base64_regions(tmp_path):
  rng = np.random.default_rng(6)
  table = fx.write_tsv_regions(tmp_path / "f.tsv", ["100", "200", "300", "400"], rng, 16, 7,
                               nan=("300",), wrong_shape=("400",))
  with open(tmp_path / "f.tsv", "a") as f:
    f.write("only\tthree\tcolumns\n")
  src = open_source(dict(kind="region_tsv", path=str(tmp_path / "f.tsv")), name="tsv")
  good, bad = _read_all(src)
  assert sorted(bad) == ["bad_feature_shape", "bad_feature_shape", "nonfinite_features"]
  for k in ("100", "200"):
    r = good[k]["regions"]
    for f in ("boxes", "features", "class_probs"):
      np.testing.assert_array_equal(r[f], table[k][f])
  assert src.find("200") == 1


def test_region_join_by_key(tmp_path):
  rng = np.random.default_rng(7)
  table = fx.write_coco(tmp_path / "c.json", tmp_path / "imgs", 3, rng, uncaptioned=0)
  stems = sorted(table)
  regions = fx.write_tsv_regions(tmp_path / "f.tsv", stems[:2], rng, 4, 3)
  src = open_source(dict(kind="coco", path=str(tmp_path / "c.json"),
                         image_dir=str(tmp_path / "imgs"),
                         regions=dict(kind="region_tsv", path=str(tmp_path / "f.tsv"))),
                    name="coco+tsv")
  assert "regions" in src.fields
  good, bad = _read_all(src)
  assert bad == ["missing_regions"]
  np.testing.assert_array_equal(good[stems[0]]["regions"]["features"],
                                regions[stems[0]]["features"])


class TinyPairsForTest(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset with an encoded Image feature, captions and regions."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(12, 16, 3)),
        "image_id": np.int64,
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "regions": {"boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                    "features": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
                    "classes": tfds.features.Tensor(shape=(None,), dtype=np.int64)},
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((12, 16, 3), 10 * i, np.uint8), "image_id": 500 + i,
                "captions": [f"red circle {i}", "blue square"],
                "regions": {"boxes": np.tile([[1, 1, 5, 5]], (i % 3, 1)).astype(np.float32),
                            "features": np.full((i % 3, 3), i, np.float32),
                            "classes": np.arange(i % 3)}}


def test_tfds_source_reads_records_by_index(tmp_path):
  TinyPairsForTest(data_dir=str(tmp_path)).download_and_prepare()
  src = open_source(dict(kind="tfds", tfds_name="tiny_pairs_for_test", split="train",
                         data_dir=str(tmp_path)), name="tfds")
  assert len(src) == 6
  assert {"image", "captions", "regions"} <= src.fields
  good, bad = _read_all(src)
  assert not bad
  for i in range(6):
    rec = good[str(500 + i)]
    assert rec["captions"] == [f"red circle {i}", "blue square"]
    assert images.inspect_image(rec["image"])[:3] == ("png", 16, 12)
    np.testing.assert_array_equal(rec["regions"]["features"], np.full((i % 3, 3), i))
  sub = open_source(dict(kind="tfds", tfds_name="tiny_pairs_for_test", split="train[2:4]",
                         data_dir=str(tmp_path)), name="slice")
  assert [sub.read(i)["key"] for i in range(len(sub))] == [src.read(i)["key"] for i in (2, 3)]


def test_neighbours_file(tmp_path):
  p = tmp_path / "nb.jsonl"
  p.write_text('{"key": "a", "images": ["b"], "texts": ["red", " "]}\nnot json\n{"images": []}\n')
  assert load_neighbours(str(p)) == {"a": (["b"], ["red"])}


def test_unknown_kind_and_missing_path_are_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown kind"):
    open_source(dict(kind="parquet", path="x"), name="x")
  with pytest.raises(ValueError, match="needs 'path'"):
    open_source(dict(kind="text"), name="x")
  with pytest.raises(ValueError, match="no files"):
    open_source(dict(kind="text", path=str(tmp_path / "none*.txt")), name="x")


def _tar(path, members):
  import io
  import tarfile
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_caption_merge_removes_repeats_and_keeps_json_captions(tmp_path):
  import json
  rng = np.random.default_rng(5)
  jpg = fx.image_bytes(fx.random_pixels(rng, 8, 8), "JPEG")
  _tar(tmp_path / "m.tar", [
      ("a.jpg", jpg), ("a.txt", b"a cat"),
      ("a.json", json.dumps({"captions": ["a cat", "a dog", "a dog"]}).encode()),
      # an empty .txt beside a .json with captions: the record keeps the .json's captions
      ("b.jpg", jpg), ("b.txt", b"  \n"),
      ("b.json", json.dumps({"captions": ["one", "two", "three", "four", "five"]}).encode()),
      # an empty .txt alone: a pair stream has no caption, an image stream needs none
      ("c.jpg", jpg), ("c.txt", b""),
      ("d.jpg", jpg), ("d.txt", b"\xff\xfe"), ("d.cls", b"3"),
  ])
  spec = dict(kind="webdataset", path=str(tmp_path / "m.tar"))
  pairs = open_source(spec, name="p")
  pairs.restrict({"image", "captions", "paraphrases", "hard_negatives"})
  good, bad = _read_all(pairs)
  assert good["a"]["captions"] == ["a cat", "a dog"]
  assert good["b"]["captions"] == ["one", "two", "three", "four", "five"]
  assert sorted(bad) == ["empty_text", "non_utf8_text"]
  image_only = open_source(spec, name="i")
  image_only.restrict({"image"})
  good, bad = _read_all(image_only)
  assert sorted(good) == ["a", "b", "c", "d"] and not bad
  assert all(set(r) == {"key", "keys", "image"} for r in good.values())
  labelled = open_source(spec, name="l")
  labelled.restrict({"image", "label"})
  assert labelled.read(3)["label"] == "3"


def test_jsonl_empty_text_drops_only_text_rows_and_captions_are_unique(tmp_path):
  import json
  (tmp_path / "p.jsonl").write_text(json.dumps(
      {"key": "k", "text": " ", "captions": ["x y", "x y", "z"], "label": "cat"}) + "\n")
  spec = dict(kind="jsonl", path=str(tmp_path / "p.jsonl"))
  pairs = open_source(spec, name="p")
  pairs.restrict({"captions"})
  rec = pairs.read(0)
  assert rec["captions"] == ["x y", "z"] and rec["label"] == "cat" and "text" not in rec
  text = open_source(spec, name="t")
  text.restrict({"text"})
  with pytest.raises(BadRecord, match="empty_text"):
    text.read(0)
