"""UNIMO's official ``;``-separated SNLI-VE and captioning lines (``data.source =
"unimo_lines"``): field order as the official readers split a line (width first in SNLI-VE,
height first in captioning), region inputs against hand-computed boxes, planted bad lines
skipped and counted, one-line errors for a wrong layout or feature width."""
import base64

import ml_collections
import numpy as np
import pytest

from data_fixtures import WhitespaceTokenizer
from data_pipelines.finetune import make_data, unimo_lines
from unimo_jax.finetune import layouts

TOK = WhitespaceTokenizer()
F = 4  # feature width of the test files


def b64(x) -> str:
  return base64.b64encode(np.asarray(x, np.float32).tobytes()).decode()


# Image "a": 200 wide, 100 high, two boxes; image "b": 50 x 50, one box.
IMAGES = {
    "a": (200.0, 100.0, [[20, 10, 120, 60], [0, 0, 200, 100]],
          np.arange(2 * F, dtype=np.float32).reshape(2, F)),
    "b": (50.0, 50.0, [[0, 0, 25, 50]], np.full((1, F), -1.5, np.float32)),
}
# hand-computed [x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W H)]
BOXES = {"a": [[0.1, 0.1, 0.6, 0.6, 0.25], [0, 0, 1, 1, 1]], "b": [[0, 0, 0.5, 1, 0.5]]}


def ve_line(image="a", label="0", tokens="0 5 6 2", w=None, h=None, n=None, boxes=None,
            feats=None, extra=0) -> str:
  W, H, bx, ft = IMAGES[image]
  n = len(bx) if n is None else n
  fields = [image, "d1", label, tokens, "0 0 0 0", "2 3 4 5", "-",
            str(W if w is None else w), str(H if h is None else h), str(n),
            b64(bx) if boxes is None else boxes, b64(ft) if feats is None else feats, "-", "-"]
  return ";".join(fields + ["x"] * extra)


def cap_line(image="a", tokens="0 5 6 7 2", boxes=None) -> str:
  W, H, bx, ft = IMAGES[image]
  fields = ["COCO_img_" + image, "c1", tokens, "0 0 0 0 0", "2 3 4 5 6", "0 0 0 0 0", "", "",
            str(H), str(W), str(len(bx)), b64(bx) if boxes is None else boxes,
            b64(np.ones((len(bx), 3))), b64(np.ones((len(bx), 2))), b64(ft), "0"]
  return ";".join(fields)


def _write(tmp_path, name, lines):
  p = tmp_path / name
  p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
  return str(p)


def test_region_inputs_width_first_in_snli_ve_height_first_in_captioning():
  for kind, line in (("entailment", ve_line()), ("captioning", cap_line())):
    r = unimo_lines.region_inputs(line.split(";"), kind, num_regions=3)
    np.testing.assert_allclose(r["region_boxes"][:2], BOXES["a"], rtol=1e-6)
    np.testing.assert_array_equal(r["region_boxes"][2], 0)
    np.testing.assert_array_equal(r["region_features"][:2], IMAGES["a"][3])
    np.testing.assert_array_equal(r["region_valid"], [True, True, False])
  r = unimo_lines.region_inputs(ve_line().split(";"), "entailment", num_regions=1)
  np.testing.assert_array_equal(r["region_valid"], [True])  # the first num_regions kept


def test_entailment_lines_planted_bad_lines(tmp_path):
  lines = [ve_line(),
           ve_line("b", label="contradiction", tokens="0 7 2"),
           ve_line(label="1", tokens="8 9"),                       # no [CLS]/[SEP]: kept
           ve_line(extra=1),                                       # wrong_field_count
           b"a;\xff" + b";x" * 12,                                 # not_utf8
           ve_line(label="7"), ve_line(label="maybe"),             # bad_label x2
           ve_line(tokens="0 x 2"), ve_line(tokens=f"0 {TOK.vocab_size} 2"),  # bad_token_ids x2
           ve_line(tokens="0 2"),                                  # empty_text
           ve_line(w="0"), ve_line(h="wide"),                      # bad_size x2
           ve_line(boxes="!!not base64"),                          # bad_features
           ve_line(n=3),                                           # bad_features (8 floats / 3)
           ve_line(feats=b64(np.full((2, F), np.nan))),            # bad_features (NaN)
           ve_line(feats=b64(np.ones((2, F + 1))))]                # bad_features (width)
  path = _write(tmp_path, "ve.txt", lines)
  rec = unimo_lines.RegionLines(path, "entailment", TOK, num_regions=2, feature_dim=F)
  assert dict(rec.dropped) == {"wrong_field_count": 1, "not_utf8": 1, "bad_label": 2,
                               "bad_token_ids": 2, "empty_text": 1, "bad_size": 2,
                               "bad_features": 4}
  rows, _ = unimo_lines.entailment_rows(rec, TOK, 6)
  np.testing.assert_array_equal(rows["label"], [0, 2, 1])
  np.testing.assert_array_equal(rows["image_index"], [0, 1, 0])
  want = [layouts.pair_text(t, None, 6, cls_id=0, sep_id=2, pad_id=1)
          for t in ([5, 6], [7], [8, 9])]
  np.testing.assert_array_equal(rows["ids"], want)
  g = rec.gather(np.array([[1, 0]]), "neg_")
  assert g["neg_region_features"].shape == (1, 2, 2, F)
  np.testing.assert_allclose(g["neg_region_boxes"][0, 0, 0], BOXES["b"][0], rtol=1e-6)
  np.testing.assert_allclose(g["neg_region_boxes"][0, 1], BOXES["a"], rtol=1e-6)
  np.testing.assert_array_equal(g["neg_region_valid"][0], [[True, False], [True, True]])


def test_wrong_layout_and_feature_width_are_one_line_errors(tmp_path):
  path = _write(tmp_path, "cap.txt", [cap_line(), cap_line("b")])
  with pytest.raises(ValueError, match=r"cap.txt: no line has the 14 ';'-separated fields of "
                                       r"UNIMO's entailment lines \(the first has 16: the "
                                       r"captioning layout\)"):
    unimo_lines.RegionLines(path, "entailment", TOK, num_regions=2, feature_dim=F)
  path = _write(tmp_path, "ve.txt", [ve_line(), ve_line("b")])
  with pytest.raises(ValueError, match=r"ve.txt: image_embeddings have 4 values per box, "
                                       r"data.region_feature_dim=2048"):
    unimo_lines.RegionLines(path, "entailment", TOK, num_regions=2, feature_dim=2048)
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    unimo_lines.RegionLines(str(tmp_path / "nope.txt"), "entailment", TOK, num_regions=2,
                            feature_dim=F)


def _config(**data):
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict(dict(kind=data.pop("kind"), num_labels=3))
  d = dict(source="unimo_lines", batch_size=2, eval_batch_size=2, max_length=8, seed=0,
           num_regions=2, region_feature_dim=F, visual_input="regions")
  d.update(data)
  c.data = ml_collections.ConfigDict(d)
  return c


def test_make_data_entailment_and_captioning(tmp_path):
  ve = _write(tmp_path, "ve.txt", [ve_line(), ve_line("b", label="2"), "a;b;c"])
  data, meta = make_data(_config(kind="entailment", train=ve), "train", TOK, training=True)
  assert data.dropped_counts() == {ve: {"wrong_field_count": 1}}
  b = next(data)
  assert b["region_features"].shape == (2, 2, F) and b["ids"].shape == (2, 8)
  for i, label in zip(b["image_index"], b["label"]):
    assert label == (0 if i == 0 else 2)
    np.testing.assert_allclose(b["region_boxes"][b["image_index"] == i][0][:len(BOXES["ab"[i]])],
                               BOXES["ab"[i]], rtol=1e-6)
  assert len(meta["image_ids"]) == 2
  cap = _write(tmp_path, "cap.txt", [cap_line(), cap_line("a", "0 8 9 2"), cap_line("b", ""),
                                     cap_line("b", "0 10 2")])
  data, meta = make_data(_config(kind="captioning", validation=cap), "validation", TOK,
                         training=False)
  assert data.dropped_counts() == {cap: {"empty_text": 1}}  # a test line without a caption
  assert meta["references"] == [[TOK.decode([5, 6, 7]), TOK.decode([8, 9])], [TOK.decode([10])]]
  b = next(data)
  np.testing.assert_array_equal(b["ids"][0][:5], [0, 5, 6, 7, 2])
  np.testing.assert_array_equal(b["targets"][0][:4], [5, 6, 7, 2])
  assert meta["scenes"].visual["region_features"].shape == (2, 2, F)


def test_official_lines_configs():
  from experiments.configs.finetune import coco_caption, snli_ve, vqa
  from unimo_jax.finetune import config as config_lib
  for module, kind in ((snli_ve, "entailment"), (coco_caption, "captioning")):
    c = module.get_config("base,lines,data_dir=/data")
    assert c.task.kind == kind and c.data.source == "unimo_lines"
    assert c.model.visual_input == "regions" and c.data.num_regions == 100
    assert c.data.train.endswith("/train.txt") and c.model.region_feature_dim == 2048
    config_lib.validate(c, num_devices=1, check_files=False)
  with pytest.raises(ValueError, match="use it with base or large"):
    snli_ve.get_config("lines")
  with pytest.raises(ValueError, match="SNLI-VE and captioning, not vqa"):
    vqa.get_config("base,lines")
  c = snli_ve.get_config("base,lines")
  c.model.visual_input = c.data.visual_input = "patches"
  with pytest.raises(config_lib.ConfigError, match="needs model.visual_input='regions'"):
    config_lib.validate(c, num_devices=1, check_files=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["entailment", "captioning"])
def test_official_lines_finetune_and_evaluate(tmp_path, kind):
  import jax
  from test_finetune_run import finetune_and_evaluate, tiny_config
  from unimo_jax.finetune import config as config_lib
  if kind == "entailment":
    lines = [ve_line(), ve_line("b", label="2", tokens="0 7 8 2"), ve_line(label="1")]
  else:
    lines = [cap_line(), cap_line("b", "0 8 9 2"), cap_line("a", "0 10 2")]
  path = _write(tmp_path, "lines.txt", lines)
  cfg = tiny_config(tmp_path, steps=2)
  cfg.task.update(dict(kind=kind, num_labels=3))
  cfg.data.update(dict(source="unimo_lines", train=path, validation=path, num_regions=2,
                       region_feature_dim=F, visual_input="regions"))
  cfg.model.update(dict(visual_input="regions", region_feature_dim=F))
  cfg.evaluation.max_length = 6
  config_lib.validate(cfg, num_devices=jax.device_count(), check_files=False)
  wd = str(tmp_path / "wd")
  res, entry = finetune_and_evaluate(cfg, wd, tokenizer=TOK)
  assert np.isfinite(res.last_metrics["loss"])
  m = entry["metrics"]
  for key in {"entailment": ("accuracy",), "captioning": ("bleu4", "cider")}[kind]:
    assert 0.0 <= m[key] <= 10.0, (key, m)
