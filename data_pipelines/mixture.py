"""Stateless mixtures: which source and which record fill global slot g of a stream.

Everything here is a pure function of (seed, stream, slot), which is what makes the pipeline's
resume exact and O(1): the iterator's position is one integer per stream, and a restored
pipeline computes slot g's record directly instead of replaying g earlier choices.

Source choice. The weights are turned into integer counts c_s over a period of T slots
(largest-remainder rounding of w_s / sum(w) * T, each c_s >= 1). Within period q the slots are
a seeded random permutation of the multiset {s repeated c_s times}: slot p of the period maps to
u = perm_q(p) in [0, T) and belongs to the source whose range [C_s, C_s + c_s) holds u. So every
window of T slots has exactly c_s draws of source s (a stratified version of
`sample_from_datasets`' i.i.d. choice: same expected mix, lower variance), and the draw counter
of s at slot g is q * c_s + (rank of p among the period's slots of s) — computed from period q
alone (O(T log T) once per period, cached), never by counting earlier periods.

Record choice. Draw k of source s (with N_s records) is record perm_{s,e}(k mod N_s) of epoch
e = k // N_s: every record once per epoch, in a fresh order each epoch.

Replacement draws. A bad record at slot g is replaced by attempt a = 1, 2, ... drawing record
hash(seed, stream, g, a) mod N_s of the same source, so the mixture proportions are unchanged.

`permute(i, n, key)` is a keyed bijection on [0, n): a 4-round Feistel network on the smallest
even-bit power of two >= n, with cycle walking (re-apply until the value is < n).
"""
import numpy as np

_U64 = np.uint64
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)
_C1, _C2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_GOLDEN, _OFFSET = _U64(0x9E3779B97F4A7C15), _U64(0x632BE59BD9B4E019)


def _mix64(x):
  """splitmix64's finaliser on 1-d uint64 arrays (a well-mixed bijection; wraps mod 2^64).

  Arrays, not scalars: numpy warns on wrap-around only for scalar arithmetic.
  """
  x = (x ^ (x >> _S30)) * _C1
  x = (x ^ (x >> _S27)) * _C2
  return x ^ (x >> _S31)


def hash_ints(*xs):
  """A 64-bit hash of integers / integer arrays (broadcast to 1-d uint64; order matters)."""
  h = np.full(1, _GOLDEN, _U64)
  for x in xs:
    x = np.atleast_1d(np.asarray(x))
    x = x.astype(np.int64).view(_U64) if x.dtype != _U64 else x
    h = _mix64(h ^ _mix64(x + _OFFSET))
  return h


def permute(i, n: int, key):
  """The image of i under a keyed pseudo-random permutation of [0, n) (i, key: int or arrays)."""
  scalar = np.ndim(i) == 0
  i = np.atleast_1d(np.asarray(i, dtype=np.int64))
  if np.any((i < 0) | (i >= n)):
    raise ValueError(f"index outside [0, {n})")
  if n <= 1:
    return int(i[0]) if scalar else i
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask, shift = _U64((1 << half) - 1), _U64(half)
  keys = [hash_ints(key, r) for r in range(4)]  # round keys, broadcast against i
  x = i.astype(_U64)
  todo = np.ones(x.shape, bool)
  out = np.empty(x.shape, np.int64)
  keys = [np.broadcast_to(k, x.shape) for k in keys]
  while todo.any():  # cycle walking: ~4 passes at most on average since 4^half < 4n
    y = x[todo]
    left, right = y >> shift, y & mask
    for k in keys:
      left, right = right, left ^ (_mix64(k[todo] ^ right) & mask)
    y = (left << shift) | right
    done = y < _U64(n)
    idx = np.flatnonzero(todo)
    out[idx[done]] = y[done].astype(np.int64)
    x[idx] = y
    todo[idx[done]] = False
  return int(out[0]) if scalar else out


def mixture_counts(weights, period: int) -> np.ndarray:
  """Integer counts per source over a period (largest remainder, every source >= 1)."""
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or len(w) == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
    raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
  period = max(int(period), len(w))
  exact = w / w.sum() * period
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:period - counts.sum()]] += 1
  return np.maximum(counts, 1)


# Permutations of domains up to this size are computed whole and cached (same values as the
# per-index path, so caching never changes a batch; 8 MiB per cached array at the limit).
_CACHE_LIMIT = 1 << 20


class Mixture:
  """Slot -> (source, record) for one stream; see the module docstring. Vectorised over slots."""

  def __init__(self, weights, sizes, *, seed: int, stream_id: int, period: int = 1000):
    if len(weights) != len(sizes):
      raise ValueError("one weight per source")
    if any(int(n) <= 0 for n in sizes):
      raise ValueError(f"every source needs records, sizes {list(sizes)}")
    self.counts = mixture_counts(weights, period)
    self.period = int(self.counts.sum())
    self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
    self.sizes = np.asarray([int(n) for n in sizes], np.int64)
    self.seed, self.stream_id = int(seed), int(stream_id)
    self._cache = {}  # tag -> whole permutation, least recently used first
    self._cached = 0  # elements held by the cache
    self._periods = {}  # period -> (source, rank) arrays, least recently used first

  def _perm(self, r, n: int, tag: tuple):
    """permute(r, n, hash_ints(seed, stream, *tag)) with whole-domain caching for small n."""
    if n > _CACHE_LIMIT:
      return permute(r, n, hash_ints(self.seed, self.stream_id, *tag))
    full = self._cache.pop(tag, None)
    if full is None:
      full = permute(np.arange(n), n, hash_ints(self.seed, self.stream_id, *tag))
      self._cached += n
    self._cache[tag] = full
    while self._cached > 4 * _CACHE_LIMIT and len(self._cache) > 1:
      self._cached -= len(self._cache.pop(next(iter(self._cache))))
    return full[r]

  def _period(self, q: int):
    """(source [T], draw rank within the period [T]) of the slots of period q (cached)."""
    hit = self._periods.pop(q, None)
    if hit is None:
      u = permute(np.arange(self.period), self.period, hash_ints(self.seed, self.stream_id, 1, q))
      src = np.searchsorted(self.starts, u, side="right") - 1
      # Rank among the period's slots of the same source, in slot order: draws are handed out
      # in slot order, so the first N_s slots of a source are exactly its first epoch.
      order = np.argsort(src, kind="stable")
      rank = np.empty(self.period, np.int64)
      rank[order] = np.arange(self.period) - self.starts[src[order]]
      hit = (src, rank)
    self._periods[q] = hit
    while len(self._periods) > 4:
      self._periods.pop(next(iter(self._periods)))
    return hit

  def source_and_draw(self, g):
    """(source index, draw counter of that source) of global slot(s) g [n]."""
    g = np.atleast_1d(np.asarray(g, np.int64))
    q, p = np.divmod(g, self.period)
    s = np.empty_like(p)
    k = np.empty_like(p)
    for qq in np.unique(q):  # usually one period per batch
      m = q == qq
      src, rank = self._period(int(qq))
      s[m] = src[p[m]]
      k[m] = qq * self.counts[src[p[m]]] + rank[p[m]]
    return s, k

  def records(self, g):
    """(source [n], record [n]) of global slots g [n]: epoch-wise permutation per source."""
    s, k = self.source_and_draw(g)
    e, r = np.divmod(k, self.sizes[s])
    rec = np.empty_like(r)
    for src, ep in set(zip(s.tolist(), e.tolist())):
      m = (s == src) & (e == ep)
      rec[m] = self._perm(r[m], int(self.sizes[src]), (2, src, ep))
    return s, rec

  def replacement(self, g: int, source: int, attempt: int) -> int:
    """Record index of the `attempt`-th (>= 1) replacement draw for slot g, same source."""
    h = hash_ints(self.seed, self.stream_id, 3, g, attempt)
    return int(h[0] % _U64(self.sizes[source]))
