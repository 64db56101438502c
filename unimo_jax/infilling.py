"""Seq2seq text infilling (UNIMO's seq2seq objective) of one text or a batch of texts.

`infilling_batch` masks B texts, each with its own generator, and gives row by row exactly what
`infilling` gives for that text alone (`infilling` is the batch of one): a row's draws (a length
and a start per fragment) are made in a Python loop in the reference's order
(tests/masking_reference.py); the layout (source, target fragments, position ids, segments,
predictions) is written for the whole batch with a fixed number of numpy calls.
`unimo_jax.masking` re-exports both.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from unimo_jax.text_masking import _round_half_up, _scatter_predictions

def _strip_text(ids, bos_id: int, sep_id: int, pad_id: int) -> np.ndarray:
  """The words of a text: drops PAD anywhere, a leading [CLS] and a trailing [SEP]."""
  ids = np.asarray(ids)
  ids = ids[ids != pad_id]
  if len(ids) and ids[0] == bos_id:
    ids = ids[1:]
  if len(ids) and ids[-1] == sep_id:
    ids = ids[:-1]
  return ids.astype(np.int32)


def _infilling_bounds(n: int, rate: float, min_len: int) -> tuple[int, int]:
  """Upper bounds (tokens moved to the target, number of fragments) for a text of n tokens."""
  if n == 0:
    return 0, 0
  if n < min_len:
    return n, 1
  budget = max(1, _round_half_up(rate * n))
  covered = min(n, budget + min_len - 1)
  return covered, covered // min_len


@functools.lru_cache(maxsize=4096)
def _infilling_prefix(length: int, rate: float, min_len: int, max_length: int,
                      max_predictions: int) -> int:
  """The longest prefix (<= length) whose worst case layout and predictions fit (cached: long
  documents all give the same window length)."""

  def fits(n):
    covered, n_frags = _infilling_bounds(n, rate, min_len)
    return n + 3 + n_frags <= max_length and covered + n_frags <= max_predictions

  # Both bounds grow with n, so `fits` holds on [0, n*] and a bisection finds n* (the same n as
  # trying n, n - 1, ... down; 9 tries instead of ~40).
  lo, hi = 0, length
  if not fits(hi):
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    hi = lo
  return hi


def _sample_fragments(n: int, rng: np.random.Generator, rate: float, min_len: int,
                      max_len: int) -> list[tuple[int, int]]:
  """Non-overlapping, non-adjacent fragments [start, end) of a text of n tokens, sorted."""
  if n == 0:
    return []
  if n < min_len:
    # Too short for one fragment: the whole text becomes the target (UNIMO-2's `_except`).
    return [(0, n)]
  budget = max(1, _round_half_up(rate * n))
  # The free segments [a, b): positions neither in a fragment nor next to one (a fragment must
  # not touch another one: one gap in the source per fragment), ascending. The starts that fit
  # a fragment of `length` are a .. b - length of each segment, in the same ascending order as
  # scanning every position, so the j-th start drawn is the same; this costs O(fragments) per
  # fragment instead of numpy passes over the text.
  free = [(0, n)]
  frags = []
  covered = 0
  integers = rng.integers
  while covered < budget:
    length = int(integers(min_len, max_len + 1))
    # The last fragment is cut to the budget, but never below min_len.
    length = min(length, max(budget - covered, min_len), n)
    counts = [max(0, b - a - length + 1) for a, b in free]
    total = sum(counts)
    if total == 0:
      break
    j = int(integers(total))
    for k, c in enumerate(counts):
      if j < c:
        break
      j -= c
    a, b = free[k]
    s = a + j
    free[k:k + 1] = [seg for seg in ((a, s - 1), (s + length + 1, b)) if seg[1] > seg[0]]
    frags.append((s, s + length))
    covered += length
  return sorted(frags)


def infilling_batch(texts: Sequence, rngs: Sequence[np.random.Generator], *, max_length: int,
                    max_predictions: int, bos_id: int, eos_id: int, pad_id: int,
                    rate: float = 0.25, min_len: int = 4, max_len: int = 32, sep_id: int = 2,
                    return_fragments: bool = False) -> dict:
  """`infilling` of each of B texts (1-D id arrays of any lengths) with rngs[b]: the same arrays
  with a leading B (``fragments``: a list of B arrays), each generator left as `infilling`
  leaves it."""
  if len(texts) != len(rngs):
    raise ValueError(f"{len(texts)} texts and {len(rngs)} generators")
  B, ML, P = len(texts), int(max_length), int(max_predictions)
  texts = [np.asarray(t) for t in texts]
  if any(t.ndim != 1 for t in texts):
    raise ValueError(f"texts must be 1-D ids, got shapes {[t.shape for t in texts]}")
  # _strip_text is the identity (but for the dtype) on a text without [PAD] whose ends are not
  # [CLS] / [SEP]: [PAD] is looked for once, over the whole batch.
  if B and (np.concatenate(texts) == pad_id).any():
    kept = [_strip_text(t, bos_id, sep_id, pad_id) for t in texts]
  else:
    kept = [_strip_text(t, bos_id, sep_id, pad_id) if len(t) and (
        t[0] == bos_id or t[-1] == sep_id) else t for t in texts]
  # Per text: its prefix length n, fragments, and where its layout puts each part.
  key = (float(rate), int(min_len), ML, P)
  lens, frag_starts, frag_ends, specials, ns_l, seq_l, all_frags = [], [], [], [], [], [], []
  base = 0
  for b, (t, rng) in enumerate(zip(kept, rngs)):
    n = _infilling_prefix(len(t), *key)
    frags = _sample_fragments(n, rng, rate, min_len, max_len)
    moved = sum(e - s for s, e in frags)
    ns = n - moved + 2  # [CLS] source [SEP]
    seq_len = ns + 1 + moved + len(frags)
    assert seq_len <= ML, (seq_len, ML)
    o = b * ML
    # [CLS] at 0, [SEP] at ns - 1 (position n + 1), the target's [CLS] at ns standing just
    # before the first fragment; each fragment's eos stands just before the next fragment, the
    # final eos just after the last one (UNIMO-2's per-fragment [CLS]).
    specials += [(o, bos_id, 0), (o + ns - 1, sep_id, n + 1),
                 (o + ns, bos_id, frags[0][0] if frags else 0)]
    slot = o + ns + 1
    for j, (s, e) in enumerate(frags):
      frag_starts.append(base + s)
      frag_ends.append(base + e)
      slot += e - s
      specials.append((slot, eos_id, frags[j + 1][0] if j + 1 < len(frags) else e + 1))
      slot += 1
    lens.append(n)
    ns_l.append(ns)
    seq_l.append(seq_len)
    all_frags.append(frags)
    base += n

  # Text token i (0-based) of row b: kept tokens fill the source from slot 1 in order; the k-th
  # moved token of fragment j sits at ns + 1 + k + j (each fragment is followed by its eos).
  # Every token keeps position i + 1.
  n_arr = np.asarray(lens, np.intp)
  text = np.concatenate([t[:n] for t, n in zip(kept, lens)]).astype(np.int32) if B else (
      np.zeros(0, np.int32))
  N = len(text)
  row = np.repeat(np.arange(B), n_arr)
  offset = np.cumsum(n_arr) - n_arr  # first flat token of each row
  i = np.arange(N) - offset[row]
  opened = np.bincount(np.asarray(frag_starts, np.intp), minlength=N + 1)
  edge = np.cumsum(opened - np.bincount(np.asarray(frag_ends, np.intp), minlength=N + 1))
  moved = edge[:N] > 0
  kept_upto = np.cumsum(~moved)  # kept tokens up to and including each flat token
  kept_before_row = np.concatenate([[0], kept_upto])[offset]
  k_kept = kept_upto - kept_before_row[row]  # 1-based rank among the row's kept tokens
  k_moved = i + 1 - k_kept  # 1-based rank among the row's moved tokens
  frags_upto = np.cumsum(opened)[:N]
  frags_before_row = np.concatenate([[0], frags_upto])[offset]
  frag_j = frags_upto - frags_before_row[row] - 1
  ns = np.asarray(ns_l, np.intp)
  slot = row * ML + np.where(moved, ns[row] + k_moved + frag_j, k_kept)
  input_ids = np.full(B * ML, pad_id, np.int32)
  position_ids = np.zeros(B * ML, np.int32)
  input_ids[slot] = text
  position_ids[slot] = i + 1
  sp = np.asarray(specials, np.intp).reshape(-1, 3)
  input_ids[sp[:, 0]] = sp[:, 1]
  position_ids[sp[:, 0]] = sp[:, 2]
  input_ids, position_ids = input_ids.reshape(B, ML), position_ids.reshape(B, ML)
  seq_len = np.asarray(seq_l, np.intp)
  col = np.arange(ML)
  segments = np.where(col < ns[:, None], 1, np.where(col < seq_len[:, None], 2, 0)).astype(
      np.int32)
  # Teacher forcing: positions ns .. seq_len - 2 predict the next token.
  n_pred = seq_len - 1 - ns
  p_row = np.repeat(np.arange(B), n_pred)
  within = np.arange(int(n_pred.sum())) - np.repeat(np.cumsum(n_pred) - n_pred, n_pred)
  p_pos = ns[p_row] + within
  out = _scatter_predictions(p_row, within, p_pos, input_ids.reshape(-1)[p_row * ML + p_pos + 1],
                             B, P)
  out.update(input_ids=input_ids, segments=segments, position_ids=position_ids)
  if return_fragments:
    out["fragments"] = [np.asarray(f, dtype=np.int32).reshape(-1, 2) for f in all_frags]
  return out


def infilling(ids, rng: np.random.Generator, *, max_length: int, max_predictions: int,
              bos_id: int, eos_id: int, pad_id: int, rate: float = 0.25, min_len: int = 4,
              max_len: int = 32, sep_id: int = 2,
              return_fragments: bool = False) -> dict[str, np.ndarray]:
  """Seq2seq text infilling (UNIMO's seq2seq objective) of one text, in the UniLM layout.

  Fragments of U(min_len, max_len) tokens are drawn at uniformly random free places until they
  cover `rate` of the text (budget = round(rate * n), at least 1); the last fragment is cut to
  the budget but never below min_len, so the share can exceed `rate` by < min_len tokens.
  Fragments never overlap or touch. The source is the text with the fragments removed (no
  placeholder, as the paper), the target is the fragments in text order, each closed by eos:

    input_ids = [CLS] source [SEP] [CLS] frag1 [EOS] frag2 [EOS] ... PAD..
    segments  =   1     1      1     2    2     2     2     2        0

  with bos = [CLS] and eos = [MASK] for seq2seq generation (UNIMO's decoder). UNIMO-2's code
  joins fragments with [CLS] instead ([CLS] frag1 [CLS] frag2, no final eos); closing each
  fragment with eos makes the target decodable with the same stop rule as fine-tuning.
  Teacher forcing: the token at position t predicts the token at t+1 in the target, so
  `positions` run over the target's [CLS]..last fragment token and `targets` are every target
  token after the [CLS] (fragment tokens and each eos).

  Args:
    ids: [L] ids of one text; PAD, a leading [CLS] and a trailing [SEP] are ignored.
    max_length: length of `input_ids`/`segments`. max_predictions: P.
    bos_id, eos_id, pad_id, sep_id: [CLS], [MASK] (the seq2seq eos), [PAD], [SEP].
    rate, min_len, max_len: share of tokens moved to the target and fragment lengths.
    return_fragments: also return `fragments` [F, 2] int32 (start, end) in text coordinates.

  Position ids (UNIMO-2): every token keeps its position in the original text, so the jumps in
  the source's positions show where fragments were cut and each fragment token carries the
  place it came from; the target's [CLS] and each eos take the position of the text token just
  before the next fragment, the final eos the position just after the last fragment:

    position_ids = 0 <kept i+1 ..> n+1  s1 <s1+1 .. e1> s2 <s2+1 .. e2> e_last+1  0 (pad)..

  These are 0-based ([CLS] = 0, pads 0): the model's text positions are `position_offset +
  position_ids` for real tokens and `pad_position` for pads (pass them as `positions=`). Without
  them the model numbers the layout sequentially and infilling loses the gap locations.

  Truncation: the text is cut at the end, before sampling, to the longest prefix whose worst
  case layout (text + 3 + one eos per fragment) fits max_length and whose worst case number of
  predictions fits P, so no fragment is ever cut. A text shorter than min_len becomes a single
  fragment (empty source); an empty text gives no predictions.

  Returns dict(input_ids [max_length] int32, segments [max_length] int32, position_ids
  [max_length] int32, positions [P], targets [P] int32, weights [P] float32).
  """
  out = infilling_batch([np.asarray(ids).reshape(-1)], [rng], max_length=max_length,
                        max_predictions=max_predictions, bos_id=bos_id, eos_id=eos_id,
                        pad_id=pad_id, rate=rate, min_len=min_len, max_len=max_len,
                        sep_id=sep_id, return_fragments=return_fragments)
  return {k: v[0] for k, v in out.items()}
