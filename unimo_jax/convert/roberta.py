"""Import RoBERTa weights from a Hugging Face ``save_pretrained`` directory (UNIMO starts there).

``load(hf_dir) -> (ModelConfig, params)`` maps every weight of ``RobertaForMaskedLM`` (or of a
bare ``RobertaModel``: then there is no ``lm_head`` in the result) onto the text path of
``unimo_jax.model.Unimo``:

  roberta.embeddings.word_embeddings           -> text_embed/word            [V, H]
  roberta.embeddings.position_embeddings       -> text_embed/position        [P, H]
    + token_type_embeddings[0] folded into every position row (UNIMO has no token types;
      RoBERTa adds row 0 to every token, so the sum is exact)
  roberta.embeddings.LayerNorm                 -> text_embed/norm
  encoder.layer.i.attention.self.{q,k,v}       -> layer i's attention/{query,key,value}
      kernel = W^T reshaped [H, heads, d] (head-major, as HF's view), bias [heads, d]
  encoder.layer.i.attention.output.dense       -> layer i's attention/out  kernel [heads, d, H]
  encoder.layer.i.attention.output.LayerNorm   -> layer i's attention_norm
  encoder.layer.i.intermediate.dense           -> layer i's mlp/wi     [H, M]
  encoder.layer.i.output.dense                 -> layer i's mlp/wo     [M, H]
  encoder.layer.i.output.LayerNorm             -> layer i's mlp_norm
  the layers' trees, stacked                   -> encoder/layers/...  [num_layers, ...]
      (``unimo_jax.model.layers.stack_layer_params``: the encoder is one ``nn.scan``)
  lm_head.dense / lm_head.layer_norm           -> lm_head/transform/{dense,norm}
  lm_head.bias (= lm_head.decoder.bias)        -> lm_head/bias               [V]
  lm_head.decoder.weight                       tied to the word table (checked equal if saved)

Torch ``Linear`` weights are ``[out, in]``; Flax kernels ``[in, out]``: every one is transposed.
Ignored on purpose: ``roberta.pooler.*`` (a tanh pooler; UNIMO's CMCL poolers are ReLU and new)
and the ``position_ids`` buffer. Any other unknown key is an error, so nothing is dropped silently.

``save(out_dir, config, params)`` writes ``config.json`` (``ModelConfig``) and ``params.msgpack``
(``flax.serialization``); ``load_converted(out_dir)`` reads them back; ``merge_params(fresh,
loaded)`` overlays the converted text path on a freshly initialised full model (visual
embeddings, region heads and CMCL projections keep their initialisation): what ``init_from``
in a training config does.
"""
import json
import os
import re
from typing import Any

import numpy as np

from unimo_jax.model.config import ModelConfig
from unimo_jax.model.layers import stack_layer_params, to_scanned_layout

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
SOURCE_FILE = "source.json"

_IGNORED = re.compile(r"^(roberta\.)?(pooler\..*|embeddings\.position_ids)$")


# ----------------------------------------------------------------------- reading HF files
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The safetensors format (8-byte header length, JSON header, raw little-endian data), read
  with numpy (bfloat16 via ml_dtypes), so no torch/jax device is involved. Returns float32 for
  floating tensors."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
  dtypes = dict(_ST_DTYPES, BF16=ml_dtypes.bfloat16)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    floating = info["dtype"] in ("F64", "F32", "F16", "BF16")
    out[name] = arr.astype(np.float32) if floating else np.array(arr)
  return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{path} is a torch pickle: reading it needs torch "
                      "(or re-save the model with safetensors)") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def read_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a save_pretrained directory: model.safetensors, pytorch_model.bin, or their
  sharded forms (``*.index.json``)."""
  for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                             ("pytorch_model.bin.index.json", _read_torch_bin)):
    index = os.path.join(hf_dir, index_name)
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(reader(os.path.join(hf_dir, shard)))
      return state
  for name, reader in (("model.safetensors", _read_safetensors),
                       ("pytorch_model.bin", _read_torch_bin)):
    path = os.path.join(hf_dir, name)
    if os.path.exists(path):
      return reader(path)
  raise FileNotFoundError(f"{hf_dir}: no model.safetensors or pytorch_model.bin (sharded or not)")


# ----------------------------------------------------------------------- config
def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
  """ModelConfig (text fields) from a Hugging Face RoBERTa ``config.json`` dict."""
  kind = hf_config.get("model_type", "roberta")
  if kind not in ("roberta", "xlm-roberta"):
    raise ValueError(f"expected a RoBERTa checkpoint, config.json has model_type={kind!r}")
  act = hf_config.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"hidden_act={act!r}: the model implements exact (erf) GELU only")
  pos = hf_config.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(f"position_embedding_type={pos!r}: only absolute positions are supported")
  vocab = hf_config["vocab_size"]
  fields = dict(
      vocab_size=vocab, hidden_size=hf_config["hidden_size"],
      num_layers=hf_config["num_hidden_layers"], num_heads=hf_config["num_attention_heads"],
      mlp_dim=hf_config["intermediate_size"], max_positions=hf_config["max_position_embeddings"],
      dropout_rate=hf_config.get("hidden_dropout_prob", 0.1),
      attention_dropout_rate=hf_config.get("attention_probs_dropout_prob", 0.1),
      layer_norm_eps=hf_config.get("layer_norm_eps", 1e-5),
      init_std=hf_config.get("initializer_range", 0.02), roberta_positions=True,
      pad_id=hf_config.get("pad_token_id", 1), cls_id=hf_config.get("bos_token_id", 0),
      sep_id=hf_config.get("eos_token_id", 2), unk_id=3 if vocab > 3 else 0, mask_id=-1)
  fields.update(overrides)
  return ModelConfig(**fields).validate()


# ----------------------------------------------------------------------- mapping
def _layer_norm(state, prefix):
  scale = state.pop(prefix + ".weight", None)
  if scale is None:  # very old checkpoints name them gamma/beta
    scale = state.pop(prefix + ".gamma")
    return {"scale": scale, "bias": state.pop(prefix + ".beta")}
  return {"scale": scale, "bias": state.pop(prefix + ".bias")}


def _linear(state, prefix, in_shape=None, out_shape=None):
  """torch Linear [out, in] -> Flax kernel [in..., out...], bias [out...]."""
  w = state.pop(prefix + ".weight").T
  b = state.pop(prefix + ".bias")
  n_in, n_out = w.shape
  return {"kernel": w.reshape(tuple(in_shape or (n_in,)) + tuple(out_shape or (n_out,))),
          "bias": b.reshape(tuple(out_shape or (n_out,)))}


def convert_state_dict(state: dict[str, np.ndarray], config: ModelConfig) -> dict[str, Any]:
  """HF RoBERTa state dict (numpy) -> Unimo param subtree (text_embed, encoder, lm_head)."""
  state = {k: np.asarray(v) for k, v in state.items()}
  if not any(k.startswith("roberta.") for k in state):  # a bare RobertaModel
    state = {("roberta." + k if not k.startswith("lm_head.") else k): v for k, v in state.items()}
  e = "roberta.embeddings."
  word = state.pop(e + "word_embeddings.weight")
  position = state.pop(e + "position_embeddings.weight")
  token_type = state.pop(e + "token_type_embeddings.weight", None)
  if token_type is not None:
    position = position + token_type[0][None, :]
  params = {"text_embed": {"word": word, "position": position,
                           "norm": _layer_norm(state, e + "LayerNorm")}}
  heads, d, h = config.num_heads, config.head_dim, config.hidden_size
  layers = []
  for i in range(config.num_layers):
    p = f"roberta.encoder.layer.{i}."
    layers.append({
        "attention": {
            "query": _linear(state, p + "attention.self.query", out_shape=(heads, d)),
            "key": _linear(state, p + "attention.self.key", out_shape=(heads, d)),
            "value": _linear(state, p + "attention.self.value", out_shape=(heads, d)),
            "out": _linear(state, p + "attention.output.dense", in_shape=(heads, d)),
        },
        "attention_norm": _layer_norm(state, p + "attention.output.LayerNorm"),
        "mlp": {"wi": _linear(state, p + "intermediate.dense"),
                "wo": _linear(state, p + "output.dense")},
        "mlp_norm": _layer_norm(state, p + "output.LayerNorm"),
    })
  params["encoder"] = stack_layer_params(layers)
  if "lm_head.dense.weight" in state:
    bias = state.pop("lm_head.bias", None)
    decoder_bias = state.pop("lm_head.decoder.bias", None)
    bias = decoder_bias if bias is None else bias
    decoder = state.pop("lm_head.decoder.weight", None)
    if decoder is not None and not np.array_equal(decoder, word):
      raise ValueError("lm_head.decoder.weight differs from the word embeddings: the model "
                       "ties them (UNIMO/RoBERTa), an untied head cannot be imported")
    params["lm_head"] = {
        "transform": {"dense": _linear(state, "lm_head.dense"),
                      "norm": _layer_norm(state, "lm_head.layer_norm")},
        "bias": bias,
    }
  leftover = sorted(k for k in state if not _IGNORED.match(k))
  if leftover:
    raise ValueError(f"unmapped RoBERTa weights: {leftover}")
  _check_shapes(params, config)
  return params


def _check_shapes(params, config: ModelConfig):
  v, h, p, m = config.vocab_size, config.hidden_size, config.max_positions, config.mlp_dim
  te = params["text_embed"]
  for name, got, want in (("word", te["word"].shape, (v, h)),
                          ("position", te["position"].shape, (p, h)),
                          ("mlp/wi", params["encoder"]["layers"]["mlp"]["wi"]["kernel"].shape,
                           (config.num_layers, h, m))):
    if tuple(got) != want:
      raise ValueError(f"{name}: checkpoint shape {tuple(got)} != config shape {want}")


def load(path: str, **config_overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a Hugging Face RoBERTa ``save_pretrained`` directory.

  ``params`` holds numpy float32 arrays for text_embed, encoder and (when the checkpoint has an
  LM head) lm_head. ``config_overrides`` set non-text fields (e.g. ``visual_input``).
  """
  with open(os.path.join(path, "config.json")) as f:
    config = config_from_hf(json.load(f), **config_overrides)
  return config, convert_state_dict(read_state_dict(path), config)


# ----------------------------------------------------------------------- our own format
def save(out_dir: str, config: ModelConfig, params, source: dict | None = None) -> None:
  """Writes ``config.json`` + ``params.msgpack`` (+ ``source.json`` provenance) to out_dir."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  tree = jax.tree.map(np.asarray, params)
  with open(os.path.join(out_dir, PARAMS_FILE), "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    f.write(config.to_json())
  with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
    json.dump(dict(source or {}, num_params=int(sum(x.size for x in jax.tree.leaves(tree)))),
              f, indent=2)


def load_converted(out_dir: str) -> tuple[ModelConfig, dict]:
  """Reads what ``save`` wrote: (ModelConfig, params of numpy arrays). Files written before the
  encoder was scanned (``encoder/layer_i``) come back in the scanned layout."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  with open(os.path.join(out_dir, CONFIG_FILE)) as f:
    config = ModelConfig.from_json(f.read())
  with open(os.path.join(out_dir, PARAMS_FILE), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  if "encoder" in params:
    params["encoder"] = to_scanned_layout(params["encoder"])
  return config, params


def merge_params(fresh: dict, loaded: dict) -> tuple[dict, list[str]]:
  """Overlays ``loaded`` (e.g. a converted text path) on ``fresh`` (a full initialised tree,
  unboxed). Every loaded leaf must exist in ``fresh`` with the same shape (ValueError naming the
  path otherwise). Returns (merged tree, '/'-joined paths that kept their fresh value)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
  flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
  merged = dict(flat_fresh)
  for path, value in flat_loaded.items():
    if path not in flat_fresh:
      raise ValueError(f"converted parameter {path} does not exist in the model")
    want = flat_fresh[path]
    if tuple(np.shape(value)) != tuple(np.shape(want)):
      raise ValueError(f"{path}: converted shape {np.shape(value)} != model shape "
                       f"{np.shape(want)}")
    merged[path] = np.asarray(value).astype(want.dtype)
  kept = sorted(set(flat_fresh) - set(flat_loaded))
  return traverse_util.unflatten_dict(merged, sep="/"), kept
