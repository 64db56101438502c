"""Fine-tuning readers: planted bad rows are skipped and counted, a wrong layout is one clear
error, batches resume exactly and are the same global batches for any process count."""
import ml_collections
import numpy as np
import pytest

from data_fixtures import WhitespaceTokenizer
from data_pipelines.finetune import RowBatches, make_data, scenes, text

TOK = WhitespaceTokenizer()


def _write(tmp_path, name, content: bytes):
  p = tmp_path / name
  p.write_bytes(content)
  return str(p)


# ---------------------------------------------------------------------------- batches
def _rows(n=10):
  return dict(x=np.arange(n, dtype=np.int32), y=np.arange(n, dtype=np.float32)[:, None] * 2)


def test_batches_resume_exactly():
  a = RowBatches(_rows(), 4, seed=3)
  for _ in range(4):
    next(a)
  state = a.get_state()
  want = [next(a) for _ in range(5)]
  b = RowBatches(_rows(), 4, seed=3)
  b.set_state(state)
  got = [next(b) for _ in range(5)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  # every row once per epoch (10 rows, batches of 4: slots 0..9 are epoch 0)
  c = RowBatches(_rows(), 5, seed=3)
  seen = np.concatenate([next(c)["x"] for _ in range(2)])
  assert sorted(seen) == list(range(10))


def test_batches_same_global_batch_for_two_processes():
  one = RowBatches(_rows(), 4, seed=1)
  p0 = RowBatches(_rows(), 4, seed=1, process_index=0, process_count=2)
  p1 = RowBatches(_rows(), 4, seed=1, process_index=1, process_count=2)
  for _ in range(6):
    np.testing.assert_array_equal(next(one)["x"], np.concatenate([next(p0)["x"], next(p1)["x"]]))
  assert p0.spec["x"][0] == (2,)


def test_eval_batches_pad_the_last_batch_and_stop():
  it = RowBatches(_rows(), 4, repeat=False, shuffle=False)
  batches = list(it)
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[0]["x"], [0, 1, 2, 3])
  np.testing.assert_array_equal(batches[2]["row_valid"], [True, True, False, False])


def test_state_of_other_data_is_refused():
  a = RowBatches(_rows(), 4, seed=1)
  b = RowBatches(_rows(12), 4, seed=1)
  with pytest.raises(ValueError, match="other data"):
    b.set_state(a.get_state())
  with pytest.raises(ValueError, match="no valid examples"):
    RowBatches({"x": np.zeros((0,))}, 4)


# ---------------------------------------------------------------------------- TSV
GOOD = "text_a\ttext_b\tlabel\nthe red circle\ta big square\t1\nsmall shapes\tthe scene\t0\n"


def test_classification_tsv_skips_and_counts_planted_bad_rows(tmp_path):
  bad = (GOOD.encode() + b"only two\tfields\n"          # wrong_field_count
         + b"\tthe scene\t1\n"                            # empty_text
         + b"red\tblue\tseven\n"                          # bad_label
         + b"red\tblue\t5\n"                              # bad_label (out of range)
         + b"r\xffd\tblue\t1\n"                           # not_utf8
         + b"left right\tabove\t0\r\n")                   # good (CRLF)
  path = _write(tmp_path, "train.tsv", bad)
  rows, dropped = text.classification_rows(path, TOK, max_length=10, num_labels=2)
  assert dropped == {"wrong_field_count": 1, "empty_text": 1, "bad_label": 2, "not_utf8": 1}
  np.testing.assert_array_equal(rows["label"], [1, 0, 0])
  a, b = list(TOK.encode("the red circle")), list(TOK.encode("a big square"))
  assert list(rows["ids"][0]) == [0] + a + [2] + b + [2, 1]
  assert rows["ids"].shape == (3, 10)


def test_classification_label_names_and_regression(tmp_path):
  path = _write(tmp_path, "t.tsv", b"label\ttext_a\nneutral\tred\nentailment\tblue\nfoo\tx\n")
  rows, dropped = text.classification_rows(path, TOK, max_length=6, num_labels=3,
                                           label_names=("contradiction", "entailment",
                                                        "neutral"))
  np.testing.assert_array_equal(rows["label"], [2, 1])
  assert dropped == {"bad_label": 1}
  path = _write(tmp_path, "s.tsv", b"text_a\ttext_b\tlabel\nred\tblue\t3.5\nred\tblue\tnan\n")
  rows, dropped = text.classification_rows(path, TOK, max_length=6, kind="regression")
  np.testing.assert_allclose(rows["label"], [3.5])
  assert rows["label"].dtype == np.float32 and dropped == {"bad_label": 1}


def test_wrong_layout_is_one_clear_error(tmp_path):
  path = _write(tmp_path, "x.tsv", b"sentence\tlabel\nred\t1\n")
  with pytest.raises(ValueError, match=r"x.tsv: header has no 'text_a' column"):
    text.classification_rows(path, TOK, max_length=6)
  path = _write(tmp_path, "y.tsv", b"source\tsummary\nred\tblue\n")
  with pytest.raises(ValueError, match=r"y.tsv: header has no 'target' column"):
    text.seq2seq_rows(path, TOK, max_source=6, max_target=6)
  with pytest.raises(FileNotFoundError, match="nope.tsv"):
    text.classification_rows(str(tmp_path / "nope.tsv"), TOK, max_length=6)


def test_seq2seq_tsv(tmp_path):
  path = _write(tmp_path, "s.tsv", b"src\ttgt\nthe red circle\ta circle\n\tx\nred\tblue\textra\n")
  rows, dropped, sources, targets = text.seq2seq_rows(path, TOK, max_source=6, max_target=5)
  assert dropped == {"empty_text": 1, "wrong_field_count": 1}
  assert sources == ["the red circle"] and targets == ["a circle"]
  assert rows["ids"].shape == (1, 11)
  assert rows["source_ids"][0, 0] == 0 and rows["targets"][0, 2] == TOK.mask_id


def _config(**data):
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(dict(kind=data.pop("kind"), num_labels=data.pop(
      "num_labels", 2)))
  d = dict(source="synthetic_scenes", batch_size=4, eval_batch_size=4, max_length=24, seed=0,
           label_names=[], answers=[], num_negative_images=2, num_negative_texts=3,
           visual_input="patches", pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3, num_regions=4,
           region_feature_dim=64, max_source=8, max_target=8,
           scenes=dict(size="tiny", image_size=64, input_size=32, seed=0, train_limit=6,
                       eval_limit=4))
  d.update(data)
  c.data = ml_collections.ConfigDict(d)
  return c


def test_make_data_tsv_counts_drops_by_file(tmp_path):
  path = _write(tmp_path, "train.tsv", GOOD.encode() + b"bad\n")
  data, _ = make_data(_config(kind="classification", source="tsv", train=path), "train", TOK,
                      training=True)
  assert data.dropped_counts() == {path: {"wrong_field_count": 1}}
  batch = next(data)
  assert batch["ids"].shape == (4, 24) and batch["row_valid"].all()
  with pytest.raises(ValueError, match="data.validation is empty"):
    make_data(_config(kind="classification", source="tsv", train=path), "validation", TOK,
              training=False)


# ---------------------------------------------------------------------------- synthetic scenes
@pytest.fixture(scope="module")
def train_scenes():
  return scenes.Scenes("train", size="tiny", limit=6, input_size=32)


def test_scenes_vqa_rows(train_scenes):
  answers = scenes.answer_vocabulary(train_scenes)
  rows, dropped, meta = scenes.vqa_rows(train_scenes, TOK, answers, 24)
  n = sum(len(q) for q in train_scenes.qa)
  assert rows["ids"].shape == (n, 24) and rows["answer_scores"].shape == (n, len(answers))
  # one exact answer per question: score 1 at its answer, 0 elsewhere
  np.testing.assert_array_equal(rows["answer_scores"].sum(1), np.ones(n))
  first = answers.index(train_scenes.qa[0][0][1])
  assert rows["answer_scores"][0, first] == 1.0 and meta["gold"][0] == [answers[first]] * 3
  assert train_scenes.visual["pixels"].shape == (6, 32, 32, 3)
  assert -1.0 <= train_scenes.visual["pixels"].min() and train_scenes.visual["pixels"].max() <= 1.0


def test_scenes_entailment_three_labels_in_snli_ve_order(train_scenes):
  from data_pipelines.synthetic_scenes import captions as captions_lib
  from data_pipelines.synthetic_scenes import generate
  assert scenes.ENTAILMENT_LABELS == ("entailment", "neutral", "contradiction")
  texts, dropped = scenes.entailment_texts(train_scenes)
  assert len(texts) == 3 * train_scenes.count and not dropped
  clause = ", and every shape is made of "
  with_clause = {0: 0, 1: 0, 2: 0}
  for k, (i, text, label) in enumerate(texts):
    assert (i, label) == (k // 3, k % 3)
    # the reference: parse the caption part back and check it against the scene graph
    body, has_clause, material = text.partition(clause)
    if has_clause:
      assert material.rstrip(".") in scenes.MATERIALS
      body += "."
    with_clause[label] += bool(has_clause)
    claim, _ = captions_lib.parse(body)
    truth = captions_lib.holds(claim, generate.scene_for(train_scenes.options, "train", i)[0])
    assert truth == (label != 2), text
    assert bool(has_clause) == (label == 1) or label == 2
  # the clause alone does not tell neutral from contradiction
  assert with_clause[1] == train_scenes.count and 0 < with_clause[2] < train_scenes.count
  rows, _ = scenes.entailment_rows(train_scenes, TOK, 24)
  np.testing.assert_array_equal(rows["label"][:3], [0, 1, 2])
  np.testing.assert_array_equal(rows["image_index"][:3], [0, 0, 0])
  # a pure function of (seed, split, index): a reader of fewer scenes gives the same rows
  fewer = scenes.Scenes("train", size="tiny", limit=2, input_size=32)
  assert scenes.entailment_texts(fewer)[0] == texts[:6]


def test_scenes_retrieval_negatives_come_from_other_scenes(train_scenes):
  rows, extra = scenes.retrieval_rows(train_scenes, TOK, 24, num_negative_images=2,
                                      num_negative_texts=3)
  data = RowBatches(rows, 4, seed=0, extra=extra)
  table, _ = scenes.caption_table(train_scenes, TOK, 24)
  for _ in range(3):
    b = next(data)
    assert b["neg_pixels"].shape == (4, 2, 32, 32, 3) and b["neg_ids"].shape == (4, 3, 24)
    for i, own in enumerate(b["image_index"]):
      np.testing.assert_array_equal(b["pixels"][i], train_scenes.visual["pixels"][own])
      for neg in b["neg_ids"][i]:
        assert not any((neg == c).all() for c in table[own])
  again = RowBatches(rows, 4, seed=0, extra=extra)
  again.set_state(dict(data.get_state(), index=2))
  data2 = RowBatches(rows, 4, seed=0, extra=extra)
  next(data2), next(data2)
  np.testing.assert_array_equal(next(again)["neg_ids"], next(data2)["neg_ids"])


def test_make_data_scenes_every_task():
  answers = None
  for kind, labels in (("vqa", 0), ("entailment", 3), ("retrieval", 2), ("captioning", 2)):
    cfg = _config(kind=kind, num_labels=labels or 2)
    if kind == "vqa":
      from data_pipelines.finetune import answer_vocabulary
      answers = answer_vocabulary(cfg)
      cfg.task.num_labels = len(answers)
    data, meta = make_data(cfg, "validation", TOK, training=False)
    b = next(data)
    assert b["pixels"].shape == (4, 32, 32, 3) and b["ids"].shape[0] == 4
    assert len(meta["image_ids"]) == 4
  cfg = _config(kind="vqa", num_labels=3)
  with pytest.raises(ValueError, match="answer vocabulary has"):
    make_data(cfg, "train", TOK, training=True)


# ---------------------------------------------------------------------------- JSONL image files
def _image_dir(tmp_path):
  from data_fixtures import image_bytes, random_pixels, undecodable_png
  d = tmp_path / "images"
  d.mkdir()
  r = np.random.default_rng(0)
  for name in ("a.png", "b.png", "c.png"):
    (d / name).write_bytes(image_bytes(random_pixels(r, 20, 30)))
  (d / "bad.png").write_bytes(undecodable_png())
  return str(d)


def test_jsonl_entailment_planted_bad_records(tmp_path):
  import json
  from data_pipelines.finetune import files
  images = _image_dir(tmp_path)
  lines = [json.dumps(dict(Flikr30kID="a.png", sentence2="a red circle", gold_label="entailment")),
           json.dumps(dict(image="b.png", hypothesis="two shapes", label="contradiction")),
           json.dumps(dict(image="a.png", hypothesis="a scene", label="neutral")),
           "{not json",
           json.dumps(dict(image="c.png", hypothesis="x")),                 # missing_field
           json.dumps(dict(image="nope.png", hypothesis="x", label="neutral")),  # missing_image
           json.dumps(dict(image="bad.png", hypothesis="x", label="neutral")),   # undecodable
           json.dumps(dict(image="c.png", hypothesis=" ", label="neutral")),     # empty_text
           json.dumps(dict(image="c.png", hypothesis="y", label="maybe"))]       # bad_label
  path = tmp_path / "ve.jsonl"
  path.write_text("\n".join(lines) + "\n")
  rec = files.ImageRecords(str(path), "entailment", images, image_size=16)
  assert dict(rec.dropped) == {"bad_json": 1, "missing_field": 1, "missing_image": 1,
                               "undecodable_image": 1, "empty_text": 1, "bad_label": 1}
  rows, _ = files.entailment_rows(rec, TOK, 8)
  np.testing.assert_array_equal(rows["label"], [0, 2, 1])
  np.testing.assert_array_equal(rows["image_index"], [0, 1, 0])
  assert rec.pixels.shape == (3, 16, 16, 3) and rec.pixels.dtype == np.uint8
  px = rec.gather(np.array([0]))["pixels"]
  assert px.dtype == np.float32 and -1.0 <= px.min() and px.max() <= 1.0
  wrong = tmp_path / "wrong.jsonl"
  wrong.write_text(json.dumps(dict(image="a.png", text="a red circle", label="neutral")) + "\n")
  with pytest.raises(ValueError, match=r"wrong.jsonl: no record has the field 'hypothesis'"):
    files.ImageRecords(str(wrong), "entailment", images, image_size=16)


def test_jsonl_vqa_soft_scores_and_retrieval(tmp_path):
  import json
  images = _image_dir(tmp_path)
  vqa = tmp_path / "vqa.jsonl"
  vqa.write_text("\n".join(json.dumps(r) for r in [
      dict(image="a.png", question="how many shapes", answers=["two", "two", "2", "two"]),
      dict(image="b.png", question="what colour", answers=["red", "Red", "blue", "blue"]),
  ]) + "\n")
  cfg = _config(kind="vqa", source="jsonl", train=str(vqa), validation=str(vqa),
                image_dir=images, image_size=16, num_labels=3)
  from data_pipelines.finetune import answer_vocabulary
  assert answer_vocabulary(cfg) == ["blue", "red", "two"]  # the 3 most frequent (2 = 1 vote)
  data, meta = make_data(cfg, "validation", TOK, training=False)
  b = next(data)
  np.testing.assert_allclose(b["answer_scores"][0], [0.0, 0.0, 1.0])
  np.testing.assert_allclose(b["answer_scores"][1], [2 / 3, 2 / 3, 0.0])
  assert meta["gold"][1] == ["red", "red", "blue", "blue"] and b["pixels"].shape == (4, 16, 16, 3)
  ret = tmp_path / "ret.jsonl"
  ret.write_text("\n".join(json.dumps(dict(image=n, captions=[f"the {c} circle", "a scene"]))
                           for n, c in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")))
                 + "\n")
  cfg = _config(kind="retrieval", source="jsonl", train=str(ret), image_dir=images,
                image_size=16, num_negative_images=2, num_negative_texts=2)
  data, meta = make_data(cfg, "train", TOK, training=True)
  b = next(data)
  assert b["neg_pixels"].shape == (4, 2, 16, 16, 3) and meta["caption_table"][0].shape[:2] == (3, 2)
