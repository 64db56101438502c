"""Related images X_I / related texts X_T: the side file `prepare neighbours` builds, read back by
the pipeline, and reaching the CMCL loss exactly as the numpy reference with those positives."""
import json
import math
import os

import jax
import numpy as np
import pytest

from data_pipelines import examples, neighbours, pipeline, prepare, tokenizers
from data_pipelines.sources import load_neighbours, open_source
from data_pipelines.streams import Stream
from data_pipelines.synthetic_scenes import generate, related
from experiments.configs import demo_related
from tests.test_contrastive import numpy_cmcl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synthetic_scenes"))
  prepare.prepare_synthetic(d, size="tiny")
  arg = f"smoke,data_dir={d}"
  config = demo_related.get_config(arg)
  path = dict(config.data.streams.pair.sources[0])["neighbours"]
  report = prepare.prepare_neighbours(
      os.path.join(os.path.dirname(demo_related.__file__), "demo_related.py") + ":" + arg,
      None, None, None)
  return dict(dir=d, config=config, path=path, report=report)


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _config(data):
  c = demo_related.get_config(f"smoke,data_dir={data['dir']}")
  c.data.workers = 0
  return c


def test_side_file_format_scores_exclusions_and_ground_truth(data):
  lines = _lines(data["path"])
  opts = generate.SceneOptions(kind="pairs", size="tiny")
  assert len(lines) == opts.num_examples("train") == data["report"]["pairs"]
  images = generate.SceneOptions(kind="images", size="tiny")
  hist = lambda objs: np.bincount(  # independent: the generator's exact object lists
      objs["shape"] * 8 + objs["colour"], minlength=48).astype(float)
  for line in lines[:12]:
    index = int(line["key"])
    pair = generate.example(opts, "train", index)
    assert len(line["images"]) == len(line["image_scores"]) <= 4
    assert line["image_scores"] == sorted(line["image_scores"], reverse=True)
    h = hist(pair["objects"])
    for key, score in zip(line["images"], line["image_scores"]):
      stream, j = divmod(int(key), generate.ID_STRIDE)
      assert stream == generate.STREAMS["images"]
      g = hist(generate.example(images, "train", j)["objects"])
      assert score == pytest.approx(h @ g / np.linalg.norm(h) / np.linalg.norm(g), abs=1e-5)
      assert score > 0
    assert len(line["texts"]) == len(line["text_scores"]) == 4
    assert line["text_scores"] == sorted(line["text_scores"], reverse=True)
    own = {" ".join(c.lower().split()) for c in pair["captions"]}
    assert not own & {" ".join(t.lower().split()) for t in line["texts"]}
    assert len(set(line["texts"])) == len(line["texts"])  # no exact duplicates
  gt = data["report"]["ground_truth"]
  # exact region classes: every image neighbour shares an object; TF-IDF well above chance
  assert gt["images"]["precision"] == 1.0
  assert gt["texts"]["precision"] > 2 * gt["texts"]["base_rate"]
  for side in ("images", "texts"):
    assert data["report"][side]["items_per_s"] > 0


def test_ground_truth_recomputes_every_kind_of_record():
  opts = related.options_from_name("synthetic_scenes/pairs_tiny")
  for kind, split in (("pairs", "train"), ("pairs", "test"), ("images", "train")):
    o = generate.SceneOptions(kind=kind, size="tiny")
    rec = generate.example(o, split, 5)
    kinds = related.object_kinds(related.scene_of_key(opts, rec["image_id"]))
    assert kinds == set(zip(rec["objects"]["colour"].tolist(), rec["objects"]["shape"].tolist()))
  text = generate.example(generate.SceneOptions(kind="text", size="tiny"), "train", 7)
  scene = related.scene_of_key(opts, text["text_id"])
  from data_pipelines.synthetic_scenes import scene as scene_lib
  named = {(scene_lib.COLOURS[c], scene_lib.SHAPES[s]) for c, s in related.object_kinds(scene)}
  assert any(f"{c} {s}" in text["text"] for c, s in named)  # the document is about that scene
  assert related.options_from_name("images_s48_seed3").seed == 3
  with pytest.raises(ValueError, match="not a synthetic_scenes config"):
    related.options_from_name("pairs_bogus")


def test_side_file_round_trips_through_the_pipeline(data):
  c = _config(data)
  cfg = pipeline.resolve_config(c.data)
  tok = tokenizers.load_tokenizer(cfg["tokenizer"])
  stream = Stream("pair", cfg, tok, process_index=0, process_count=1)
  table = load_neighbours(data["path"])
  image_spec = dict(cfg["streams"]["image"]["sources"][0])
  images = open_source(image_spec, name="images")
  codec = examples.TextCodec(tok)
  length = cfg["streams"]["pair"]["max_length"]
  for i in range(6):
    rec = stream.sources[0].read(i)
    want_images, want_texts = table[rec["key"]]
    row = stream.row(slot=100 + i, s=0, i=i)
    assert row["related_valid"].tolist() == [True]
    j = images.find(want_images[0])
    assert row["_image"][1] == images.read(j)["image"]  # X_I: the unpaired image's bytes
    ids, valid = codec.texts(want_texts[:1], 1, length)
    np.testing.assert_array_equal(row["related_text_ids"], ids)
    assert row["related_text_valid"].tolist() == [True]


def test_data_resume_is_exact_with_neighbours_on(data):
  c = _config(data)
  it = pipeline.make_pipeline(c.data, process_index=0, process_count=1)
  it.next()
  saved = it.get_state()
  want = [it.next() for _ in range(2)]
  it.close()
  again = pipeline.make_pipeline(c.data, process_index=0, process_count=1)
  again.set_state(saved)
  got = [again.next() for _ in range(2)]
  again.close()
  for w, g in zip(want, got):
    assert w["pair/related_valid"].any()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def _embed(model, params, batch):
  """Independent CMCL embeddings of every text and image of a pair batch (float64)."""
  from unimo_jax.model import Unimo
  ap = lambda *a, method: model.apply({"params": params}, *a, method=method)

  def texts(ids):
    b, k, length = ids.shape
    cls = ap(ids.reshape(b * k, length), method=Unimo.encode_text)["cls"]
    return np.asarray(ap(cls, method=Unimo.cmcl_text), np.float64).reshape(b, k, -1)

  def images(pixels):
    img = ap({"pixels": pixels}, method=Unimo.encode_image)["img"]
    return np.asarray(ap(img, method=Unimo.cmcl_image), np.float64)

  b = batch["pair/caption_ids"].shape[0]
  rel = batch["pair/related_pixels"]
  return dict(
      image=images(batch["pair/pixels"]), text=texts(batch["pair/caption_ids"][:, None])[:, 0],
      positives=texts(batch["pair/positive_ids"]), related=texts(batch["pair/related_text_ids"]),
      negatives=texts(batch["pair/negative_ids"]),
      related_images=images(rel.reshape((-1,) + rel.shape[2:])).reshape(b, rel.shape[1], -1))


@pytest.mark.slow
def test_related_items_reach_the_cmcl_loss_as_in_the_numpy_reference(data):
  from unimo_jax import parallel
  from unimo_jax.model import Unimo
  from unimo_jax.train import setup as setup_lib
  c = _config(data)
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  it = pipeline.make_pipeline(c.data, process_index=0, process_count=1)
  batch = it.next()
  it.close()
  assert batch["pair/related_valid"].all() and batch["pair/related_text_valid"].all()
  run = setup_lib.build_run(c, it.spec, vocab_size=tok.vocab_size, process_count=1)
  state = run.new_state()
  params = jax.device_get(state.params)  # before the step, which donates the state
  _, metrics = run.step(state, parallel.global_batch(batch, run.mesh))
  metrics = jax.device_get(metrics)
  e = _embed(Unimo(run.model_cfg), params["model"], batch)
  log_t = float(params["cmcl"]["log_temperature"])
  valid = batch["pair/row_valid"].astype(bool)
  aug = dict(positive_texts=np.concatenate([e["positives"], e["related"]], 1),
             negative_texts=e["negatives"], positive_images=e["related_images"])
  masks = dict(positive_texts=np.concatenate([batch["pair/positive_valid"],
                                              batch["pair/related_text_valid"]], 1),
               negative_texts=batch["pair/negative_valid"],
               positive_images=batch["pair/related_valid"])
  masks = {k: v.astype(bool) for k, v in masks.items()}
  _, with_related, _ = numpy_cmcl(e["image"], e["text"], log_t, valid, aug, masks)
  for k in ("loss_i2t", "loss_t2i"):
    assert float(metrics[f"pair_cmcl/{k}"]) == pytest.approx(with_related[k], rel=2e-4), k
  assert metrics["pair_cmcl/num_image_columns"] == with_related["num_image_columns"] == 2 * 8
  assert metrics["pair_cmcl/num_text_columns"] == with_related["num_text_columns"]
  # Without X_I / X_T the reference loss is another number: the step used them.
  plain_aug = dict(positive_texts=e["positives"], negative_texts=e["negatives"])
  plain_masks = dict(positive_texts=masks["positive_texts"][:, :e["positives"].shape[1]],
                     negative_texts=masks["negative_texts"])
  _, plain, _ = numpy_cmcl(e["image"], e["text"], log_t, valid, plain_aug, plain_masks)
  for k in ("loss_i2t", "loss_t2i"):
    assert not math.isclose(plain[k], with_related[k], rel_tol=1e-3), k


def test_settings_and_command_errors(data, tmp_path):
  c = _config(data)
  c.neighbours.images = "pixels"
  with pytest.raises(ValueError, match="neighbours.images must be one of"):
    neighbours.settings(c)
  c = _config(data)
  c.neighbours.k_images = 0
  with pytest.raises(ValueError, match="neighbours.k_images must be >= 1"):
    neighbours.settings(c)
  c = _config(data)
  c.neighbours.texts = "embedding"
  with pytest.raises(ValueError, match="needs a checkpoint: pass --workdir"):
    neighbours.build(c, str(tmp_path / "x.jsonl"))
  rc = prepare.main(["unimo-jax prepare", "neighbours", "--config", str(tmp_path / "no.py")])
  assert rc == 2


def test_missing_neighbours_file_is_one_line_naming_it(tmp_path):
  with pytest.raises(ValueError, match=r"neighbours file .*none.jsonl.*prepare neighbours"):
    load_neighbours(str(tmp_path / "none.jsonl"))
