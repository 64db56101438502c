"""The runner: 8 devices equal 1, uneven last batches count once, processes cover every row once,
and the language metrics equal a direct unpadded numpy computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimo_jax import masking, parallel
from unimo_jax.evaluation import captioning, retrieval, runner
from unimo_jax.model import ModelConfig, Unimo, init_params

N, C, K, L = 13, 2, 3, 8


@pytest.fixture(scope="module")
def model_and_params():
  cfg = ModelConfig.tiny(vocab_size=64, dropout_rate=0.0, attention_dropout_rate=0.0)
  return Unimo(cfg), init_params(cfg, jax.random.key(1))


def _text(rng, n_words):
  """[CLS] w.. [SEP] PAD.. with ordinary ids 4..62."""
  ids = np.full((L,), 1, np.int32)
  ids[0], ids[n_words + 1] = 0, 2
  ids[1:n_words + 1] = rng.integers(4, 63, n_words)
  return ids


def _split(cfg, n=N, seed=0):
  rng = np.random.default_rng(seed)
  data = dict(
      pixels=rng.normal(size=(n, cfg.image_size, cfg.image_size, 3)).astype(np.float32),
      image_id=np.arange(100, 100 + n, dtype=np.int64),
      caption_ids=np.stack([[_text(rng, rng.integers(2, 6)) for _ in range(C)]
                            for _ in range(n)]),
      caption_valid=np.ones((n, C), bool),
      negative_ids=np.stack([[_text(rng, 4) for _ in range(K)] for _ in range(n)]),
      negative_valid=np.ones((n, K), bool),
      negative_kind=rng.integers(0, 2, size=(n, K)).astype(np.int32),
  )
  data["caption_valid"][::4, 1] = False  # some images have one caption only
  data["negative_valid"][1::3, 2] = False
  mlm, s2s, cap = [], [], []
  for i in range(n):
    ids = data["caption_ids"][i, 0]
    r = np.random.default_rng([seed, i])
    mlm.append(masking.span_mlm(ids, ids > 3, r, vocab_size=64, mask_id=63,
                                special_ids=(0, 1, 2, 3, 63), max_predictions=4))
    s2s.append(masking.infilling(ids, r, max_length=12, max_predictions=8, bos_id=0, eos_id=63,
                                 pad_id=1, min_len=1, max_len=2))
    cap.append(masking.captioning_layout(ids, max_length=L, max_predictions=L))
  for prefix, rows, names in (
      ("mlm_", mlm, dict(ids="input_ids", positions="positions", targets="targets",
                          weights="weights")),
      ("s2s_", s2s, dict(ids="input_ids", segments="segments", position_ids="position_ids",
                          positions="positions", targets="targets", weights="weights")),
      ("cap_", cap, dict(ids="input_ids", positions="positions", targets="targets",
                          weights="weights"))):
    for field, key in names.items():
      data[prefix + field] = np.stack([r[key] for r in rows])
  meta = dict(captions=[[f"w{j} x" for j in range(C)] for _ in range(n)],
              kind_names=("colour", "shape"))
  return data, meta


def _mesh(n):
  return parallel.make_mesh((-1, 1, 1), devices=jax.devices()[:n])


def test_embeddings_on_8_devices_equal_1_device_with_an_uneven_batch(model_and_params):
  model, params = model_and_params
  data, _ = _split(model.config)
  out = {}
  for n in (1, 8):
    ev = runner.Evaluator(model, _mesh(n), runner.EvalSettings(batch_size=8))
    out[n] = ev.embeddings(params, data)
  # 13 rows in batches of 8: the second batch has 5 real rows and 3 padding rows.
  np.testing.assert_array_equal(out[8]["index"], np.arange(N))
  np.testing.assert_array_equal(out[1]["index"], np.arange(N))
  for key in ("image", "caption", "negative"):
    np.testing.assert_allclose(out[8][key], out[1][key], rtol=1e-5, atol=1e-6)
  # And both equal one unpadded, unsharded forward of all 13 rows.
  ref = jax.jit(lambda p, b: retrieval.embed_batch(model, p, b))(
      params, {k: data[k] for k in ("pixels", "caption_ids", "negative_ids")})
  np.testing.assert_allclose(out[8]["image"], ref["image"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[8]["caption"], ref["caption"], rtol=1e-5, atol=1e-6)


def test_full_run_counts_every_row_once_and_matches_between_meshes(model_and_params):
  model, params = model_and_params
  data, meta = _split(model.config)
  settings = runner.EvalSettings(
      batch_size=8, caption=captioning.CaptionSettings(max_length=4, beam_size=2),
      caption_images=10)
  results = {}
  for n in (1, 8):
    ev = runner.Evaluator(model, _mesh(n), settings,
                          decode_fn=lambda ids: " ".join(f"w{i}" for i in ids))
    results[n] = ev.run(params, data, meta)
  pairs = results[8]["pairs"]
  n_captions = int(data["caption_valid"].sum())
  assert pairs["i2t_r@1"][1] == N and pairs["t2i_r@1"][1] == n_captions
  n_trials = int(sum(data["caption_valid"][i].sum() * data["negative_valid"][i].sum()
                     for i in range(N)))
  assert pairs["hard_negative_acc"][1] == n_trials
  assert pairs["hard_negative_all_acc"][1] == data["negative_valid"].sum()
  assert pairs["mlm_nll"][1] == sum(data["mlm_weights"].sum(1))
  assert len(results[8]["artefacts"]["captions"]) == 10
  assert sorted(c["index"] for c in results[8]["artefacts"]["captions"]) == list(range(10))
  for key, value in results[1]["metrics"].items():
    if not key.endswith("_s"):  # timings differ
      np.testing.assert_allclose(results[8]["metrics"][key], value, rtol=1e-4, err_msg=key)
  for key in ("bleu4", "cider", "i2t_r@1", "t2i_r@5", "hard_negative_acc", "mlm_accuracy",
              "s2s_perplexity", "caption_nll"):
    assert np.isfinite(results[8]["metrics"][key]), key


def test_language_metrics_equal_a_direct_computation(model_and_params):
  model, params = model_and_params
  data, _ = _split(model.config, n=5, seed=3)
  ev = runner.Evaluator(model, _mesh(8), runner.EvalSettings(batch_size=8,
                                                             evaluators=("language",)))
  got = ev.run(params, data)["metrics"]
  # Reference: one unpadded forward per objective, numpy cross-entropy.
  @jax.jit
  def mlm_logits(p, ids, positions):
    hidden = model.apply({"params": p}, ids, method=Unimo.encode_text)["hidden"]
    return model.apply({"params": p}, hidden, positions, method=Unimo.lm_logits)

  logits = np.asarray(mlm_logits(params, data["mlm_ids"], data["mlm_positions"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  t, w = data["mlm_targets"], data["mlm_weights"]
  nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
  acc = (logits.argmax(-1) == t)
  np.testing.assert_allclose(got["mlm_nll"], (nll * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(got["mlm_perplexity"], np.exp((nll * w).sum() / w.sum()), rtol=1e-5)
  np.testing.assert_allclose(got["mlm_accuracy"], (acc * w).sum() / w.sum(), rtol=1e-6)


def test_split_batches_give_each_process_an_equal_number_of_batches_covering_all_rows():
  data = {"image_id": np.arange(13), "x": np.arange(13) * 10}
  seen, counts = [], []
  for p in range(2):
    batches = list(runner.split_batches(data, 8, ["x"], process_index=p, process_count=2))
    counts.append(len(batches))
    for b in batches:
      assert len(b["x"]) == 4
      seen += list(b["index"][b["row_valid"]])
      np.testing.assert_array_equal(b["x"][b["row_valid"]], b["index"][b["row_valid"]] * 10)
  assert counts == [2, 2]
  assert sorted(seen) == list(range(13))


def test_global_batch_size_rounds_up_to_the_data_parallel_size():
  assert runner.global_batch_size(13, _mesh(8)) == 16
  assert runner.global_batch_size(16, _mesh(8)) == 16
  assert runner.global_batch_size(3, _mesh(1)) == 3


def test_settings_from_config():
  s = runner.EvalSettings.from_config({"batch_size": 4, "caption": {"beam_size": 3},
                                       "evaluators": ["retrieval"]})
  assert s.batch_size == 4 and s.caption.beam_size == 3 and s.evaluators == ("retrieval",)
  with pytest.raises(ValueError, match="bogus"):
    runner.EvalSettings.from_config({"bogus": 1})
  with pytest.raises(ValueError, match="beem"):
    runner.EvalSettings.from_config({"caption": {"beem_size": 1}})
