"""One's own data end to end: evaluation splits of every source kind, and each format's example
config trained for 2 steps and evaluated on a held-out test split (docs/own_data.md)."""
import json
import os

import numpy as np
import pytest

from data_pipelines import eval_data, pipeline
import data_fixtures as fx

TOK = fx.WhitespaceTokenizer()
S = 16


def _pairs_config(train_path, **streams):
  c = pipeline.default_config()
  c.image_size, c.patch_size = S, 4
  c.num_related_images = c.num_related_texts = 0
  c.streams.pair.update(dict(batch_size=2, max_length=14, max_predictions=2,
                             s2s_max_predictions=14, sources=[
                                 dict(name="shards", kind="webdataset", path=str(train_path))]))
  for s, srcs in streams.items():
    c.streams[s].update(dict(batch_size=2, sources=srcs))
  return c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("splits")
  rng = np.random.default_rng(0)
  train = fx.write_webdataset(root / "train-000.tar", 6, rng)
  test = fx.write_webdataset(root / "test-000.tar", 4, rng, start=100)
  return root, train, test


def test_split_names_a_held_out_file_of_a_file_source(shards):
  root, _, test = shards
  c = _pairs_config(root / "train-*.tar")
  ev = {"sources": {"test": str(root / "test-000.tar")}}
  data, meta = eval_data.load_eval_split(c, "test", tokenizer=TOK, eval_config=ev)
  assert meta["records"] == 4 and len(data["image_id"]) == 4
  assert meta["source"] == f"webdataset {root / 'test-000.tar'}"
  # The test shard's records (keys s00100..), not the training shard's.
  assert [meta["captions"][i] for i in range(4)] == [[cap] + extra for _, cap, extra in
                                                     test.values()]
  assert eval_data.default_splits(c, eval_config=ev) == ["test"]
  # Equal caption strings share a key across the split; empty slots are -1.
  keys = data["caption_key"]
  for i in range(4):
    for j in range(2):
      for i2 in range(4):
        for j2 in range(2):
          if keys[i, j] >= 0 and keys[i2, j2] >= 0:
            assert (keys[i, j] == keys[i2, j2]) == (
                meta["captions"][i][j] == meta["captions"][i2][j2])


def test_an_unknown_split_fails_in_one_line(shards):
  root, _, _ = shards
  c = _pairs_config(root / "train-*.tar")
  with pytest.raises(ValueError) as e:
    eval_data.load_eval_split(c, "valid", tokenizer=TOK,
                              eval_config={"sources": {"test": str(root / "test-000.tar")}})
  msg = str(e.value)
  assert "\n" not in msg and "'valid'" in msg and "['test']" in msg
  with pytest.raises(ValueError) as e:  # no evaluation.sources at all: say how to add one
    eval_data.load_eval_split(c, "test", tokenizer=TOK)
  assert "\n" not in str(e.value) and "evaluation.sources" in str(e.value)
  with pytest.raises(ValueError, match="no held-out split"):
    eval_data.default_splits(c)


def test_evaluating_on_a_training_source_is_refused_unless_allowed(shards):
  root, train, _ = shards
  c = _pairs_config(root / "train-*.tar")
  ev = {"sources": {"test": {"kind": "webdataset", "path": str(root / "train-000.tar")}}}
  with pytest.raises(ValueError) as e:
    eval_data.load_eval_split(c, "test", tokenizer=TOK, eval_config=ev)
  msg = str(e.value)
  assert "\n" not in msg and "training source 'shards'" in msg and "--allow-train-source" in msg
  # A training source of another stream counts too (the image stream reads the same shard).
  c2 = _pairs_config(root / "test-000.tar", image=[dict(name="imgs", kind="webdataset",
                                                        path=str(root / "train-000.tar"))])
  with pytest.raises(ValueError, match="'imgs' of stream image"):
    eval_data.load_eval_split(c2, "test", tokenizer=TOK, eval_config=ev)
  data, meta = eval_data.load_eval_split(c, "test", tokenizer=TOK,
                                         eval_config=dict(ev, allow_train_source=True))
  assert meta["records"] == len(train) == len(data["image_id"])
  data, _ = eval_data.load_eval_split(c, "test", tokenizer=TOK, eval_config=ev,
                                      allow_train_source=True)
  assert len(data["image_id"]) == len(train)


def test_a_spec_without_kind_inherits_the_training_pair_source(shards):
  root, _, _ = shards
  c = _pairs_config(root / "train-*.tar")
  spec = eval_data.split_source(c, "test", {"sources": {"test": {"path": "x.tar"}}})
  assert spec["kind"] == "webdataset" and spec["path"] == "x.tar" and spec["name"] == "eval_test"


# ---------------------------------------------------------------------------------------------
# Each format's example config, as docs/own_data.md runs it: tokenizer, 2 steps, test split
# ---------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220),
           "yellow": (230, 220, 40)}
TEMPLATES = ("a photo of a {} square", "a {} square on a grey background")


def _records(n, start):
  """n records with templated captions (equal strings across images of one colour)."""
  names = sorted(COLOURS)
  out = []
  for i in range(start, start + n):
    colour = names[i % len(names)]
    px = np.full((24, 24, 3), 128, np.uint8)
    px[6:18, 6:18] = COLOURS[colour]
    out.append(dict(key=f"{i:05d}", pixels=px, label=colour,
                    captions=[t.format(colour) for t in TEMPLATES]))
  return out


def _write_webdataset(root):
  import tarfile
  import io
  for split, recs in (("train", _records(16, 0)), ("test", _records(8, 100))):
    with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
      for r in recs:
        for name, data in ((f"{r['key']}.png", fx.image_bytes(r["pixels"])),
                           (f"{r['key']}.txt", r["captions"][0].encode()),
                           (f"{r['key']}.json", json.dumps({"captions": r["captions"],
                                                            "label": r["label"]}).encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))


def _write_coco(root, images=True, regions=None):
  (root / "images").mkdir(exist_ok=True)
  (root / "annotations").mkdir(exist_ok=True)
  for split, recs in (("train", _records(16, 0)), ("test", _records(8, 100))):
    ann = dict(images=[], annotations=[])
    for r in recs:
      name = f"{r['key']}.jpg"
      if images:
        (root / "images" / name).write_bytes(fx.image_bytes(r["pixels"], "JPEG"))
      ann["images"].append(dict(id=int(r["key"]), file_name=name, width=24, height=24))
      ann["annotations"] += [dict(id=10 * int(r["key"]) + k, image_id=int(r["key"]), caption=c)
                             for k, c in enumerate(r["captions"])]
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))


def _write_jsonl(root, images=True):
  (root / "images").mkdir(exist_ok=True)
  for split, recs in (("train", _records(16, 0)), ("test", _records(8, 100))):
    with open(root / f"{split}.jsonl", "w") as f:
      for r in recs:
        obj = dict(key=r["key"], captions=r["captions"], label=r["label"])
        if images:
          (root / "images" / f"{r['key']}.png").write_bytes(fx.image_bytes(r["pixels"]))
          obj["image"] = f"{r['key']}.png"
        f.write(json.dumps(obj) + "\n")
  with open(root / "corpus.jsonl", "w") as f:
    for colour in COLOURS:
      f.write(json.dumps({"text": f"the {colour} square is on a grey background"}) + "\n")


REGION_ARGS = "regions=4,features=8,classes=5"


def _write_regions(root, store):
  keys = [r["key"] for r in _records(16, 0) + _records(8, 100)]
  rng = np.random.default_rng(0)
  (root / "regions").mkdir(exist_ok=True)
  if store == "npz":
    _write_jsonl(root, images=False)
    fx.write_npz_regions(root / "regions", keys, rng, 8, 5)
  else:
    _write_coco(root, images=False)
    fx.write_tsv_regions(root / "regions" / "all.tsv", keys, rng, 8, 5)


def _write_tfds(root):
  import tensorflow_datasets as tfds

  class OwnDataPairsForTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(24, 24, 3), encoding_format="png"),
          "image_id": np.int64, "captions": tfds.features.Sequence(tfds.features.Text())}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(_records(16, 0)),
              "test": self._generate_examples(_records(8, 100))}

    def _generate_examples(self, recs):  # pylint: disable=arguments-differ
      for r in recs:
        yield r["key"], dict(image=r["pixels"], image_id=int(r["key"]), captions=r["captions"])

  OwnDataPairsForTest(data_dir=str(root / "tfds")).download_and_prepare()
  return f"name=own_data_pairs_for_test,data_dir={root / 'tfds'},key=image_id"


FORMATS = {
    "webdataset": (_write_webdataset, ""),
    "coco": (_write_coco, ""),
    "jsonl": (_write_jsonl, ""),
    "tfds": (_write_tfds, None),
    "regions_npz": (lambda root: _write_regions(root, "npz"), REGION_ARGS),
    "regions_tsv": (lambda root: _write_regions(root, "tsv"), REGION_ARGS),
}


def _run_format(fmt, tmp_path, capsys):
  from unimo_jax import cli
  root = tmp_path / "data"
  root.mkdir()
  write, extra = FORMATS[fmt]
  got = write(root)
  extra = got if extra is None else extra
  config = f"experiments/configs/examples/{fmt}.py:root={root},smoke" + (
      f",{extra}" if extra else "")
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), config)
  # The commands of docs/own_data.md, in order.
  assert cli.main(["unimo-jax", "tokenizer", "train", "--config", config, "--vocab-size", "200",
                   "--fit-vocab", "--out", str(root / "tokenizer" / "spm")]) == 0
  workdir = str(tmp_path / "run")
  assert cli.main(["unimo-jax", "train", "--config", config, "--workdir", workdir]) == 0
  out = capsys.readouterr().out
  assert "trained steps 0 -> 2 (done)" in out and "data: " in out
  assert cli.main(["unimo-jax", "evaluate", "--workdir", workdir, "--split", "test",
                   "--no-figures"]) == 0
  out = capsys.readouterr().out
  assert "image->text R@1" in out
  assert "\ntest: " in out and "(8 records, 8 images evaluated, dropped none)" in out
  with open(os.path.join(workdir, "results.json")) as f:
    (entry,) = json.load(f)["evaluations"]
  assert entry["split"] == "test" and entry["records"] == 8 and entry["images"] == 8
  name = entry["source"].rsplit("/", 1)[-1]  # the test files, never the training ones
  assert "test" in name and "train" not in name
  # 4 colours x 2 templates: 8 distinct caption strings are the candidates of the test split.
  assert entry["pairs"]["t2i_r@1"][1] == 8
  if fmt in ("webdataset", "jsonl"):  # records with a label: zero-shot classification too
    assert entry["pairs"]["zero_shot_acc"][1] == 8
    assert entry["metrics"]["zero_shot_chance"] == 0.25
  assert cli.main(["unimo-jax", "evaluate", "--workdir", workdir, "--split", "nope"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "'nope'" in err[0]


def test_own_webdataset_trains_and_evaluates_on_its_test_split(tmp_path, capsys):
  from unimo_jax import cli
  _run_format("webdataset", tmp_path, capsys)
  # Files named on the command line: a new split, or the training shard (refused in one line).
  workdir, root = str(tmp_path / "run"), tmp_path / "data"
  assert cli.main(["unimo-jax", "evaluate", "--workdir", workdir, "--split", "heldout",
                   "--source", f"heldout={root / 'test-*.tar'}", "--no-figures"]) == 0
  capsys.readouterr()
  assert cli.main(["unimo-jax", "evaluate", "--workdir", workdir, "--split", "again",
                   "--source", f"again={root / 'train-000000.tar'}", "--no-figures"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "reads the training source" in err[0]
  with open(os.path.join(workdir, "results.json")) as f:
    splits = {e["split"]: e for e in json.load(f)["evaluations"]}
  assert sorted(splits) == ["heldout", "test"] and splits["heldout"]["records"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["coco", "jsonl", "tfds", "regions_npz", "regions_tsv"])
def test_each_format_trains_and_evaluates_on_its_test_split(fmt, tmp_path, capsys):
  _run_format(fmt, tmp_path, capsys)


def test_labels_give_zero_shot_prompts_per_class(tmp_path):
  _write_webdataset(tmp_path)
  c = _pairs_config(tmp_path / "train-*.tar")
  c.streams.pair.max_length = 12
  templates = ("a {} square", "the colour {}")
  ev = {"sources": {"test": str(tmp_path / "test-000000.tar")},
        "zero_shot": {"templates": templates}}
  data, meta = eval_data.load_eval_split(c, "test", tokenizer=TOK, eval_config=ev)
  assert meta["class_names"] == tuple(sorted(COLOURS))
  want = [sorted(COLOURS).index(r["label"]) for r in _records(8, 100)]
  np.testing.assert_array_equal(data["label"], want)
  assert data["prompt_ids"].shape == (4, 2, 12) and data["prompt_valid"].all()
  for k, name in enumerate(meta["class_names"]):
    for t, template in enumerate(templates):
      ids = TOK.encode(template.format(name))
      np.testing.assert_array_equal(data["prompt_ids"][k, t, 1:1 + len(ids)], ids)
  # Named classes in the config fix the order (and labels outside them are -1).
  ev["zero_shot"]["classes"] = ["yellow", "red", "purple"]
  data, meta = eval_data.load_eval_split(c, "test", tokenizer=TOK, eval_config=ev)
  names = ["yellow", "red", "purple"]
  np.testing.assert_array_equal(data["label"], [names.index(r["label"]) if r["label"] in names
                                                else -1 for r in _records(8, 100)])


def test_run_summary_line_lists_drops_and_cuts_per_source():
  from unimo_jax.train import main as train_main
  metrics = {"data/dropped/shards/undecodable_image": 2.0, "data/dropped/shards/empty_text": 1.0,
             "data/dropped/corpus/non_utf8_text": 0.0, "data/dropped_total": 3.0,
             "data/truncated/pair": 5.0, "data/truncated/pair/shards": 5.0,
             "data/truncated/text/corpus": 0.0}
  assert train_main.data_counts(metrics) == (
      "  data: dropped 3 records (shards/empty_text 1, shards/undecodable_image 2); "
      "texts cut to fit: pair/shards 5")
  assert train_main.data_counts({"data/dropped_total": 0.0}) == (
      "  data: no record dropped; no text cut")


def test_a_negative_equal_to_a_caption_after_the_cut_is_left_out(tmp_path):
  # Caption and negative differ only in their last word, beyond max_length - 2 = 4 tokens.
  rng = np.random.default_rng(0)
  px = fx.image_bytes(fx.random_pixels(rng, 16, 16))
  import io
  import tarfile
  with tarfile.open(tmp_path / "t.tar", "w") as tar:
    for name, data in (("a.png", px), ("a.json", json.dumps({
        "captions": ["a red circle left of a square"],
        "hard_negatives": ["a red circle left of a triangle", "a blue circle"]}).encode())):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  c = _pairs_config(tmp_path / "train.tar")
  c.streams.pair.max_length = 6
  data, meta = eval_data.load_eval_split(
      c, "test", tokenizer=TOK, eval_config={"sources": {"test": str(tmp_path / "t.tar")}})
  np.testing.assert_array_equal(data["negative_valid"][0], [False, True])
  assert meta["negatives_equal_to_caption"] == 1 and meta["truncated"] == 2


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_example_configs_validate(fmt):
  """The full-size example configs (the smoke ones run end to end above)."""
  import importlib
  from unimo_jax.train import config as config_lib
  module = importlib.import_module(f"experiments.configs.examples.{fmt}")
  arg = "root=/data/mine" + (
      f",{REGION_ARGS}" if fmt.startswith("regions") else "")
  config = module.get_config(arg)
  config_lib.validate(config, num_devices=8, data_defaults=pipeline.default_config(),
                      check_files=False)
  assert "test" in config.evaluation.get("sources", {}) or fmt == "tfds"
  with pytest.raises(ValueError, match="root=DIR"):
    module.get_config("smoke")


def test_the_docs_show_every_example_and_only_existing_ones():
  import re
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(repo, "docs", "own_data.md")) as f:
    text = f.read()
  named = set(re.findall(r"experiments/configs/examples/(\w+)\.py", text))
  files = {n[:-3] for n in os.listdir(os.path.join(repo, "experiments", "configs", "examples"))
           if n.endswith(".py") and n not in ("__init__.py", "shared.py")}
  assert named - {"FORMAT"} == files == set(FORMATS)
  for command in re.findall(r"^unimo-jax (\w+(?: train)?) ", text, re.M):
    # `prepare` is `prepare regions` (run by tests/test_region_store.py)
    assert command in ("tokenizer train", "train", "evaluate", "prepare"), command
