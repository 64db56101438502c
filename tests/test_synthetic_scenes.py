"""synthetic_scenes: determinism, truthful captions, false hard negatives, held-out combinations,
pixel-exact boxes, region labels, QA, and the TFDS builder (tiny build)."""
import itertools
import os

import numpy as np
import pytest

from data_pipelines.synthetic_scenes import captions as C
from data_pipelines.synthetic_scenes import generate as G
from data_pipelines.synthetic_scenes import render as R
from data_pipelines.synthetic_scenes import scene as S

TINY = G.SceneOptions(size="tiny")
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "white")
HELD_OUT_TEXT = ("green circle", "yellow square", "red triangle", "orange diamond",
                 "purple cross", "blue star")
# Location phrases as the test reads them: (row or None, col or None).
LOCATION = {"top_left": (0, 0), "top": (0, None), "top_right": (0, 2), "left": (None, 0),
            "center": (1, 1), "right": (None, 2), "bottom_left": (2, 0),
            "bottom": (2, None), "bottom_right": (2, 2)}


def _objects(record):
  o = record["objects"]
  return [dict(size=int(o["size"][k]), colour=int(o["colour"][k]), shape=int(o["shape"][k]),
               row=int(o["row"][k]), col=int(o["col"][k])) for k in range(len(o["shape"]))]


def _rel(a, p, b):
  return {"left": a["col"] < b["col"], "right": a["col"] > b["col"],
          "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[p]


def _true(claim, objects):
  """Independent truth of a claim over the scene graph's object table."""
  for perm in itertools.permutations(range(len(objects)), len(claim.objects)):
    matched = [objects[k] for k in perm]
    if any((m["size"], m["colour"], m["shape"]) != want
           for m, want in zip(matched, claim.objects)):
      continue
    if not all(_rel(matched[i], p, matched[j]) for i, p, j in claim.relations):
      continue
    if claim.location is not None:
      row, col = LOCATION[claim.location]
      if (row is not None and matched[0]["row"] != row) or (
          col is not None and matched[0]["col"] != col):
        continue
    return True
  return False


def _records(split, n=None):
  n = TINY.num_examples(split) if n is None else n
  return [r for _, r in G.generate_examples(TINY, split, stop=n)]


def _equal(a, b):
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)):
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
  if isinstance(a, str):
    return a == b
  return np.array_equal(np.asarray(a), np.asarray(b))


def test_examples_are_a_function_of_seed_split_and_index():
  a = G.example(TINY, "train", 7)
  b = G.example(TINY, "train", 7)
  assert _equal(a, b)
  assert not _equal(a, G.example(TINY, "train", 8))
  assert not _equal(a["image"], G.example(G.SceneOptions(size="tiny", seed=1), "train", 7)["image"])
  # The iterator yields the same records as random access, with ids unique across splits.
  it = dict(G.generate_examples(TINY, "validation", start=2, stop=4))
  assert _equal(it[3], G.example(TINY, "validation", 3))
  ids = {int(r["image_id"]) for s in G.PAIR_SPLITS for r in _records(s, 8)}
  assert len(ids) == 4 * 8


def test_handwritten_scene_captions_and_negatives():
  red = S.SceneObject(shape=0, colour=0, size=1, row=0, col=0, center=(10.0, 10.0))
  blue = S.SceneObject(shape=1, colour=2, size=0, row=0, col=2, center=(53.0, 10.0))
  scene = S.Scene(objects=(red, blue), image_size=64, background_seed=3)
  claim, caps = C.captions(scene, np.random.default_rng(0))
  assert caps == [
      "a large red circle to the left of a small blue square.",
      "there is a small blue square, and a large red circle is on its left.",
      "a small blue square to the right of a large red circle.",
      "a large red circle and a small blue square; the large red circle is to the left of "
      "the small blue square.",
  ]
  negatives = {C.render_caption(c, C.TEMPLATES[2][0])
               for _, c in C.false_rewrites(claim, scene, seen_only=True)}
  assert "a large red circle to the right of a small blue square." in negatives
  assert "a large red circle above a small blue square." in negatives  # same row: false
  assert "a large blue circle to the left of a small red square." in negatives  # colour swap
  assert "a small red circle to the left of a small blue square." in negatives
  assert "a large red circle to the left of a small blue square." not in negatives


def test_one_object_scene_uses_its_location():
  obj = S.SceneObject(shape=3, colour=4, size=0, row=2, col=1, center=(32.0, 53.0))
  scene = S.Scene(objects=(obj,), image_size=64, background_seed=1)
  _, caps = C.captions(scene, np.random.default_rng(0))
  assert caps[0] == "a small purple diamond at the bottom."
  assert caps[3] == "a small diamond that is purple, at the bottom."


@pytest.mark.parametrize("split", ["train", "test_compositional"])
def test_captions_are_true_paraphrases_and_negatives_are_false(split):
  for r in _records(split):
    objects = _objects(r)
    claims = []
    for cap in r["captions"]:
      parsed = C.parse(cap)
      assert parsed is not None, cap
      assert _true(parsed[0], objects), cap
      claims.append(parsed[0].key())
    assert len(set(claims)) == 1  # all captions state the same thing
    assert len(set(r["captions"])) == len(r["captions"]) >= 4
    assert 1 <= len(r["hard_negatives"]) <= TINY.num_negatives
    assert len(set(r["hard_negatives"])) == len(r["hard_negatives"])
    for neg in r["hard_negatives"]:
      assert neg not in r["captions"]
      parsed = C.parse(neg)
      assert parsed is not None, neg
      assert not _true(parsed[0], objects), neg


def test_template_parse_round_trip():
  for k in range(60):
    scene, rng = G.scene_for(TINY, "train", k)
    claim = C.scene_claim(scene, rng)
    for template in C.TEMPLATES[len(claim.objects)]:
      parsed, t = C.parse(C.render_caption(claim, template))
      assert parsed.key() == claim.key()


def test_held_out_combinations_never_in_standard_splits():
  held = {(COLOURS.index(t.split()[0]), SHAPES.index(t.split()[1])) for t in HELD_OUT_TEXT}
  for split in ("train", "validation", "test"):
    for r in _records(split):
      assert not {(o["colour"], o["shape"]) for o in _objects(r)} & held
      texts = (list(r["captions"]) + list(r["hard_negatives"]) + list(r["qa"]["question"])
               + list(r["qa"]["answer"]))
      assert not [t for t in texts if any(h in t for h in HELD_OUT_TEXT)]
  for r in _records("test_compositional"):
    assert {(o["colour"], o["shape"]) for o in _objects(r)} & held
  text = " ".join(r["text"] for _, r in G.generate_examples(
      G.SceneOptions(kind="text", size="tiny"), "train"))
  assert not [h for h in HELD_OUT_TEXT if h in text]
  for _, r in G.generate_examples(G.SceneOptions(kind="images", size="tiny"), "train"):
    assert not {(o["colour"], o["shape"]) for o in _objects(r)} & held


@pytest.mark.parametrize("image_size", [64, 48])
def test_boxes_inside_image_and_tight_around_object_pixels(image_size):
  options = G.SceneOptions(size="tiny", image_size=image_size)
  for _, r in G.generate_examples(options, "train", stop=24):
    img = r["image"].astype(np.float32)
    assert img.shape == (image_size, image_size, 3) and r["image"].dtype == np.uint8
    boxes = r["regions"]["boxes"]
    cell = image_size / 3
    for k, o in enumerate(_objects(r)):
      x1, y1, x2, y2 = boxes[k]
      assert 0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size
      # Pixels of the object's colour inside its grid cell: their tight box is the box.
      near = np.linalg.norm(img - S.COLOUR_RGB[o["colour"]], axis=-1) < 30
      yy, xx = np.mgrid[0:image_size, 0:image_size]
      in_cell = (yy // cell == o["row"]) & (xx // cell == o["col"])
      ys, xs = np.nonzero(near & in_cell)
      assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
      # Size is visible: large objects are wider than small ones.
      extent = max(x2 - x1, y2 - y1) / image_size
      assert (extent > 0.2) if o["size"] == 1 else (extent < 0.19)


def test_renderer_masks_match_boxes_and_do_not_overlap():
  scene, _ = G.scene_for(TINY, "test", 0)
  image, boxes, masks = R.render(scene)
  assert masks.sum(axis=0).max() == 1
  for k in range(len(boxes)):
    ys, xs = np.nonzero(masks[k])
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(boxes[k])


def test_region_labels_and_features_carry_the_objects():
  feats, labels = [], []
  for r in _records("train"):
    reg = r["regions"]
    n = len(r["objects"]["shape"])
    assert reg["features"].shape == (n, TINY.feature_dim) and reg["features"].dtype == np.float32
    assert reg["class_probs"].shape == (n, 48)
    np.testing.assert_allclose(reg["class_probs"].sum(-1), 1.0, rtol=1e-5)
    expect = r["objects"]["shape"] * 8 + r["objects"]["colour"]
    np.testing.assert_array_equal(reg["classes"], expect)
    assert (reg["class_probs"].argmax(-1) == expect).mean() >= 0.5
    feats.append(reg["features"])
    labels.append(expect * 2 + r["objects"]["size"])
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  d = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
  same = labels[:, None] == labels[None]
  off = ~np.eye(len(labels), dtype=bool)
  assert d[same & off].mean() < 0.6 * d[~same].mean()


def test_qa_answers_follow_the_scene_graph():
  words = ("zero", "one", "two", "three")
  for r in _records("validation"):
    objects = _objects(r)
    for q, a in zip(r["qa"]["question"], r["qa"]["answer"]):
      if q == "how many shapes are there?":
        assert a == words[len(objects)]
      elif q.startswith("how many "):
        colour = COLOURS.index(q.split()[2])
        assert a == words[sum(o["colour"] == colour for o in objects)]
      elif q.startswith("what colour is the "):
        shape = SHAPES.index(q[len("what colour is the "):-1])
        assert [COLOURS[o["colour"]] for o in objects if o["shape"] == shape] == [a]
      elif q.startswith("is there a "):
        size, colour, shape = q[len("is there a "):-1].split()
        present = any((o["size"], o["colour"], o["shape"]) ==
                      (("small", "large").index(size), COLOURS.index(colour),
                       SHAPES.index(shape)) for o in objects)
        assert a == ("yes" if present else "no")


def test_prepare_tiny_builds_tfds_tokenizer_and_side_files(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from data_pipelines import prepare
  from data_pipelines import rewriting
  from data_pipelines import tokenizers
  data_dir = str(tmp_path)
  manifest = prepare.prepare_synthetic(data_dir, size="tiny")
  assert manifest["configs"] == {"pairs": "pairs_tiny", "text": "text_tiny",
                                 "images": "images_tiny"}
  for kind in G.KINDS:
    builder = tfds.builder(f"synthetic_scenes/{kind}_tiny", data_dir=data_dir)
    options = G.SceneOptions(kind=kind, size="tiny")
    for split in options.splits:
      assert builder.info.splits[split].num_examples == options.num_examples(split)
  ds = tfds.builder_from_directory(manifest["builder_dirs"]["pairs"]).as_dataset(
      split="test_compositional")
  spec = ds.element_spec
  assert spec["image"].shape == (64, 64, 3) and spec["image"].dtype.name == "uint8"
  assert spec["image_id"].dtype.name == "int64"
  assert spec["captions"].dtype.name == "string"
  assert spec["hard_negatives"].shape.as_list() == [None]
  assert spec["regions"]["boxes"].shape.as_list() == [None, 4]
  assert spec["regions"]["features"].shape.as_list() == [None, 64]
  assert spec["regions"]["class_probs"].shape.as_list() == [None, 48]
  assert spec["regions"]["classes"].dtype.name == "int64"
  assert spec["objects"]["center"].shape.as_list() == [None, 2]
  # Stored in index order and equal to the plain-python records.
  for k, rec in enumerate(ds.take(3).as_numpy_iterator()):
    ref = G.example(TINY, "test_compositional", k)
    np.testing.assert_array_equal(rec["image"], ref["image"])
    assert [c.decode() for c in rec["captions"]] == ref["captions"]
    assert [c.decode() for c in rec["hard_negatives"]] == ref["hard_negatives"]
    np.testing.assert_array_equal(rec["regions"]["features"], ref["regions"]["features"])
    np.testing.assert_array_equal(rec["relations"]["predicate"], ref["relations"]["predicate"])
  text = next(tfds.load("synthetic_scenes/text_tiny", split="train",
                        data_dir=data_dir).as_numpy_iterator())
  assert text["text"].decode() == G.example(G.SceneOptions(kind="text", size="tiny"),
                                            "train", 0)["text"]
  # The tokenizer has the UNIMO layout and round-trips the captions.
  tok = tokenizers.load_tokenizer(manifest["tokenizer"])
  assert tok.vocab_size == manifest["vocab_size"] and tok.mask_id == tok.vocab_size - 1
  for cap in G.example(TINY, "test", 0)["captions"]:
    assert tok.decode(tok.encode(cap)) == cap
  # TF-IDF negatives: keyed by image id, captions of other images, false for the image.
  side = rewriting.load_tfidf_side_file(manifest["tfidf_negatives"]["test"])
  assert len(side) == TINY.num_examples("test")
  for k, r in enumerate(_records("test")):
    negatives = side[int(r["image_id"])]
    assert len(negatives) == 4
    for neg in negatives:
      assert neg not in r["captions"] and not _true(C.parse(neg)[0], _objects(r))
  # Running again finds everything in place.
  before = os.path.getmtime(manifest["tfidf_negatives"]["train"])
  again = prepare.prepare_synthetic(data_dir, size="tiny")
  assert os.path.getmtime(manifest["tfidf_negatives"]["train"]) == before
  assert again["tokenizer"] == manifest["tokenizer"]
