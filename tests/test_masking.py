"""Specification tests of unimo_jax.masking: statistics over many seeds and hand-built cases."""
import numpy as np
import pytest

from unimo_jax import masking

CLS, PAD, SEP, UNK = 0, 1, 2, 3
VOCAB = 1000
MASK = VOCAB - 1
SPECIALS = (CLS, PAD, SEP, UNK)


def _text(rng, n_tokens, pad=0, piece_probs=(0.6, 0.3, 0.1)):
  """[CLS] words [SEP] PAD..: words of 1-3 pieces, ordinary ids in [4, MASK)."""
  ids = rng.integers(4, MASK, size=n_tokens)
  starts = []
  while len(starts) < n_tokens:
    n = rng.choice([1, 2, 3], p=piece_probs)
    starts += [True] + [False] * (n - 1)
  starts = np.asarray(starts[:n_tokens])
  ids = np.concatenate([[CLS], ids, [SEP], [PAD] * pad]).astype(np.int32)
  # Tokenizers flag specials as word starts; padding too.
  starts = np.concatenate([[True], starts, [True], [True] * pad])
  return ids, starts


def _mlm(ids, starts, seed, **kw):
  kw.setdefault("max_predictions", 80)
  return masking.span_mlm(ids, starts, np.random.default_rng(seed), vocab_size=VOCAB,
                          mask_id=MASK, special_ids=SPECIALS, **kw)


def _reference_words(ids, starts):
  """Word index per token (-1 for specials), written independently of the implementation."""
  word = -np.ones(len(ids), int)
  w = -1
  prev_special = True
  for t, (i, s) in enumerate(zip(ids, starts)):
    if i in SPECIALS:
      prev_special = True
      continue
    if s or prev_special:
      w += 1
    word[t] = w
    prev_special = False
  return word


def test_span_mlm_rate_whole_words_and_specials():
  rng = np.random.default_rng(0)
  fractions = []
  for seed in range(150):
    ids, starts = _text(rng, 300, pad=20)
    out = _mlm(ids, starts, seed)
    n = int(out["weights"].sum())
    pos = out["positions"][:n]
    assert np.all(out["weights"][n:] == 0) and np.all(out["positions"][n:] == 0)
    assert np.all(np.diff(pos) > 0)
    np.testing.assert_array_equal(out["targets"][:n], ids[pos])
    # Specials and padding: never predicted, never changed.
    assert not np.isin(ids[pos], SPECIALS).any()
    special = np.isin(ids, SPECIALS)
    np.testing.assert_array_equal(out["input_ids"][special], ids[special])
    # Only predicted positions change.
    unmasked = np.ones(len(ids), bool)
    unmasked[pos] = False
    np.testing.assert_array_equal(out["input_ids"][unmasked], ids[unmasked])
    # Whole words: a word is either entirely predicted or not at all.
    word = _reference_words(ids, starts)
    chosen = np.zeros(len(ids), bool)
    chosen[pos] = True
    for w in range(word.max() + 1):
      assert len(set(chosen[word == w])) == 1
    # Budget: round(15% of 300) = 45, never exceeded (whole words can leave it a bit short).
    assert 1 <= n <= 45
    fractions.append(n / 300)
  assert 0.14 <= np.mean(fractions) <= 0.15, np.mean(fractions)


def test_span_mlm_80_10_10_and_random_ids():
  rng = np.random.default_rng(1)
  kinds = np.zeros(3)
  random_ids = []
  for seed in range(120):
    ids, starts = _text(rng, 400)
    out = _mlm(ids, starts, seed)
    n = int(out["weights"].sum())
    new = out["input_ids"][out["positions"][:n]]
    old = out["targets"][:n]
    is_mask = new == MASK
    same = new == old
    kinds += [is_mask.sum(), (~is_mask & ~same).sum(), same.sum()]
    random_ids += list(new[~is_mask & ~same])
  share = kinds / kinds.sum()
  # About 7,000 predictions: a 0.1 share has a standard deviation of 0.0036.
  np.testing.assert_allclose(share, [0.8, 0.1, 0.1], atol=0.015)
  random_ids = np.asarray(random_ids)
  assert random_ids.min() >= 4 and MASK not in random_ids


def test_random_ids_uniform_over_ordinary_vocabulary():
  # vocab 20, MASK 19 and an extra special 7 excluded: 14 allowed ids.
  rng = np.random.default_rng(2)
  v = masking.random_ordinary_ids(rng, 28000, vocab_size=20, excluded=[0, 1, 2, 3, 7, 19])
  allowed = [i for i in range(4, 19) if i != 7]
  counts = np.array([(v == i).sum() for i in allowed])
  assert counts.sum() == len(v)
  expected = len(v) / len(allowed)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 36.1  # 99.9% quantile of chi-square with 13 degrees of freedom


def _analytic_pmf(p, lo, hi):
  k = np.arange(lo, hi + 1)
  w = p * (1 - p) ** (k - lo)
  return k, w / w.sum()


@pytest.mark.parametrize("min_span_words", [0, 1])
def test_span_lengths_follow_truncated_geometric(min_span_words):
  # A long text of one-piece words and a low rate: spans rarely collide, so the number of words
  # each span masks is max(1, drawn length), and the drawn lengths follow the pmf.
  ids = np.concatenate([[CLS], np.arange(4, 4 + 3000) % (MASK - 4) + 4, [SEP]])
  starts = np.ones(len(ids), bool)
  drawn, used = [], []
  for seed in range(40):
    out = _mlm(ids, starts, seed, mask_rate=0.05, max_predictions=200,
               min_span_words=min_span_words, return_spans=True)
    spans = out["spans"]
    drawn += list(spans[:, 3])
    used += list(spans[:, 2])
    # A span masks whole words only: tokens == words here.
    np.testing.assert_array_equal(spans[:, 1], spans[:, 2])
  drawn, used = np.asarray(drawn), np.asarray(used)
  k, pmf = _analytic_pmf(0.2, min_span_words, 10)
  counts = np.array([(drawn == i).sum() for i in k])
  assert counts.sum() == len(drawn) > 1500
  expected = pmf * len(drawn)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 29.6  # 99.9% quantile, 10 (or 9) degrees of freedom
  assert np.all(used <= np.maximum(drawn, 1))
  assert np.mean(used == np.maximum(drawn, 1)) > 0.85


def test_span_mlm_deterministic_per_seed():
  ids, starts = _text(np.random.default_rng(3), 200)
  a = _mlm(ids, starts, [7, 0, 5])
  b = _mlm(ids, starts, [7, 0, 5])
  c = _mlm(ids, starts, [7, 0, 6])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["positions"], c["positions"])


def test_span_mlm_caps_and_edge_cases():
  ids, starts = _text(np.random.default_rng(4), 300)
  out = _mlm(ids, starts, 0, max_predictions=10)
  assert out["positions"].shape == (10,) and 1 <= out["weights"].sum() <= 10
  # Nothing maskable: no predictions, ids untouched.
  only_specials = np.array([CLS, SEP, PAD, PAD], np.int32)
  out = _mlm(only_specials, np.ones(4, bool), 0)
  assert out["weights"].sum() == 0
  np.testing.assert_array_equal(out["input_ids"], only_specials)
  # One word of 5 pieces, budget round(0.15 * 5) = 1: the whole word is still masked.
  ids = np.array([CLS, 10, 11, 12, 13, 14, SEP], np.int32)
  starts = np.array([1, 1, 0, 0, 0, 0, 1], bool)
  out = _mlm(ids, starts, 0)
  np.testing.assert_array_equal(out["positions"][:5], [1, 2, 3, 4, 5])
  assert out["weights"].sum() == 5


# ----------------------------------------------------------------------------------------------
# Infilling
# ----------------------------------------------------------------------------------------------

EOS = MASK


def _infill(text, seed, **kw):
  kw.setdefault("max_length", 256)
  kw.setdefault("max_predictions", 96)
  return masking.infilling(text, np.random.default_rng(seed), bos_id=CLS, eos_id=EOS,
                           pad_id=PAD, sep_id=SEP, return_fragments=True, **kw)


def _reconstruct(out):
  """Original text from source + target + fragment starts (independent of the sampler)."""
  seq, seg = out["input_ids"], out["segments"]
  source = list(seq[seg == 1][1:-1])  # drop [CLS] ... [SEP]
  target = list(seq[seg == 2])
  assert target[0] == CLS and (len(target) == 1 or target[-1] == EOS)
  pieces, cur = [], []
  for t in target[1:]:
    if t == EOS:
      pieces.append(cur)
      cur = []
    else:
      cur.append(t)
  frags = out["fragments"]
  assert len(pieces) == len(frags)
  text, s, f = [], 0, 0
  n = len(source) + sum(len(p) for p in pieces)
  while len(text) < n:
    if f < len(frags) and frags[f, 0] == len(text):
      assert len(pieces[f]) == frags[f, 1] - frags[f, 0]
      text += pieces[f]
      f += 1
    else:
      text.append(source[s])
      s += 1
  return np.asarray(text)


def _check_position_ids(out, text):
  """Text tokens keep their original positions (1..n); structural tokens as documented."""
  seq, seg, pos = out["input_ids"], out["segments"], out["position_ids"]
  n, frags = len(text), out["fragments"]
  src, src_pos = seq[seg == 1], pos[seg == 1]
  tgt, tgt_pos = seq[seg == 2], pos[seg == 2]
  assert src_pos[0] == 0 and src_pos[-1] == n + 1
  words = np.concatenate([src[1:-1], tgt[1:][tgt[1:] != EOS]])
  word_pos = np.concatenate([src_pos[1:-1], tgt_pos[1:][tgt[1:] != EOS]])
  order = np.argsort(word_pos)
  np.testing.assert_array_equal(word_pos[order], np.arange(1, n + 1))
  np.testing.assert_array_equal(words[order], text)
  # [CLS] and eos slots: just before the next fragment, or just after the last one.
  structural = tgt_pos[np.concatenate([[True], tgt[1:] == EOS])]
  np.testing.assert_array_equal(structural, list(frags[:, 0]) + [frags[-1, 1] + 1])
  assert np.all(pos[seg == 0] == 0)


def test_infilling_fragments_rate_and_reconstruction():
  rng = np.random.default_rng(5)
  shares, lengths = [], []
  for seed in range(200):
    n = int(rng.integers(40, 200))
    text = rng.integers(4, MASK, size=n).astype(np.int32)
    # Given in the [CLS] .. [SEP] PAD layout; the function strips it.
    out = _infill(np.concatenate([[CLS], text, [SEP], [PAD] * 5]), seed)
    frags = out["fragments"]
    ln = frags[:, 1] - frags[:, 0]
    assert np.all((ln >= 4) & (ln <= 32))
    assert np.all(frags[1:, 0] > frags[:-1, 1])  # sorted, disjoint and never touching
    lengths += list(ln)
    shares.append(ln.sum() / n)
    np.testing.assert_array_equal(_reconstruct(out), text)
    _check_position_ids(out, text)
    # Teacher forcing: each slot predicts the next token of the target segment.
    k = int(out["weights"].sum())
    pos = out["positions"][:k]
    assert np.all(out["segments"][pos] == 2)
    np.testing.assert_array_equal(out["targets"][:k], out["input_ids"][pos + 1])
    assert k == (out["segments"] == 2).sum() - 1
    assert np.all(out["input_ids"][out["segments"] == 0] == PAD)
  assert 0.25 <= np.mean(shares) <= 0.28, np.mean(shares)
  # Uniform U(4, 32) fragment lengths, except the last one cut to the budget.
  assert set(lengths) >= set(range(4, 33))


def test_infilling_truncation_short_texts_and_determinism():
  text = np.arange(4, 304, dtype=np.int32)
  out = _infill(text, 0, max_length=64, max_predictions=24)
  rebuilt = _reconstruct(out)
  assert len(rebuilt) <= 61
  np.testing.assert_array_equal(rebuilt, text[:len(rebuilt)])
  assert out["weights"].sum() <= 24
  # Shorter than min_len: the whole text is the target, the source is empty.
  out = _infill(np.array([10, 11, 12], np.int32), 0)
  np.testing.assert_array_equal(out["input_ids"][:9], [CLS, SEP, CLS, 10, 11, 12, EOS, PAD, PAD])
  np.testing.assert_array_equal(out["segments"][:8], [1, 1, 2, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(out["positions"][:4], [2, 3, 4, 5])
  np.testing.assert_array_equal(out["targets"][:5], [10, 11, 12, EOS, 0])
  np.testing.assert_array_equal(out["position_ids"][:8], [0, 4, 0, 1, 2, 3, 4, 0])
  # Same seed, same layout; another seed, another one.
  text = np.arange(4, 104, dtype=np.int32)
  a, b, c = _infill(text, [1, 2]), _infill(text, [1, 2]), _infill(text, [1, 3])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_captioning_layout():
  out = masking.captioning_layout(np.array([CLS, 5, 6, 7, SEP, PAD]), max_length=8,
                                  max_predictions=6, bos_id=CLS, eos_id=SEP, pad_id=PAD)
  np.testing.assert_array_equal(out["input_ids"], [CLS, 5, 6, 7, SEP, PAD, PAD, PAD])
  np.testing.assert_array_equal(out["segments"], [2, 2, 2, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(out["positions"], [0, 1, 2, 3, 0, 0])
  np.testing.assert_array_equal(out["targets"], [5, 6, 7, SEP, 0, 0])
  np.testing.assert_array_equal(out["weights"], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["position_ids"], [0, 1, 2, 3, 4, 0, 0, 0])
  # Truncated to keep the eos: max_length 5 leaves 3 words.
  out = masking.captioning_layout(np.arange(10, 20), max_length=5, max_predictions=8)
  np.testing.assert_array_equal(out["input_ids"], [CLS, 10, 11, 12, SEP])
  np.testing.assert_array_equal(out["targets"][:4], [10, 11, 12, SEP])


# ----------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------

# Hand-computed IoUs: 0-1 81/119, 0-2 100/200, 0-3 50/150, 0-4 40/160, 1-2 90/210, 1-3 54/146,
# 1-4 45/155, 2-3 50/250, 2-4 40/260, 3-4 90/110; box 5 is far away; box 6 (= box 0) is invalid.
BOXES = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 20], [5, 0, 15, 10],
                  [6, 0, 16, 10], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
VALID = np.array([1, 1, 1, 1, 1, 1, 0], bool)
# Regions masked with each drawn one at threshold 0.3 (IoU > 0.3).
EXPECTED = {0: {0, 1, 2, 3}, 1: {0, 1, 2, 3}, 2: {0, 1, 2}, 3: {0, 1, 3, 4}, 4: {3, 4}, 5: {5}}


def test_iou_hand_values():
  got = masking.iou(BOXES[:5], BOXES[:5])
  pairs = {(0, 1): 81 / 119, (0, 2): 0.5, (0, 3): 50 / 150, (0, 4): 0.25, (1, 2): 90 / 210,
           (1, 3): 54 / 146, (1, 4): 45 / 155, (2, 3): 0.2, (2, 4): 40 / 260, (3, 4): 90 / 110}
  for (i, j), v in pairs.items():
    assert got[i, j] == pytest.approx(v) and got[j, i] == pytest.approx(v)
  np.testing.assert_allclose(np.diag(got), 1.0)
  assert masking.iou(BOXES[:1], np.array([[3, 3, 3, 8]]))[0, 0] == 0.0  # degenerate box


def test_region_mask_overlap_rule():
  seen = set()
  for seed in range(60):
    m = masking.region_mask(BOXES, VALID, np.random.default_rng(seed), overlap_threshold=0.3)
    got = set(np.flatnonzero(m))
    # round(0.15 * 6 valid) = 1 region drawn; the rest are its overlaps.
    drawn = [d for d, exp in EXPECTED.items() if exp == got]
    assert drawn, got
    assert not m[6]
    seen |= {tuple(sorted(got))}
  assert len(seen) == 5  # regions 0 and 1 give the same set
  # No valid region: nothing masked.
  assert not masking.region_mask(BOXES, np.zeros(7, bool), np.random.default_rng(0)).any()


def test_region_mask_rate_on_disjoint_boxes():
  grid = np.array([[x, y, x + 1, y + 1] for x in range(0, 20, 2) for y in range(0, 20, 2)])
  valid = np.arange(100) < 80
  counts = []
  for seed in range(20):
    m = masking.region_mask(grid, valid, np.random.default_rng(seed))
    assert not m[80:].any()
    counts.append(m.sum())
  assert set(counts) == {12}  # round(0.15 * 80)
  m = masking.patch_mask(196, np.random.default_rng(0))
  assert m.shape == (196,) and m.sum() == 29


# ---------------------------------------------------------------------------------------------
# The fast implementations equal the plain loop ones (tests/masking_reference.py), bit for bit
# ---------------------------------------------------------------------------------------------


def _random_case(rng):
  L = int(rng.integers(1, 96))
  ids = rng.integers(0, 60, L).astype(np.int32)  # specials 0-3 anywhere, not only at the ends
  if rng.random() < 0.5:
    ids[int(rng.integers(L)):] = PAD
  starts = rng.random(L) < rng.random()
  return ids, starts


def _assert_same_outputs_and_generator(ref_fn, fn, seed, *args, **kw):
  r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
  a, b = ref_fn(*args, rng=r1, **kw), fn(*args, rng=r2, **kw)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (seed, k)
  # The row's later draws (region masks, ...) come from the same generator: same state after.
  assert r1.bit_generator.state == r2.bit_generator.state


def test_span_mlm_equals_the_reference_loop():
  import masking_reference as ref
  rng = np.random.default_rng(11)
  for seed in range(1500):
    ids, starts = _random_case(rng)
    kw = dict(vocab_size=60, mask_id=59, special_ids=(CLS, PAD, SEP),
              max_predictions=int(rng.integers(1, 24)),
              mask_rate=float(rng.choice([0.15, 0.5, 0.95])),
              max_span_words=int(rng.integers(1, 11)), min_span_words=int(rng.integers(0, 2)),
              return_spans=True)
    _assert_same_outputs_and_generator(
        lambda i, s, rng, **k: ref.span_mlm(i, s, rng, **k),
        lambda i, s, rng, **k: masking.span_mlm(i, s, rng, **k), seed, ids, starts, **kw)


def test_span_mlm_equals_the_reference_at_512_tokens():
  import masking_reference as ref
  rng = np.random.default_rng(12)
  for seed in range(40):
    ids, starts = _text(rng, 510)
    kw = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, max_predictions=80)
    _assert_same_outputs_and_generator(
        lambda i, s, rng, **k: ref.span_mlm(i, s, rng, **k),
        lambda i, s, rng, **k: masking.span_mlm(i, s, rng, **k), seed, ids, starts, **kw)


def test_infilling_equals_the_reference_loop():
  import masking_reference as ref
  rng = np.random.default_rng(13)
  for seed in range(1500):
    ids, _ = _random_case(rng)
    if seed % 10 == 0:
      ids, _ = _text(rng, 510)
    kw = dict(max_length=int(rng.integers(3, 600 if len(ids) > 100 else 100)),
              max_predictions=int(rng.integers(0, 200 if len(ids) > 100 else 40)),
              bos_id=CLS, eos_id=59, pad_id=PAD, sep_id=SEP,
              rate=float(rng.choice([0.1, 0.25, 0.6])), return_fragments=True)
    _assert_same_outputs_and_generator(
        lambda i, rng, **k: ref.infilling(i, rng, **k),
        lambda i, rng, **k: masking.infilling(i, rng, **k), seed, ids, **kw)


# ---------------------------------------------------------------------------------------------
# The batch functions give, row by row, what the reference gives for each text alone
# ---------------------------------------------------------------------------------------------


def _rows_equal_reference(ref_rows, out, rngs_ref, rngs, list_keys=()):
  for j, a in enumerate(ref_rows):
    for k in a:
      b = out[k][j]
      if k not in list_keys:
        assert out[k].dtype == a[k].dtype and out[k].shape[1:] == a[k].shape, (j, k)
      assert b.dtype == a[k].dtype and b.tobytes() == a[k].tobytes(), (j, k)
    assert rngs_ref[j].bit_generator.state == rngs[j].bit_generator.state, j


def test_span_mlm_batch_equals_the_reference_row_by_row():
  """Batches of mixed texts (specials anywhere, padding, no maskable word, 512-token texts):
  every row and every generator as the plain loop (tests/masking_reference.py) on that row."""
  import masking_reference as ref
  rng = np.random.default_rng(21)
  for case in range(60):
    B = int(rng.integers(1, 9))
    L = 512 if case % 6 == 0 else int(rng.integers(1, 96))
    ids = np.full((B, L), PAD, np.int32)
    starts = np.ones((B, L), bool)
    for b in range(B):
      if case % 6 == 0:
        ids[b], starts[b] = _text(rng, L - 2)
        continue
      kind = rng.random()
      if kind < 0.1:
        continue  # only padding: no maskable word
      i, s = _random_case(rng)
      i, s = i[:L], s[:L]
      ids[b, :len(i)], starts[b, :len(s)] = i, s
    kw = dict(vocab_size=60 if L < 512 else VOCAB, mask_id=59 if L < 512 else MASK,
              special_ids=(CLS, PAD, SEP), max_predictions=int(rng.integers(1, 81)),
              mask_rate=float(rng.choice([0.15, 0.5])), max_span_words=int(rng.integers(1, 11)),
              min_span_words=int(rng.integers(0, 2)))
    seeds = [[case, b] for b in range(B)]
    r_ref = [np.random.default_rng(s) for s in seeds]
    r_new = [np.random.default_rng(s) for s in seeds]
    expected = [ref.span_mlm(ids[b], starts[b], r_ref[b], return_spans=True, **kw)
                for b in range(B)]
    got = masking.span_mlm_batch(ids, starts, r_new, return_spans=True, **kw)
    _rows_equal_reference(expected, got, r_ref, r_new, list_keys=("spans",))


def test_infilling_batch_equals_the_reference_row_by_row():
  """Texts of different lengths in one batch (empty, shorter than a fragment, with [PAD],
  [CLS] / [SEP] ends, 510 tokens): every row and generator as the reference loop's."""
  import masking_reference as ref
  rng = np.random.default_rng(22)
  for case in range(80):
    B = int(rng.integers(1, 9))
    texts = []
    for _ in range(B):
      kind = rng.random()
      if kind < 0.1:
        texts.append(np.zeros(0, np.int32))
      elif kind < 0.2:
        texts.append(rng.integers(4, 59, int(rng.integers(1, 4))).astype(np.int32))
      elif kind < 0.35:
        texts.append(_text(rng, 510)[0][1:-1])
      else:
        texts.append(_random_case(rng)[0])  # specials (and PAD runs) anywhere
    long = any(len(t) > 100 for t in texts)
    kw = dict(max_length=int(rng.integers(60 if long else 3, 600 if long else 100)),
              max_predictions=int(rng.integers(0, 200 if long else 40)), bos_id=CLS,
              eos_id=59, pad_id=PAD, sep_id=SEP, rate=float(rng.choice([0.1, 0.25, 0.6])))
    seeds = [[case, b] for b in range(B)]
    r_ref = [np.random.default_rng(s) for s in seeds]
    r_new = [np.random.default_rng(s) for s in seeds]
    expected = [ref.infilling(t, r, return_fragments=True, **kw) for t, r in zip(texts, r_ref)]
    got = masking.infilling_batch(texts, r_new, return_fragments=True, **kw)
    _rows_equal_reference(expected, got, r_ref, r_new, list_keys=("fragments",))


def test_batch_functions_check_their_inputs():
  rng = [np.random.default_rng(0)]
  with pytest.raises(ValueError, match=r"\[B, L\] with B = 1"):
    masking.span_mlm_batch(np.zeros((2, 4), np.int32), np.ones((2, 4), bool), rng,
                           vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                           max_predictions=4)
  with pytest.raises(ValueError, match="2 texts and 1 generators"):
    masking.infilling_batch([np.zeros(3, np.int32)] * 2, rng, max_length=8, max_predictions=4,
                            bos_id=CLS, eos_id=MASK, pad_id=PAD)
