"""Seq2seq through TFDS (``data.source = "tfds"``, ``tfds_seq2seq``): the real ``cnn_dailymail``
and ``gigaword`` builders read a tiny dataset prepared in a tmp data_dir (no network: a
subclass of each builder, with its own features, name and version, generates the planted
rows), checked against the generated examples and against the TSV reader on the same pairs;
bad rows skipped and counted, exact resume, one-line errors (unprepared dataset, wrong key,
non-text key, unknown dataset), the recipes' ``tfds`` arg, and (slow) ``finetune`` +
``evaluate`` writing ROUGE into results.json."""
import json
import os

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from data_fixtures import WORDS, WhitespaceTokenizer  # noqa: E402
from data_pipelines.finetune import make_data, text, tfds_seq2seq  # noqa: E402
from unimo_jax.finetune import config as config_lib  # noqa: E402

TOK = WhitespaceTokenizer()


def _good(seed, n):
  """n (source, target) pairs of WORDS; the target is the source's first three words."""
  r = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    src = " ".join(r.choice(WORDS, int(r.integers(4, 9))))
    out.append((src, " ".join(src.split()[:3])))
  return out


# (source, target) per split; None marks the pair a planted bad row stands for
CNN_TRAIN = [("the red circle\nis above the square .", "red circle .\nabove square ."),
             ("", "a circle"),                     # empty_text (source)
             (b"r\xffd circle", "red"),            # not_utf8 (source)
             ("a big square", b"\xfe"),            # not_utf8 (target)
             ("left right", "  \n "),              # empty_text (target: only white space)
             *_good(0, 15)]
CNN_TRAIN_KEPT = [("the red circle is above the square .", "red circle . above square ."),
                  *_good(0, 15)]
CNN_VALIDATION = _good(1, 6) + [("  ", "blue")]    # empty_text
GIGA_VALIDATION = [("small green triangle", "triangle"), ("", ""), *_good(2, 3)]


def _builder(real_name, rows_of, extra):
  """A subclass of the real TFDS builder that generates ``rows_of[split]`` (TFDS writes them
  under data_dir/<real_name>/<version> with the real features)."""
  cls = type(tfds.builder(real_name))
  keys = config_lib.SEQ2SEQ_TFDS_KEYS[real_name]

  class Tiny(cls, skip_registration=True):
    name = real_name

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate(rows) for split, rows in rows_of.items()}

    def _generate(self, rows):
      for k, (s, t) in enumerate(rows):
        yield k, dict({keys[0]: s, keys[1]: t}, **extra(k))
  return Tiny


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  _builder("cnn_dailymail", dict(train=CNN_TRAIN, validation=CNN_VALIDATION),
           lambda k: dict(id=f"{k:04x}", publisher="cnn"))(data_dir=d).download_and_prepare()
  _builder("gigaword", dict(validation=GIGA_VALIDATION, train=_good(3, 8)),
           lambda k: {})(data_dir=d).download_and_prepare()
  return d


def _tsv(tmp_path, pairs):
  p = tmp_path / "pairs.tsv"
  p.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs))
  return str(p)


def test_cnn_dailymail_rows_are_the_generated_pairs_and_bad_rows_are_counted(data_dir, tmp_path):
  rows, dropped, sources, targets = tfds_seq2seq.seq2seq_rows(
      "cnn_dailymail", "train", data_dir, TOK, max_source=8, max_target=6)
  assert dropped == {"empty_text": 2, "not_utf8": 2}
  # TFDS keeps its own (hashed) order: the same pairs, line breaks as single spaces
  assert sorted(zip(sources, targets)) == sorted(CNN_TRAIN_KEPT)
  assert len(sources) == rows["ids"].shape[0] == 16
  # each row by hand: source block [CLS] s.. [SEP] (truncated to 8), target [CLS] t.. [MASK]
  for k, (s, t) in enumerate(zip(sources, targets)):
    src = list(TOK.encode(s))[:6]
    want = [TOK.cls_id, *src, TOK.sep_id] + [TOK.pad_id] * (6 - len(src))
    np.testing.assert_array_equal(rows["source_ids"][k], want)
    tgt = list(TOK.encode(t))[:4]
    assert list(rows["targets"][k][:len(tgt) + 1]) == [*tgt, TOK.mask_id]
  # the TSV reader on the same pairs in the same order gives the same rows
  want, tsv_dropped, tsv_sources, _ = text.seq2seq_rows(_tsv(tmp_path, zip(sources, targets)),
                                                        TOK, max_source=8, max_target=6)
  assert tsv_dropped == {} and tsv_sources == sources
  assert sorted(want) == sorted(rows)
  for k in want:
    np.testing.assert_array_equal(rows[k], want[k])


def test_make_data_gigaword_default_keys_and_exact_resume(data_dir):
  cfg = _config(tfds_name="gigaword", tfds_data_dir=data_dir)
  data, meta = make_data(cfg, "validation", TOK, training=False)
  assert data.dropped_counts() == {"gigaword:validation": {"empty_text": 1}}
  kept = [p for p in GIGA_VALIDATION if p[0]]
  assert sorted(zip(meta["sources"], meta["targets"])) == sorted(kept)
  batches = list(data)
  assert sum(int(b["row_valid"].sum()) for b in batches) == 4
  # training: stop after 3 batches, resume in a freshly read dataset, same batches follow
  cfg = _config(tfds_name="cnn_dailymail", tfds_data_dir=data_dir, batch_size=4)
  a, _ = make_data(cfg, "train", TOK, training=True)
  for _ in range(3):
    next(a)
  b, _ = make_data(cfg, "train", TOK, training=True)
  b.set_state(a.get_state())
  for _ in range(6):  # past the end of the first epoch (16 rows = 4 batches)
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_one_line_errors(data_dir, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"holds no prepared cnn_dailymail .*`tfds build "
                                       r"cnn_dailymail --data_dir DIR`") as e:
    tfds_seq2seq.seq2seq_rows("cnn_dailymail", "train", str(tmp_path / "empty"), TOK,
                              max_source=8, max_target=6)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"^TFDS cnn_dailymail:validation has no feature "
                                       r"'summary' \(data.target_key\); its features: "
                                       r"article, highlights, id, publisher$"):
    tfds_seq2seq.seq2seq_rows("cnn_dailymail", "validation", data_dir, TOK, max_source=8,
                              max_target=6, target_key="summary")
  with pytest.raises(ValueError, match=r"cnn_dailymail: no split 'dev'"):
    tfds_seq2seq.seq2seq_rows("cnn_dailymail", "dev", data_dir, TOK, max_source=8,
                              max_target=6)
  with pytest.raises(ValueError, match=r"^data.source_key is empty and TFDS 'my_summaries' is "
                                       r"not a known seq2seq dataset \(aeslc, .*\): name its "
                                       r"source text feature$"):
    tfds_seq2seq.seq2seq_rows("my_summaries", "train", data_dir, TOK, max_source=8,
                              max_target=6)
  with pytest.raises(ValueError, match="data.target_key is empty"):
    config_lib.seq2seq_tfds_keys("my_summaries", "body", "")
  with pytest.raises(ValueError, match="both 'article'"):
    config_lib.seq2seq_tfds_keys("cnn_dailymail", "", "article")
  # a key naming a number, not a text (reddit_tifu's features, from the real builder)
  features = tfds.builder("reddit_tifu").info.features
  with pytest.raises(ValueError, match=r"^TFDS reddit_tifu:train: feature 'ups' "
                                       r"\(data.source_key\) is not text"):
    tfds_seq2seq.check_keys("reddit_tifu", "train", features, ("ups", "tldr"))


@pytest.mark.parametrize("name", sorted(config_lib.SEQ2SEQ_TFDS_KEYS))
def test_known_keys_are_the_real_builders_text_features(name):
  info = tfds.builder(name).info
  tfds_seq2seq.check_keys(name, "train", info.features, config_lib.SEQ2SEQ_TFDS_KEYS[name])


def test_one_line_text():
  assert tfds_seq2seq.one_line("a .\n b .\r\n\n c\td  e") == "a . b . c d  e"


def _config(**data):
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(dict(kind="seq2seq", num_labels=2))
  d = dict(source="tfds", batch_size=2, eval_batch_size=2, max_source=8, max_target=6, seed=0,
           train="train", validation="validation", test="test", tfds_data_dir="",
           source_key="", target_key="")
  d.update(data)
  c.data = ml_collections.ConfigDict(d)
  return c


def test_recipes_tfds_arg_and_config_validation(data_dir, tmp_path):
  from experiments.configs.finetune import cnndm, gigaword, squad_qg
  c = cnndm.get_config(f"base,tfds,tfds_dir={tmp_path}")
  assert (c.data.source, c.data.tfds_name, c.data.tfds_data_dir) == ("tfds", "cnn_dailymail",
                                                                     str(tmp_path))
  assert (c.data.train, c.data.validation, c.data.test) == ("train", "validation", "test")
  assert cnndm.get_config("base").data.source == "tsv"  # TSV stays the default
  assert gigaword.get_config("base,tfds").data.tfds_name == "gigaword"
  with pytest.raises(ValueError, match="squad_qg has no TFDS dataset"):
    squad_qg.get_config("base,tfds")
  bpe = tmp_path / "bpe"
  bpe.mkdir()
  (bpe / "vocab.json").write_text("{}")
  (bpe / "merges.txt").write_text("")
  c.data.tokenizer = f"bpe:{bpe}"
  with pytest.raises(config_lib.ConfigError, match=r"data.tfds_name 'cnn_dailymail' is not "
                                                   r"prepared .*tfds build cnn_dailymail "
                                                   r"--data_dir DIR"):
    config_lib.validate(c, num_devices=1, check_files=True)
  c.data.tfds_data_dir = data_dir
  config_lib.validate(c, num_devices=1, check_files=True)
  c.data.tfds_name = "my_summaries"
  with pytest.raises(config_lib.ConfigError, match=r"data.source_key is empty and TFDS "
                                                   r"'my_summaries' is not a known"):
    config_lib.validate(c, num_devices=1, check_files=False)
  c.data.update(dict(source_key="body", target_key="title"))
  config_lib.validate(c, num_devices=1, check_files=False)
  t = cnndm.get_config("base")
  t.data.source_key = "article"
  with pytest.raises(config_lib.ConfigError, match=r"data.source_key='article' names a TFDS "
                                                   r"feature: it is read by seq2seq with "
                                                   r"data.source 'tfds' only"):
    config_lib.validate(t, num_devices=1, check_files=False)


@pytest.mark.slow
def test_cnndm_recipe_finetunes_and_evaluates_rouge_through_the_cli(data_dir, tmp_path, capsys):
  """``unimo-jax finetune --config cnndm.py:demo,smoke,tfds,tfds_dir=D`` (2 steps) then
  ``unimo-jax evaluate``: ROUGE / BLEU-4 of the validation split in results.json."""
  from data_pipelines import tokenizers
  from unimo_jax import cli
  words = [" ".join(WORDS), "the red circle is above the square ."]
  spm = tokenizers.train_sentencepiece(words * 4, str(tmp_path / "tok" / "spm"), vocab_size=64,
                                       model_type="word", fit_vocab=True)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = os.path.join(root, "experiments/configs/finetune/cnndm.py")
  wd = str(tmp_path / "wd")
  assert cli.main(["unimo-jax", "finetune", "--config",
                   f"{config}:demo,smoke,tfds,tfds_dir={data_dir}", "--workdir", wd,
                   f"--config.data.tokenizer=sentencepiece:{spm}",
                   "--config.data.max_source=16", "--config.data.max_target=8",
                   "--config.train.progress_bar=off"]) == 0
  out = capsys.readouterr().out
  assert "trained steps 0 -> 2 (done)" in out
  assert cli.main(["unimo-jax", "evaluate", "--workdir", wd, "--no-figures"]) == 0
  with open(os.path.join(wd, "results.json")) as f:
    entry = json.load(f)["evaluations"][-1]
  assert entry["split"] == "validation"
  m = entry["metrics"]
  assert m["count"] == 6
  for k in ("rouge1", "rouge2", "rougeL", "bleu4"):
    assert 0.0 <= m[k] <= 1.0
  assert entry["dropped"] == {"cnn_dailymail:validation": {"empty_text": 1}}
