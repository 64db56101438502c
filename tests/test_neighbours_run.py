"""Slow end-to-end checks of the neighbours: the embedding scorer on a run's checkpoint, and
exact training resume with X_I / X_T on (demo_related on the tiny synthetic_scenes)."""
import json
import os

import jax
import numpy as np
import pytest

from data_pipelines import neighbours, pipeline, prepare, tokenizers
from experiments.configs import demo_related
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import main as main_lib
from unimo_jax.train import metrics as metrics_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synthetic_scenes"))
  prepare.prepare_synthetic(d, size="tiny")
  arg = f"smoke,data_dir={d}"
  prepare.prepare_neighbours(
      os.path.join(os.path.dirname(demo_related.__file__), "demo_related.py") + ":" + arg,
      None, None, None)
  return arg


def _config(arg):
  c = demo_related.get_config(arg)
  c.data.workers = 0
  c.train.log_every = 1
  c.train.progress_bar = "off"
  return c


def _reference_top_k(q, c, k):
  s = q.astype(np.float64) @ c.astype(np.float64).T
  return [list(np.argsort(-s[i], kind="stable")[:k]) for i in range(len(q))]


def test_embedding_scorer_ranks_by_the_checkpoint_towers(data, tmp_path):
  c = _config(data)
  workdir = str(tmp_path / "run")
  r = main_lib.train_from_config(c, workdir, max_steps=2)
  assert r.checkpoint_step == 2
  c.neighbours.images = c.neighbours.texts = "embedding"
  out = str(tmp_path / "nb.jsonl")
  lines = []
  report = neighbours.build(c, out, workdir=workdir, step=2, log=lines.append)
  assert report["embedding"]["step"] == 2 and report["embedding"]["items_per_s"] > 0
  assert any("items/s" in line for line in lines)
  assert any("precision@k" in line for line in lines)
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  # Independent ranking of the same embeddings: numpy over the full matrix.
  cfg = pipeline.resolve_config(c.data)
  pairs = neighbours._records(dict(cfg["streams"]["pair"]["sources"][0]), "p",
                              {"image", "regions", "captions"})
  imgs = neighbours._records(dict(cfg["streams"]["image"]["sources"][0]), "i",
                             {"image", "regions"})
  emb = neighbours.Embedder(workdir, 2, cfg, tokenizers.load_tokenizer(cfg["tokenizer"]))
  q, col = emb.images(pairs, 16), emb.images(imgs, 16)
  want = _reference_top_k(q, col, 4)
  scores = q @ col.T
  for i, (row, w) in enumerate(zip(rows, want)):
    assert row["images"] == [imgs[j]["key"] for j in w]
    np.testing.assert_allclose(row["image_scores"], scores[i, w], atol=2e-5)
  assert all(len(row["texts"]) == 4 for row in rows)
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)


def test_training_resume_is_exact_with_neighbours_on(data, tmp_path):
  c = _config(data)
  c.train.checkpoint_every = 2
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  main_lib.train_from_config(c, straight, max_steps=4)
  main_lib.train_from_config(c, split, max_steps=2)
  r = main_lib.train_from_config(c, split, max_steps=2)
  assert (r.first_step, r.last_step) == (2, 4)

  def losses(w):
    rows = metrics_lib.read_jsonl(os.path.join(w, "metrics.jsonl"))
    return {row["step"]: (row["loss"], row.get("pair_cmcl/num_image_columns")) for row in rows}
  a, b = losses(straight), losses(split)
  assert a == b and sorted(a) == [1, 2, 3, 4]
  assert all(v[1] == 16 for v in a.values())  # 8 images + 8 related images every step
  pa, _ = ckpt_lib.restore_params(straight, 4)
  pb, _ = ckpt_lib.restore_params(split, 4)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_with_refresh_remines_with_each_checkpoint(data, tmp_path):
  c = _config(data)
  c.train.checkpoint_every = 2
  path = dict(c.data.streams.pair.sources[0])["neighbours"]
  with open(path) as f:
    before = f.read()
  workdir = str(tmp_path / "run")
  try:
    r = neighbours.train_with_refresh(c, workdir, every=2, log=lambda line: None)
    assert (r.last_step, r.stopped_by) == (4, "done")
    with open(path) as f:
      after = [json.loads(line) for line in f]
    # The file is the embedding scorer's ranking at the round's checkpoint (step 2).
    mined = _config(data)
    mined.neighbours.images = mined.neighbours.texts = "embedding"
    again = str(tmp_path / "again.jsonl")
    neighbours.build(mined, again, workdir=workdir, step=2, log=lambda line: None)
    with open(again) as f:
      assert after == [json.loads(line) for line in f]
    assert [json.loads(line) for line in before.splitlines()] != after
  finally:
    with open(path, "w") as f:  # the module's other tests read the objects / tfidf file
      f.write(before)
