"""The batch schema: every field, shape and dtype the input pipeline emits.

This module is the authority on what a batch contains. The train step, every source and every
example builder follow it; `pipeline.make_pipeline` checks each source against it when the
pipeline is built and names the source and the field on a mismatch.

A batch is a flat dict ``{"<stream>/<field>": np.ndarray}`` over the streams ``text``, ``image``
and ``pair``. Each array has a leading dimension ``B``: the rows THIS process feeds, i.e.
``streams.<s>.batch_size // process_count`` (the trainer assembles the global array).

Symbolic dimensions (resolved from the ``data`` config section, see `pipeline`):
  L   streams.<s>.max_length            tokens of a text (``[CLS] w1..wN [SEP]`` then PAD)
  P   streams.<s>.max_predictions       masked-LM prediction slots
  L2  streams.text.s2s_max_length       seq2seq (infilling) sequence, source + target
  P2  streams.<s>.s2s_max_predictions   seq2seq prediction slots
  S   image_size                        square image side in pixels
  N   visual tokens: (S // patch_size)**2 for ``patches``, R for ``regions``
  R   num_regions                       detector regions per image ([IMG] is NOT included: the
                                        model prepends the mean-feature [IMG] slot itself)
  F   region_feature_dim                detector feature size (2048 in UNIMO)
  C   num_region_classes                detector classes (1601 for Visual Genome)
  Kp  num_positives                     paraphrase positives per pair (other captions, rewrites)
  Kn  num_negatives                     hard-negative texts per pair (scene-graph rewrites, ...)
  Ki  num_related_images                retrieved related images X_I per pair (neighbours file)
  Kt  num_related_texts                 retrieved related texts X_T per pair (neighbours file)

Conventions: token ids int32 with CLS=0, PAD=1, SEP=2, UNK=3, MASK=tokenizer.mask_id; prediction
slots are padded with position 0 / target 0 / weight 0.0; ``*_valid``, ``row_valid`` and
``visual_mask`` are bool (``visual_mask`` True = this region/patch is masked for prediction: its
input is zeroed by the model); every weight of a row with ``row_valid == False`` is 0, so padding
rows are inert even for a loss that ignores ``row_valid``.
"""
import dataclasses
from typing import Any, Mapping

import numpy as np

STREAMS = ("text", "image", "pair")
STREAM_IDS = {"text": 0, "image": 1, "pair": 2}  # the `stream` in the masking seed

# Why a record was dropped (see `dropped_counts` of the iterator). Order is part of the format.
DROP_REASONS = (
    "undecodable_image",   # not an image format we read, or the decoder failed on it
    "truncated_image",     # image bytes end before the format's end marker
    "image_too_large",     # header says more pixels than data.max_image_pixels
    "empty_text",          # no text, or nothing left after tokenisation
    "non_utf8_text",       # bytes that are not UTF-8
    "bad_json",            # a JSON line / member that does not parse or is not an object
    "bad_feature_shape",   # region boxes/features/probs of the wrong rank or size
    "nonfinite_features",  # NaN or Inf in region boxes/features/probs
    "truncated_member",    # a tar member that runs past the end of its shard
    "missing_field",       # a record without what its stream needs (no image, no caption, ...)
    "missing_regions",     # regions input: no region features stored for this image
    "unreadable_record",   # the reader failed in another way (the first message is logged)
    "bad_token_ids",       # a token store record outside its shard or the vocabulary
)
REASON_IDS = {r: i for i, r in enumerate(DROP_REASONS)}


class SchemaError(ValueError):
  """A source or batch does not match the schema (the message names source and field)."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of a stream: per-row shape (symbolic dims) and dtype."""
  name: str
  shape: tuple
  dtype: Any
  doc: str


def _text_fields(prefix, L, P, doc_what):
  return [
      Field(f"{prefix}ids", (L,), np.int32, f"{doc_what} input ids with masked tokens replaced "
            "(80% MASK / 10% random / 10% kept)"),
      Field(f"{prefix}positions", (P,), np.int32, "index into the sequence of each prediction"),
      Field(f"{prefix}targets", (P,), np.int32, "original token id at each prediction position"),
      Field(f"{prefix}weights", (P,), np.float32, "1.0 for a real prediction, 0.0 for padding"),
  ]


def _s2s_fields(L2, P2, doc_what):
  return [
      Field("s2s_ids", (L2,), np.int32, f"{doc_what} seq2seq input ids (source then target)"),
      Field("s2s_segments", (L2,), np.int32, "0 pad, 1 source, 2 target (UniLM seq2seq mask)"),
      Field("s2s_position_ids", (L2,), np.int32, "0-based text positions of each token (pads "
            "0): infilling keeps each token's place in the original text, so pass them to the "
            "model as positions"),
      Field("s2s_positions", (P2,), np.int32, "position whose output predicts the next target"),
      Field("s2s_targets", (P2,), np.int32, "target token predicted at that position"),
      Field("s2s_weights", (P2,), np.float32, "1.0 real target, 0.0 padding"),
  ]


def visual_fields(visual_input: str, related: bool = False):
  """Visual input fields (``pixels`` or the three region fields); `related` adds a Ki axis."""
  pre = ("Ki",) if related else ()
  name = "related_" if related else ""
  if visual_input == "patches":
    return [Field(f"{name}pixels", pre + ("S", "S", 3), np.float32,
                  "RGB pixels resized to S x S, (x/255 - pixel_mean) / pixel_std")]
  if visual_input == "regions":
    return [
        Field(f"{name}region_features", pre + ("R", "F"), np.float32,
              "detector region features, zero for padding regions"),
        Field(f"{name}region_boxes", pre + ("R", 5), np.float32,
              "[x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W H)] (UNIMO's 5-d box), zero padding"),
        Field(f"{name}region_valid", pre + ("R",), np.bool_, "True for a real region"),
    ]
  raise SchemaError(f"visual_input must be 'patches' or 'regions', got {visual_input!r}")


def _mrp_fields(visual_input):
  fields = [Field("visual_mask", ("N",), np.bool_,
                  "masked region/patch prediction: True = masked (15%, plus regions overlapping "
                  "a masked one above the IoU threshold)")]
  if visual_input == "regions":
    fields += [
        Field("region_classes", ("R",), np.int32, "detector class of each region (argmax of "
              "the soft labels when only those are given); 0 for padding"),
        Field("region_class_probs", ("R", "C"), np.float32, "detector class distribution "
              "(one-hot when only hard classes are given); zero for padding"),
    ]
  return fields


def stream_fields(stream: str, cfg: Mapping) -> list:
  """The fields of `stream` for a data config (objectives and visual input decide which)."""
  vis = cfg["visual_input"]
  scfg = cfg["streams"][stream]
  objectives = tuple(scfg.get("objectives", ("mlm", "s2s")))
  fields = []
  if stream == "text":
    if "mlm" in objectives:
      fields += _text_fields("mlm_", "L", "P", "text")
    if "s2s" in objectives:
      fields += _s2s_fields("L2", "P2", "text infilling:")
  elif stream == "image":
    fields += visual_fields(vis) + _mrp_fields(vis)
  elif stream == "pair":
    fields += visual_fields(vis) + _mrp_fields(vis)
    fields.append(Field("caption_ids", ("L",), np.int32,
                        "the clean caption [CLS] w [SEP] PAD (CMCL text side)"))
    if "mlm" in objectives:
      fields += _text_fields("mlm_", "L", "P", "caption (conditioned on the image)")
    if "s2s" in objectives:
      fields += _s2s_fields("L", "P2", "captioning layout (the image is the source):")
    fields += [
        Field("positive_ids", ("Kp", "L"), np.int32, "paraphrase positives X+ of the caption"),
        Field("positive_valid", ("Kp",), np.bool_, "True for a real positive"),
        Field("negative_ids", ("Kn", "L"), np.int32, "hard negatives X- (rewrites)"),
        Field("negative_valid", ("Kn",), np.bool_, "True for a real negative"),
    ]
    fields += visual_fields(vis, related=True)
    fields += [
        Field("related_valid", ("Ki",), np.bool_, "True for a real related image X_I"),
        Field("related_text_ids", ("Kt", "L"), np.int32, "retrieved related texts X_T"),
        Field("related_text_valid", ("Kt",), np.bool_, "True for a real related text"),
    ]
  else:
    raise SchemaError(f"unknown stream {stream!r}; streams are {STREAMS}")
  fields.append(Field("row_valid", (), np.bool_, "False for a padding row (all weights 0)"))
  return fields


def dims(stream: str, cfg: Mapping) -> dict:
  """Values of the symbolic dimensions for `stream`."""
  scfg = cfg["streams"][stream]
  s = int(cfg["image_size"])
  if cfg["visual_input"] == "patches":
    if s % int(cfg["patch_size"]):
      raise SchemaError(f"image_size {s} is not a multiple of patch_size {cfg['patch_size']}")
    n = (s // int(cfg["patch_size"])) ** 2
  else:
    n = int(cfg["num_regions"])
  L = int(scfg.get("max_length", 0))
  return dict(
      L=L, P=int(scfg.get("max_predictions", 0)),
      L2=int(scfg.get("s2s_max_length", L)), P2=int(scfg.get("s2s_max_predictions", 0)),
      S=s, N=n, R=int(cfg["num_regions"]), F=int(cfg["region_feature_dim"]),
      C=int(cfg["num_region_classes"]), Kp=int(cfg["num_positives"]),
      Kn=int(cfg["num_negatives"]), Ki=int(cfg["num_related_images"]),
      Kt=int(cfg["num_related_texts"]))


def row_spec(stream: str, cfg: Mapping) -> dict:
  """``{field: (shape, dtype)}`` of ONE row of `stream`, dims resolved."""
  d = dims(stream, cfg)
  out = {}
  for f in stream_fields(stream, cfg):
    out[f.name] = (tuple(d[x] if isinstance(x, str) else x for x in f.shape), np.dtype(f.dtype))
  return out


def batch_spec(cfg: Mapping, process_count: int = 1) -> dict:
  """``{"<stream>/<field>": (shape, dtype)}`` of a per-process batch of every enabled stream."""
  out = {}
  for stream in enabled_streams(cfg):
    b = local_batch_size(cfg, stream, process_count)
    for name, (shape, dtype) in row_spec(stream, cfg).items():
      out[f"{stream}/{name}"] = ((b,) + shape, dtype)
  return out


def enabled_streams(cfg: Mapping) -> tuple:
  """Streams with a positive batch size and at least one source, in `STREAMS` order."""
  streams = cfg["streams"]
  return tuple(s for s in STREAMS if s in streams and int(streams[s].get("batch_size", 0)) > 0
               and len(streams[s].get("sources", ())) > 0)


def local_batch_size(cfg: Mapping, stream: str, process_count: int) -> int:
  b = int(cfg["streams"][stream]["batch_size"])
  if b % process_count:
    raise SchemaError(f"streams.{stream}.batch_size {b} is not divisible by process_count "
                      f"{process_count}")
  return b // process_count


def check_row(row: Mapping, spec: Mapping, *, source: str, stream: str):
  """Raises `SchemaError` naming `source` and the field unless `row` matches `spec` exactly."""
  missing = [k for k in spec if k not in row]
  extra = [k for k in row if k not in spec]
  if missing:
    raise SchemaError(f"source {source!r} (stream {stream}) lacks field {missing[0]!r}")
  if extra:
    raise SchemaError(f"source {source!r} (stream {stream}) emits unknown field {extra[0]!r}")
  for k, (shape, dtype) in spec.items():
    v = np.asarray(row[k])
    if v.shape != tuple(shape) or v.dtype != dtype:
      raise SchemaError(f"source {source!r} (stream {stream}) field {k!r}: expected "
                        f"{dtype.name}{list(shape)}, got {v.dtype.name}{list(v.shape)}")


def check_batch(batch: Mapping, spec: Mapping):
  """Raises `SchemaError` naming the field unless `batch` matches a `batch_spec` exactly."""
  for k in set(spec) | set(batch):
    if k not in batch or k not in spec:
      raise SchemaError(f"batch field {k!r} is {'missing' if k in spec else 'not in schema'}")
    v = batch[k]
    shape, dtype = spec[k]
    if tuple(v.shape) != tuple(shape) or v.dtype != dtype:
      raise SchemaError(f"batch field {k!r}: expected {dtype.name}{list(shape)}, got "
                        f"{v.dtype.name}{list(v.shape)}")


def describe(cfg: Mapping, process_count: int = 1) -> str:
  """A human-readable table of the batch (for logs and docs)."""
  lines = []
  for stream in enabled_streams(cfg):
    d = dims(stream, cfg)
    for f in stream_fields(stream, cfg):
      shape = ("B",) + tuple(f.shape)
      resolved = [local_batch_size(cfg, stream, process_count)] + [
          d[x] if isinstance(x, str) else x for x in f.shape]
      lines.append(f"{stream}/{f.name:<22} {np.dtype(f.dtype).name:<8} "
                   f"[{','.join(map(str, shape))}] = {resolved}  {f.doc}")
  return "\n".join(lines)
