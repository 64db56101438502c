"""The draws of a numpy PCG64 `Generator`, computed in Python from its raw 64-bit words.

Masking makes ~30 scalar draws per 512-token text (a span length and an anchor per span, a
length and a start per infilling fragment). Each `Generator.random()` / `.integers(n)` call
costs ~0.5 / ~1.5 us of numpy's argument handling; `RawDraws(rng)` fetches the generator's raw
words 64 at a time (`bit_generator.random_raw`) and computes the same values from them with
numpy's own algorithms (PCG64 only):

  random()            (word >> 11) * 2**-53, one word (numpy's next_double)
  integers(lo, hi)    Lemire's bounded draw on next_uint32 (ranges < 2**32: the low half of a
                      word, its high half kept for the next call, as PCG64's has_uint32 buffer)
                      or on next_uint64 (larger ranges); a range of one value draws nothing
  random(n), integers(lo, hi, size=n)   the same element by element

so a `RawDraws` gives exactly the values the generator would have given, call for call
(tests/test_raw_draws.py checks it against numpy). The generator itself is left ahead of the
draws by what was fetched but not used: call `sync()` before drawing from it again.
"""
import numpy as np

_M32, _M64 = (1 << 32) - 1, (1 << 64) - 1
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


class RawDraws:
  """Duck-typed `random` / `integers` of a PCG64 `np.random.Generator` (module docstring)."""
  __slots__ = ("_bg", "_start", "_words", "_pos", "_used", "_has", "_half")

  def __init__(self, rng: np.random.Generator):
    bg = rng.bit_generator
    if type(bg) is not np.random.PCG64:  # pylint: disable=unidiomatic-typecheck
      raise TypeError(f"RawDraws needs a PCG64 generator, got {type(bg).__name__}")
    state = bg.state
    self._bg, self._start = bg, state
    self._has, self._half = bool(state["has_uint32"]), int(state["uinteger"])
    self._words, self._pos, self._used = [], 0, 0

  def _word(self) -> int:
    if self._pos == len(self._words):
      self._words = self._bg.random_raw(64).tolist()
      self._pos = 0
    w = self._words[self._pos]
    self._pos += 1
    self._used += 1
    return w

  def _u32(self) -> int:
    if self._has:
      self._has = False
      return self._half
    w = self._word()
    self._has, self._half = True, w >> 32
    return w & _M32

  def _bounded(self, rng: int) -> int:
    """A uniform draw from [0, rng] (numpy's random_bounded_uint64 without masking)."""
    if rng == 0:
      return 0
    if rng < _M32:
      excl = rng + 1
      m = self._u32() * excl
      if (m & _M32) < excl:
        threshold = (_M32 - rng) % excl
        while (m & _M32) < threshold:
          m = self._u32() * excl
      return m >> 32
    if rng == _M32:
      return self._u32()
    if rng == _M64:
      return self._word()
    excl = rng + 1
    m = self._word() * excl
    if (m & _M64) < excl:
      threshold = (_M64 - rng) % excl
      while (m & _M64) < threshold:
        m = self._word() * excl
    return m >> 64

  def _take(self, k: int) -> np.ndarray:
    """The next k words as uint64 [k] (one numpy pass instead of k `_word` calls)."""
    rest = self._words[self._pos:self._pos + k]
    self._pos += len(rest)
    self._used += k
    out = np.asarray(rest, np.uint64)
    if len(rest) < k:
      out = np.concatenate([out, self._bg.random_raw(k - len(rest))])
    return out

  def random(self, size=None):
    """Like `Generator.random()`: a float in [0, 1), or float64 [size]."""
    if size is None:
      return (self._word() >> 11) * _TO_UNIT
    return (self._take(int(size)) >> np.uint64(11)).astype(np.float64) * _TO_UNIT

  def integers(self, low, high=None, size=None):
    """Like `Generator.integers(low, high, size)` (int64, high exclusive): an int or [size]."""
    if high is None:
      low, high = 0, low
    low, high = int(low), int(high)
    if high <= low:
      raise ValueError(f"integers: low {low} >= high {high}")
    rng = high - 1 - low
    if size is None:
      return low + self._bounded(rng)
    n = int(size)
    if rng == 0 or rng >= _M32 or n == 0:
      return np.asarray([low + self._bounded(rng) for _ in range(n)], np.int64).reshape(n)
    # Vectorised Lemire on n half-words (a rejection, p < n * rng / 2**32, redoes it by scalar).
    used = self._used
    head = [self._half] if self._has else []
    words = self._take((n - len(head) + 1) // 2)
    halves = np.stack([words & np.uint64(_M32), words >> np.uint64(32)], 1).reshape(-1)
    u = np.concatenate([np.asarray(head, np.uint64), halves])
    m = u[:n] * np.uint64(rng + 1)
    if np.any((m & np.uint64(_M32)) < np.uint64(rng + 1)):
      # Give the words back (they come before any still buffered) and draw one by one.
      self._words, self._pos = words.tolist() + self._words[self._pos:], 0
      self._used = used
      return np.asarray([low + self._bounded(rng) for _ in range(n)], np.int64)
    self._has = len(u) > n
    if self._has:
      self._half = int(u[n])
    return (m >> np.uint64(32)).astype(np.int64) + low

  def sync(self):
    """Moves the generator to just after the draws made here (its next draw is the next one
    this object would have made)."""
    bg = self._bg
    bg.state = self._start
    bg.advance(self._used)  # resets the half-word buffer
    if self._has:
      state = bg.state
      state["has_uint32"], state["uinteger"] = 1, self._half
      bg.state = state
    self._start, self._words, self._pos, self._used = bg.state, [], 0, 0
