"""Greedy and beam-search decoding over a cached decode step (pure JAX, jit-able).

Both searches drive a *step function* and know nothing about the model:

  step_fn(tokens [N] int32, step int32[], cache) -> (logits [N, V], cache)

``tokens`` are the tokens fed at this step (the bos token at step 0, then the token chosen at the
previous step), ``step`` is the number of tokens generated so far, and ``cache`` is any pytree the
step function keeps between calls (a key/value cache, or for an uncached reference the whole token
prefix). Rows of the cache are the N = batch x beam hypotheses; beam search reorders them after
each step with ``reorder_fn(cache, parents [N])`` (default: gather every non-scalar leaf along
axis 0; scalar leaves such as a shared cache index are left alone).

Search semantics (the UNIMO/ERNIE-GEN beam search, which is Paddle's ``beam_search`` op):
- A hypothesis is the generated tokens after bos. It ends when it emits ``eos_id`` (the eos counts
  in its length) or when it reaches ``max_length`` tokens (then it is complete as it stands).
- Its score is the GNMT length-normalised log-probability ``logp / ((5 + length) / 6) ** alpha``.
- ``min_length``: eos is forbidden while fewer than ``min_length`` tokens have been generated.
- ``block_trigrams``: a token is forbidden if it would repeat a trigram already in the hypothesis.
- ``forbidden_ids``: tokens never generated (pad, bos, mask, ...).
- The beam holds ``beam_size`` hypotheses, alive or finished. Each step the candidates are every
  one-token extension of every alive hypothesis plus every finished hypothesis unchanged; the best
  ``beam_size`` by score form the next beam. The search stops when every hypothesis has finished
  or at ``max_length``. A beam large enough never to prune therefore equals exhaustive search, and
  beam size 1 equals greedy decoding (every candidate of a size-1 beam has the same length).
"""
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Large finite "minus infinity": keeps sums, divisions and top_k free of NaN/inf.
NEG = -1e9

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


class Decoded(NamedTuple):
  """Result of a search.

  tokens:  [B, K, T] int32 generated tokens (no bos; eos included when emitted; pad after).
  lengths: [B, K] int32 generated length (counts the eos).
  logp:    [B, K] float32 summed log-probability of the tokens.
  scores:  [B, K] float32 length-normalised score; hypotheses sorted best first along K.
  For greedy decoding K = 1.
  """
  tokens: jax.Array
  lengths: jax.Array
  logp: jax.Array
  scores: jax.Array


def length_penalty(length, alpha: float):
  """GNMT length penalty ``((5 + length) / 6) ** alpha`` (float32, elementwise)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def gather_rows(cache, rows):
  """Default ``reorder_fn``: ``leaf[rows]`` on axis 0 of every leaf with ``ndim >= 1``."""
  return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows, axis=0), cache)


def blocked_tokens(tokens, step, vocab_size: int, *, min_length: int, eos_id: int,
                   forbidden_ids: Sequence[int] = (), block_trigrams: bool = False):
  """Which tokens may not be generated next.

  Args:
    tokens: [N, T] tokens generated so far (positions >= step are ignored).
    step: int32 scalar, number of tokens generated so far.
    vocab_size: V.
  Returns:
    [N, V] bool, True where the next token is forbidden.
  """
  n, t_max = tokens.shape
  ids = jnp.arange(vocab_size)
  blocked = jnp.isin(ids, jnp.asarray(list(forbidden_ids) or [-1], jnp.int32))
  blocked = blocked | ((ids == eos_id) & (step < min_length))
  blocked = jnp.broadcast_to(blocked[None, :], (n, vocab_size))
  if block_trigrams and t_max >= 3:
    # The candidate c completes (a, b, c) with (a, b) the last two tokens; it repeats a trigram if
    # some earlier position j has tokens[j:j+2] == (a, b) and tokens[j+2] == c, j + 2 < step.
    a = jnp.take(tokens, jnp.clip(step - 2, 0, t_max - 1), axis=1)
    b = jnp.take(tokens, jnp.clip(step - 1, 0, t_max - 1), axis=1)
    j = jnp.arange(t_max - 2)
    match = ((tokens[:, :-2] == a[:, None]) & (tokens[:, 1:-1] == b[:, None])
             & (j[None, :] + 2 < step))
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], match.shape)
    repeat = jnp.zeros((n, vocab_size), bool).at[rows, tokens[:, 2:]].max(match)
    blocked = blocked | repeat
  return blocked


def _log_probs(logits):
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def greedy_search(step_fn: StepFn, cache, batch_size: int, *, max_length: int, bos_id: int,
                  eos_id: int, pad_id: int, alpha: float = 0.0, min_length: int = 0,
                  block_trigrams: bool = False, forbidden_ids: Sequence[int] = ()) -> Decoded:
  """Picks the most probable allowed token at every step (same constraints as beam search).

  ``cache`` has batch_size rows. Returns ``Decoded`` with K = 1.
  """
  b = batch_size

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_length) & ~jnp.all(done)

  def body(state):
    step, tokens, last, done, logp, cache = state
    logits, cache = step_fn(last, step, cache)
    lp = _log_probs(logits)
    vocab = lp.shape[-1]
    lp = jnp.where(blocked_tokens(tokens, step, vocab, min_length=min_length, eos_id=eos_id,
                                  forbidden_ids=forbidden_ids, block_trigrams=block_trigrams),
                   NEG, lp)
    choice = jnp.argmax(lp, axis=-1).astype(jnp.int32)
    chosen_lp = jnp.take_along_axis(lp, choice[:, None], axis=-1)[:, 0]
    choice = jnp.where(done, pad_id, choice)
    logp = logp + jnp.where(done, 0.0, chosen_lp)
    tokens = jax.lax.dynamic_update_slice(tokens, choice[:, None], (0, step))
    done = done | (choice == eos_id)
    return step + 1, tokens, choice, done, logp, cache

  state = (jnp.int32(0), jnp.full((b, max_length), pad_id, jnp.int32),
           jnp.full((b,), bos_id, jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32),
           cache)
  _, tokens, _, _, logp, _ = jax.lax.while_loop(cond, body, state)
  lengths = jnp.sum(tokens != pad_id, axis=-1).astype(jnp.int32)
  scores = logp / length_penalty(jnp.maximum(lengths, 1), alpha)
  return Decoded(tokens[:, None], lengths[:, None], logp[:, None], scores[:, None])


def beam_search(step_fn: StepFn, cache, batch_size: int, *, beam_size: int, max_length: int,
                bos_id: int, eos_id: int, pad_id: int, alpha: float = 0.0, min_length: int = 0,
                block_trigrams: bool = False, forbidden_ids: Sequence[int] = (),
                reorder_fn: Callable = gather_rows, cache_is_expanded: bool = False) -> Decoded:
  """Beam search with GNMT length penalty, minimum length and trigram blocking.

  Args:
    step_fn: the decode step (see the module docstring).
    cache: the decode state for batch_size rows (tiled here to batch*beam rows with
      ``reorder_fn(cache, repeat(arange(B), K))``), or for batch*beam rows already when
      ``cache_is_expanded``. Row ``b * beam_size + k`` is hypothesis k of example b.
    batch_size: B.
    beam_size: K.
    max_length: T, the most tokens generated (eos included).
    alpha: length-penalty exponent (>= 0; 0 ranks by raw log-probability).
  Returns:
    ``Decoded`` with [B, K, ...] fields sorted by score, best first.
  """
  if alpha < 0:
    raise ValueError(f"length penalty alpha must be >= 0, got {alpha}")
  b, k, t_max = batch_size, beam_size, max_length
  if not cache_is_expanded:
    cache = reorder_fn(cache, jnp.repeat(jnp.arange(b), k))

  def cond(state):
    step, _, _, _, _, finished, _ = state
    return (step < t_max) & ~jnp.all(finished)

  def body(state):
    step, tokens, last, logp, lengths, finished, cache = state
    logits, cache = step_fn(last.reshape(b * k), step, cache)
    lp = _log_probs(logits)
    vocab = lp.shape[-1]
    blocked = blocked_tokens(tokens.reshape(b * k, t_max), step, vocab, min_length=min_length,
                             eos_id=eos_id, forbidden_ids=forbidden_ids,
                             block_trigrams=block_trigrams)
    lp = jnp.where(blocked, NEG, lp).reshape(b, k, vocab)
    # Candidates: extensions of alive hypotheses (all of length step + 1) and the finished
    # hypotheses unchanged. Impossible candidates get logp NEG (not just a NEG score) so that, if a
    # beam larger than the number of real candidates selects one, it stays a dead hypothesis.
    ext_logp = jnp.where(finished[:, :, None], NEG, logp[:, :, None] + lp).reshape(b, k * vocab)
    keep_logp = jnp.where(finished, logp, NEG)
    cand_logp = jnp.concatenate([ext_logp, keep_logp], axis=1)
    cand_score = jnp.concatenate(
        [ext_logp / length_penalty(step + 1, alpha),
         keep_logp / length_penalty(jnp.maximum(lengths, 1), alpha)], axis=1)
    _, top = jax.lax.top_k(cand_score, k)
    is_ext = top < k * vocab
    parent = jnp.where(is_ext, top // vocab, top - k * vocab)
    token = jnp.where(is_ext, top % vocab, pad_id).astype(jnp.int32)

    def pick(x):  # [B, K, ...] -> rows of the chosen parents
      return jnp.take_along_axis(x, parent.reshape(parent.shape + (1,) * (x.ndim - 2)), axis=1)

    # A kept finished hypothesis has pad at this position already: writing pad is a no-op.
    tokens = jax.lax.dynamic_update_slice(pick(tokens), token[:, :, None], (0, 0, step))
    logp = jnp.take_along_axis(cand_logp, top, axis=1)
    lengths = jnp.where(is_ext, step + 1, pick(lengths))
    # Dead hypotheses (logp near NEG) count as finished so they do not keep the loop running.
    finished = jnp.where(is_ext, token == eos_id, pick(finished)) | (logp < NEG / 2)
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(b * k)
    cache = reorder_fn(cache, rows)
    return step + 1, tokens, jnp.where(is_ext, token, eos_id), logp, lengths, finished, cache

  # Only hypothesis 0 is real at the start: the others are copies that must not be chosen twice.
  logp0 = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None, :], (b, 1)).astype(jnp.float32)
  state = (jnp.int32(0), jnp.full((b, k, t_max), pad_id, jnp.int32),
           jnp.full((b, k), bos_id, jnp.int32), logp0, jnp.zeros((b, k), jnp.int32),
           jnp.zeros((b, k), bool), cache)
  _, tokens, _, logp, lengths, _, _ = jax.lax.while_loop(cond, body, state)
  scores = logp / length_penalty(jnp.maximum(lengths, 1), alpha)
  order = jnp.argsort(-scores, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  return Decoded(take(tokens), take(lengths), take(logp), take(scores))


def exhaustive_search(log_prob_fn: Callable[[np.ndarray], np.ndarray], *, vocab_size: int,
                      max_length: int, eos_id: int, alpha: float = 0.0, min_length: int = 0,
                      block_trigrams: bool = False, forbidden_ids: Sequence[int] = ()):
  """Reference: scores every allowed hypothesis and returns them best first (numpy, tiny V/T).

  log_prob_fn(prefix tokens [t] int) -> [V] log-probabilities of the next token.
  Returns a list of (score, tokens tuple, logp) sorted by score descending.
  """
  out = []

  def allowed(prefix, c):
    if c in forbidden_ids or (c == eos_id and len(prefix) < min_length):
      return False
    if block_trigrams and len(prefix) >= 2:
      tri = (prefix[-2], prefix[-1], c)
      if any(tuple(prefix[j:j + 3]) == tri for j in range(len(prefix) - 2)):
        return False
    return True

  def expand(prefix, logp):
    lp = np.asarray(log_prob_fn(np.asarray(prefix, np.int64)), np.float64)
    for c in range(vocab_size):
      if not allowed(prefix, c):
        continue
      seq, total = prefix + (c,), logp + lp[c]
      if c == eos_id or len(seq) == max_length:
        out.append((total / ((5.0 + len(seq)) / 6.0) ** alpha, seq, total))
      else:
        expand(seq, total)

  expand((), 0.0)
  return sorted(out, key=lambda r: -r[0])
