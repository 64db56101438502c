"""Rewriting for CMCL: lexicon rewrites, exact scene-graph rewrites, TF-IDF negatives, positives."""
import math
import re

import numpy as np
import pytest

from data_pipelines import lexicon
from data_pipelines import rewriting as rw
from data_pipelines.synthetic_scenes import captions as C
from data_pipelines.synthetic_scenes import generate as G

CAPTIONS = [
    "A man riding a red bike next to two dogs.",
    "An elephant standing under a large tree",
    "Three cats on top of the TABLE.",
    "a woman holds an orange umbrella near a white bus",
    "Two girls and a boy play with a ball on the left",
]


def _words(text):
  return re.findall(r"[A-Za-z]+", text)


def _known(word):
  """The lexicon class of a single word (independent lookup over the raw tables)."""
  w = word.lower()
  for cls, groups in (("colour", lexicon.COLOURS), ("size", lexicon.SIZES),
                      ("number", lexicon.NUMBERS), ("shape", lexicon.SHAPES),
                      ("direction", lexicon.DIRECTIONS)):
    if any(w in g for g in groups):
      return cls
  if any(w in forms for g in lexicon.OBJECTS for forms in g):
    return "object"
  return None


def test_lexicon_rewrites_change_exactly_one_known_word():
  rng = np.random.default_rng(0)
  for text in CAPTIONS:
    rewrites = rw.lexicon_rewrites(text, rng, 50, classes={"colour", "size", "number", "object",
                                                            "direction"})
    assert len(rewrites) >= 3
    assert len({t for t, _ in rewrites}) == len(rewrites)
    for new, cls in rewrites:
      a, b = _words(text), _words(new)
      assert len(a) == len(b), (text, new)
      diff = [k for k in range(len(a)) if a[k] != b[k]]
      content = [k for k in diff if a[k].lower() not in ("a", "an")]
      assert len(content) == 1, (text, new)
      k = content[0]
      assert _known(a[k]) == _known(b[k]) == cls
      assert a[k][0].isupper() == b[k][0].isupper()  # case kept
      # Plural kept for objects: "dogs" -> another plural form.
      if cls == "object":
        plural = lambda w: any(w.lower() == p for g in lexicon.OBJECTS for _, p in g)
        assert plural(a[k]) == plural(b[k])
      # Article changes only in front of the changed word, to agree with it.
      for j in diff:
        if j != k:
          assert j == k - 1 and b[j].lower() == ("an" if b[k][0].lower() in "aeiou" else "a")


def test_article_and_case_agreement():
  out = {t for t, _ in rw.lexicon_candidates("A red bike")}
  assert "An orange bike" in out and "A blue bike" in out
  out = {t for t, _ in rw.lexicon_candidates("THREE DOGS")}
  assert "FOUR DOGS" in out and "THREE CATS" in out


def test_relation_phrases_are_replaced_whole():
  out = {t for t, c in rw.lexicon_candidates("a cat on top of the table") if c == "relation"}
  assert "a cat behind the table" in out
  assert "a cat below the table" in out
  assert not any("top" in t for t in out)  # "on top of" is one unit
  assert not any(t.startswith("a cat above") for t in out)  # a synonym is not a negative


def test_text_without_lexicon_words_has_no_rewrites():
  assert rw.lexicon_rewrites("nothing to see here", np.random.default_rng(0), 5) == []


def _tfidf_reference(texts):
  """Plain-python TF-IDF: counts x (ln((1+N)/(1+df)) + 1), L2-normalised dicts."""
  docs = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
  df = {}
  for d in docs:
    for w in set(d):
      df[w] = df.get(w, 0) + 1
  vecs = []
  for d in docs:
    v = {w: d.count(w) * (math.log((1 + len(docs)) / (1 + df[w])) + 1) for w in set(d)}
    n = math.sqrt(sum(x * x for x in v.values()))
    vecs.append({w: x / n for w, x in v.items()})
  return vecs


def _cos(u, v):
  dot = sum(x * v.get(w, 0.0) for w, x in u.items())
  return dot / math.sqrt(sum(x * x for x in u.values())) / math.sqrt(sum(x * x for x in v.values()))


def test_tfidf_nearest_hand_computed():
  images = [["red circle"], ["red square"], ["blue square square"], ["green star"]]
  idx, scores = rw.tfidf_negatives(images, k=2)
  # By hand: idf(red) = idf(square) = ln(5/3)+1 = 1.5108, idf(circle) = idf(blue) = ln(5/2)+1
  # = 1.9163; cos("red circle", "red square") = 1.5108 / |(1.5108, 1.9163)| / sqrt(2) = 0.4376.
  assert idx[0][0] == 1
  assert scores[0][0] == pytest.approx(1.5108 / math.hypot(1.5108, 1.9163) / math.sqrt(2),
                                       abs=1e-3)
  flat = [c for caps in images for c in caps]
  ref = _tfidf_reference(flat)
  for i in range(len(images)):
    expect = sorted(((-_cos(ref[i], ref[j]), j) for j in range(len(flat)) if j != i))[:2]
    assert idx[i] == [j for _, j in expect]
    np.testing.assert_allclose(scores[i], [-s for s, _ in expect], atol=1e-5)


def test_tfidf_query_is_the_sum_of_an_images_captions_and_skips_its_texts():
  images = [["a red circle", "a red ring"], ["a red circle"], ["a red ring shape"],
            ["a blue star"]]
  flat = [c for caps in images for c in caps]
  ref = _tfidf_reference(flat)
  query = {}
  for j in (0, 1):
    for w, x in ref[j].items():
      query[w] = query.get(w, 0.0) + x
  idx, scores = rw.tfidf_negatives(images, k=3)
  # Caption 2 ("a red circle" of image 1) equals one of image 0's own captions: skipped.
  expect = sorted(((-_cos(query, ref[j]), j) for j in (3, 4)))
  assert idx[0] == [j for _, j in expect]
  np.testing.assert_allclose(scores[0], [-s for s, _ in expect], atol=1e-5)
  # An accept filter removes candidates; small blocks give the same answer.
  idx2, _ = rw.tfidf_negatives(images, k=3, accept=lambda i, c: c != 3, block_elements=1)
  assert idx2[0] == [4]
  assert idx2[1:] == [[c for c in row if c != 3] for row in idx[1:]]


def test_tfidf_takes_one_caption_per_other_image_by_default():
  images = [["red circle"], ["red circle left right", "a red circle"], ["blue star"]]
  idx, _ = rw.tfidf_negatives(images, k=3)
  ref = _tfidf_reference([c for caps in images for c in caps])
  closer = 1 if _cos(ref[0], ref[1]) > _cos(ref[0], ref[2]) else 2
  assert idx[0] == [closer, 3]
  idx, _ = rw.tfidf_negatives(images, k=3, one_per_image=False)
  assert {1, 2} <= set(idx[0])


def test_tfidf_side_file_round_trip(tmp_path):
  images = [["red circle"], ["red square"], ["blue square"]]
  path = rw.tfidf_side_path(str(tmp_path), "toy", "train")
  assert rw.load_tfidf_side_file(path) == {}
  assert rw.write_tfidf_side_file(path, [10, 11, 12], images, k=1) == 3
  loaded = rw.load_tfidf_side_file(path)
  assert loaded == {10: ["red square"], 11: ["red circle"], 12: ["red square"]}


def test_scene_graph_rewrites_keep_the_template_and_are_false():
  options = G.SceneOptions(size="tiny")
  rng = np.random.default_rng(0)
  for k in range(12):
    record = G.example(options, "train", k)
    scene = rw.scene_from_record(record)
    for caption in record["captions"]:
      claim, template = C.parse(caption)
      out = rw.scene_graph_rewrites(caption, record, rng, 4)
      assert 1 <= len(out) <= 4
      for new, kind in out:
        new_claim, new_template = C.parse(new)
        assert new_template == template and new != caption
        assert new_claim.key() != claim.key()
        assert not C.holds(new_claim, scene)
  assert rw.scene_graph_rewrites("a photo of a dog", record, rng, 4) == []


def test_paraphrase_positives():
  caps = ["a cat", "a small cat", "a cat", "the cat sleeps"]
  assert rw.paraphrase_positives(caps, 0, 5) == ["a small cat", "the cat sleeps"]
  assert rw.paraphrase_positives(caps, 1, 5, paraphrases=["a kitten", "a cat"]) == [
      "a cat", "the cat sleeps", "a kitten"]
  got = rw.paraphrase_positives(caps, 3, 2, paraphrases=["x"], rng=np.random.default_rng(1))
  assert len(got) == 2 and set(got) <= {"a cat", "a small cat", "x"}


def test_prepare_tfidf_command(tmp_path):
  import json
  from data_pipelines import prepare
  src = tmp_path / "caps.jsonl"
  src.write_text("\n".join(json.dumps(r) for r in [
      {"id": 5, "captions": ["a red car", "a red vehicle"]},
      {"id": 7, "captions": ["a blue car"]}, {"id": 9, "captions": ["two dogs"]}]) + "\n")
  out = tmp_path / "side" / "neg.jsonl"
  assert prepare.main(["unimo-jax prepare", "tfidf", "--captions", str(src), "--out", str(out),
                       "--k", "1"]) == 0
  assert rw.load_tfidf_side_file(str(out)) == {5: ["a blue car"], 7: ["a red car"],
                                               9: ["a red car"]}
