"""Seeded masking for UNIMO's pre-training objectives (pure numpy: no jax, no TensorFlow).

Every function takes one example and a `np.random.Generator` (callers build it as
`np.random.default_rng([seed, stream, index])`), so a batch is a pure function of (seed, position)
and the data pipeline can call these functions from `tf.numpy_function` or from a plain Python
iterator. Outputs have fixed shapes; padding rows of `positions/targets/weights` are 0/0/0.0.

Objectives (facts in shared/UNIMO.md, decisions written next to each function):
  span_mlm          bidirectional span MLM: whole words, span length ~ truncated Geo(0.2), 15%.
  infilling         seq2seq infilling: fragments of U(4,32) tokens until 25%, UniLM layout.
  captioning_layout text generated from an image prefix: `[CLS] w1..wN [SEP]`, next-token targets.
  region_mask       masked region prediction: 15% of regions + regions overlapping them.
  patch_mask        the same for patch inputs (patches never overlap, so no overlap rule).
"""
from __future__ import annotations

import bisect
import functools
import math
from typing import Iterable

import numpy as np

# Ids below this are the special tokens of the UNIMO/RoBERTa layout (CLS, PAD, SEP, UNK).
FIRST_ORDINARY_ID = 4
_INTP_MAX = int(np.iinfo(np.intp).max)  # np.iinfo() per call costs microseconds


def _round_half_up(x: float) -> int:
  # Python's round() rounds half to even; budgets should not depend on parity. math.floor is
  # np.floor on one float without the numpy scalar (infilling's truncation calls this ~20 times).
  return math.floor(x + 0.5)


# ---------------------------------------------------------------------------------------------
# Span MLM
# ---------------------------------------------------------------------------------------------


def span_length_distribution(geo_p: float = 0.2, max_span_words: int = 10,
                             min_span_words: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The span-length law of UNIMO-2's `mask`: lengths `min..max` with pmf ∝ p(1-p)^(k-min).

  Returns (lengths [K] int, probs [K] float64). With the default `min_span_words=0` a drawn 0 is
  NOT re-drawn: it masks just the anchor word (UNIMO-2's loop always masks the anchor word and
  then adds words while `num_words < span_len`), so 0 and 1 both give one-word spans.
  `min_span_words=1` gives the plain truncated geometric on 1..max (SpanBERT).
  """
  if not 0.0 < geo_p <= 1.0:
    raise ValueError(f"geo_p must be in (0, 1], got {geo_p}")
  if not 0 <= min_span_words <= max_span_words:
    raise ValueError(f"need 0 <= min_span_words <= max_span_words, got "
                     f"{min_span_words}, {max_span_words}")
  lengths = np.arange(min_span_words, max_span_words + 1)
  probs = geo_p * (1.0 - geo_p) ** (lengths - min_span_words)
  return lengths, probs / probs.sum()


@functools.lru_cache(maxsize=16)
def _span_table(geo_p, max_span_words, min_span_words):
  """(span lengths, their cumulative probabilities) as lists, for `bisect` draws."""
  lengths, probs = span_length_distribution(geo_p, max_span_words, min_span_words)
  return lengths.tolist(), np.cumsum(probs).tolist()


@functools.lru_cache(maxsize=64)
def _special_set(special_ids: tuple, mask_id: int) -> frozenset:
  return frozenset(int(s) for s in special_ids) | {mask_id}


@functools.lru_cache(maxsize=64)
def _excluded(excluded: frozenset, vocab_size: int) -> tuple:
  return tuple(sorted(e for e in excluded if FIRST_ORDINARY_ID <= e < vocab_size))


def random_ordinary_ids(rng: np.random.Generator, size: int, *, vocab_size: int,
                        excluded: Iterable[int]) -> np.ndarray:
  """Ids drawn uniformly from `[4, vocab_size)` minus `excluded` (e.g. MASK). [size] int32."""
  excl = _excluded(excluded if isinstance(excluded, frozenset) else frozenset(
      int(e) for e in excluded), int(vocab_size))
  n_allowed = vocab_size - FIRST_ORDINARY_ID - len(excl)
  if n_allowed <= 0:
    raise ValueError(f"no ordinary ids in a vocabulary of {vocab_size}")
  v = rng.integers(0, n_allowed, size=size) + FIRST_ORDINARY_ID
  # Shifting past each excluded id in increasing order maps [0, n_allowed) onto the allowed ids
  # one-to-one, so the draw stays uniform.
  for e in excl:
    v = v + (v >= e)
  return v.astype(np.int32)


@functools.lru_cache(maxsize=16)
def _special_table(special_ids: frozenset) -> np.ndarray:
  """bool [max id + 2]: True at the special ids (non-negative); the last entry stands for every
  larger id."""
  table = np.zeros(max(special_ids) + 2, bool)
  table[sorted(special_ids)] = True
  return table


def _words(ids: np.ndarray, word_starts: np.ndarray, special_ids) -> tuple[np.ndarray, ...]:
  """Maskable words: (start [W], length [W], contiguous_with_previous [W] bool, word of each
  token [L] (-1 before the first word), maskable [L] bool)."""
  special_ids = frozenset(special_ids)
  if special_ids and min(special_ids) >= 0 and (not ids.size or ids.min() >= 0):
    # A table lookup: one pass whatever the number of special ids (np.isin sorts).
    table = _special_table(special_ids)
    maskable = ~table[np.minimum(ids, len(table) - 1)]
  else:
    maskable = np.ones(ids.shape, bool)
    for s in special_ids:
      maskable &= ids != s
  # A special token always ends a word, even if the tokenizer did not flag the next token.
  starts = maskable & word_starts
  if len(starts):
    starts[0] = maskable[0]
    starts[1:] |= maskable[1:] & ~maskable[:-1]
  start_idx = np.flatnonzero(starts)
  word_of_token = np.cumsum(starts) - 1
  lengths = np.bincount(word_of_token[maskable], minlength=len(start_idx))[:len(start_idx)]
  contiguous = np.zeros(len(start_idx), dtype=bool)
  if len(start_idx) > 1:
    contiguous[1:] = start_idx[1:] == start_idx[:-1] + lengths[:-1]
  return start_idx, lengths, contiguous, word_of_token, maskable


def span_mlm(ids, word_starts, rng: np.random.Generator, *, vocab_size: int, mask_id: int,
             special_ids: Iterable[int], max_predictions: int, mask_rate: float = 0.15,
             geo_p: float = 0.2, max_span_words: int = 10, min_span_words: int = 0,
             mask_prob: float = 0.8, random_prob: float = 0.1,
             return_spans: bool = False) -> dict[str, np.ndarray]:
  """Whole-word span masking (UNIMO / UNIMO-2 span MLM) of one text.

  Args:
    ids: [L] int token ids, e.g. `[CLS] w1..wN [SEP] PAD..`.
    word_starts: [L] bool, True where a token begins a new word (tokenizer's `word_starts`).
    rng: the example's generator.
    vocab_size, mask_id: vocabulary size and the [MASK] id.
    special_ids: ids never masked; MUST include PAD, CLS, SEP (and MASK) — padding is excluded
      only through this set. Special tokens also end words and spans.
    max_predictions: P, the fixed length of the prediction arrays; never more are masked.
    mask_rate: share of maskable tokens to mask (budget = round(rate * maskable), at least 1).
    geo_p, max_span_words, min_span_words: span length in words, see `span_length_distribution`.
    mask_prob, random_prob: per masked token, [MASK] with prob 0.8, a random ordinary id
      (uniform over ids >= 4, not MASK, not in special_ids) with 0.1, else unchanged.
    return_spans: also return `spans` [S, 4] int32 rows (first_token, num_tokens, num_words,
      drawn_length) for tests and analysis.

  Returns dict(input_ids [L] int32, positions [P] int32 (ascending), targets [P] int32 (the
  original ids), weights [P] float32 (1 for a prediction, 0 for padding)).

  Procedure: repeat {draw a span length k; pick an anchor word uniformly among unmasked words
  that fit the remaining budget; mask the anchor word and the following words, up to k words in
  all, stopping early at a special token, an already masked word, or a word that would overshoot
  the budget} until the budget is reached or no unmasked word fits. Only whole words are masked
  (UNIMO-2 may cut the last word at the budget; we never do), so the masked share can fall a
  little short of `mask_rate` when words are long. If no word fits the budget at all, one word
  (at most P tokens) is still masked, so every text with a maskable word gets a target.
  """
  ids = np.asarray(ids)
  word_starts = np.asarray(word_starts, dtype=bool)
  if ids.shape != word_starts.shape or ids.ndim != 1:
    raise ValueError(f"ids {ids.shape} and word_starts {word_starts.shape} must be equal [L]")
  special_ids = _special_set(tuple(special_ids), int(mask_id))
  w_start, w_len, w_contig, word_of_token, maskable = _words(ids, word_starts, special_ids)
  n_words = len(w_start)
  n_maskable = int(w_len.sum())
  budget = 0
  if n_maskable:
    budget = min(max_predictions, max(1, _round_half_up(mask_rate * n_maskable)))

  lengths, cdf = _span_table(geo_p, max_span_words, min_span_words)
  # The loop runs once per span (~20 times at 512 tokens) and costs what its numpy calls cost,
  # so it works on Python lists: `unmasked` (ascending word indices) IS the candidate list
  # while the remaining budget fits the longest word, and one numpy pass finds the candidates
  # only near the end of the budget. The draws are the same calls in the same order as a plain
  # loop over numpy arrays (tests/masking_reference.py), so the masks are too.
  masked_word = np.zeros(n_words, dtype=bool)
  # A masked word's length set past any budget: one comparison finds the unmasked words that fit.
  avail_len = w_len.copy()
  masked_list = [False] * n_words
  len_list, contig_list, start_list = w_len.tolist(), w_contig.tolist(), w_start.tolist()
  unmasked = list(range(n_words))
  longest = max(len_list) if n_words else 0
  no_word = _INTP_MAX  # avail_len is np.bincount's intp
  count = 0
  spans = []
  # Bound once: the loop body is a few microseconds, attribute lookups are a share of it.
  rand, integers, bisect_right, last = rng.random, rng.integers, bisect.bisect_right, len(cdf) - 1
  # Each iteration masks at least one word or stops, so n_words + 1 iterations always suffice.
  for _ in range(n_words + 1):
    if count >= budget:
      break
    remaining = budget - count
    every = remaining >= longest
    candidates = unmasked if every else np.flatnonzero(avail_len <= remaining)
    fallback = len(candidates) == 0
    if fallback:
      # No whole word fits the budget: mask one word anyway, if it fits the P slots.
      if count > 0:
        break
      candidates = np.flatnonzero(w_len <= max_predictions)
      every = False
      if len(candidates) == 0:
        break
      remaining = max_predictions
    drawn = lengths[min(bisect_right(cdf, rand()), last)]
    k = 1 if fallback else max(1, drawn)
    j = int(integers(len(candidates)))
    anchor = int(candidates[j])
    w, n_tok, n_w = anchor, 0, 0
    while n_w < k and w < n_words and not masked_list[w] and n_tok + len_list[w] <= remaining:
      if n_w > 0 and not contig_list[w]:
        break  # a special token lies between the words: spans do not cross it
      masked_list[w] = True
      n_tok += len_list[w]
      n_w += 1
      w += 1
    if n_w:
      masked_word[anchor:w] = True
      avail_len[anchor:w] = no_word
      # anchor..w-1 were all unmasked, so they sit together in `unmasked` from anchor's place.
      pos = j if every else bisect.bisect_left(unmasked, anchor)
      del unmasked[pos:pos + n_w]
    count += n_tok
    spans.append((start_list[anchor], n_tok, n_w, drawn))

  # A maskable token is masked with its word (a word's tokens are the maskable run from its
  # start, so this equals marking [start, start + length) of every masked word).
  token_masked = maskable & masked_word[np.maximum(word_of_token, 0)] & (word_of_token >= 0) \
      if n_words else np.zeros(len(ids), dtype=bool)
  positions = np.flatnonzero(token_masked)
  n_pred = len(positions)
  assert n_pred <= max_predictions

  # Draw both arrays whole so the generator advances the same way whatever the outcome.
  u = rng.random(n_pred)
  replacement = random_ordinary_ids(rng, n_pred, vocab_size=vocab_size, excluded=special_ids)
  input_ids = ids.astype(np.int32, copy=True)
  to_mask = u < mask_prob
  to_random = (u >= mask_prob) & (u < mask_prob + random_prob)
  input_ids[positions[to_mask]] = mask_id
  input_ids[positions[to_random]] = replacement[to_random]

  out = _predictions(positions, ids[positions], max_predictions)
  out["input_ids"] = input_ids
  if return_spans:
    out["spans"] = np.asarray(spans, dtype=np.int32).reshape(-1, 4)
  return out


def _predictions(positions, targets, max_predictions: int) -> dict[str, np.ndarray]:
  n = len(positions)
  pos = np.zeros(max_predictions, np.int32)
  tgt = np.zeros(max_predictions, np.int32)
  wts = np.zeros(max_predictions, np.float32)
  pos[:n] = positions
  tgt[:n] = targets
  wts[:n] = 1.0
  return dict(positions=pos, targets=tgt, weights=wts)


# ---------------------------------------------------------------------------------------------
# Seq2seq layouts: infilling (text) and captioning (image prefix)
# ---------------------------------------------------------------------------------------------


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
  while covered < budget:
    length = int(rng.integers(min_len, max_len + 1))
    # The last fragment is cut to the budget, but never below min_len.
    length = min(length, max(budget - covered, min_len), n)
    counts = [max(0, b - a - length + 1) for a, b in free]
    total = sum(counts)
    if total == 0:
      break
    j = int(rng.integers(total))
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
  text = _strip_text(ids, bos_id, sep_id, pad_id)
  n = _infilling_prefix(len(text), float(rate), int(min_len), int(max_length),
                        int(max_predictions))
  text = text[:n]
  frags = _sample_fragments(n, rng, rate, min_len, max_len)

  # Text token i sits at position i + 1 ([CLS] at 0, [SEP] at n + 1) in source and target alike.
  # The layout is written by index, a fixed number of numpy calls whatever the fragment count:
  # source slots 0..ns-1, then the target's [CLS] at ns, fragment j's tokens after it (each
  # fragment followed by its eos, so token k of the target, of fragment j, sits at ns+1+k+j).
  keep = np.ones(n, dtype=bool)
  for s, e in frags:
    keep[s:e] = False
  kept = np.flatnonzero(keep)
  moved = np.flatnonzero(~keep)  # fragment tokens in text order = fragment order
  lens = np.asarray([e - s for s, e in frags], np.int64)
  nf, ns = len(frags), len(kept) + 2
  seq_len = ns + 1 + len(moved) + nf
  assert seq_len <= max_length, (seq_len, max_length)
  input_ids = np.full(max_length, pad_id, np.int32)
  position_ids = np.zeros(max_length, np.int32)
  input_ids[0], input_ids[ns - 1], input_ids[ns] = bos_id, sep_id, bos_id
  input_ids[1:ns - 1] = text[kept]
  position_ids[1:ns - 1] = kept + 1
  position_ids[ns - 1] = n + 1
  # The target's [CLS] and each eos stand just before the fragment they start, as UNIMO-2's
  # per-fragment [CLS]; the final eos stands just after the last fragment.
  position_ids[ns] = frags[0][0] if frags else 0
  if nf:
    slots = ns + 1 + np.arange(len(moved)) + np.repeat(np.arange(nf), lens)
    input_ids[slots] = text[moved]
    position_ids[slots] = moved + 1
    eos = ns + 1 + np.cumsum(lens) + np.arange(nf)
    input_ids[eos] = eos_id
    position_ids[eos] = [s for s, _ in frags[1:]] + [frags[-1][1] + 1]
  segments = np.zeros(max_length, np.int32)
  segments[:ns] = 1
  segments[ns:seq_len] = 2
  positions = np.arange(ns, seq_len - 1)
  out = _predictions(positions, input_ids[positions + 1], max_predictions)
  out.update(input_ids=input_ids, segments=segments, position_ids=position_ids)
  if return_fragments:
    out["fragments"] = np.asarray(frags, dtype=np.int32).reshape(-1, 2)
  return out


def captioning_layout(ids, *, max_length: int, max_predictions: int, bos_id: int = 0,
                      eos_id: int = 2, pad_id: int = 1) -> dict[str, np.ndarray]:
  """Captioning: the whole text is the target, generated after the image (the source).

    input_ids    = [CLS] w1 .. wN [SEP]  PAD..   (eos = [SEP], as UNIMO's captioning decoder)
    segments     =   2   2  ..  2   2      0
    position_ids =   0   1  ..  N  N+1     0       (0-based, as `infilling`'s)

  The image is not in this sequence: the model puts it in front and builds the captioning mask
  from (num_visual, text_valid). Position t predicts token t+1: positions 0..N, targets
  w1..wN [SEP]. The text (PAD, a leading [CLS] and a trailing [SEP] ignored) is cut at the end
  to N = min(len, max_length - 2, max_predictions - 1) so that the closing eos is always kept.

  Returns dict(input_ids [max_length], segments [max_length], position_ids [max_length],
  positions [P], targets [P], weights [P]).
  """
  text = _strip_text(ids, bos_id, eos_id, pad_id)
  n = max(0, min(len(text), max_length - 2, max_predictions - 1))
  seq = np.concatenate([[bos_id], text[:n], [eos_id]]).astype(np.int32)
  input_ids = np.full(max_length, pad_id, np.int32)
  input_ids[:len(seq)] = seq
  position_ids = np.zeros(max_length, np.int32)
  position_ids[:len(seq)] = np.arange(len(seq))
  segments = np.zeros(max_length, np.int32)
  segments[:len(seq)] = 2
  positions = np.arange(len(seq) - 1)
  out = _predictions(positions, seq[1:], max_predictions)
  out.update(input_ids=input_ids, segments=segments, position_ids=position_ids)
  return out


# ---------------------------------------------------------------------------------------------
# Visual masking
# ---------------------------------------------------------------------------------------------


def iou(boxes_a, boxes_b) -> np.ndarray:
  """Intersection over union of boxes (x1, y1, x2, y2, ...): [N, >=4], [M, >=4] -> [N, M].

  Extra columns (the area of UNIMO's 5-d boxes) are ignored. Degenerate boxes have IoU 0.
  """
  a = np.asarray(boxes_a, np.float64)[:, :4]
  b = np.asarray(boxes_b, np.float64)[:, :4]
  area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
  area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
  inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def region_mask(boxes, valid, rng: np.random.Generator, *, rate: float = 0.15,
                overlap_threshold: float = 0.3) -> np.ndarray:
  """Regions to zero for masked region prediction. boxes [R, >=4] (x1, y1, x2, y2), valid [R].

  Exactly k = max(1, round(rate * n_valid)) valid regions are drawn uniformly without
  replacement (an exact count, not a Bernoulli per region, so every image with a valid region
  trains MRP and the share does not fluctuate); then every valid region whose IoU with a drawn
  region exceeds `overlap_threshold` is masked too, so the model cannot copy a masked region from
  a near duplicate (UNIMO: 0.3). The overlap rule is applied once, to the drawn regions, not
  transitively. Returns mask [R] bool; invalid regions are never masked.
  """
  valid = np.asarray(valid, dtype=bool)
  idx = np.flatnonzero(valid)
  mask = np.zeros(valid.shape, dtype=bool)
  if len(idx) == 0:
    return mask
  k = min(len(idx), max(1, _round_half_up(rate * len(idx))))
  drawn = rng.choice(idx, size=k, replace=False)
  mask[drawn] = True
  overlap = iou(np.asarray(boxes)[drawn], np.asarray(boxes)).max(axis=0) > overlap_threshold
  return mask | (overlap & valid)


def patch_mask(num_patches: int, rng: np.random.Generator, *, rate: float = 0.15) -> np.ndarray:
  """Patches to zero for patch inputs: exactly max(1, round(rate * N)) of N, uniformly.

  Returns mask [N] bool in the model's patch order (row-major over the patch grid).
  """
  mask = np.zeros(num_patches, dtype=bool)
  if num_patches == 0:
    return mask
  k = min(num_patches, max(1, _round_half_up(rate * num_patches)))
  mask[rng.choice(num_patches, size=k, replace=False)] = True
  return mask
