"""Image captioning: generation with the key/value cache, and BLEU-4 / CIDEr against references.

Scoring uses pycocoevalcap's ``Bleu`` and ``Cider`` scorers (pure python). Its ``PTBTokenizer``
runs the Stanford tokenizer in Java, so captions are normalised here instead by ``tokenize``:
lower case, punctuation dropped, words and numbers kept (a possessive ``'s`` stays attached).
"""
import re
from typing import Mapping, Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> str:
  """Lower-cased words joined by single spaces: ``"A red Circle, left."`` -> ``"a red circle left"``."""
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
