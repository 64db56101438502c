"""Golden files for the UNIMO importer, made by real Paddle (not by this project's code).

Builds a tiny UNIMO-shaped Paddle static-graph program with the official variable names and
shapes (``NLP/UNIMO/src/model/unimo_finetune.py`` + ``transformer_encoder.py`` of
PaddlePaddle/Research), fills it with random weights, runs the official forward pass on fixed
text, image and image-text inputs, and writes

  tests/golden/unimo_tiny/<variable>          one LoDTensor file per parameter (``save_vars``
                                              without ``filename``: the release's layout)
  tests/golden/unimo_tiny/unimo_tiny.pdparams the same parameters as a ``paddle.static.save``
                                              pickle (name -> numpy array)
  tests/golden/unimo_tiny/config.json         the official config keys (unimo_base_en.json's)
  tests/golden/unimo_tiny_io.npz              inputs and Paddle's outputs (no pickled objects)

The forward pass is UNIMO's: text ``LN_pre_encoder(word[ids] + pos[pos_ids])`` with positions
from 2 (RoBERTa), regions ``LN_v_pre_encoder(image_emb(feat) + image_loc(box))`` with the
[IMG] slot prepended by the reader (mean of the real region features, box [0,0,1,1,1]), the
pair as ``[IMG] v.. [CLS] w.. [SEP]``, post-LN encoder layers ``LN(x + att(x))``,
``LN(x + ffn(x))`` with attention bias ``(mask - 1) * 1e4``, ``q * d_head**-0.5``, erf GELU,
LayerNorm eps 1e-5; LM head ``LN(gelu(fc(h))) @ word_embedding^T + mask_lm_out_fc.b_0`` at
gathered positions; poolers ``relu(fc(h[CLS]))`` / ``relu(fc(h[IMG]))``. The attention masks
are the official ones: bidirectional over valid tokens, and for ``caption_*`` the img2txt mask
(image sees the image, text sees the image and earlier text).

Rerun (from the repository root; needs no GPU, ~10 s):

  python3 -m venv /work/paddle_venv
  /work/paddle_venv/bin/pip install paddlepaddle==3.3.1 numpy
  /work/paddle_venv/bin/python tests/golden/make_unimo_golden.py

Paddle 3's static graph (PIR) is used; fc / layer_norm / embedding are written with the ops
the fluid layers lower to (``x @ w + b``, ``layer_norm``, ``lookup``) over parameters created by
name, because the fluid layer helpers no longer build PIR programs. ``save_vars`` then writes
each variable with ``core.save_func``; every run checks that its file is byte-identical to the
legacy ``save`` op's (``FLAGS_enable_pir_api=0``, in a subprocess), i.e. the LoDTensor stream of
Paddle 1.8
(uint32 version 0, uint64 LoD level count, uint32 tensor version 0, int32 TensorDesc size,
TensorDesc protobuf, raw little-endian data). The seed is fixed, so a rerun reproduces the same
values.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

if "--legacy-save" in sys.argv:  # the legacy static graph is chosen before paddle is imported
  os.environ["FLAGS_enable_pir_api"] = "0"

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle import ParamAttr  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "unimo_tiny")
IO_FILE = os.path.join(HERE, "unimo_tiny_io.npz")

# tiny shapes; FFN is 4H as in the official encoder call (d_inner_hid = emb_size * 4)
CONFIG = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 32, "initializer_range": 0.02, "max_position_embeddings": 24,
    "num_attention_heads": 4, "num_hidden_layers": 2, "type_vocab_size": 4, "vocab_size": 99,
    "image_class_size": 16, "class_attr_size": 4, "image_embedding_size": 24,
    "image_predict_feature": False, "image_predict_class": True, "image_use_attr": False,
    "image_use_soft_label": True,
}
H = CONFIG["hidden_size"]
N_HEAD = CONFIG["num_attention_heads"]
D_HEAD = H // N_HEAD
F_DIM = CONFIG["image_embedding_size"]
EPS = 1e-5
PAD, CLS, SEP = 1, 0, 2


# ------------------------------------------------------------------ the official graph pieces
_PARAMS = {}


def param(name, shape, init=None):
  """One named parameter of the program (created on first use, shared afterwards, as the
  official code shares weights by ParamAttr name)."""
  if name not in _PARAMS:
    _PARAMS[name] = paddle.static.create_parameter(
        list(shape), "float32", attr=ParamAttr(name=name),
        default_initializer=init or paddle.nn.initializer.Constant(0.0))
  return _PARAMS[name]


def layer_norm(x, name):
  """pre_process_layer / post_process_layer 'n': LN over the last dim, eps 1e-5."""
  one = paddle.nn.initializer.Constant(1.0)
  return F.layer_norm(x, [H], weight=param(name + "_layer_norm_scale", [H], one),
                      bias=param(name + "_layer_norm_bias", [H]), epsilon=EPS)


def fc(x, size, name):
  """fluid.layers.fc(num_flatten_dims=ndim-1): x @ w [in, out] + b."""
  w = param(name + ".w_0", [x.shape[-1], size])
  return paddle.matmul(x, w) + param(name + ".b_0", [size])


def encoder_layer(x, bias, i):
  name = f"encoder_layer_{i}"
  att = name + "_multi_head_att"

  def heads(t):  # [B, L, h*d] -> [B, h, L, d] (head-major split of the last dim)
    return paddle.transpose(paddle.reshape(t, [0, 0, N_HEAD, D_HEAD]), [0, 2, 1, 3])

  q = heads(fc(x, H, att + "_query_fc"))
  k = heads(fc(x, H, att + "_key_fc"))
  v = heads(fc(x, H, att + "_value_fc"))
  q = paddle.scale(q, scale=D_HEAD ** -0.5)
  weights = F.softmax(paddle.matmul(q, k, transpose_y=True) + bias)
  ctx = paddle.reshape(paddle.transpose(paddle.matmul(weights, v), [0, 2, 1, 3]), [0, 0, H])
  x = layer_norm(x + fc(ctx, H, att + "_output_fc"), name + "_post_att")
  hidden = F.gelu(fc(x, 4 * H, name + "_ffn_fc_0"), approximate=False)
  return layer_norm(x + fc(hidden, H, name + "_ffn_fc_1"), name + "_post_ffn")


def encoder(x, mask):
  """mask [B, L, L] 0/1 -> bias (mask-1)*1e4 stacked over heads, as UNIMO's _gen_input."""
  bias = paddle.scale(mask, scale=1e4, bias=-1.0, bias_after_scale=False)
  bias = paddle.stack([bias] * N_HEAD, axis=1)
  bias.stop_gradient = True
  for i in range(CONFIG["num_hidden_layers"]):
    x = encoder_layer(x, bias, i)
  return x


def text_embedding(ids, pos):
  word = param("word_embedding", [CONFIG["vocab_size"], H])
  position = param("pos_embedding", [CONFIG["max_position_embeddings"], H])
  return layer_norm(F.embedding(ids, word) + F.embedding(pos, position), "pre_encoder")


def region_embedding(features, boxes):
  x = fc(features, H, "image_emb") + fc(boxes, H, "image_loc")
  return layer_norm(x, "v_pre_encoder")


def lm_logits(hidden, flat_positions):
  """Gathers rows ``flat_positions`` of hidden reshaped [B*L, H] (the official mask_pos)."""
  x = paddle.gather(paddle.reshape(hidden, [-1, H]), flat_positions)
  x = F.gelu(fc(x, H, "mask_lm_trans_fc"), approximate=False)
  x = layer_norm(x, "mask_lm_trans")
  word = param("word_embedding", [CONFIG["vocab_size"], H])
  return paddle.matmul(x, word, transpose_y=True) + param("mask_lm_out_fc.b_0",
                                                          [CONFIG["vocab_size"]])


def pooled(hidden, index, name):
  return F.relu(fc(hidden[:, index], H, name))


# ------------------------------------------------------------------ fixed inputs
def text_inputs(rng):
  ids = np.full((3, 9), PAD, np.int64)
  lengths = (9, 6, 3)
  for b, n in enumerate(lengths):
    ids[b, :n] = np.concatenate([[CLS], rng.integers(4, CONFIG["vocab_size"], n - 2), [SEP]])
  return ids


def positions(ids):
  """RoBERTa positions: real tokens 2, 3, ...; pads at the pad position 1."""
  real = ids != PAD
  return np.where(real, 1 + np.cumsum(real, axis=1), PAD).astype(np.int64)


def region_inputs(rng, counts, max_regions):
  """Detector-like regions: features [B, R, F] >= 0, boxes [B, R, 5], valid [B, R]."""
  b = len(counts)
  features = np.zeros((b, max_regions, F_DIM), np.float32)
  boxes = np.zeros((b, max_regions, 5), np.float32)
  valid = np.zeros((b, max_regions), np.int32)
  for i, n in enumerate(counts):
    features[i, :n] = np.abs(rng.normal(0, 1.0, (n, F_DIM)))
    x1, y1 = rng.uniform(0, 0.6, (2, n))
    x2, y2 = x1 + rng.uniform(0.1, 0.4, n), y1 + rng.uniform(0.1, 0.4, n)
    boxes[i, :n] = np.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], axis=1)
    valid[i, :n] = 1
  return features, boxes, valid


def with_image_slot(features, boxes, valid):
  """What UNIMO's reader feeds: [IMG] = mean of the real features with box [0,0,1,1,1]."""
  n = np.maximum(valid.sum(1, keepdims=True), 1)[..., None]
  mean = (features * valid[..., None]).sum(1, keepdims=True) / n
  img_box = np.broadcast_to(np.array([0, 0, 1, 1, 1], np.float32), (len(boxes), 1, 5))
  v = np.concatenate([np.ones((len(valid), 1), np.int32), valid], axis=1)
  return (np.concatenate([mean, features], 1).astype(np.float32),
          np.concatenate([img_box, boxes], 1).astype(np.float32), v)


def bidirectional(valid):
  v = valid.astype(np.float32)
  return v[:, :, None] * v[:, None, :]


def captioning(vvalid, tvalid):
  valid = np.concatenate([vvalid, tvalid], 1).astype(np.float32)
  n, total = vvalid.shape[1], valid.shape[1]
  idx = np.arange(total)
  is_text = idx >= n
  structure = (~is_text[None, :]) | (is_text[:, None] & is_text[None, :]
                                     & (idx[None, :] <= idx[:, None]))
  return structure[None].astype(np.float32) * valid[:, :, None] * valid[:, None, :]


def flat(lm_positions, length):
  b = np.arange(lm_positions.shape[0])[:, None]
  return (b * length + lm_positions).reshape(-1).astype(np.int64)


# ------------------------------------------------------------------ file layout check
def save_probe(directory):
  """Saves one known [3, 5] float32 parameter with save_vars (PIR or legacy, per the flag)."""
  paddle.enable_static()
  prog, startup = paddle.static.Program(), paddle.static.Program()
  with paddle.static.program_guard(prog, startup):
    w = paddle.static.create_parameter([3, 5], "float32", attr=ParamAttr(name="probe.w_0"))
  exe = paddle.static.Executor(paddle.CPUPlace())
  exe.run(startup)
  value = np.arange(15, dtype=np.float32).reshape(3, 5) - 7.5
  paddle.static.global_scope().find_var("probe.w_0").get_tensor().set(value, paddle.CPUPlace())
  paddle.static.io.save_vars(exe, directory, prog, vars=[w])
  with open(os.path.join(directory, "probe.w_0"), "rb") as f:
    return f.read()


def check_legacy_layout():
  """The PIR writer's bytes == the legacy ``save`` op's bytes for the same tensor."""
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, __file__, "--legacy-save", os.path.join(tmp, "legacy")],
                   check=True, capture_output=True)
    with open(os.path.join(tmp, "legacy", "probe.w_0"), "rb") as f:
      legacy = f.read()
    pir = save_probe(os.path.join(tmp, "pir"))
  if legacy != pir:
    raise SystemExit("save_vars under PIR and the legacy save op write different bytes")
  print(f"LoDTensor layout: PIR save_vars == legacy save op ({len(pir)} bytes)")


# ------------------------------------------------------------------ build, fill, run, save
def main():
  rng = np.random.default_rng(20210801)
  paddle.enable_static()
  paddle.seed(0)
  main_prog, startup = paddle.static.Program(), paddle.static.Program()
  io = {}
  text_ids = text_inputs(rng)
  io.update(text_ids=text_ids.astype(np.int32), text_valid=(text_ids != PAD).astype(np.int32),
            text_lm_positions=np.array([[1, 4, 7], [0, 2, 5], [1, 2, 0]], np.int32))
  io.update(zip(("image_features", "image_boxes", "image_valid"),
                region_inputs(rng, (5, 3), 5)))
  pair_f, pair_b, pair_v = region_inputs(rng, (4, 2), 4)
  pair_ids = np.full((2, 7), PAD, np.int64)
  pair_ids[0] = [CLS, *rng.integers(4, CONFIG["vocab_size"], 5), SEP]
  pair_ids[1, :4] = [CLS, *rng.integers(4, CONFIG["vocab_size"], 2), SEP]
  io.update(pair_features=pair_f, pair_boxes=pair_b, pair_valid=pair_v,
            pair_ids=pair_ids.astype(np.int32), pair_text_valid=(pair_ids != PAD).astype(np.int32),
            pair_lm_positions=np.array([[1, 3, 5], [1, 2, 0]], np.int32))

  t_len, p_len = text_ids.shape[1], pair_ids.shape[1]
  img_f, img_b, img_v = with_image_slot(io["image_features"], io["image_boxes"], io["image_valid"])
  pv_f, pv_b, pv_v = with_image_slot(pair_f, pair_b, pair_v)
  n_vis = pv_f.shape[1]
  feed = {
      "t_ids": text_ids, "t_pos": positions(text_ids), "t_mask": bidirectional(text_ids != PAD),
      "t_lm": flat(io["text_lm_positions"], t_len),
      "i_feat": img_f, "i_box": img_b, "i_mask": bidirectional(img_v),
      "p_ids": pair_ids, "p_pos": positions(pair_ids), "p_feat": pv_f, "p_box": pv_b,
      "p_mask": bidirectional(np.concatenate([pv_v, pair_ids != PAD], 1)),
      "c_mask": captioning(pv_v, pair_ids != PAD),
      "p_lm": flat(io["pair_lm_positions"], p_len),
  }
  with paddle.static.program_guard(main_prog, startup):
    data = {k: paddle.static.data(k, list(v.shape), str(v.dtype)) for k, v in feed.items()}
    xt = text_embedding(data["t_ids"], data["t_pos"])
    text_hidden = encoder(xt, data["t_mask"])
    image_hidden = encoder(region_embedding(data["i_feat"], data["i_box"]), data["i_mask"])
    xp_text = text_embedding(data["p_ids"], data["p_pos"])
    xp = paddle.concat([region_embedding(data["p_feat"], data["p_box"]), xp_text], axis=1)
    pair_hidden = encoder(xp, data["p_mask"])
    caption_hidden = encoder(xp, data["c_mask"])
    fetch = {
        "text_hidden": text_hidden,
        "text_lm_logits": lm_logits(text_hidden, data["t_lm"]),
        "text_pooled": pooled(text_hidden, 0, "pooled_fc_text"),
        "image_hidden": image_hidden,
        "image_pooled": pooled(image_hidden, 0, "pooled_fc_image"),
        "pair_hidden": pair_hidden,
        "pair_lm_logits": lm_logits(pair_hidden[:, n_vis:], data["p_lm"]),
        "pair_text_pooled": pooled(pair_hidden, n_vis, "pooled_fc_text"),
        "pair_image_pooled": pooled(pair_hidden, 0, "pooled_fc_image"),
        "caption_hidden": caption_hidden,
        "caption_lm_logits": lm_logits(caption_hidden[:, n_vis:], data["p_lm"]),
    }
  params = [_PARAMS[k] for k in sorted(_PARAMS)]
  names = sorted(_PARAMS)
  exe = paddle.static.Executor(paddle.CPUPlace())
  exe.run(startup)
  scope = paddle.static.global_scope()
  for name in names:  # random weights, larger than the 0.02 init; LN scales near 1
    t = scope.find_var(name).get_tensor()
    shape = np.array(t).shape
    value = (1.0 + 0.1 * rng.normal(size=shape) if name.endswith("layer_norm_scale")
             else 0.15 * rng.normal(size=shape))
    t.set(value.astype(np.float32), paddle.CPUPlace())

  outs = exe.run(main_prog, feed=feed, fetch_list=list(fetch.values()))
  for k, v in zip(fetch, outs):
    io[k] = np.asarray(v, np.float32)
  io["text_lm_logits"] = io["text_lm_logits"].reshape(3, -1, CONFIG["vocab_size"])
  for k in ("pair_lm_logits", "caption_lm_logits"):
    io[k] = io[k].reshape(2, -1, CONFIG["vocab_size"])

  if os.path.exists(OUT_DIR):
    shutil.rmtree(OUT_DIR)
  os.makedirs(OUT_DIR)
  paddle.static.io.save_vars(exe, OUT_DIR, main_prog, vars=params)  # one file per variable
  paddle.static.save(main_prog, os.path.join(OUT_DIR, "unimo_tiny"))  # .pdparams, .pdopt, program
  for extra in os.listdir(OUT_DIR):  # the importer reads parameters only: drop the rest
    if extra.startswith("unimo_tiny.") and not extra.endswith(".pdparams"):
      os.remove(os.path.join(OUT_DIR, extra))
  with open(os.path.join(OUT_DIR, "config.json"), "w") as f:
    json.dump(CONFIG, f, indent=2, sort_keys=True)
  np.savez_compressed(IO_FILE, **io)
  print(f"{len(names)} variables -> {OUT_DIR}; {len(io)} arrays -> {IO_FILE}")
  print("max |LM logit| text/pair:", float(np.abs(io["text_lm_logits"]).max()),
        float(np.abs(io["pair_lm_logits"]).max()))


if __name__ == "__main__":
  if "--legacy-save" in sys.argv:
    save_probe(sys.argv[sys.argv.index("--legacy-save") + 1])
  else:
    check_legacy_layout()
    main()
