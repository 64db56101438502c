"""Greedy and beam search against exhaustive search and hand-worked cases (toy scoring function).

The toy model's next-token logits depend on the step, the last token and the running sum of the
generated tokens, which it keeps in a per-row cache: beam search must reorder that cache correctly
to match the numpy reference, which recomputes everything from the prefix.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimo_jax.evaluation import decoding

BOS, EOS, PAD = 0, 2, 1
V, T, M = 6, 4, 5


def _tables(seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(T + 1, V)) * 1.5, rng.normal(size=(V, V)) * 1.5,
          rng.normal(size=(M, V)) * 1.5)


def _toy(seed, batch):
  """(step_fn, cache for `batch` rows, numpy log_prob_fn for each row)."""
  tables = [np.stack([t + 0.3 * r for r in range(batch)]) for t in _tables(seed)]
  e, f, g = (jnp.asarray(t, jnp.float32) for t in tables)

  def step_fn(tokens, step, cache):
    row, total = cache["row"], cache["sum"]
    total = jnp.where(step > 0, total + tokens, total)
    logits = e[row, step] + f[row, tokens] + g[row, total % M]
    return logits, {"row": row, "sum": total}

  def log_prob_fn(r):
    def fn(prefix):
      prefix = list(prefix)
      last = prefix[-1] if prefix else BOS
      logits = tables[0][r, len(prefix)] + tables[1][r, last] + tables[2][r, sum(prefix) % M]
      return logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    return fn

  cache = {"row": jnp.arange(batch), "sum": jnp.zeros((batch,), jnp.int32)}
  return step_fn, cache, log_prob_fn


FORBID = (BOS, PAD)


@pytest.mark.parametrize("alpha,min_length,trigrams", [(0.0, 0, False), (1.0, 2, False),
                                                       (0.6, 0, True)])
def test_beam_search_without_pruning_equals_exhaustive_search(alpha, min_length, trigrams):
  step_fn, cache, ref = _toy(0, batch=2)
  # 4 allowed tokens (eos + 3): at most 1 + 3 + 9 + 27 + 81 hypotheses, so this beam never prunes.
  kwargs = dict(max_length=T, eos_id=EOS, alpha=alpha, min_length=min_length,
                block_trigrams=trigrams, forbidden_ids=FORBID)
  out = jax.jit(lambda c: decoding.beam_search(step_fn, c, 2, beam_size=128, bos_id=BOS,
                                               pad_id=PAD, **kwargs))(cache)
  for r in range(2):
    best = decoding.exhaustive_search(ref(r), vocab_size=V, **kwargs)
    for rank in range(5):  # the top of the beam is the top of the exhaustive ranking
      score, seq, logp = best[rank]
      n = int(out.lengths[r, rank])
      assert tuple(np.asarray(out.tokens[r, rank, :n])) == seq
      assert np.all(np.asarray(out.tokens[r, rank, n:]) == PAD)
      np.testing.assert_allclose(out.scores[r, rank], score, rtol=1e-5)
      np.testing.assert_allclose(out.logp[r, rank], logp, rtol=1e-5)


def test_greedy_equals_beam_size_one():
  step_fn, cache, _ = _toy(1, batch=3)
  for alpha, min_length, trigrams in [(0.0, 0, False), (1.2, 3, True)]:
    kw = dict(max_length=T, bos_id=BOS, eos_id=EOS, pad_id=PAD, alpha=alpha,
              min_length=min_length, block_trigrams=trigrams, forbidden_ids=FORBID)
    g = decoding.greedy_search(step_fn, cache, 3, **kw)
    b = decoding.beam_search(step_fn, cache, 3, beam_size=1, **kw)
    for x, y in zip(g, b):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_greedy_follows_the_argmax_of_a_numpy_reference():
  step_fn, cache, ref = _toy(2, batch=2)
  out = decoding.greedy_search(step_fn, cache, 2, max_length=T, bos_id=BOS, eos_id=EOS,
                               pad_id=PAD, forbidden_ids=FORBID)
  for r in range(2):
    prefix = []
    while len(prefix) < T and (not prefix or prefix[-1] != EOS):
      lp = ref(r)(prefix)
      lp[list(FORBID)] = -np.inf
      prefix.append(int(np.argmax(lp)))
    n = int(out.lengths[r, 0])
    assert list(np.asarray(out.tokens[r, 0, :n])) == prefix


def _table_step(table):
  """A step function whose log-probs depend only on (step, last token): table [T, V_last, V]."""
  table = jnp.asarray(np.log(table), jnp.float32)

  def step_fn(tokens, step, cache):
    return table[step, tokens], cache
  return step_fn, jnp.zeros((1,))


def test_length_penalty_prefers_longer_hypotheses_and_beam_two_beats_greedy():
  # Vocab: 0 bos, 1 pad, 2 eos, 3 'a', 4 'b'. Step 0: eos .4, a .35, b .25.
  # After a: eos .9; after b: eos .95 (b is a good first move only with hindsight).
  p = np.full((3, 5, 5), 1e-6)
  p[0, 0, [2, 3, 4]] = [.40, .35, .25]
  p[1, 3, [2, 3, 4]] = [.90, .05, .05]
  p[1, 4, [2, 3, 4]] = [.95, .03, .02]
  p[2, :, 2] = 1.0
  step_fn, cache = _table_step(p)
  kw = dict(max_length=3, bos_id=0, eos_id=2, pad_id=1, forbidden_ids=(0, 1))
  # alpha 0: '[eos]' (log .4) beats 'a eos' (log .315): greedy and beam agree.
  g = decoding.greedy_search(step_fn, cache, 1, **kw)
  assert list(np.asarray(g.tokens[0, 0, :1])) == [2]
  b = decoding.beam_search(step_fn, cache, 1, beam_size=2, **kw)
  assert list(np.asarray(b.tokens[0, 0, :1])) == [2]
  np.testing.assert_allclose(b.scores[0], [np.log(.4), np.log(.35 * .9)], rtol=1e-5)
  # alpha 2: lp(1) = 1, lp(2) = (7/6)^2. 'a eos': log(.315)/1.3611 = -0.849 > log(.4) = -0.916.
  b = decoding.beam_search(step_fn, cache, 1, beam_size=2, alpha=2.0, **kw)
  assert list(np.asarray(b.tokens[0, 0, :2])) == [3, 2]
  np.testing.assert_allclose(b.scores[0, 0], np.log(.35 * .9) / (7 / 6) ** 2, rtol=1e-5)
  # min_length 1 forbids the immediate eos: the beam of 2 ends with 'a eos' and 'b eos'.
  b = decoding.beam_search(step_fn, cache, 1, beam_size=2, min_length=1, **kw)
  assert [list(np.asarray(b.tokens[0, i, :2])) for i in range(2)] == [[3, 2], [4, 2]]
  np.testing.assert_allclose(b.logp[0], np.log([.35 * .9, .25 * .95]), rtol=1e-4)


def test_min_length_blocks_eos_until_reached():
  p = np.full((5, 5, 5), 1e-3)
  p[:, :, 2] = 0.99  # eos is always the favourite
  step_fn, cache = _table_step(p)
  for min_length in (0, 1, 3):
    out = decoding.beam_search(step_fn, cache, 1, beam_size=3, max_length=5, bos_id=0, eos_id=2,
                               pad_id=1, min_length=min_length, forbidden_ids=(0, 1))
    assert int(out.lengths[0, 0]) == min_length + 1
    assert int(out.tokens[0, 0, min_length]) == 2
    assert 2 not in list(np.asarray(out.tokens[0, 0, :min_length]))


def test_trigram_blocking_never_repeats_a_trigram():
  # 'a' then 'b' alternate with high probability, eos is unlikely: a b a b a b ... repeats
  # trigrams (a b a) at once; with blocking the decoder must deviate at every would-be repeat.
  p = np.full((8, 6, 6), 1e-2)
  p[:, 0, 3] = 0.9
  p[:, 3, 4] = 0.9
  p[:, 4, 3] = 0.9
  p[:, 4, 5] = 0.05
  p[:, 5, 5] = 0.5
  p[:, 5, 2] = 0.3
  step_fn, cache = _table_step(p)
  kw = dict(max_length=8, bos_id=0, eos_id=2, pad_id=1, forbidden_ids=(0, 1))
  free = decoding.greedy_search(step_fn, cache, 1, **kw)
  assert list(np.asarray(free.tokens[0, 0])) == [3, 4] * 4
  for out in (decoding.greedy_search(step_fn, cache, 1, block_trigrams=True, **kw),
              decoding.beam_search(step_fn, cache, 1, beam_size=3, block_trigrams=True, **kw)):
    seq = [int(x) for x in np.asarray(out.tokens[0, 0, :int(out.lengths[0, 0])])]
    trigrams = [tuple(seq[i:i + 3]) for i in range(len(seq) - 2)]
    assert len(trigrams) == len(set(trigrams)), seq
  blocked = decoding.greedy_search(step_fn, cache, 1, block_trigrams=True, **kw)
  # a b a b (a blocked) c c c (c blocked) eos.
  assert list(np.asarray(blocked.tokens[0, 0])) == [3, 4, 3, 4, 5, 5, 5, 2]


def test_blocked_tokens_hand_case():
  tokens = jnp.asarray([[5, 6, 5, 6, 9, 9], [5, 6, 7, 5, 6, 1]], jnp.int32)
  blocked = decoding.blocked_tokens(tokens, jnp.int32(5), 10, min_length=6, eos_id=2,
                                    forbidden_ids=(0,), block_trigrams=True)
  # Row 0: prefix 5 6 5 6 9, last two (6, 9): never seen before -> only 0 and eos blocked.
  # Row 1: prefix 5 6 7 5 6, last two (5, 6) seen followed by 7 -> 7 blocked.
  expect = np.zeros((2, 10), bool)
  expect[:, [0, 2]] = True
  expect[1, 7] = True
  np.testing.assert_array_equal(np.asarray(blocked), expect)
  blocked = decoding.blocked_tokens(tokens, jnp.int32(4), 10, min_length=0, eos_id=2,
                                    block_trigrams=True)
  # Row 0 at step 4: prefix 5 6 5 6, last (5, 6) seen followed by 5 -> 5 blocked.
  expect = np.zeros((2, 10), bool)
  expect[0, 5] = True
  np.testing.assert_array_equal(np.asarray(blocked), expect)


def test_length_penalty_formula():
  np.testing.assert_allclose(decoding.length_penalty(np.array([1, 7]), 0.6),
                             [1.0, 2.0 ** 0.6], rtol=1e-6)
