"""GLUE through TFDS (``data.source = "tfds"``): the same rows as the TSV reader, GLUE's
feature names and splits, planted bad rows skipped and counted, one-line errors for an
unprepared dataset, an unknown split or a wrong layout. No network: a tiny GLUE-shaped
builder is prepared in a tmp dir, and the real ``glue/*`` builders are read through
``tfds.testing.mock_data``."""
import math

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from data_fixtures import WhitespaceTokenizer  # noqa: E402
from data_pipelines.finetune import make_data, text, tfds_text  # noqa: E402
from unimo_jax.finetune import config as config_lib  # noqa: E402

TOK = WhitespaceTokenizer()
MNLI_NAMES = ["entailment", "neutral", "contradiction"]  # TFDS glue/mnli's ClassLabel order

# (fields, rows) per config; bytes b"\xff" is not UTF-8; label -1 is GLUE's unlabelled row
EXAMPLES = {
    "sst2": dict(train=[dict(sentence="the red circle", label=1),
                        dict(sentence="a big square", label=0),
                        dict(sentence="  ", label=1),                  # empty_text
                        dict(sentence=b"r\xffd", label=0),             # not_utf8
                        dict(sentence="small shapes", label=-1),       # no_label
                        dict(sentence="left right above", label=0)]),
    "mnli": dict(train=[dict(premise="red", hypothesis="blue", label=0)],
                 validation_matched=[dict(premise="the red circle", hypothesis="a scene",
                                          label=2),
                                     dict(premise="small", hypothesis="", label=1),
                                     dict(premise="a big square", hypothesis="two shapes",
                                          label=1)],
                 validation_mismatched=[dict(premise="above", hypothesis="below", label=0)]),
    "stsb": dict(train=[dict(sentence1="red", sentence2="blue", label=3.5),
                        dict(sentence1="red", sentence2="blue", label=math.nan),  # bad_label
                        dict(sentence1="a scene", sentence2="the scene", label=-1.0),
                        dict(sentence1="two shapes", sentence2="small", label=0.25)]),
}


class TinyGlue(tfds.core.GeneratorBasedBuilder):
  """GLUE's features (names, ClassLabels, idx) on a handful of planted rows."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in EXAMPLES]

  def _info(self):
    name = self.builder_config.name
    if name == "sst2":
      feats = dict(sentence=tfds.features.Text(), label=tfds.features.ClassLabel(num_classes=2))
    elif name == "mnli":
      feats = dict(premise=tfds.features.Text(), hypothesis=tfds.features.Text(),
                   label=tfds.features.ClassLabel(names=MNLI_NAMES))
    else:
      feats = dict(sentence1=tfds.features.Text(), sentence2=tfds.features.Text(),
                   label=tf.float32)
    feats["idx"] = tf.int32
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(rows)
            for split, rows in EXAMPLES[self.builder_config.name].items()}

  def _generate_examples(self, rows):
    for k, row in enumerate(rows):
      yield k, dict(row, idx=100 + k)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  for name in EXAMPLES:
    TinyGlue(config=name, data_dir=str(d)).download_and_prepare()
  return str(d)


def _tsv(tmp_path, rows, fields):
  lines = ["\t".join(["text_a", "text_b"][:len(fields)] + ["label"])]
  for r in rows:
    lines.append("\t".join([r[f] for f in fields] + [str(r["label"])]))
  p = tmp_path / "x.tsv"
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def test_sst2_rows_equal_the_tsv_readers_and_bad_rows_are_counted(data_dir, tmp_path):
  rows, dropped, idx = tfds_text.classification_rows("tiny_glue/sst2", "train", data_dir, TOK,
                                                     max_length=8, num_labels=2)
  assert dropped == {"empty_text": 1, "not_utf8": 1, "no_label": 1}
  assert idx == [100, 101, 105]
  good = [EXAMPLES["sst2"]["train"][k] for k in (0, 1, 5)]
  want, _ = text.classification_rows(_tsv(tmp_path, good, ["sentence"]), TOK, max_length=8,
                                     num_labels=2)
  np.testing.assert_array_equal(rows["ids"], want["ids"])
  np.testing.assert_array_equal(rows["label"], want["label"])
  assert list(rows["ids"][0][:5]) == [0, *TOK.encode("the red circle"), 2]


def test_stsb_float_labels_pairs_and_unlabelled_rows(data_dir, tmp_path):
  rows, dropped, _ = tfds_text.classification_rows("tiny_glue/stsb", "train", data_dir, TOK,
                                                   max_length=10, kind="regression",
                                                   num_labels=1)
  assert dropped == {"bad_label": 1, "no_label": 1}
  assert rows["label"].dtype == np.float32
  np.testing.assert_allclose(rows["label"], [3.5, 0.25])
  good = [EXAMPLES["stsb"]["train"][k] for k in (0, 3)]
  want, _ = text.classification_rows(_tsv(tmp_path, good, ["sentence1", "sentence2"]), TOK,
                                     max_length=10, kind="regression")
  np.testing.assert_array_equal(rows["ids"], want["ids"])


def _config(**data):
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(dict(kind=data.pop("kind", "classification"),
                                          num_labels=data.pop("num_labels", 3)))
  d = dict(source="tfds", batch_size=2, eval_batch_size=2, max_length=12, seed=0,
           label_names=["contradiction", "entailment", "neutral"], train="train",
           validation="validation_matched", test="test_matched", tfds_data_dir="")
  d.update(data)
  c.data = ml_collections.ConfigDict(d)
  return c


def test_make_data_mnli_splits_and_labels_by_name(data_dir):
  cfg = _config(tfds_name="tiny_glue/mnli", tfds_data_dir=data_dir)
  data, meta = make_data(cfg, "validation", TOK, training=False)
  # TFDS's entailment 0 / neutral 1 / contradiction 2 -> the config's order by name
  assert data.dropped_counts() == {"tiny_glue/mnli:validation_matched": {"empty_text": 1}}
  b = next(data)
  np.testing.assert_array_equal(b["label"], [0, 2])
  assert meta["idx"] == [100, 102]
  # an evaluation split outside train/validation/test is read as that TFDS split
  data, _ = make_data(cfg, "validation_mismatched", TOK, training=False)
  assert next(data)["label"][0] == 1  # entailment
  # TFDS's own order when no label names are given
  data, _ = make_data(_config(tfds_name="tiny_glue/mnli", tfds_data_dir=data_dir,
                              label_names=[]), "validation", TOK, training=False)
  np.testing.assert_array_equal(next(data)["label"], [2, 1])


def test_one_line_errors(data_dir, tmp_path):
  empty = str(tmp_path / "empty")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"holds no prepared tiny_glue/sst2 .*tfds build "
                                       r"tiny_glue --config sst2 --data_dir DIR") as e:
    tfds_text.classification_rows("tiny_glue/sst2", "train", empty, TOK, max_length=8)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"tiny_glue/sst2: no split 'validation_matched'"):
    tfds_text.classification_rows("tiny_glue/sst2", "validation_matched", data_dir, TOK,
                                  max_length=8)
  with pytest.raises(ValueError, match=r"data.tfds_name 'no_such_set/x'"):
    tfds_text.classification_rows("no_such_set/x", "train", data_dir, TOK, max_length=8)
  with pytest.raises(ValueError, match=r"label names \['entailment'\] are not in "
                                       r"data.label_names"):
    tfds_text.classification_rows("tiny_glue/mnli", "train", data_dir, TOK, max_length=8,
                                  num_labels=3, label_names=("neutral", "contradiction", "x"))
  with pytest.raises(ValueError, match=r"'label' has 3 classes but task.num_labels=2"):
    tfds_text.classification_rows("tiny_glue/mnli", "train", data_dir, TOK, max_length=8)
  with pytest.raises(ValueError, match=r"'label' is not a class label"):
    tfds_text.classification_rows("tiny_glue/stsb", "train", data_dir, TOK, max_length=8)


def test_config_validation_says_how_to_prepare(tmp_path):
  from experiments.configs.finetune import sst2
  c = sst2.get_config(f"base,tfds,tfds_dir={tmp_path}")
  assert c.data.source == "tfds" and c.data.tfds_name == "glue/sst2" and c.data.train == "train"
  bpe = tmp_path / "bpe"
  bpe.mkdir()
  (bpe / "vocab.json").write_text("{}")
  (bpe / "merges.txt").write_text("")
  c.data.tokenizer = f"bpe:{bpe}"
  with pytest.raises(config_lib.ConfigError, match=r"data.tfds_name 'glue/sst2' is not prepared"
                                                   r" .*tfds build glue --config sst2"):
    config_lib.validate(c, num_devices=1, check_files=True)
  config_lib.validate(c, num_devices=1, check_files=False)
  from experiments.configs.finetune import mnli
  m = mnli.get_config("base,tfds")
  assert (m.data.validation, m.data.test) == ("validation_matched", "test_matched")
  assert list(m.evaluation.splits) == ["validation", "validation_mismatched"]
  c.data.tfds_name = ""
  with pytest.raises(config_lib.ConfigError, match="data.tfds_name is empty"):
    config_lib.validate(c, num_devices=1, check_files=False)


# ---------------------------------------------------------------------------- real glue/* builders
@pytest.mark.parametrize("config,fields", [
    ("sst2", ("sentence",)), ("cola", ("sentence",)), ("mnli", ("premise", "hypothesis")),
    ("stsb", ("sentence1", "sentence2")), ("qqp", ("question1", "question2")),
    ("qnli", ("question", "sentence")), ("mrpc", ("sentence1", "sentence2")),
    ("rte", ("sentence1", "sentence2"))])
def test_real_glue_feature_names(config, fields):
  info = tfds.builder(f"glue/{config}").info
  assert tfds_text.text_fields(f"glue/{config}", info.features) == fields


def test_real_glue_mnli_through_mock_data():
  seen = []

  def as_dataset(self, split, **kwargs):
    del kwargs
    seen.append(str(split))
    rows = [dict(premise=b"the red circle", hypothesis=b"a scene", label=2, idx=7),
            dict(premise=b"red", hypothesis=b"blue", label=0, idx=8),
            dict(premise=b"red", hypothesis=b"blue", label=-1, idx=9)]
    return tf.data.Dataset.from_tensor_slices(
        {k: [r[k] for r in rows] for k in rows[0]})
  cfg = _config(tfds_name="glue/mnli")
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    data, meta = make_data(cfg, "validation", TOK, training=False)
  assert seen == ["validation_matched"]
  np.testing.assert_array_equal(next(data)["label"], [0, 1])  # contradiction, entailment
  assert meta["idx"] == [7, 8]
  assert data.dropped_counts() == {"glue/mnli:validation_matched": {"no_label": 1}}


@pytest.mark.slow
def test_tfds_glue_finetunes_and_evaluates(data_dir, tmp_path):
  import jax
  from test_finetune_run import finetune_and_evaluate, tiny_config
  cfg = tiny_config(tmp_path, steps=2)
  cfg.data.update(dict(source="tfds", tfds_name="tiny_glue/sst2", tfds_data_dir=data_dir,
                       train="train", validation="train", test=""))
  config_lib.validate(cfg, num_devices=jax.device_count(), check_files=False)
  wd = str(tmp_path / "wd")
  res, e = finetune_and_evaluate(cfg, wd, tokenizer=TOK)
  assert np.isfinite(res.last_metrics["loss"])
  assert e["metrics"]["count"] == 3 and 0.0 <= e["metrics"]["accuracy"] <= 1.0
  assert e["dropped"] == {"tiny_glue/sst2:train": {"empty_text": 1, "not_utf8": 1,
                                                    "no_label": 1}}
