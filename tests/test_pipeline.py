"""The three-stream pipeline: schema, content, mixtures, sharding, bad records, exact resume."""
import collections
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipelines import pipeline, schema
from data_pipelines.mixture import Mixture, mixture_counts, permute
import data_fixtures as fx

TOK = fx.WhitespaceTokenizer()
S = 16  # image side: fixture images are written at S x S so pixels compare exactly


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline_data")
  rng = np.random.default_rng(0)
  d = dict(root=root)
  d["corpus"] = fx.write_corpus(root / "corpus.txt", 30, rng)
  d["corpus2"] = fx.write_corpus(root / "corpus2.txt", 12, rng)
  # Pairs with S x S images, three captions and two hard negatives each.
  (root / "pimg").mkdir()
  d["pairs"] = {}
  with open(root / "pairs.jsonl", "w") as f:
    for i in range(12):
      key = f"p{i:02d}"
      px = fx.random_pixels(rng, S, S)
      (root / "pimg" / f"{key}.png").write_bytes(fx.image_bytes(px))
      caps = [fx.sentence(rng) for _ in range(3)]
      negs = [fx.sentence(rng) for _ in range(2)]
      d["pairs"][key] = dict(pixels=px, captions=caps, negatives=negs)
      f.write(json.dumps(dict(key=key, image=f"{key}.png", captions=caps,
                              hard_negatives=negs)) + "\n")
  d["images"] = fx.write_images(root / "imgs", 6, rng, size=(S, S))
  d["npz"] = fx.write_npz_regions(root / "npz", [f"p{i:02d}" for i in range(12)], rng, 6, 5)
  return d


def _base(d, **kw):
  c = pipeline.default_config()
  c.seed = 7
  c.image_size, c.patch_size = S, 4
  c.num_positives, c.num_negatives, c.num_related_images, c.num_related_texts = 2, 2, 1, 1
  c.streams.text.update(dict(batch_size=4, max_length=12, max_predictions=3, s2s_max_length=16,
                             s2s_max_predictions=6, sources=[
                                 dict(name="corpus", kind="text", path=str(d["root"] / "corpus.txt"),
                                      weight=3.0),
                                 dict(name="corpus2", kind="text",
                                      path=str(d["root"] / "corpus2.txt"), weight=1.0)]))
  c.streams.image.update(dict(batch_size=2, sources=[
      dict(name="imgs", kind="image_folder", path=str(d["root"] / "imgs"))]))
  c.streams.pair.update(dict(batch_size=4, max_length=14, max_predictions=2,
                             s2s_max_predictions=14, sources=[
                                 dict(name="pairs", kind="jsonl",
                                      path=str(d["root"] / "pairs.jsonl"),
                                      image_dir=str(d["root"] / "pimg"))]))
  for k, v in kw.items():
    c[k] = v
  return c


def _take(it, n):
  out = [next(it) for _ in range(n)]
  return out


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def _words(ids):
  return TOK.decode([i for i in ids if i > 3])


def test_patch_batches_match_schema_and_content(data):
  it = pipeline.make_pipeline(_base(data), tokenizer=TOK)
  spec = schema.batch_spec(it.cfg)
  lines = set(data["corpus"]) | set(data["corpus2"])
  for b in _take(it, 3):
    schema.check_batch(b, spec)
    assert b["text/row_valid"].all() and b["pair/row_valid"].all()
    for r in range(4):
      # Put the MLM targets back: the row is [CLS] + a line of a corpus + [SEP] (lines fit).
      ids = b["text/mlm_ids"][r].copy()
      w = b["text/mlm_weights"][r] > 0
      ids[b["text/mlm_positions"][r][w]] = b["text/mlm_targets"][r][w]
      assert ids[0] == TOK.cls_id and _words(ids) in lines
      # The infilling layout holds the same words, split between source and target.
      seg = b["text/s2s_segments"][r]
      assert (seg[0], seg[seg > 0][-1]) == (1, 2)
      # A pair row: caption, positives and negatives of ONE record, its image as pixels.
      cap = _words(b["pair/caption_ids"][r])
      key = next(k for k, v in data["pairs"].items() if cap in v["captions"])
      rec = data["pairs"][key]
      pos = {_words(x) for x, v in zip(b["pair/positive_ids"][r], b["pair/positive_valid"][r])
             if v}
      assert pos == set(rec["captions"]) - {cap}
      neg = {_words(x) for x, v in zip(b["pair/negative_ids"][r], b["pair/negative_valid"][r])
             if v}
      assert neg == set(rec["negatives"])
      np.testing.assert_allclose(b["pair/pixels"][r], (rec["pixels"] / 255.0 - 0.5) / 0.5,
                                 atol=1e-5)
      assert not b["pair/related_valid"][r].any() and not b["pair/related_pixels"][r].any()
      assert b["pair/visual_mask"][r].sum() == round(0.15 * (S // 4) ** 2)
    for r in range(2):
      assert any(np.allclose(b["image/pixels"][r], (px / 255.0 - 0.5) / 0.5, atol=1e-5)
                 for px in data["images"].values())
  it.close()


def test_region_batches_match_schema(data):
  c = _base(data, visual_input="regions", num_regions=3, region_feature_dim=6,
            num_region_classes=5, num_related_images=0, num_related_texts=0)
  c.streams.text.batch_size = 0
  c.streams.image.sources = [dict(name="npz", kind="region_npz", path=str(data["root"] / "npz"))]
  c.streams.pair.sources[0]["regions"] = dict(kind="region_npz", path=str(data["root"] / "npz"))
  it = pipeline.make_pipeline(c, tokenizer=TOK)
  b = next(it)
  schema.check_batch(b, schema.batch_spec(it.cfg))
  for r in range(2):
    feats = b["image/region_features"][r]
    key = next(k for k, v in data["npz"].items() if np.allclose(v["features"][0], feats[0]))
    ref = data["npz"][key]
    n = min(3, len(ref["boxes"]))
    np.testing.assert_array_equal(b["image/region_valid"][r], np.arange(3) < n)
    np.testing.assert_allclose(b["image/region_boxes"][r, :n, :4],
                               ref["boxes"][:n] / np.array([40, 30, 40, 30]), rtol=1e-6)
    area = (ref["boxes"][:n, 2] - ref["boxes"][:n, 0]) * (ref["boxes"][:n, 3] -
                                                         ref["boxes"][:n, 1]) / (40 * 30)
    np.testing.assert_allclose(b["image/region_boxes"][r, :n, 4], np.minimum(area, 1), rtol=1e-5)
    np.testing.assert_array_equal(b["image/region_classes"][r, :n],
                                  ref["class_probs"][:n].argmax(1))
    assert b["image/visual_mask"][r].any() and not (b["image/visual_mask"][r] &
                                                    ~b["image/region_valid"][r]).any()
  it.close()


def test_batch_is_a_pure_function_of_seed_and_position(data):
  a = pipeline.make_pipeline(_base(data), tokenizer=TOK)
  b = pipeline.make_pipeline(_base(data), tokenizer=TOK)
  other_seed = _base(data, seed=8)
  other_seed.streams.image.batch_size = other_seed.streams.pair.batch_size = 0
  c = pipeline.make_pipeline(other_seed, tokenizer=TOK)
  for x, y, z in zip(_take(a, 3), _take(b, 3), _take(c, 3)):
    _same(x, y)
    assert x["text/mlm_ids"].tobytes() != z["text/mlm_ids"].tobytes()
  for it in (a, b, c):
    it.close()


def test_global_batch_is_the_same_for_any_process_count(data):
  one = pipeline.make_pipeline(_base(data), tokenizer=TOK)
  two = [pipeline.make_pipeline(_base(data), tokenizer=TOK, process_index=i, process_count=2)
         for i in range(2)]
  for _ in range(2):
    full, halves = next(one), [next(t) for t in two]
    for k, v in full.items():
      assert halves[0][k].shape[0] == v.shape[0] // 2
      np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), v, err_msg=k)
  for it in [one] + two:
    it.close()


_RESUME = """
import json, sys
import numpy as np
sys.path[:0] = [{tests!r}, {repo!r}]
import data_fixtures as fx
from data_pipelines import pipeline
cfg = json.load(open({cfg!r}))
it = pipeline.make_pipeline(cfg, tokenizer=fx.WhitespaceTokenizer())
it.restore({state!r})
out = {{}}
for i in range(10):
  for k, v in next(it).items():
    out[f"{{i}}|{{k}}"] = v
np.savez({out!r}, **out)
json.dump(dict(dropped=it.dropped_counts(), state=it.get_state()), open({meta!r}, "w"))
it.close()
del it
"""


def test_exact_resume_in_a_new_process(data, tmp_path):
  c = _base(data)
  # A bad line in a corpus: the drop counts must survive the restore too.
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"red circle\n\xff\xfe broken\nblue square\n")
  c.streams.text.sources.append(dict(name="bad", kind="text", path=str(bad), weight=2.0))
  straight_it = pipeline.make_pipeline(c, tokenizer=TOK)
  straight = _take(straight_it, 10)
  straight_it.save(str(tmp_path / "state.json"))  # saving does not disturb the iterator
  straight += _take(straight_it, 10)
  (tmp_path / "cfg.json").write_text(json.dumps(straight_it.cfg))
  here = os.path.dirname(os.path.abspath(__file__))
  script = _RESUME.format(tests=here, repo=os.path.dirname(here), cfg=str(tmp_path / "cfg.json"),
                          state=str(tmp_path / "state.json"), out=str(tmp_path / "out.npz"),
                          meta=str(tmp_path / "meta.json"))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
  resumed = np.load(tmp_path / "out.npz")
  for i in range(10):
    _same(straight[10 + i], {k.split("|", 1)[1]: resumed[k] for k in resumed.files
                             if k.startswith(f"{i}|")})
  meta = json.loads((tmp_path / "meta.json").read_text())
  assert meta["dropped"] == straight_it.dropped_counts()
  assert meta["dropped"]["bad"]["non_utf8_text"] > 0
  assert meta["state"] == straight_it.get_state()
  straight_it.close()


def test_restore_cost_does_not_depend_on_position(data):
  c = _base(data)
  c.streams.image.batch_size = 0  # text and pairs: the restore path is the same for any stream
  it = pipeline.make_pipeline(c, tokenizer=TOK)
  state = it.get_state()
  assert len(json.dumps(state)) < 1000  # a few integers, whatever the position

  def first_batch_after_restore(step):
    s = dict(state, step=step, slots={k: step * it.streams[k].global_batch for k in
                                      state["slots"]})
    t = time.perf_counter()
    it.set_state(s)
    next(it)
    return time.perf_counter() - t

  first_batch_after_restore(3)  # warm up
  near = min(first_batch_after_restore(10) for _ in range(2))
  far = min(first_batch_after_restore(10**12) for _ in range(2))
  assert far < 2 * near + 0.5, (near, far)
  it.close()


def _single_stream(stream, sources, batch_size, max_attempts, **kw):
  c = pipeline.default_config()
  c.image_size, c.patch_size = S, 4
  c.max_attempts = max_attempts
  c.num_related_images = c.num_related_texts = 0
  for k, v in kw.items():
    c[k] = v
  c.streams[stream].batch_size = batch_size
  c.streams[stream].sources = sources
  if stream == "pair":
    c.streams.pair.max_length = 14
  return pipeline.make_pipeline(c, tokenizer=TOK)


def _planted(tmp_path):
  rng = np.random.default_rng(3)
  # text: 10 good, 2 whitespace-only, 2 non-UTF-8 in the index; 3 empty lines left out of it.
  fx.write_corpus(tmp_path / "t.txt", 10, rng, empty_lines=3, blank_lines=2, non_utf8=2)
  # images: 4 good; garbage, truncated PNG, damaged PNG (bad CRC), a PNG only TF finds broken.
  fx.write_images(tmp_path / "im", 4, rng, size=(S, S))
  png = fx.image_bytes(fx.random_pixels(rng, S, S))
  (tmp_path / "im" / "x_garbage.jpg").write_bytes(b"not an image")
  (tmp_path / "im" / "x_trunc.png").write_bytes(png[:len(png) // 2])
  (tmp_path / "im" / "x_crc.png").write_bytes(fx.damaged_png(png))
  (tmp_path / "im" / "x_zlib.png").write_bytes(fx.undecodable_png(S, S))
  # pairs: 5 good records, one undecodable image, one member cut by a truncated download.
  fx.write_webdataset(tmp_path / "w.tar", 5, rng, bad_image=1)
  fx.write_webdataset(tmp_path / "w2.tar", 1, rng, start=10, truncate_last=True)
  # regions: 4 good, NaN, wrong-shaped boxes.
  fx.write_npz_regions(tmp_path / "r", list("abcdef"), rng, 6, 5, nan=("e",), wrong_shape=("f",))
  return {
      "text": ([dict(name="t", kind="text", path=str(tmp_path / "t.txt"))], 7,
               {"t": {"empty_text": 3 + 2, "non_utf8_text": 2}}, {}),
      "image": ([dict(name="im", kind="image_folder", path=str(tmp_path / "im"))], 4,
                {"im": {"undecodable_image": 3, "truncated_image": 1}}, {}),
      "pair": ([dict(name="w", kind="webdataset", path=str(tmp_path / "w*.tar"))], 3,
               {"w": {"undecodable_image": 1, "truncated_member": 1}}, {}),
      "regions": ([dict(name="r", kind="region_npz", path=str(tmp_path / "r"))], 3,
                  {"r": {"nonfinite_features": 1, "bad_feature_shape": 1}},
                  dict(visual_input="regions", num_regions=4, region_feature_dim=6,
                       num_region_classes=5)),
  }


def test_planted_bad_records_are_dropped_and_counted(tmp_path):
  for name, (sources, b, expected, kw) in _planted(tmp_path).items():
    stream = "image" if name == "regions" else name
    # One attempt per slot and exactly one epoch: each bad record is met exactly once and its
    # slot becomes a padding row.
    it = _single_stream(stream, sources, b, 1, **kw)
    n = len(it.streams[stream].sources[0])
    assert n % b == 0, (name, n)
    rows = [r for batch in _take(it, n // b) for r in batch[f"{stream}/row_valid"]]
    assert it.dropped_counts() == expected, name
    index_drops = sum(it.streams[stream].sources[0].index_drops.values())
    assert len(rows) - sum(rows) == sum(sum(v.values()) for v in expected.values()) - index_drops
    it.close()
    # With replacement draws every row is a real one (but for images only the TF decoder finds
    # broken: those rows are masked), and the counts only grow.
    it = _single_stream(stream, sources, b, 8, **kw)
    invalid = 0
    for batch in _take(it, 2 * n // b):
      valid = batch[f"{stream}/row_valid"]
      invalid += int((~valid).sum())
      for k in batch:
        if k.endswith("_weights"):
          assert batch[k][valid].any() and not batch[k][~valid].any(), (name, k)
    got = it.dropped_counts()[sources[0]["name"]]
    assert set(got) == set(expected[sources[0]["name"]])
    assert all(got[r] >= v for r, v in expected[sources[0]["name"]].items())
    assert (invalid == 0) if name != "image" else (1 <= invalid <= got["undecodable_image"])
    it.close()


def test_invalid_rows_carry_no_weight(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"\xff\xfe\n" * 4)  # nothing usable after the probe...
  (tmp_path / "ok.txt").write_bytes(b"red circle\n")
  srcs = [dict(name="ok", kind="text", path=str(tmp_path / "ok.txt"), weight=1e-3),
          dict(name="bad", kind="text", path=str(tmp_path / "t.txt"), weight=1.0)]
  with pytest.raises(schema.SchemaError, match="'bad'.*non_utf8_text"):
    _single_stream("text", srcs, 4, 2)


def test_neighbours_give_related_items_and_absent_ones_are_masked(data, tmp_path):
  nb = tmp_path / "nb.jsonl"
  keys = sorted(data["pairs"])
  with open(nb, "w") as f:
    for k in keys[:6]:  # half the records have neighbours
      f.write(json.dumps(dict(key=k, images=[keys[-1]], texts=["two big shapes"])) + "\n")
  c = _base(data)
  c.streams.text.batch_size = c.streams.image.batch_size = 0
  c.streams.pair.sources[0]["neighbours"] = str(nb)
  it = pipeline.make_pipeline(c, tokenizer=TOK)
  seen = collections.Counter()
  for b in _take(it, 3):
    for r in range(4):
      key = next(k for k, v in data["pairs"].items()
                 if _words(b["pair/caption_ids"][r]) in v["captions"])
      has = key in keys[:6]
      seen[has] += 1
      assert b["pair/related_valid"][r, 0] == has
      assert b["pair/related_text_valid"][r, 0] == has
      if has:
        np.testing.assert_allclose(b["pair/related_pixels"][r, 0],
                                   (data["pairs"][keys[-1]]["pixels"] / 255 - 0.5) / 0.5,
                                   atol=1e-5)
        assert _words(b["pair/related_text_ids"][r, 0]) == "two big shapes"
      else:
        assert not b["pair/related_pixels"][r].any()
        assert (b["pair/related_text_ids"][r] == TOK.pad_id).all()
  assert seen[True] and seen[False]
  it.close()


def test_mixture_is_stratified_and_epochs_cover_every_record():
  counts = mixture_counts([3.0, 1.0, 0.001], 100)
  assert counts.tolist() == [75, 25, 1]  # every source keeps at least one draw per period
  m = Mixture([3.0, 1.0], [7, 5], seed=1, stream_id=0, period=8)
  src, rec = m.records(np.arange(8 * 35))
  for w in range(35):  # every window of one period holds exactly 6 + 2 draws
    assert np.bincount(src[8 * w:8 * w + 8], minlength=2).tolist() == [6, 2]
  for s, n in ((0, 7), (1, 5)):
    r = rec[src == s]
    for e in range(len(r) // n):  # each epoch of a source is a permutation of its records
      assert sorted(r[e * n:(e + 1) * n].tolist()) == list(range(n))
  for n in (1, 2, 3, 10, 1000, 4097):
    assert sorted(permute(np.arange(n), n, 5).tolist()) == list(range(n))
  # 1:3 weights over two corpora in the pipeline's own terms
  assert m.replacement(3, 0, 1) == m.replacement(3, 0, 1) < 7


def test_synthetic_scenes_default_config(tmp_path):
  # What `unimo-jax prepare synthetic_scenes` builds: TFDS configs, tokenizer, side files.
  from data_pipelines import prepare
  prepare.prepare_synthetic(str(tmp_path), size="tiny")
  c = pipeline.default_synthetic_config(data_dir=str(tmp_path), size="tiny")
  c.streams.text.batch_size = c.streams.image.batch_size = c.streams.pair.batch_size = 4
  for vis in ("patches", "regions"):
    c.visual_input = vis
    it = pipeline.make_pipeline(c)
    b = next(it)
    schema.check_batch(b, schema.batch_spec(it.cfg))
    assert b["pair/negative_valid"].any() and b["pair/positive_valid"].any()
    assert b["text/row_valid"].all() and b["image/row_valid"].all()
    assert it.dropped_counts() == {n: {} for n in ("synthetic_text", "synthetic_images",
                                                  "synthetic_pairs")}
    it.close()


def test_side_file_and_lexicon_negatives(tmp_path):
  rng = np.random.default_rng(5)
  (tmp_path / "img").mkdir()
  with open(tmp_path / "p.jsonl", "w") as f:
    for i in range(4):
      (tmp_path / "img" / f"{i}.png").write_bytes(fx.image_bytes(fx.random_pixels(rng, S, S)))
      f.write(json.dumps(dict(key=i, image=f"{i}.png",
                              captions=["a red circle left of a blue square"])) + "\n")
  with open(tmp_path / "tfidf.jsonl", "w") as f:
    for i in range(4):
      f.write(json.dumps(dict(id=i, negatives=[f"{'two ' * (i + 1)}shapes"], scores=[0.5])) + "\n")
  src = dict(name="p", kind="jsonl", path=str(tmp_path / "p.jsonl"), image_dir=str(tmp_path / "img"),
             tfidf_negatives=str(tmp_path / "tfidf.jsonl"), lexicon_negatives=True)
  it = _single_stream("pair", [src], 4, 1, num_negatives=3)
  b = next(it)
  caption = b["pair/caption_ids"][0]
  side = {f"{'two ' * (i + 1)}shapes" for i in range(4)}
  firsts = set()
  for r in range(4):
    firsts.add(_words(b["pair/negative_ids"][r, 0]))  # the side file's negative comes first
    assert b["pair/negative_valid"][r].all()
    for k in (1, 2):  # lexicon rewrites: the caption with one word or phrase replaced
      neg = b["pair/negative_ids"][r, k]
      assert neg.tobytes() != caption.tobytes()
      assert abs(int((neg != TOK.pad_id).sum()) - int((caption != TOK.pad_id).sum())) <= 2
  assert firsts == side  # one epoch of 4 records: each record's own side-file negative
  it.close()


def test_texts_cut_to_fit_are_counted_per_stream(tmp_path):
  # 8 documents of 3..10 words; the text layout fits max(L - 2, L2) = 6 tokens.
  lengths = [3, 10, 6, 7, 4, 9, 5, 8]
  (tmp_path / "c.txt").write_text("".join(" ".join(fx.WORDS[:n]) + "\n" for n in lengths))
  c = pipeline.default_config()
  c.max_attempts = 1
  c.streams.text.update(dict(batch_size=8, max_length=8, max_predictions=2, s2s_max_length=6,
                             s2s_max_predictions=3, sources=[
                                 dict(name="c", kind="text", path=str(tmp_path / "c.txt"))]))
  it = pipeline.make_pipeline(c, tokenizer=TOK)
  _take(it, 1)
  # One epoch of the 8 documents: each one longer than 6 tokens is cut once.
  assert it.truncated_counts() == {"text/c": sum(n > 6 for n in lengths)}
  assert it.get_state()["truncated"] == {"text/c": 4}
  it.close()
