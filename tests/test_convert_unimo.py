"""Official UNIMO import: our model with the converted weights reproduces real Paddle's forward
pass (golden files made by tests/golden/make_unimo_golden.py with paddlepaddle 3.3.1), the
LoDTensor reader against hand-written bytes, bad files, the restricted unpickler, the command
and ``train.init_from``. No Paddle is needed here."""
import io
import os
import pickle
import shutil
import struct

import flax.linen as nn
import jax
import numpy as np
import pytest

from unimo_jax.convert import cli, roberta, unimo
from unimo_jax.model import Unimo, init_variables, masks

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
PARAM_DIR = os.path.join(GOLDEN, "unimo_tiny")
PDPARAMS = os.path.join(PARAM_DIR, "unimo_tiny.pdparams")
ATOL = 1e-4


@pytest.fixture(scope="module")
def golden():
  with np.load(os.path.join(GOLDEN, "unimo_tiny_io.npz"), allow_pickle=False) as f:
    return dict(f)


@pytest.fixture(scope="module")
def converted():
  config, params, notes = unimo.load_checkpoint(PARAM_DIR)
  assert notes == []
  return config, params


def _full_params(config, params):
  """The converted tree on a full model (the CMCL projection layer after the pooler and the
  region heads are not in a UNIMO checkpoint; their values do not enter the outputs tested)."""
  shapes = nn.unbox(jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0))))
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)["params"]
  merged, kept = roberta.merge_params(fresh, params)
  assert all(k.startswith(("region_head/", "text_projection/projection/",
                           "image_projection/projection/")) for k in kept), kept
  return merged


def _pooled(model, params, h, which):
  """relu(pooler(h)) of our Projection module, read from its captured pooler output."""
  method = Unimo.cmcl_text if which == "text" else Unimo.cmcl_image
  _, state = model.apply({"params": params}, h, method=method, capture_intermediates=True,
                         mutable=["intermediates"])
  tower = "text_projection" if which == "text" else "image_projection"
  return np.maximum(np.asarray(state["intermediates"][tower]["pooler"]["__call__"][0]), 0)


def _run(config, params, fn, *args):
  model = Unimo(config)
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=fn))(params, *args)


def _regions(g, prefix):
  return {"region_features": g[prefix + "_features"], "region_boxes": g[prefix + "_boxes"],
          "region_valid": g[prefix + "_valid"]}


def test_config_from_shapes_and_official_json(converted):
  config, _ = converted
  assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads,
          config.mlp_dim, config.max_positions, config.region_feature_dim) == (
              99, 32, 2, 4, 128, 24, 24)
  assert config.visual_input == "regions" and config.roberta_positions and not config.pre_ln
  assert config.mask_token_id == 98 and config.num_region_classes == 16


@pytest.mark.parametrize("layers,hidden,heads", [(12, 768, 12), (24, 1024, 16)])
def test_released_sizes_from_shapes_alone(layers, hidden, heads):
  shapes = {"word_embedding": (50265, hidden), "pos_embedding": (514, hidden),
            "encoder_layer_0_ffn_fc_0.w_0": (hidden, 4 * hidden), "image_emb.w_0": (2048, hidden)}
  shapes.update({f"encoder_layer_{i}_ffn_fc_1.w_0": (4 * hidden, hidden) for i in range(layers)})
  config = unimo.infer_config(shapes)
  assert (config.num_layers, config.num_heads, config.mlp_dim, config.max_text_length,
          config.mask_token_id, config.region_feature_dim) == (
              layers, heads, 4 * hidden, 512, 50264, 2048)


def test_text_alone_matches_paddle(converted, golden):
  config, params = converted
  params = _full_params(config, params)
  out = _run(config, params, Unimo.encode_text, golden["text_ids"])
  valid = golden["text_valid"].astype(bool)
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid], golden["text_hidden"][valid],
                             atol=ATOL)
  logits = _run(config, params, Unimo.lm_logits, out["hidden"], golden["text_lm_positions"])
  assert np.abs(golden["text_lm_logits"]).max() > 2.0  # a non-trivial comparison
  np.testing.assert_allclose(np.asarray(logits), golden["text_lm_logits"], atol=ATOL)
  pooled = _pooled(Unimo(config), params, out["cls"], "text")
  np.testing.assert_allclose(pooled, golden["text_pooled"], atol=ATOL)


def test_image_alone_matches_paddle(converted, golden):
  config, params = converted
  params = _full_params(config, params)
  out = _run(config, params, Unimo.encode_image, _regions(golden, "image"))
  valid = np.asarray(out["visual_valid"])
  assert valid.sum() == 2 + golden["image_valid"].sum()  # [IMG] + the real regions
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid], golden["image_hidden"][valid],
                             atol=ATOL)
  pooled = _pooled(Unimo(config), params, out["img"], "image")
  np.testing.assert_allclose(pooled, golden["image_pooled"], atol=ATOL)


def test_pair_matches_paddle_bidirectional_and_captioning(converted, golden):
  config, params = converted
  params = _full_params(config, params)
  visual, ids = _regions(golden, "pair"), golden["pair_ids"]
  out = _run(config, params, Unimo.encode_pair, visual, ids)
  vvalid = np.asarray(out["visual_valid"])
  valid = np.concatenate([vvalid, golden["pair_text_valid"].astype(bool)], axis=1)
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid], golden["pair_hidden"][valid],
                             atol=ATOL)
  logits = _run(config, params, Unimo.lm_logits, out["text_hidden"], golden["pair_lm_positions"])
  np.testing.assert_allclose(np.asarray(logits), golden["pair_lm_logits"], atol=ATOL)
  model = Unimo(config)
  np.testing.assert_allclose(_pooled(model, params, out["cls"], "text"),
                             golden["pair_text_pooled"], atol=ATOL)
  np.testing.assert_allclose(_pooled(model, params, out["img"], "image"),
                             golden["pair_image_pooled"], atol=ATOL)

  bias = masks.to_bias(masks.captioning(vvalid.shape[1], golden["pair_text_valid"], vvalid))
  cap = _run(config, params, Unimo.encode_pair, visual, ids, bias)
  np.testing.assert_allclose(np.asarray(cap["hidden"])[valid], golden["caption_hidden"][valid],
                             atol=ATOL)
  logits = _run(config, params, Unimo.lm_logits, cap["text_hidden"], golden["pair_lm_positions"])
  np.testing.assert_allclose(np.asarray(logits), golden["caption_lm_logits"], atol=ATOL)
  assert np.abs(golden["caption_lm_logits"] - golden["pair_lm_logits"]).max() > 0.1


def test_pdparams_pickle_gives_the_same_model(converted):
  config, params = converted
  config2, params2 = unimo.load(PDPARAMS)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


# ----------------------------------------------------------------------- the LoDTensor layout
def _lod_bytes(array, data_type, lod=(), packed=False):
  """A LoDTensor stream written by hand from Paddle's layout (independent of the reader)."""
  dims = b"".join(_varint(d) for d in array.shape)
  desc = b"\x08" + _varint(data_type)
  desc += (b"\x12" + _varint(len(dims)) + dims if packed
           else b"".join(b"\x10" + _varint(d) for d in array.shape))
  out = struct.pack("<IQ", 0, len(lod))
  for level in lod:
    out += struct.pack("<Q", 8 * len(level)) + np.asarray(level, "<u8").tobytes()
  return out + struct.pack("<Ii", 0, len(desc)) + desc + array.tobytes()


def _varint(v):
  out = b""
  while True:
    byte, v = v & 0x7F, v >> 7
    out += bytes([byte | (0x80 if v else 0)])
    if not v:
      return out


def test_lod_tensor_reader_against_hand_written_streams(tmp_path):
  cases = [(np.arange(24, dtype="<f4").reshape(2, 3, 4), 5, (), False),
           (np.arange(6, dtype="<i8").reshape(6, 1), 3, ((0, 2, 6),), True),
           (np.linspace(-1, 1, 300, dtype="<f2").reshape(3, 100), 4, (), True),
           (np.arange(5, dtype="<f8"), 6, (), False)]
  for i, (array, data_type, lod, packed) in enumerate(cases):
    path = tmp_path / f"v{i}"
    path.write_bytes(_lod_bytes(array, data_type, lod, packed))
    got = unimo.read_lod_tensor(str(path))
    assert got.shape == array.shape
    want = array.astype(np.float32) if array.dtype.kind == "f" else array
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_corrupt_or_truncated_variable_file_is_named(tmp_path):
  d = tmp_path / "params"
  shutil.copytree(PARAM_DIR, d)
  name = "encoder_layer_1_multi_head_att_key_fc.w_0"
  original = (d / name).read_bytes()
  (d / name).write_bytes(original[:-6])
  with pytest.raises(ValueError, match=f"{name}: truncated"):
    unimo.load(str(d))
  (d / name).write_bytes(original[:10])
  with pytest.raises(ValueError, match=f"{name}: truncated"):
    unimo.load(str(d))
  (d / name).write_bytes(b"\x07" + original[1:])
  with pytest.raises(ValueError, match=f"{name}: not a LoDTensor file"):
    unimo.load(str(d))
  (d / name).write_bytes(original[:16] + struct.pack("<i", 3) + b"\xff\xff\xff" + original[23:])
  with pytest.raises(ValueError, match=f"{name}: corrupt"):
    unimo.load(str(d))
  (d / name).write_bytes(original + b"\0" * 4)
  with pytest.raises(ValueError, match=f"{name}: corrupt"):
    unimo.load(str(d))
  (d / name).write_bytes(original)
  wo = "encoder_layer_1_ffn_fc_1.w_0"
  (d / wo).write_bytes((d / "encoder_layer_1_ffn_fc_0.w_0").read_bytes())  # a wrong shape
  with pytest.raises(ValueError, match=wo + r": shape \(32, 128\), expected \(128, 32\)"):
    unimo.load(str(d))
  with open(tmp_path / "cut.pdparams", "wb") as f:
    f.write(open(PDPARAMS, "rb").read()[:-100])
  with pytest.raises(ValueError, match="cut.pdparams: corrupt or truncated"):
    unimo.load(str(tmp_path / "cut.pdparams"))


def test_missing_variable_is_named(tmp_path):
  d = tmp_path / "params"
  shutil.copytree(PARAM_DIR, d)
  os.remove(d / "encoder_layer_1_ffn_fc_0.w_0")
  os.remove(d / "mask_lm_out_fc.b_0")
  with pytest.raises(ValueError, match="missing 2 official UNIMO variable file.*"
                     "encoder_layer_1_ffn_fc_0.w_0, mask_lm_out_fc.b_0"):
    unimo.load(str(d))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    unimo.load(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty: no encoder_layer_<i>_.* not a UNIMO checkpoint"):
    unimo.load(str(tmp_path / "empty"))


def test_heads_optimizer_state_and_unknown_variables_are_reported_and_skipped(tmp_path, converted):
  d = tmp_path / "params"
  shutil.copytree(PARAM_DIR, d)
  for extra, like in (("cls_out_w", "pooled_fc_text.w_0"), ("cls_out_b", "pooled_fc_text.b_0"),
                      ("word_embedding_moment1_0", "word_embedding"),
                      ("learning_rate_0", "mask_lm_out_fc.b_0"),
                      ("sent_embedding", "image_loc.w_0")):
    shutil.copy(d / like, d / extra)
  config, params, notes = unimo.load_checkpoint(str(d))
  assert notes == ["skipped 2 fine-tuning head variable(s): cls_out_b, cls_out_w",
                   "skipped 2 optimizer state variable(s): learning_rate_0, "
                   "word_embedding_moment1_0",
                   "skipped 1 unknown variable(s): sent_embedding"]
  assert config == converted[0]
  jax.tree.map(np.testing.assert_array_equal, params, converted[1])


def test_config_json_absent_or_inconsistent(tmp_path, converted):
  d = tmp_path / "params"
  shutil.copytree(PARAM_DIR, d)
  os.remove(d / "config.json")
  with pytest.raises(ValueError, match="not a multiple of 64 .* head count"):
    unimo.load(str(d))  # 32 / 64: the head count cannot come from shapes here
  config, _ = unimo.load(str(d), num_heads=4)
  assert config == converted[0].replace(dropout_rate=0.1, num_region_classes=1601)
  (tmp_path / "bad.json").write_text('{"num_attention_heads": 4, "hidden_size": 48}')
  with pytest.raises(ValueError, match="bad.json: hidden_size=48 but"):
    unimo.load(str(d), config_path=str(tmp_path / "bad.json"))


# ----------------------------------------------------------------------- the pickle
class _Payload:
  def __reduce__(self):
    return (os.system, ("echo this must never run",))


def test_restricted_unpickler_refuses_non_array_objects(tmp_path):
  arrays = {"word_embedding": np.ones((3, 2), np.float32), "ids": np.arange(3)}
  ok = tmp_path / "ok.pdparams"
  ok.write_bytes(pickle.dumps(arrays, protocol=4))
  got = unimo.read_pdparams(str(ok))
  np.testing.assert_array_equal(got["word_embedding"], arrays["word_embedding"])
  paddle_save_style = {"w": ("linear_0.w_0", np.zeros(2, np.float32)),
                       "StructuredToParameterName@@": {"w": "linear_0.w_0"}}
  assert list(unimo.read_pdparams(_dump(tmp_path / "ps.pdparams", paddle_save_style))) == ["w"]

  for bad, culprit in ((dict(arrays, evil=_Payload()), r"posix\.system|os\.system"),
                       (dict(arrays, obj=io.BytesIO(b"x")), r"_io\.BytesIO"),
                       (dict(arrays, fn=np.save), r"numpy.*save")):
    path = _dump(tmp_path / "bad.pdparams", bad)
    with pytest.raises(pickle.UnpicklingError, match=f"bad.pdparams: refusing to unpickle "
                       f"({culprit})"):
      unimo.read_pdparams(path)
  path = _dump(tmp_path / "strs.pdparams", dict(arrays, names=np.array(["a"], dtype=object)))
  with pytest.raises(ValueError, match="'names' is not a numeric array"):
    unimo.read_pdparams(path)


def _dump(path, obj):
  path.write_bytes(pickle.dumps(obj, protocol=4))
  return str(path)


# ----------------------------------------------------------------------- command, init_from
def test_command_round_trip(tmp_path, converted, capsys):
  out = tmp_path / "converted"
  assert cli.main(["unimo-jax convert", "unimo", "--paddle-dir", PARAM_DIR,
                   "--out", str(out)]) == 0
  assert "converted" in capsys.readouterr().out
  config, params = roberta.load_converted(str(out))
  assert config == converted[0]
  jax.tree.map(np.testing.assert_array_equal, params, converted[1])

  d = tmp_path / "params"
  shutil.copytree(PARAM_DIR, d)
  os.remove(d / "image_emb.w_0")
  assert cli.main(["unimo-jax convert", "unimo", "--paddle-dir", str(d), "--out",
                   str(tmp_path / "x")]) == 2
  assert "image_emb.w_0" in capsys.readouterr().err
  assert cli.main(["unimo-jax convert", "unimo", "--paddle-dir", PDPARAMS, "--out",
                   str(tmp_path / "y"), "--num-heads", "4"]) == 0


@pytest.mark.slow
def test_converted_checkpoint_is_usable_as_init_from(tmp_path, converted):
  import train_util as tu  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  config, params = converted
  out = str(tmp_path / "converted")
  assert cli.main(["unimo-jax convert", "unimo", "--paddle-dir", PARAM_DIR, "--out", out]) == 0
  c = tu.run_config("regions")
  c.model.update(dict(vocab_size=config.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                      mlp_dim=128, max_positions=24, roberta_positions=True,
                      region_feature_dim=24))
  c.data.region_feature_dim = 24
  c.data.streams.image.batch_size = 0
  c.data.streams.pair.batch_size = 0
  c.train.progress_bar = "off"
  c.train.checkpoint_every = 0
  c.train.init_from = out
  wd = str(tmp_path / "run")
  trainer.train(c, wd, data=tu.batches(c), max_steps=0)  # saves the initial state (step 0)
  restored, step = ckpt_lib.restore_params(wd)
  assert step == 0
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  got = dict(jax.tree_util.tree_flatten_with_path(restored["model"])[0])
  for path, value in flat.items():
    np.testing.assert_array_equal(got[path], value)
