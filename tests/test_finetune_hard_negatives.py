"""Hard negatives of retrieval fine-tuning: the mined pools against a numpy brute force (on the
8 fake devices), the batches' negatives drawn from them, and the pools' file on resume."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from data_fixtures import WhitespaceTokenizer
from data_pipelines.finetune import RowBatches, scenes
from finetune_util import tiny_config
from unimo_jax.finetune import hard_negatives
from unimo_jax.model import Unimo, init_variables

TOK = WhitespaceTokenizer()


def _brute(image_emb, text_emb, text_scene, k):
  s = image_emb @ text_emb.T                                   # [S, R]
  own = text_scene[None, :] == np.arange(len(image_emb))[:, None]
  img_pool = np.argsort(-np.where(own, -np.inf, s).T, axis=1, kind="stable")[:, :k]
  txt_pool = np.argsort(-np.where(own, -np.inf, s), axis=1, kind="stable")[:, :k]
  return img_pool, txt_pool


def test_mined_pools_equal_a_numpy_brute_force():
  assert jax.device_count() == 8
  r = np.random.default_rng(0)
  n_img, per = 13, 3
  text_scene = np.repeat(np.arange(n_img), per)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  img = unit(r.normal(size=(n_img, 8))).astype(np.float32)
  txt = unit(r.normal(size=(n_img * per, 8))).astype(np.float32)
  pools = hard_negatives.mine(img, txt, text_scene, k=5)
  ref_img, ref_txt = _brute(img.astype(np.float64), txt.astype(np.float64), text_scene, 5)
  np.testing.assert_array_equal(pools["images"], ref_img)
  np.testing.assert_array_equal(pools["texts"], ref_txt)
  assert not np.any(pools["images"] == text_scene[:, None])
  assert not np.any(text_scene[pools["texts"]] == np.arange(n_img)[:, None])
  # more than the candidates: -1 fills the missing slots
  few = hard_negatives.mine(img[:2], txt[:6], text_scene[:6], k=4)
  assert (few["images"][:, 1:] == -1).all() and (few["texts"][:, 3:] == -1).all()


@pytest.fixture(scope="module")
def train_scenes():
  return scenes.Scenes("train", size="tiny", limit=8, input_size=16)


def test_batches_draw_their_negatives_from_the_pools(train_scenes):
  n = train_scenes.count
  calls = []

  def pools(visual, ids, image_index):
    calls.append(len(ids))
    # images: the next two scenes; texts: rows of the scene before (never one's own)
    img = np.stack([(image_index + 1) % n, (image_index + 2) % n], 1)
    rows_of = [np.nonzero(image_index == s)[0] for s in range(n)]
    txt = np.stack([np.r_[rows_of[(s - 1) % n][:2], -1] for s in range(n)])
    return {"images": img, "texts": txt}
  rows, extra = scenes.retrieval_rows(train_scenes, TOK, 24, num_negative_images=3,
                                      num_negative_texts=4, hard_pools=pools)
  assert calls == [len(rows["ids"])]
  data = RowBatches(rows, 4, seed=0, extra=extra)
  table, valid = scenes.caption_table(train_scenes, TOK, 24)
  pix = train_scenes.visual["pixels"]
  from_pool = drawn = 0
  for _ in range(4):
    b = next(data)
    for i, own in enumerate(b["image_index"]):
      allowed = [pix[(own + 1) % n], pix[(own + 2) % n]]
      for neg in b["neg_pixels"][i]:
        assert any(np.array_equal(neg, a) for a in allowed)
      before = table[(own - 1) % n][valid[(own - 1) % n]][:2]
      for neg in b["neg_ids"][i]:  # a pool row, or (slot -1) a uniform other scene's caption
        assert not any(np.array_equal(neg, c) for c in table[own])
        from_pool += any(np.array_equal(neg, c) for c in before)
        drawn += 1
  # two of the three pool slots are rows, one is -1 (a uniform draw): both kinds occur
  assert 0.4 * drawn < from_pool < drawn
  # a pool holding a positive's own scene is refused
  bad = lambda v, ids, ii: {"images": np.stack([ii, ii], 1), "texts": np.zeros((n, 2), int) - 1}
  with pytest.raises(ValueError, match="own scene"):
    scenes.retrieval_rows(train_scenes, TOK, 24, num_negative_images=1, num_negative_texts=1,
                          hard_pools=bad)


def test_pool_builder_mines_with_the_model_and_reads_its_file_back(tmp_path, train_scenes):
  cfg = tiny_config()
  model = Unimo(cfg)
  params = nn.unbox(init_variables(cfg, jax.random.key(0))["params"])
  build = hard_negatives.pool_builder(model, params, 3, str(tmp_path))
  table, valid = scenes.caption_table(train_scenes, TOK, 12)
  img_of, cap_of = np.nonzero(valid)
  ids = np.clip(table[img_of, cap_of], 0, cfg.vocab_size - 1)
  pools = build(train_scenes.visual, ids, img_of)
  # the reference: embeddings one by one on one device, then the brute force
  apply = lambda *a, method: model.apply({"params": params}, *a, method=method)
  img = np.stack([np.asarray(apply(apply({"pixels": p[None]}, method=Unimo.encode_image)["img"],
                                   method=Unimo.cmcl_image))[0]
                  for p in train_scenes.visual["pixels"]])
  txt = np.asarray(apply(apply(ids, method=Unimo.encode_text)["cls"], method=Unimo.cmcl_text))
  ref_img, ref_txt = _brute(img.astype(np.float64), txt.astype(np.float64), img_of, 3)
  np.testing.assert_array_equal(pools["images"], ref_img)
  np.testing.assert_array_equal(pools["texts"], ref_txt)
  assert (tmp_path / hard_negatives.FILE).is_file()
  # a resume reads the file (whatever the parameters now are)
  other = jax.tree.map(lambda x: x * 0.0, params)
  again = hard_negatives.pool_builder(model, other, 3, str(tmp_path))(train_scenes.visual, ids,
                                                                       img_of)
  np.testing.assert_array_equal(again["images"], pools["images"])
  with pytest.raises(ValueError, match="remove the file"):
    hard_negatives.pool_builder(model, params, 2, str(tmp_path))(train_scenes.visual, ids, img_of)
