"""Image captioning: generation with the key/value cache, and BLEU-4 / CIDEr against references.

Scoring uses pycocoevalcap's ``Bleu`` and ``Cider`` scorers (pure python). Its ``PTBTokenizer``
runs the Stanford tokenizer in Java, so captions are normalised here instead by ``tokenize``:
lower case, punctuation dropped, words and numbers kept (a possessive ``'s`` stays attached).
"""
import dataclasses
import re
from typing import Mapping, Sequence

import jax
import numpy as np

from unimo_jax.evaluation import decoding

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> str:
  """Lower-cased words joined by single spaces: ``"A red Circle."`` -> ``"a red circle"``."""
  return " ".join(_WORD.findall(text.lower()))


def caption_scores(candidates: Mapping, references: Mapping) -> dict:
  """Corpus BLEU-1..4 and CIDEr(-D as in pycocoevalcap, sigma 6) of generated captions.

  Args:
    candidates: {image id: generated caption (str)}.
    references: {image id: list of reference captions (str)}; the same keys.
  Returns:
    dict of floats: ``bleu1``..``bleu4`` (0..1) and ``cider`` (0..10), plus ``cider_per_image``
    (np.ndarray, in sorted key order) for reports.
  """
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  if set(candidates) != set(references):
    raise ValueError("candidates and references must have the same image ids")
  if not candidates:
    return {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0, "cider": 0.0,
            "cider_per_image": np.zeros((0,))}
  keys = sorted(candidates)
  res = {k: [tokenize(candidates[k])] for k in keys}
  gts = {k: [tokenize(r) for r in references[k]] for k in keys}
  if any(not refs for refs in gts.values()):
    raise ValueError("every image needs at least one reference caption")
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, per_image = Cider().compute_score(gts, res)
  out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
  out["cider"] = float(cider)
  out["cider_per_image"] = np.asarray(per_image, np.float64)
  return out


def decode_tokens(tokens: np.ndarray, lengths: np.ndarray, decode_fn, eos_id: int) -> list:
  """Generated token rows [N, T] (+ lengths [N]) to strings, dropping eos and what follows."""
  out = []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    ids = [int(t) for t in row[:int(n)]]
    if eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    out.append(decode_fn(np.asarray(ids, np.int32)))
  return out


def references_by_id(image_ids: Sequence, captions: Sequence[Sequence[str]]) -> dict:
  """{image id: list of non-empty reference captions}."""
  return {int(i): [c for c in caps if c] for i, caps in zip(image_ids, captions)}


# ---------------------------------------------------------------------------------------------
# Generation (device side)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CaptionSettings:
  """How captions are generated (UNIMO's captioning decoder: bos [CLS], eos [SEP]).

  max_length: most tokens generated, eos included.
  beam_size: 1 = greedy search.
  alpha: GNMT length-penalty exponent. min_length: tokens before eos may be emitted.
  block_trigrams: forbid repeating a trigram.
  """
  max_length: int = 20
  beam_size: int = 1
  alpha: float = 0.0
  min_length: int = 1
  block_trigrams: bool = False


def forbidden_ids(config) -> tuple:
  """Ids a caption never contains: pad, bos ([CLS]), unk and [MASK]."""
  return tuple(sorted({config.pad_id, config.cls_id, config.unk_id, config.mask_token_id}))


def model_step_fn(model, params):
  """The model's cached decode step in ``decoding``'s step-function form."""
  from unimo_jax.model import Unimo  # pylint: disable=import-outside-toplevel

  def step_fn(tokens, step, cache):
    del step  # the cache knows its own index and text position
    out, cache = model.apply({"params": params}, tokens, cache, method=Unimo.decode_step)
    return out["logits"], cache
  return step_fn


def generate(model, params, visual: dict, settings: CaptionSettings,
             step_fn=None, cache=None) -> decoding.Decoded:
  """Captions for a batch of images (jit-able).

  Args:
    model: a ``Unimo`` module; params: its parameter tree.
    visual: the model's visual input for B images.
    settings: search settings.
    step_fn, cache: override the model's cached step (tests pass an uncached reference); by
      default the image block is prefilled once and ``Unimo.decode_step`` extends it.
  Returns:
    ``decoding.Decoded`` [B, K, max_length] (K = beam size), best hypothesis first.
  """
  from unimo_jax.model import Unimo, reorder_cache  # pylint: disable=import-outside-toplevel
  cfg = model.config
  batch = jax.tree.leaves(visual)[0].shape[0]
  reorder = decoding.gather_rows
  if step_fn is None:
    _, cache = model.apply({"params": params}, settings.max_length, visual=visual,
                           method=Unimo.prefill)
    step_fn = model_step_fn(model, params)
    reorder = reorder_cache
  kw = dict(max_length=settings.max_length, bos_id=cfg.cls_id, eos_id=cfg.sep_id,
            pad_id=cfg.pad_id, alpha=settings.alpha, min_length=settings.min_length,
            block_trigrams=settings.block_trigrams, forbidden_ids=forbidden_ids(cfg))
  if settings.beam_size == 1:
    return decoding.greedy_search(step_fn, cache, batch, **kw)
  return decoding.beam_search(step_fn, cache, batch, beam_size=settings.beam_size,
                              reorder_fn=reorder, **kw)
