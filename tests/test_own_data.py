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
