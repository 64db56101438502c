"""Raw record -> one row of a stream (numpy), with tokenisation, truncation, padding and masking.

`RowBuilder(stream, cfg, tokenizer)` turns the raw records of `sources.base` into rows that match
`schema.row_spec` except for images: in ``patches`` mode a row carries the encoded image bytes
(``_image`` [1 + Ki] string, ``_image_ratio`` [1 + Ki] int32 JPEG downscale index,
``_image_present`` [1 + Ki] bool: slot 0 the image itself, then the related images) and the TF
stage of `pipeline` decodes them into ``pixels`` / ``related_pixels``.

Pairs: the caption is drawn among the record's captions; the others and any ``paraphrases`` are
the positives X+ (`rewriting.paraphrase_positives`); the negatives X- are the record's
``hard_negatives``, then side-file negatives (TF-IDF), then, if the source asks for them,
word-level lexicon rewrites of the caption. Every random choice of a row (caption, paraphrases,
negatives, related items, text window, MLM, infilling, region/patch masks) draws from ONE generator that the caller seeds with
``np.random.default_rng([seed, stream_id, slot])``, so a row is a pure function of
(seed, stream, slot) and of the record the mixture puts there.

Texts longer than their layout are cut (a long document: one random window; a caption, positive
or negative: its first L - 2 tokens); each cut text is counted in the row's ``_truncated``, which
the iterator sums into ``truncated_counts()`` (logged as ``data/truncated/<stream>``).

Masking is `unimo_jax.masking` (shared with the objectives): span MLM (special ids never masked),
infilling with bos [CLS] / eos [MASK] (UNIMO's seq2seq decoder), captioning with eos [SEP].
Region masking runs on the pixel boxes (IoU is scale free); patches use `patch_mask`.
"""
import numpy as np

from data_pipelines import images, rewriting, schema
from data_pipelines.half_float import copy_into
from data_pipelines.sources.base import BadRecord, text_list
from unimo_jax import masking


# A deferred text row's (window ids, generator), masked by `RowBuilder.finish_text_rows`.
_PENDING = "_pending_text"

# Row fields in `RowBuilder.region_dtype` (float32 in the schema; `Stream` casts them back).
HALF_FIELDS = ("region_features", "region_class_probs", "related_region_features")


class Padded:
  """A row field that is `data` [n, ...] followed by zeros up to `shape` (n <= shape[0]).

  Region rows are 1.4 MB of float32 at the paper's shapes: `Stream.batch` writes the n rows
  straight into its batch array (`write`) instead of copying a padded per-row array into it, and
  anything else sees the padded array through ``np.asarray`` (the same values either way)."""
  __slots__ = ("data", "shape", "dtype")

  def __init__(self, data, shape, dtype):
    self.data, self.shape, self.dtype = data, tuple(shape), np.dtype(dtype)

  def write(self, out):
    """Fills `out` (zeros, `shape`) with the data."""
    if len(self.data):
      copy_into(out[:len(self.data)], np.asarray(self.data))

  def __array__(self, dtype=None, copy=None):
    out = np.zeros(self.shape, self.dtype)
    self.write(out)
    return out if dtype is None else out.astype(dtype)


def _cut(stats):
  if stats is not None:
    stats["truncated"] = stats.get("truncated", 0) + 1


class TextCodec:
  """Tokeniser wrapper: ids with specials, truncation, padding, word starts."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.cls, self.pad, self.sep = tokenizer.cls_id, tokenizer.pad_id, tokenizer.sep_id
    self.mask, self.vocab_size = tokenizer.mask_id, tokenizer.vocab_size
    self.special = (self.cls, self.pad, self.sep, self.mask)

  def encode(self, text: str, what: str = "text") -> np.ndarray:
    ids = np.asarray(self.tok.encode(text), np.int32)
    if ids.size == 0:
      raise BadRecord("empty_text", f"{what}: no tokens")
    return ids

  def sequence(self, ids, length: int, stats: dict | None = None):
    """``[CLS] ids[:length-2] [SEP] PAD..`` [length] int32 and word starts [length] bool.

    stats: counts ``truncated`` += 1 when ids are cut to fit."""
    ids = np.asarray(ids, np.int32)
    if len(ids) > max(0, length - 2):
      _cut(stats)
    ids = ids[:max(0, length - 2)]
    out = np.full(length, self.pad, np.int32)
    out[0], out[1:1 + len(ids)], out[1 + len(ids)] = self.cls, ids, self.sep
    ws = np.ones(length, bool)
    if len(ids):
      ws[1:1 + len(ids)] = np.asarray(self.tok.word_starts(ids), bool)
    return out, ws

  def sequences(self, texts, length: int):
    """`sequence` of each of B id arrays (no truncation counts): ids [B, length] int32 and word
    starts [B, length] bool, written for the whole batch at once."""
    B, keep = len(texts), max(0, length - 2)
    cut = [t[:keep] for t in texts]
    n = np.asarray([len(t) for t in cut], np.intp)
    out = np.full((B, length), self.pad, np.int32)
    ws = np.ones((B, length), bool)
    if B and (n == n[0]).all():  # windows of long documents: all of one length
      out[:, 1:1 + n[0]] = np.stack(cut)
      # word_starts per text: a tokenizer's word starts may depend on the text's first token.
      ws[:, 1:1 + n[0]] = np.stack([np.asarray(self.tok.word_starts(t), bool) for t in cut])
    elif n.any():
      rows = np.repeat(np.arange(B), n)
      cols = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + 1
      out[rows, cols] = np.concatenate(cut)
      # word_starts per text: a tokenizer's word starts may depend on the text's first token.
      ws[rows, cols] = np.concatenate([np.asarray(self.tok.word_starts(t), bool) for t in cut])
    out[:, 0] = self.cls
    out[np.arange(B), n + 1] = self.sep
    return out, ws

  def texts(self, texts, count: int, length: int, stats: dict | None = None):
    """Up to `count` texts -> ids [count, length] and valid [count] (tokenless texts skipped);
    each text cut to fit counts in ``stats["truncated"]``."""
    ids = np.full((count, length), self.pad, np.int32)
    valid = np.zeros(count, bool)
    k = 0
    for t in texts:
      if k == count:
        break
      tok = self.tok.encode(t)
      if len(tok) > max(0, length - 2):
        _cut(stats)
      tok = tok[:max(0, length - 2)]
      if len(tok):
        ids[k, 0], ids[k, 1:1 + len(tok)], ids[k, 1 + len(tok)] = self.cls, tok, self.sep
        valid[k] = True
        k += 1
    return ids, valid


class RowBuilder:
  """Builds the rows of one stream. `read_related(key)` -> raw record or None (neighbours)."""

  def __init__(self, stream: str, cfg, tokenizer):
    self.stream, self.cfg = stream, cfg
    self.codec = TextCodec(tokenizer) if tokenizer is not None else None
    self.d = schema.dims(stream, cfg)
    scfg = cfg["streams"][stream]
    self.objectives = tuple(scfg.get("objectives", ("mlm", "s2s")))
    self.visual = cfg["visual_input"]
    self.mask_rate = float(scfg.get("mask_rate", 0.15))
    self.infill_rate = float(scfg.get("infilling_rate", 0.25))
    self.region_rate = float(cfg.get("region_mask_rate", 0.15))
    self.overlap = float(cfg.get("region_overlap_threshold", 0.3))
    self.max_pixels = int(cfg.get("max_image_pixels", 1 << 26))
    self.spec = schema.row_spec(stream, cfg)
    # dtype of region features and class probabilities in the rows: float16 when every source
    # of the stream gives float16 (`Stream` sets it; exact, as the values are float16 already).
    self.region_dtype = np.dtype(np.float32)
    if stream in ("text", "pair") and self.codec is None:
      raise ValueError(f"stream {stream} needs a tokenizer")

  # -- what a stream needs from a source ----------------------------------------------------
  def required_fields(self, provided=frozenset()) -> tuple:
    """Raw fields a source providing `provided` must be able to provide for this stream (text:
    the text, or its token ids from a token store)."""
    if self.stream == "text":
      return ("token_ids",) if "token_ids" in provided else ("text",)
    vis = ("image",) if self.visual == "patches" else ("regions",)
    return vis + (("captions",) if self.stream == "pair" else ())

  def wanted_fields(self) -> set:
    """Raw fields this stream reads when a source has them (required ones included)."""
    if self.stream == "text":
      return {"text", "token_ids"}
    vis = {"image"} if self.visual == "patches" else {"regions", "image"}
    return vis | ({"captions", "paraphrases", "hard_negatives"} if self.stream == "pair" else set())

  # -- text pieces --------------------------------------------------------------------------
  def _mlm_args(self) -> dict:
    return dict(vocab_size=self.codec.vocab_size, mask_id=self.codec.mask,
                special_ids=self.codec.special, max_predictions=self.d["P"],
                mask_rate=self.mask_rate)

  @staticmethod
  def _mlm_fields(out, prefix) -> dict:
    return {f"{prefix}ids": out["input_ids"], f"{prefix}positions": out["positions"],
            f"{prefix}targets": out["targets"], f"{prefix}weights": out["weights"]}

  def _mlm(self, seq, ws, rng, prefix="mlm_"):
    return self._mlm_fields(masking.span_mlm(seq, ws, rng, **self._mlm_args()), prefix)

  @staticmethod
  def _s2s(out):
    return {"s2s_ids": out["input_ids"], "s2s_segments": out["segments"],
            "s2s_position_ids": out["position_ids"], "s2s_positions": out["positions"],
            "s2s_targets": out["targets"], "s2s_weights": out["weights"]}

  def _text_window(self, rec, rng, stats):
    """The ids a text row masks: the text's ids, or one random window of a long document."""
    if "token_ids" in rec:  # a token store: the ids encode(text) gives, tokenised beforehand
      ids = np.asarray(rec["token_ids"], np.int32)
      if ids.size == 0:
        raise BadRecord("empty_text", "text: no tokens")
    elif "text" in rec:
      ids = self.codec.encode(rec["text"])
    else:
      raise BadRecord("missing_field", "text")
    want = max(self.d["L"] - 2 if "mlm" in self.objectives else 0,
               self.d["L2"] if "s2s" in self.objectives else 0)
    if len(ids) > want:  # a long document: both objectives see one random window from a word
      _cut(stats)
      ws_all = np.asarray(self.codec.tok.word_starts(ids), bool)
      starts = np.flatnonzero(ws_all[:len(ids) - want + 1])
      start = int(starts[rng.integers(len(starts))]) if len(starts) else 0
      ids = ids[start:start + want]
    return ids

  def text_fields(self, windows, rngs) -> dict:
    """Span MLM and infilling of B text windows (`_text_window`), rngs[b] for row b: the text
    rows' masked fields as [B, ...] arrays, each row what masking it alone gives (the masking
    draws of a row come after its window's)."""
    L, L2 = self.d["L"], self.d["L2"]
    out = {}
    if "mlm" in self.objectives:
      seq, ws = self.codec.sequences(windows, L)
      out.update(self._mlm_batch(seq, ws, rngs))
    if "s2s" in self.objectives:
      # infilling cuts the text further to what its layout fits.
      out.update(self._s2s(masking.infilling_batch(
          [w[:L2] for w in windows], rngs, max_length=L2, max_predictions=self.d["P2"],
          bos_id=self.codec.cls, eos_id=self.codec.mask, pad_id=self.codec.pad,
          sep_id=self.codec.sep, rate=self.infill_rate)))
    return out

  def _mlm_batch(self, seq, ws, rngs, prefix="mlm_"):
    return self._mlm_fields(masking.span_mlm_batch(seq, ws, rngs, **self._mlm_args()), prefix)

  def finish_text_rows(self, rows) -> dict:
    """Masks the text rows that `build(..., defer=True)` left pending, all at once: {field:
    [len(rows), ...]} for every masked field (rows without a pending text, e.g. padding rows,
    keep their own values); the pending marks are removed from the rows."""
    pending = [j for j, r in enumerate(rows) if _PENDING in r]
    if not pending:
      return {}
    windows, rngs = zip(*(rows[j].pop(_PENDING) for j in pending))
    fields = self.text_fields(list(windows), list(rngs))
    if len(pending) == len(rows):
      return fields
    out = {}
    for name, a in fields.items():
      full = np.empty((len(rows),) + a.shape[1:], a.dtype)
      for j, r in enumerate(rows):
        if name in r:
          full[j] = r[name]
      full[pending] = a
      out[name] = full
    return out

  # -- visual pieces ------------------------------------------------------------------------
  def check_image(self, data):
    """Header check of encoded bytes -> (ratio index, width, height); BadRecord on a problem."""
    if not isinstance(data, (bytes, bytearray)):
      raise BadRecord("missing_field", "image")
    fmt, w, h, problem = images.inspect_image(data)
    if problem:
      raise BadRecord(problem, f"{fmt or 'unknown'} image")
    if w is not None and h is not None:
      if w <= 0 or h <= 0:
        raise BadRecord("undecodable_image", f"size {w}x{h}")
      if w * h > self.max_pixels:
        raise BadRecord("image_too_large", f"{w}x{h}")
    ratio = images.jpeg_ratio_index(w, h, self.d["S"]) if fmt == "jpeg" else 0
    return ratio, w, h

  def _regions(self, rec):
    """Raw regions -> (features [R,F], boxes5 [R,5], valid [R], pixel boxes [R,4], classes,
    probs) padded/truncated to R (the detector's first R regions are kept); features and probs
    are `Padded` (the batch is written from the source's arrays without a padded copy)."""
    reg = rec.get("regions")
    if reg is None:
      raise BadRecord("missing_regions", "no regions")
    R, F, C = self.d["R"], self.d["F"], self.d["C"]
    feats, boxes = reg["features"], reg["boxes"]
    n = min(len(boxes), R)
    if len(boxes) and feats.shape[1] != F:
      raise BadRecord("bad_feature_shape", f"features of size {feats.shape[1]}, expected {F}")
    probs = reg.get("class_probs")
    if probs is not None and len(boxes) and probs.shape[1] != C:
      raise BadRecord("bad_feature_shape", f"class_probs of size {probs.shape[1]}, expected {C}")
    classes = reg.get("classes")
    if probs is None and classes is None:
      raise BadRecord("missing_field", "region classes or class_probs")
    if classes is not None and len(classes) and (classes.min() < 0 or classes.max() >= C):
      raise BadRecord("bad_feature_shape", f"region class outside [0, {C})")
    w, h = reg.get("width"), reg.get("height")
    if (not w or not h) and isinstance(rec.get("image"), (bytes, bytearray)):
      _, w, h, _ = images.inspect_image(rec["image"])
    if not w or not h:  # no image size anywhere: the boxes' extent is the best estimate
      w = float(max(1.0, boxes[:, 2].max())) if len(boxes) else 1.0
      h = float(max(1.0, boxes[:, 3].max())) if len(boxes) else 1.0
    dt = self.region_dtype
    out_f = Padded(feats[:n], (R, F), dt)
    out_b = np.zeros((R, 5), np.float32)
    pix = np.zeros((R, 4), np.float32)
    valid = np.zeros(R, bool)
    cls = np.zeros(R, np.int32)
    prb = Padded(probs[:n] if probs is not None else np.zeros((0, C), dt), (R, C), dt)
    if n:
      b = boxes[:n]
      nb = np.clip(b / np.asarray([w, h, w, h], np.float32), 0.0, 1.0)
      out_b[:n, :4] = nb
      out_b[:n, 4] = (nb[:, 2] - nb[:, 0]) * (nb[:, 3] - nb[:, 1])
      pix[:n] = b
      valid[:n] = True
      if probs is not None:
        cls[:n] = np.argmax(probs[:n], axis=1) if classes is None else classes[:n]
      else:
        cls[:n] = classes[:n]
        one_hot = np.zeros((n, C), dt)
        one_hot[np.arange(n), cls[:n]] = 1.0
        prb = Padded(one_hot, (R, C), dt)
    return out_f, out_b, valid, pix, cls, prb

  def _visual(self, rec, rng, row):
    """Adds the visual input and MRP fields (or the image-bytes slot 0) to `row`."""
    if self.visual == "patches":
      ratio, _, _ = self.check_image(rec.get("image"))
      row["_image"], row["_image_ratio"], row["_image_present"] = [rec["image"]], [ratio], [True]
      row["visual_mask"] = masking.patch_mask(self.d["N"], rng, rate=self.region_rate)
    else:
      f, b, v, pix, cls, prb = self._regions(rec)
      row.update(region_features=f, region_boxes=b, region_valid=v, region_classes=cls,
                 region_class_probs=prb)
      row["visual_mask"] = masking.region_mask(pix, v, rng, rate=self.region_rate,
                                               overlap_threshold=self.overlap)

  def _related_images(self, related, row):
    """Related images X_I: appended image slots (patches) or region arrays; bad ones masked."""
    Ki = self.d["Ki"]
    valid = np.zeros(Ki, bool)
    if self.visual == "patches":
      for k in range(Ki):
        rec = related[k] if k < len(related) else None
        data, ratio, ok = b"", 0, False
        if rec is not None:
          try:
            ratio, _, _ = self.check_image(rec.get("image"))
            data, ok = rec["image"], True
          except BadRecord:
            pass
        row["_image"].append(data)
        row["_image_ratio"].append(ratio)
        row["_image_present"].append(ok)
        valid[k] = ok  # the TF stage also clears it if the decode fails
    else:
      R, F = self.d["R"], self.d["F"]
      feats = np.zeros((Ki, R, F), self.region_dtype)
      boxes = np.zeros((Ki, R, 5), np.float32)
      rvalid = np.zeros((Ki, R), bool)
      for k in range(min(Ki, len(related))):
        if related[k] is None:
          continue
        try:
          f, boxes[k], rvalid[k], _, _, _ = self._regions(related[k])
          f.write(feats[k])
          valid[k] = True
        except BadRecord:
          pass
      row.update(related_region_features=feats, related_region_boxes=boxes,
                 related_region_valid=rvalid)
    row["related_valid"] = valid

  # -- rows ---------------------------------------------------------------------------------
  def build(self, rec, rng, related_images=(), related_texts=(), extra_negatives=(),
            lexicon_negatives=False, defer: bool = False):
    """One row (dict) of this stream from raw record `rec`; raises BadRecord.

    Text rows with `defer`: the row keeps its window and generator pending and
    `finish_text_rows` masks a batch of such rows at once (the same values).

    Pairs only: `extra_negatives` (e.g. TF-IDF-nearest captions of other images) follow the
    record's own hard negatives; `lexicon_negatives` fills the remaining slots with word-level
    rewrites of the caption (`rewriting.lexicon_rewrites`).
    """
    row, stats = {}, {}
    if self.stream == "text":
      window = self._text_window(rec, rng, stats)
      if defer:
        row[_PENDING] = (window, rng)
      else:
        row.update({k: v[0] for k, v in self.text_fields([window], [rng]).items()})
    elif self.stream == "image":
      self._visual(rec, rng, row)
    else:
      self._pair_row(rec, rng, row, related_images, related_texts, extra_negatives,
                     lexicon_negatives, stats)
    row["row_valid"] = True
    row["_truncated"] = np.int32(stats.get("truncated", 0))
    return row

  def _pair_row(self, rec, rng, row, related_images, related_texts, extra_negatives,
                lexicon_negatives, stats):
    captions = rec.get("captions")
    if not captions:
      raise BadRecord("missing_field", "captions")
    L, Kn = self.d["L"], self.d["Kn"]
    c = int(rng.integers(len(captions)))
    ids = self.codec.encode(captions[c], "caption")
    caption_ids, ws = self.codec.sequence(ids, L, stats)
    row["caption_ids"] = caption_ids
    # Other captions of the image and supplied paraphrases are the positives X+.
    pos = rewriting.paraphrase_positives(captions, c, self.d["Kp"] + 2,
                                         rec.get("paraphrases", ()), rng)
    row["positive_ids"], row["positive_valid"] = self.codec.texts(pos, self.d["Kp"], L, stats)
    neg = list(rec.get("hard_negatives", []))
    neg = [neg[j] for j in rng.permutation(len(neg))] if neg else []
    neg += [t for t in extra_negatives if t not in neg]
    if lexicon_negatives and len(neg) < Kn:
      neg += [t for t, _ in rewriting.lexicon_rewrites(captions[c], rng, Kn - len(neg))]
    row["negative_ids"], row["negative_valid"] = self.codec.texts(neg, Kn, L, stats)
    texts = text_list(list(related_texts), "related texts")
    row["related_text_ids"], row["related_text_valid"] = self.codec.texts(
        texts, self.d["Kt"], L, stats)
    if "mlm" in self.objectives:
      row.update(self._mlm(caption_ids, ws, rng))
    if "s2s" in self.objectives:
      row.update(self._s2s(masking.captioning_layout(
          caption_ids, max_length=L, max_predictions=self.d["P2"], bos_id=self.codec.cls,
          eos_id=self.codec.sep, pad_id=self.codec.pad)))
    self._visual(rec, rng, row)
    self._related_images(list(related_images), row)

  # -- padding rows -------------------------------------------------------------------------
  def empty_row(self):
    """A row with row_valid False: zeros everywhere, PAD ids, no image to decode."""
    row = {}
    for name, (shape, dtype) in self.spec.items():
      if self.visual == "patches" and name in ("pixels", "related_pixels"):
        continue
      is_ids = name.endswith("_ids") and name != "s2s_position_ids"
      fill = self.codec.pad if (is_ids and self.codec is not None) else 0
      if name in HALF_FIELDS:
        dtype = self.region_dtype
      row[name] = np.full(shape, fill, dtype)
    if self.visual == "patches" and self.stream != "text":
      k = 1 + (self.d["Ki"] if self.stream == "pair" else 0)
      row["_image"], row["_image_ratio"], row["_image_present"] = [b""] * k, [0] * k, [False] * k
    row["_truncated"] = np.int32(0)
    return row
