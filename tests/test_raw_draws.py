"""`RawDraws` against numpy's Generator: the same values call for call, and text rows built with it
byte-identical to rows built with the plain generator."""

import numpy as np
import pytest

from data_pipelines import examples, pipeline
from unimo_jax.raw_draws import RawDraws
import data_fixtures as fx


def _same_value(x, y):
  x, y = np.asarray(x), np.asarray(y)
  assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (x, y)


@pytest.mark.parametrize("buffered", [False, True])
def test_mixed_calls_match_the_generator(buffered):
  ops = np.random.default_rng(123)
  for trial in range(60):
    ref, mine = np.random.default_rng([trial, 7]), np.random.default_rng([trial, 7])
    if buffered:  # a half word already buffered by an earlier 32-bit draw
      _same_value(ref.integers(7), mine.integers(7))
    d = RawDraws(mine)
    for _ in range(int(ops.integers(1, 150))):
      op = int(ops.integers(5))
      if op == 0:
        _same_value(ref.random(), d.random())
      elif op == 1:
        n = int(ops.choice([1, 2, 3, 17, 500, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 2 ** 62]))
        _same_value(ref.integers(n), d.integers(n))
      elif op == 2:
        lo = int(ops.integers(-5, 5))
        hi = lo + int(ops.integers(1, 40))
        _same_value(ref.integers(lo, hi), d.integers(lo, hi))
      elif op == 3:
        n = int(ops.integers(0, 90))
        _same_value(ref.random(n), d.random(n))
      else:
        n, hi = int(ops.integers(0, 90)), int(ops.integers(1, 9000))
        _same_value(ref.integers(0, hi, size=n), d.integers(0, hi, size=n))
    d.sync()  # the generator continues where the draws stopped
    _same_value(ref.random(), mine.random())
    _same_value(ref.integers(10), mine.integers(10))


def test_rejections_match_the_generator():
  """Ranges near 2**32 make Lemire's rejection frequent (the vectorised draw falls back)."""
  ops = np.random.default_rng(9)
  for trial in range(40):
    ref, mine = np.random.default_rng(trial), np.random.default_rng(trial)
    d = RawDraws(mine)
    for k in range(20):
      hi = int(ops.choice([3, 2 ** 31 + 7, 3 * 2 ** 30, 2 ** 32 - 3]))
      n = int(ops.integers(1, 12))
      _same_value(ref.integers(0, hi, size=n), d.integers(0, hi, size=n))
      if k % 3 == 0:
        _same_value(ref.random(), d.random())
    d.sync()
    _same_value(ref.random(), mine.random())


def test_other_bit_generators_are_refused():
  with pytest.raises(TypeError, match="PCG64"):
    RawDraws(np.random.Generator(np.random.MT19937(0)))


def test_text_rows_identical_with_the_plain_generator(tmp_path, monkeypatch):
  """The text stream's rows (window, span MLM, infilling) with RawDraws and without it."""
  rng = np.random.default_rng(1)
  with open(tmp_path / "c.txt", "w") as f:
    for _ in range(20):
      f.write(fx.sentence(rng, 2, 40) + "\n")
  c = pipeline.default_config()
  c.workers = 0
  c.streams.text.update(dict(batch_size=4, max_length=12, max_predictions=3, s2s_max_length=16,
                             s2s_max_predictions=6, sources=[
                                 dict(name="c", kind="text", path=str(tmp_path / "c.txt"))]))

  def batches():
    it = pipeline.make_pipeline(c, tokenizer=fx.WhitespaceTokenizer())
    try:
      return [next(it) for _ in range(5)]
    finally:
      it.close()

  fast = batches()
  monkeypatch.setattr(examples, "RawDraws", lambda g: g)
  plain = batches()
  for a, b in zip(fast, plain):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].tobytes() == b[k].tobytes(), k
