"""Span MLM and infilling of texts, for one text or a batch of texts (pure numpy).

`span_mlm` / `infilling` mask one text; `span_mlm_batch` / `infilling_batch` mask B texts, each
with its own generator, and give exactly the rows that the one-text functions give for each
(seed, text), row by row (they ARE the one-text functions: those call them with B = 1). A row's
random draws are made in the same order as a plain loop over numpy arrays
(tests/masking_reference.py), one Python loop iteration per span or fragment; everything else
(finding the words, writing the masked ids, the seq2seq layout, the prediction arrays) is a fixed
number of numpy calls per BATCH, not per row: at 512 tokens a numpy call costs about as much as a
span's draws, so per-row array work was most of a row's masking time.

`unimo_jax.masking` re-exports the one-text functions (facts and decisions are in their
docstrings).
"""
from __future__ import annotations

import bisect
import functools
import math
from typing import Iterable, Sequence

import numpy as np

# Ids below this are the special tokens of the UNIMO/RoBERTa layout (CLS, PAD, SEP, UNK).
FIRST_ORDINARY_ID = 4
_INTP_MAX = int(np.iinfo(np.intp).max)  # np.iinfo() per call costs microseconds


def _round_half_up(x: float) -> int:
  # Python's round() rounds half to even; budgets should not depend on parity. math.floor is
  # np.floor on one float without the numpy scalar (infilling's truncation calls this ~20 times).
  return math.floor(x + 0.5)


def _predictions(positions, targets, max_predictions: int) -> dict[str, np.ndarray]:
  n = len(positions)
  pos = np.zeros(max_predictions, np.int32)
  tgt = np.zeros(max_predictions, np.int32)
  wts = np.zeros(max_predictions, np.float32)
  pos[:n] = positions
  tgt[:n] = targets
  wts[:n] = 1.0
  return dict(positions=pos, targets=tgt, weights=wts)


def _scatter_predictions(row, within, positions, targets, batch: int, max_predictions: int):
  """[B, P] positions / targets (int32) and weights (float32) from flat lists of predictions:
  prediction k of the batch is number `within[k]` of row `row[k]`."""
  flat = row * max_predictions + within
  pos = np.zeros(batch * max_predictions, np.int32)
  tgt = np.zeros(batch * max_predictions, np.int32)
  wts = np.zeros(batch * max_predictions, np.float32)
  pos[flat] = positions
  tgt[flat] = targets
  wts[flat] = 1.0
  shape = (batch, max_predictions)
  return dict(positions=pos.reshape(shape), targets=tgt.reshape(shape),
              weights=wts.reshape(shape))


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


def _allowed(vocab_size: int, excluded) -> tuple[int, tuple]:
  excl = _excluded(excluded if isinstance(excluded, frozenset) else frozenset(
      int(e) for e in excluded), int(vocab_size))
  n_allowed = vocab_size - FIRST_ORDINARY_ID - len(excl)
  if n_allowed <= 0:
    raise ValueError(f"no ordinary ids in a vocabulary of {vocab_size}")
  return n_allowed, excl


def _shift_past(v: np.ndarray, excl: tuple) -> np.ndarray:
  """Draws from [0, n_allowed) -> the allowed ids, int32. Shifting past each excluded id in
  increasing order maps [0, n_allowed) onto the allowed ids one-to-one (uniform stays uniform)."""
  v = v + FIRST_ORDINARY_ID
  for e in excl:
    v = v + (v >= e)
  return v.astype(np.int32)


def random_ordinary_ids(rng: np.random.Generator, size: int, *, vocab_size: int,
                        excluded: Iterable[int]) -> np.ndarray:
  """Ids drawn uniformly from `[4, vocab_size)` minus `excluded` (e.g. MASK). [size] int32."""
  n_allowed, excl = _allowed(vocab_size, excluded)
  return _shift_past(rng.integers(0, n_allowed, size=size), excl)


@functools.lru_cache(maxsize=16)
def _maskable_table(special_ids: frozenset) -> np.ndarray:
  """bool [max id + 2]: False at the special ids (non-negative), True elsewhere; the last entry
  stands for every larger id."""
  table = np.ones(max(special_ids) + 2, bool)
  table[sorted(special_ids)] = False
  return table


def _words(ids: np.ndarray, word_starts: np.ndarray, special_ids: frozenset):
  """Maskable words of B texts [B, L]: flat token index of each word's start [W] (row-major, so
  ascending by row, then position), its length [W], contiguous_with_previous [W] bool (that of
  a row's first word is meaningless: spans never reach back), maskable tokens per row [B]."""
  B, L = ids.shape
  if min(special_ids) >= 0 and ids.dtype.kind in "iu":
    # A table lookup: one pass whatever the number of special ids (np.isin sorts). Seen as
    # unsigned, a negative id is larger than any special id, as it is no special id.
    table = _maskable_table(special_ids)
    unsigned = ids.view(ids.dtype.str.replace("i", "u")) if ids.dtype.kind == "i" else ids
    maskable = table[np.minimum(unsigned, len(table) - 1)]
  else:
    maskable = np.ones(ids.shape, bool)
    for s in special_ids:
      maskable &= ids != s
  # A special token always ends a word, even if the tokenizer did not flag the next token.
  starts = maskable & word_starts
  starts[:, 0] = maskable[:, 0]
  starts[:, 1:] |= np.greater(maskable[:, 1:], maskable[:, :-1])  # maskable after a special
  start = np.flatnonzero(starts)
  # before[t]: maskable tokens ahead of flat position t. A word's tokens are the maskable ones
  # from its start to the next start: a maskable token after a special one, or at a row's
  # first position, starts a word, so what lies between a row's last word and the next row's
  # first start is special and does not count.
  before = np.zeros(B * L + 1, np.intp)
  np.cumsum(maskable.reshape(-1), out=before[1:])
  end = np.empty_like(start)
  end[:-1] = start[1:]
  end[-1:] = B * L
  length = before[end] - before[start]
  contiguous = np.zeros(len(start), bool)
  contiguous[1:] = start[1:] == start[:-1] + length[:-1]
  return start, length, contiguous, (before[-1:] if B == 1 else np.diff(before[::L]))


def _choose_spans(rng, start, length, contig, masked, lo: int, hi: int, w_len, budget: int,
                  longest: int, max_predictions: int, lengths: list, cdf: list) -> list:
  """One text's spans: [(first token, tokens, words, drawn length)], drawn as the reference loop.

  The text's words are lo..hi-1 of the batch's lists: start (token within the text), length,
  contig, masked (all False there; set for the masked words); w_len: their lengths [hi - lo]."""
  # The loop runs once per span (~20 times at 512 tokens) and costs what its calls cost, so it
  # works on Python lists: `unmasked` (ascending word indices) IS the candidate list while the
  # remaining budget fits the longest word, and one numpy pass finds the candidates only near
  # the end of the budget (on lengths where masked words are set past any budget, updated then).
  unmasked = list(range(lo, hi))
  avail_len, pending = None, []
  count = 0
  spans = []
  # Bound once: the loop body is a few microseconds, attribute lookups are a share of it.
  rand, integers, bisect_right, last = rng.random, rng.integers, bisect.bisect_right, len(cdf) - 1
  # Each iteration masks at least one word or stops, so hi - lo + 1 iterations always suffice.
  for _ in range(hi - lo + 1):
    if count >= budget:
      break
    remaining = budget - count
    if remaining >= longest and unmasked:
      # Every unmasked word fits (the common case): the same steps as below, fewer of them.
      drawn = lengths[min(bisect_right(cdf, rand()), last)]
      k = drawn if drawn > 1 else 1
      j = int(integers(len(unmasked)))
      w = anchor = unmasked[j]
      n_tok = n_w = 0
      while n_w < k and w < hi and not masked[w] and n_tok + length[w] <= remaining:
        if n_w > 0 and not contig[w]:
          break  # a special token lies between the words: spans do not cross it
        masked[w] = True
        n_tok += length[w]
        n_w += 1
        w += 1
      pending.append((anchor, w))
      del unmasked[j:j + n_w]  # anchor..w-1 sit together in `unmasked` from anchor's place
      count += n_tok
      spans.append((start[anchor], n_tok, n_w, drawn))
      continue
    every = remaining >= longest
    if every:
      candidates = unmasked
    else:
      if avail_len is None:
        avail_len = w_len.copy()
      for a, b in pending:
        avail_len[a - lo:b - lo] = _INTP_MAX
      pending = []
      candidates = np.flatnonzero(avail_len <= remaining) + lo
    fallback = len(candidates) == 0
    if fallback:
      # No whole word fits the budget: mask one word anyway, if it fits the P slots.
      if count > 0:
        break
      candidates = np.flatnonzero(w_len <= max_predictions) + lo
      every = False
      if len(candidates) == 0:
        break
      remaining = max_predictions
    drawn = lengths[min(bisect_right(cdf, rand()), last)]
    k = 1 if fallback else max(1, drawn)
    j = int(integers(len(candidates)))
    anchor = int(candidates[j])
    w, n_tok, n_w = anchor, 0, 0
    while n_w < k and w < hi and not masked[w] and n_tok + length[w] <= remaining:
      if n_w > 0 and not contig[w]:
        break
      masked[w] = True
      n_tok += length[w]
      n_w += 1
      w += 1
    if n_w:
      pending.append((anchor, w))
      pos = j if every else bisect.bisect_left(unmasked, anchor)
      del unmasked[pos:pos + n_w]
    count += n_tok
    spans.append((start[anchor], n_tok, n_w, drawn))
  return spans


def span_mlm_batch(ids, word_starts, rngs: Sequence[np.random.Generator], *, vocab_size: int,
                   mask_id: int, special_ids: Iterable[int], max_predictions: int,
                   mask_rate: float = 0.15, geo_p: float = 0.2, max_span_words: int = 10,
                   min_span_words: int = 0, mask_prob: float = 0.8, random_prob: float = 0.1,
                   return_spans: bool = False) -> dict:
  """`span_mlm` of each row of ids [B, L] / word_starts [B, L] with rngs[b]: the same arrays
  with a leading B (``spans``: a list of B arrays), and each generator left as `span_mlm`
  leaves it."""
  ids = np.asarray(ids)
  word_starts = np.asarray(word_starts, dtype=bool)
  if ids.shape != word_starts.shape or ids.ndim != 2 or len(rngs) != len(ids):
    raise ValueError(f"ids {ids.shape} and word_starts {word_starts.shape} must be equal "
                     f"[B, L] with B = {len(rngs)} generators")
  B, L = ids.shape
  special_ids = _special_set(tuple(special_ids), int(mask_id))
  n_allowed, excl = _allowed(vocab_size, special_ids)
  lengths, cdf = _span_table(geo_p, max_span_words, min_span_words)
  if L:
    w_start, w_len, w_contig, n_maskable = _words(ids, word_starts, special_ids)
  else:
    w_start = w_len = np.zeros(0, np.intp)
    w_contig, n_maskable = np.zeros(0, bool), np.zeros(B, np.intp)
  if B == 1:  # one text (a caption of a pair row): no per-row bookkeeping
    first, start_l = [0, len(w_start)], w_start.tolist()
    longest = [int(w_len.max()) if len(w_len) else 0]
  else:
    row, col = np.divmod(w_start, max(L, 1))
    counts = np.bincount(row, minlength=B)
    first = np.zeros(B + 1, np.intp)
    np.cumsum(counts, out=first[1:])
    nonempty = np.flatnonzero(counts)
    longest = np.zeros(B, np.intp)
    if len(nonempty):
      longest[nonempty] = np.maximum.reduceat(w_len, first[nonempty])
    first, longest, start_l = first.tolist(), longest.tolist(), col.tolist()
  len_l, contig_l, n_maskable = w_len.tolist(), w_contig.tolist(), n_maskable.tolist()
  masked = [False] * len(len_l)
  span_first, span_tokens, draws_u, draws_v, all_spans = [], [], [], [], []
  for b, rng in enumerate(rngs):
    lo, hi = first[b], first[b + 1]
    budget = 0
    if n_maskable[b]:
      budget = min(max_predictions, max(1, _round_half_up(mask_rate * n_maskable[b])))
    spans = _choose_spans(rng, start_l, len_l, contig_l, masked, lo, hi, w_len[lo:hi], budget,
                          longest[b], max_predictions, lengths, cdf)
    n_pred, o = 0, b * L
    for s in spans:
      if s[1]:
        span_first.append(o + s[0])
        span_tokens.append(s[1])
        n_pred += s[1]
    assert n_pred <= max_predictions
    # Draw both arrays whole so the generator advances the same way whatever the outcome.
    draws_u.append(rng.random(n_pred))
    draws_v.append(rng.integers(0, n_allowed, size=n_pred))
    all_spans.append(spans)

  # The masked tokens: each span is a run of tokens (its words are contiguous), in flat
  # coordinates; sorted, they are each row's positions in ascending order, as the draws are.
  if B == 1:
    runs = sorted(zip(span_first, span_tokens))
    positions = np.asarray([t for a, n in runs for t in range(a, a + n)], np.intp)
    u, v = draws_u[0], draws_v[0]
  else:
    tokens = np.asarray(span_tokens, np.intp)
    run_start = np.asarray(span_first, np.intp) - (np.cumsum(tokens) - tokens)
    positions = np.sort(np.repeat(run_start, tokens) + np.arange(int(tokens.sum())))
    u, v = (np.concatenate(draws_u), np.concatenate(draws_v)) if B else (np.zeros(0),) * 2
  replacement = _shift_past(v, excl)
  input_ids = ids.astype(np.int32)  # a copy
  flat = input_ids.reshape(-1)
  targets = flat[positions]
  to_mask = u < mask_prob
  to_random = (u >= mask_prob) & (u < mask_prob + random_prob)
  flat[positions[to_mask]] = mask_id
  flat[positions[to_random]] = replacement[to_random]
  if B == 1:
    out = {k: a[None] for k, a in _predictions(positions, targets, max_predictions).items()}
  else:
    row = positions // max(L, 1)
    n_row = np.bincount(row, minlength=B)
    within = np.arange(len(positions)) - np.repeat(np.cumsum(n_row) - n_row, n_row)
    out = _scatter_predictions(row, within, positions - row * L, targets, B, max_predictions)
  out["input_ids"] = input_ids
  if return_spans:
    out["spans"] = [np.asarray(s, dtype=np.int32).reshape(-1, 4) for s in all_spans]
  return out


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
  out = span_mlm_batch(ids[None], word_starts[None], [rng], vocab_size=vocab_size,
                       mask_id=mask_id, special_ids=special_ids,
                       max_predictions=max_predictions, mask_rate=mask_rate, geo_p=geo_p,
                       max_span_words=max_span_words, min_span_words=min_span_words,
                       mask_prob=mask_prob, random_prob=random_prob, return_spans=return_spans)
  return {k: v[0] for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Infilling
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
  lens, frag_starts, frag_ends, specials, special_pos, ns_l, seq_l, all_frags = (
      [], [], [], [], [], [], [], [])
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
