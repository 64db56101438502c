"""Span MLM of one text or a batch of texts (pure numpy); infilling is in `unimo_jax.infilling`.

`span_mlm_batch` masks B texts, each with its own generator, and gives row by row exactly what
`span_mlm` gives for that text alone (`span_mlm` is the batch of one). A row's random draws are
made in the same order as a plain loop over numpy arrays (tests/masking_reference.py), one
Python loop iteration per span; everything else (finding the words, writing the masked ids, the
prediction arrays) is a fixed number of numpy calls per BATCH, not per row: at 512 tokens a
numpy call costs about as much as a span's draws, so per-row array work was most of a row's
masking time. `unimo_jax.masking` re-exports both (facts and decisions in their docstrings).
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


def _choose_spans(rng, length, breaks, masked, lo: int, hi: int, w_len, budget: int,
                  longest: int, max_predictions: int, lengths: list, cdf: list) -> list:
  """One text's spans: [(first word, tokens, words, drawn length)], drawn as the reference loop.

  The text's words are lo..hi-1 of the batch's: length (list), breaks (the words that are not
  contiguous with the previous one: a special token lies between), masked (list, all False
  there; set for the masked words); w_len: their lengths [hi - lo]."""
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
        if n_w > 0 and w in breaks:
          break  # a special token lies between the words: spans do not cross it
        masked[w] = True
        n_tok += length[w]
        n_w += 1
        w += 1
      pending.append((anchor, w))
      del unmasked[j:j + n_w]  # anchor..w-1 sit together in `unmasked` from anchor's place
      count += n_tok
      spans.append((anchor, n_tok, n_w, drawn))
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
      if n_w > 0 and w in breaks:
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
    spans.append((anchor, n_tok, n_w, drawn))
  return spans


def span_mlm_batch(ids, word_starts, rngs: Sequence[np.random.Generator], *, vocab_size: int,
                   mask_id: int, special_ids: Iterable[int], max_predictions: int,
                   mask_rate: float = 0.15, geo_p: float = 0.2, max_span_words: int = 10,
                   min_span_words: int = 0, mask_prob: float = 0.8, random_prob: float = 0.1,
                   return_spans: bool = False, single: bool = False) -> dict:
  """`span_mlm` of each row of ids [B, L] / word_starts [B, L] with rngs[b]: the same arrays
  with a leading B (``spans``: a list of B arrays), and each generator left as `span_mlm`
  leaves it. (single: B = 1 and the arrays without the leading axis, for `span_mlm`.)"""
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
    first = [0, len(w_start)]
    longest = [int(w_len.max()) if len(w_len) else 0]
  else:
    counts = np.bincount(w_start // max(L, 1), minlength=B)
    first = np.zeros(B + 1, np.intp)
    np.cumsum(counts, out=first[1:])
    nonempty = np.flatnonzero(counts)
    longest = np.zeros(B, np.intp)
    if len(nonempty):
      longest[nonempty] = np.maximum.reduceat(w_len, first[nonempty])
    first, longest = first.tolist(), longest.tolist()
  len_l, n_maskable = w_len.tolist(), n_maskable.tolist()
  breaks = set(np.flatnonzero(~w_contig).tolist())  # a few per row: a set beats a list here
  masked = [False] * len(len_l)
  span_word, span_tokens, draws_u, draws_v, all_spans = [], [], [], [], []
  for b, rng in enumerate(rngs):
    lo, hi = first[b], first[b + 1]
    budget = 0
    if n_maskable[b]:
      budget = min(max_predictions, max(1, _round_half_up(mask_rate * n_maskable[b])))
    spans = _choose_spans(rng, len_l, breaks, masked, lo, hi, w_len[lo:hi], budget,
                          longest[b], max_predictions, lengths, cdf)
    n_pred = 0
    for s in spans:
      if s[1]:
        span_word.append(s[0])
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
    runs = sorted(zip(w_start[span_word].tolist(), span_tokens))
    positions = np.asarray([t for a, n in runs for t in range(a, a + n)], np.intp)
    u, v = draws_u[0], draws_v[0]
  else:
    tokens = np.asarray(span_tokens, np.intp)
    run_start = w_start[span_word] - (np.cumsum(tokens) - tokens)
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
    if single:  # `span_mlm`: the arrays of the one text, without the leading axis
      out = {k: a[0] for k, a in out.items()}
      input_ids = flat
  else:
    row = positions // max(L, 1)
    n_row = np.bincount(row, minlength=B)
    within = np.arange(len(positions)) - np.repeat(np.cumsum(n_row) - n_row, n_row)
    out = _scatter_predictions(row, within, positions - row * L, targets, B, max_predictions)
  out["input_ids"] = input_ids
  if return_spans:
    out["spans"] = []
    for b, spans in enumerate(all_spans):  # first word -> its first token in the text
      a = np.asarray(spans, dtype=np.int64).reshape(-1, 4)
      a[:, 0] = w_start[a[:, 0]] - b * L
      out["spans"].append(a.astype(np.int32))
    if single:
      out["spans"] = out["spans"][0]
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
                       mask_prob=mask_prob, random_prob=random_prob, return_spans=return_spans,
                       single=True)
  return out
