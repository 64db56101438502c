"""Import the official UNIMO checkpoints (PaddlePaddle/Research ``NLP/UNIMO``, Paddle 1.8).

``load(path) -> (ModelConfig, params)`` reads either

- a Paddle static-graph parameter directory: one file per variable, named as the variable,
  each a LoDTensor stream (what ``fluid.io.save_params`` / ``save_persistables`` and the
  ``save`` op write; the released UNIMO-base/-large checkpoints), or
- a ``.pdparams`` pickle of ``{variable name: numpy array}`` (``paddle.static.save``), opened
  by an unpickler that admits numpy arrays, dicts and tuples only (a pickle naming any other
  global is refused: a free unpickle would run arbitrary code),

and maps every official variable onto ``unimo_jax.model.Unimo`` (``visual_input="regions"``).
Paddle fc weights are ``[in, out]`` like Flax kernels; heads split the last dim head-major:

  word_embedding [V, H]                          -> text_embed/word (tied to the LM head)
  pos_embedding [P, H]                           -> text_embed/position (row 2 = first token)
  pre_encoder_layer_norm_{scale,bias}            -> text_embed/norm
  image_emb.{w_0 [F, H], b_0}                    -> region_embed/feature
  image_loc.{w_0 [5, H], b_0}                    -> region_embed/box
  v_pre_encoder_layer_norm_{scale,bias}          -> region_embed/norm
  encoder_layer_{i}_multi_head_att_{query,key,value}_fc.w_0 [H, H]
                                                 -> layer i's attention/{..}  [H, h, d]
  encoder_layer_{i}_multi_head_att_output_fc.w_0 -> layer i's attention/out   [h, d, H]
  encoder_layer_{i}_post_att_layer_norm_*        -> layer i's attention_norm
  encoder_layer_{i}_ffn_fc_{0,1}                 -> layer i's mlp/{wi,wo}
  encoder_layer_{i}_post_ffn_layer_norm_*        -> layer i's mlp_norm
  the layers' trees, stacked                     -> encoder/layers/...  [num_layers, ...]
      (``unimo_jax.model.layers.stack_layer_params``, as the RoBERTa import)
  mask_lm_trans_fc, mask_lm_trans_layer_norm_*   -> lm_head/transform/{dense,norm}
  mask_lm_out_fc.b_0 [V]                         -> lm_head/bias
  pooled_fc_text / pooled_fc_image               -> text_projection/pooler, image_projection/pooler

Every one of them is required (a missing one is an error naming it). The config comes from the
shapes, and the head count from the official config json (``num_attention_heads``; a ``*.json``
with that key in the directory, or beside the ``.pdparams``) or else ``hidden_size // 64`` (true
of UNIMO-base and -large). Fine-tuning heads (``cls_out_w`` ...), optimizer state and unknown
variables are skipped, each kind reported in one line. Nothing here needs Paddle.
"""
import glob
import json
import logging
import os
import pickle
import re
import struct
from typing import Any

import numpy as np

from unimo_jax.model.config import ModelConfig
from unimo_jax.model.layers import stack_layer_params

# ----------------------------------------------------------------------- LoDTensor files
# VarType.Type of Paddle's framework.proto (the TensorDesc data_type field)
_PADDLE_DTYPES = {0: np.bool_, 1: np.int16, 2: np.int32, 3: np.int64, 4: np.float16,
                  5: np.float32, 6: np.float64, 20: np.uint8, 21: np.int8}
_BF16 = 22


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise ValueError(f"{where}: corrupt TensorDesc (bad varint)")
    byte = buf[pos]
    value |= (byte & 0x7F) << shift
    pos += 1
    shift += 7
    if not byte & 0x80:
      return value, pos


def _signed(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def parse_tensor_desc(buf: bytes, where: str) -> tuple[int, list[int]]:
  """The ``TensorDesc`` protobuf message (``required VarType.Type data_type = 1; repeated int64
  dims = 2``) -> (data_type, dims). Packed and unpacked dims are both accepted."""
  data_type, dims, pos = None, [], 0
  while pos < len(buf):
    key, pos = _varint(buf, pos, where)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos, where)
      if field == 1:
        data_type = value
      elif field == 2:
        dims.append(_signed(value))
    elif wire == 2:
      n, pos = _varint(buf, pos, where)
      if pos + n > len(buf):
        raise ValueError(f"{where}: corrupt TensorDesc (field {field} runs past the end)")
      if field == 2:  # packed dims
        end, sub = pos + n, pos
        while sub < end:
          value, sub = _varint(buf, sub, where)
          dims.append(_signed(value))
      pos += n
    elif wire in (1, 5):
      pos += 8 if wire == 1 else 4
    else:
      raise ValueError(f"{where}: corrupt TensorDesc (wire type {wire})")
  if data_type is None:
    raise ValueError(f"{where}: corrupt TensorDesc (no data_type)")
  return data_type, dims


def read_lod_tensor(path: str) -> np.ndarray:
  """One Paddle LoDTensor file -> numpy array (floating types as float32).

  Layout (little-endian): uint32 version (0); uint64 LoD level count, each level a uint64 byte
  size and that many bytes of offsets; uint32 tensor version (0); int32 TensorDesc size; the
  TensorDesc protobuf; the raw data, exactly prod(dims) elements. Anything else is a ValueError
  naming the file.
  """
  with open(path, "rb") as f:
    buf = f.read()
  pos = 0

  def take(n, what):
    nonlocal pos
    if pos + n > len(buf):
      raise ValueError(f"{path}: truncated LoDTensor file ({len(buf)} bytes, ends inside the "
                       f"{what})")
    out = buf[pos:pos + n]
    pos += n
    return out

  (version,) = struct.unpack("<I", take(4, "version"))
  if version != 0:
    raise ValueError(f"{path}: not a LoDTensor file (version {version}, expected 0)")
  (levels,) = struct.unpack("<Q", take(8, "LoD level count"))
  if levels > 16:
    raise ValueError(f"{path}: not a LoDTensor file ({levels} LoD levels)")
  for _ in range(levels):
    (size,) = struct.unpack("<Q", take(8, "LoD level size"))
    take(size, "LoD offsets")
  (tensor_version,) = struct.unpack("<I", take(4, "tensor version"))
  if tensor_version != 0:
    raise ValueError(f"{path}: unsupported tensor version {tensor_version} (expected 0)")
  (desc_size,) = struct.unpack("<i", take(4, "TensorDesc size"))
  if desc_size <= 0:
    raise ValueError(f"{path}: corrupt LoDTensor file (TensorDesc size {desc_size})")
  data_type, dims = parse_tensor_desc(take(desc_size, "TensorDesc"), path)
  if any(d < 0 for d in dims):
    raise ValueError(f"{path}: corrupt TensorDesc (dims {dims})")
  if data_type == _BF16:
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
    dtype = np.dtype(ml_dtypes.bfloat16)
  elif data_type in _PADDLE_DTYPES:
    dtype = np.dtype(_PADDLE_DTYPES[data_type])
  else:
    raise ValueError(f"{path}: unsupported Paddle data type {data_type}")
  want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  have = len(buf) - pos
  if have != want:
    kind = "truncated" if have < want else "corrupt"
    raise ValueError(f"{path}: {kind} LoDTensor file: shape {dims} {dtype.name} needs {want} "
                     f"data bytes, the file has {have}")
  arr = np.frombuffer(buf, dtype=dtype.newbyteorder("<"), count=want // dtype.itemsize,
                      offset=pos).reshape(dims)
  return arr.astype(np.float32) if dtype.kind == "f" or data_type == _BF16 else arr.copy()


# ----------------------------------------------------------------------- .pdparams pickles
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"), ("builtins", "tuple"),
}


class _ArraysOnly(pickle.Unpickler):
  """Admits numpy arrays, dtypes, dicts and tuples; any other global is refused."""

  def __init__(self, file, path):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    if (module, name) in _PICKLE_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"{self._path}: refusing to unpickle {module}.{name} (a "
                                 ".pdparams file may hold numpy arrays and dicts only)")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"{self._path}: refusing a persistent id in the pickle")


def read_pdparams(path: str) -> dict[str, np.ndarray]:
  """``{name: array}`` from a ``.pdparams`` pickle (``paddle.static.save``; ``paddle.save``'s
  ``(name, array)`` tuples are accepted too). Floating arrays come back as float32."""
  with open(path, "rb") as f:
    try:
      state = _ArraysOnly(f, path).load()
    except pickle.UnpicklingError as e:
      if "refusing" in str(e):
        raise
      raise ValueError(f"{path}: corrupt or truncated .pdparams pickle ({e})") from e
    except Exception as e:  # any damage to the stream (EOF, bad opcodes, bad array states)
      raise ValueError(f"{path}: corrupt or truncated .pdparams pickle ({e!r})") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path}: a .pdparams file holds a dict, got {type(state).__name__}")
  out = {}
  for name, value in state.items():
    if name == "StructuredToParameterName@@":  # paddle.save's name map, not a tensor
      continue
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
      value = value[1]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
      raise ValueError(f"{path}: entry {name!r} is not a numeric array "
                       f"({type(value).__name__})")
    out[str(name)] = value.astype(np.float32) if value.dtype.kind == "f" else value
  return out


# ----------------------------------------------------------------------- names
_LAYER = re.compile(r"^encoder_layer_(\d+)_")
_OPTIMIZER = re.compile(r"(_moment\d*_\d+|_beta[12]_pow_acc_\d+|_velocity_\d+|^learning_rate_\d+"
                        r"|@LR_DECAY_COUNTER@|^loss_scaling_\d+|^num_(good|bad)_steps_\d+)$")
_FINETUNE = re.compile(r"^(cls_|fc_\d+\.|fuse|fusion|match|vqa|ve_|snli|seq2seq|grounded\.)")
_NOT_VARIABLES = re.compile(r"(\.(json|pdparams|pdopt|pdmodel|pdiparams|npz|md|txt|py|log)$"
                            r"|^__model__$|^__params__$|^\.)")


def _fc(name, path):
  return {name + ".w_0": path + ("kernel",), name + ".b_0": path + ("bias",)}


def _ln(name, path):
  return {name + "_layer_norm_scale": path + ("scale",),
          name + "_layer_norm_bias": path + ("bias",)}


def official_names(num_layers: int) -> dict[str, tuple[str, ...]]:
  """Official variable name -> our parameter path (tuple of keys), for every variable."""
  m = {"word_embedding": ("text_embed", "word"), "pos_embedding": ("text_embed", "position")}
  m.update(_ln("pre_encoder", ("text_embed", "norm")))
  m.update(_fc("image_emb", ("region_embed", "feature")))
  m.update(_fc("image_loc", ("region_embed", "box")))
  m.update(_ln("v_pre_encoder", ("region_embed", "norm")))
  for i in range(num_layers):
    p, ours = f"encoder_layer_{i}", ("encoder", f"layer_{i}")
    for theirs, mine in (("query", "query"), ("key", "key"), ("value", "value"),
                         ("output", "out")):
      m.update(_fc(f"{p}_multi_head_att_{theirs}_fc", ours + ("attention", mine)))
    m.update(_ln(p + "_post_att", ours + ("attention_norm",)))
    m.update(_fc(p + "_ffn_fc_0", ours + ("mlp", "wi")))
    m.update(_fc(p + "_ffn_fc_1", ours + ("mlp", "wo")))
    m.update(_ln(p + "_post_ffn", ours + ("mlp_norm",)))
  m.update(_fc("mask_lm_trans_fc", ("lm_head", "transform", "dense")))
  m.update(_ln("mask_lm_trans", ("lm_head", "transform", "norm")))
  m["mask_lm_out_fc.b_0"] = ("lm_head", "bias")
  m.update(_fc("pooled_fc_text", ("text_projection", "pooler")))
  m.update(_fc("pooled_fc_image", ("image_projection", "pooler")))
  return m


def _num_layers(names) -> int:
  layers = {int(mt.group(1)) for n in names if (mt := _LAYER.match(n))}
  return max(layers) + 1 if layers else 0


def _sort_extras(extras) -> list[str]:
  """Report lines for the variables that are not official backbone weights (skipped)."""
  kinds = {"fine-tuning head": [], "optimizer state": [], "unknown": []}
  for n in sorted(extras):
    kind = ("optimizer state" if _OPTIMIZER.search(n) else
            "fine-tuning head" if _FINETUNE.match(n) else "unknown")
    kinds[kind].append(n)
  notes = []
  for kind, names in kinds.items():
    if names:
      shown = names if len(names) <= 12 or kind == "unknown" else names[:6] + ["..."]
      notes.append(f"skipped {len(names)} {kind} variable(s): {', '.join(shown)}")
  return notes


# ----------------------------------------------------------------------- config
def find_config_json(directory: str) -> str | None:
  """The official model config (a ``*.json`` with ``num_attention_heads``) in ``directory``."""
  found = []
  for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
    try:
      with open(path) as f:
        if "num_attention_heads" in json.load(f):
          found.append(path)
    except (OSError, ValueError, TypeError):
      continue
  if len(found) > 1:
    raise ValueError(f"{directory}: several model config files {found}; pass one explicitly")
  return found[0] if found else None


def infer_config(shapes: dict[str, tuple[int, ...]], official: dict | None = None,
                 config_path: str = "", num_heads: int | None = None,
                 **overrides) -> ModelConfig:
  """ModelConfig from the variables' shapes, checked against the official config json."""
  vocab, hidden = shapes["word_embedding"]
  fields = dict(
      vocab_size=vocab, hidden_size=hidden, num_layers=_num_layers(shapes),
      max_positions=shapes["pos_embedding"][0],
      mlp_dim=shapes["encoder_layer_0_ffn_fc_0.w_0"][1],
      region_feature_dim=shapes["image_emb.w_0"][0], visual_input="regions",
      roberta_positions=True, pad_id=1, cls_id=0, sep_id=2, unk_id=3, mask_id=-1,
      layer_norm_eps=1e-5, pre_ln=False)
  official = official or {}
  for key, field in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                     ("num_hidden_layers", "num_layers"),
                     ("max_position_embeddings", "max_positions")):
    if key in official and official[key] != fields[field]:
      raise ValueError(f"{config_path}: {key}={official[key]} but the checkpoint's variables "
                       f"have {field}={fields[field]}")
  act = official.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"{config_path}: hidden_act={act!r}: the model implements erf GELU only")
  for key, field in (("hidden_dropout_prob", "dropout_rate"),
                     ("attention_probs_dropout_prob", "attention_dropout_rate"),
                     ("initializer_range", "init_std"), ("image_class_size", "num_region_classes")):
    if key in official:
      fields[field] = official[key]
  if num_heads is None:
    num_heads = official.get("num_attention_heads")
  if num_heads is None:
    if hidden % 64:
      raise ValueError(f"hidden size {hidden} is not a multiple of 64 and no config json gives "
                       "num_attention_heads: pass the head count")
    num_heads = hidden // 64
  fields["num_heads"] = int(num_heads)
  fields.update(overrides)
  return ModelConfig(**fields).validate()


# ----------------------------------------------------------------------- mapping
def _expected_shape(name: str, path: tuple[str, ...], cfg: ModelConfig) -> tuple[int, ...]:
  v, h, m, f = cfg.vocab_size, cfg.hidden_size, cfg.mlp_dim, cfg.region_feature_dim
  leaf = path[-1]
  if name == "word_embedding":
    return (v, h)
  if name == "pos_embedding":
    return (cfg.max_positions, h)
  if name == "mask_lm_out_fc.b_0":
    return (v,)
  if leaf in ("scale", "bias") and "layer_norm" in name:
    return (h,)
  n_in = {"feature": f, "box": 5, "wo": m}.get(path[-2], h)
  n_out = m if path[-2] == "wi" else h
  return (n_in, n_out) if leaf == "kernel" else (n_out,)


def _to_model_shape(value: np.ndarray, path: tuple[str, ...], cfg: ModelConfig) -> np.ndarray:
  """Attention kernels split the last dim head-major (``[n_head, d_head]``), as the official
  reshape ``[0, 0, n_head, d_key]``; the output projection splits its input dim the same way."""
  if "attention" not in path:
    return value
  heads, d = cfg.num_heads, cfg.head_dim
  if path[-2] == "out":
    return value.reshape(heads, d, -1) if path[-1] == "kernel" else value
  return value.reshape(value.shape[:-1] + (heads, d))


def _model_layout(params: dict, config: ModelConfig) -> dict:
  """Per-layer trees (``encoder/layer_i``) -> the model's encoder layout (``encoder/layers``,
  stacked on a leading [num_layers] axis for the scanned encoder) through
  ``stack_layer_params``, the one layout function the converters share."""
  params["encoder"] = stack_layer_params([params["encoder"].pop(f"layer_{i}")
                                          for i in range(config.num_layers)])
  return params


def convert_variables(variables: dict[str, np.ndarray], config: ModelConfig,
                      source: str = "") -> dict[str, Any]:
  """Official variables (numpy) -> Unimo param tree (text_embed, region_embed, encoder,
  lm_head, text_projection/pooler, image_projection/pooler). Shapes are checked per variable."""
  params: dict[str, Any] = {}
  for name, path in official_names(config.num_layers).items():
    value = np.asarray(variables[name])
    want = _expected_shape(name, path, config)
    if tuple(value.shape) != want:
      raise ValueError(f"{source}{name}: shape {tuple(value.shape)}, expected {want} for "
                       f"{'/'.join(path)}")
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _to_model_shape(value.astype(np.float32), path, config)
  return _model_layout(params, config)


def _official(path: str, names) -> dict[str, tuple[str, ...]]:
  n = _num_layers(names)
  if not n:
    raise ValueError(f"{path}: no encoder_layer_<i>_* variables: not a UNIMO checkpoint")
  return official_names(n)


def _read(path: str) -> tuple[dict[str, np.ndarray], list[str], str]:
  """(official variables, report lines, directory holding the config json)."""
  if os.path.isdir(path):
    files = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))
                   and not _NOT_VARIABLES.search(n))
    wanted = _official(path, files)
    missing = [n for n in wanted if n not in files]
    if missing:
      raise ValueError(f"{path}: missing {len(missing)} official UNIMO variable file(s): "
                       f"{', '.join(missing)}")
    variables = {n: read_lod_tensor(os.path.join(path, n)) for n in wanted}
    return variables, _sort_extras(set(files) - set(wanted)), path
  if os.path.isfile(path):
    state = read_pdparams(path)
    wanted = _official(path, state)
    missing = [n for n in wanted if n not in state]
    if missing:
      raise ValueError(f"{path}: missing {len(missing)} official UNIMO variable(s): "
                       f"{', '.join(missing)}")
    return ({n: state[n] for n in wanted}, _sort_extras(set(state) - set(wanted)),
            os.path.dirname(os.path.abspath(path)))
  raise FileNotFoundError(f"{path}: no such Paddle parameter directory or .pdparams file")


def load_checkpoint(path: str, config_path: str | None = None, num_heads: int | None = None,
                    **config_overrides) -> tuple[ModelConfig, dict, list[str]]:
  """(ModelConfig, params, report lines) from an official UNIMO parameter directory or a
  ``.pdparams`` file. ``config_path``: the official config json (default: found beside the
  variables); ``num_heads`` overrides its head count; ``config_overrides`` set other fields."""
  variables, notes, where = _read(path)
  config_path = config_path or find_config_json(where)
  official = None
  if config_path:
    with open(config_path) as f:
      official = json.load(f)
  elif num_heads is None:
    notes.append(f"no config json with num_attention_heads: assuming "
                 f"{variables['word_embedding'].shape[1] // 64} heads of 64")
  shapes = {n: tuple(v.shape) for n, v in variables.items()}
  config = infer_config(shapes, official, config_path or "", num_heads, **config_overrides)
  source = path.rstrip("/") + ("/" if os.path.isdir(path) else ":")
  return config, convert_variables(variables, config, source), notes


def load(path: str, config_path: str | None = None, num_heads: int | None = None,
         **config_overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params of numpy float32 arrays); skipped variables are logged."""
  config, params, notes = load_checkpoint(path, config_path, num_heads, **config_overrides)
  for line in notes:
    logging.warning("%s: %s", path, line)
  return config, params
