"""The sharded top-k builder (unimo_jax.neighbours) against a brute-force numpy top-k."""
import jax
import numpy as np
import pytest

from unimo_jax import neighbours


def _reference(q, c, k, valid=None, exclude=None):
  """Independent numpy top-k: full score matrix, stable sort of -score (lower index first)."""
  s = q.astype(np.float64) @ c.astype(np.float64).T
  if valid is not None:
    s[:, ~valid] = -np.inf
  if exclude is not None:
    for i, row in enumerate(exclude):
      s[i, row[row >= 0]] = -np.inf
  vals = np.full((len(q), k), -np.inf)
  idx = np.full((len(q), k), -1)
  for i in range(len(q)):
    order = np.argsort(-s[i], kind="stable")
    order = order[np.isfinite(s[i, order])][:k]
    vals[i, :len(order)], idx[i, :len(order)] = s[i, order], order
  return vals, idx


def _tied_case(seed, n=13, m=53, d=5):
  """Integer embeddings with few distinct values: many exactly equal scores."""
  rng = np.random.default_rng(seed)
  q = rng.integers(0, 2, (n, d)).astype(np.float32)
  c = rng.integers(0, 2, (m, d)).astype(np.float32)
  c[7] = c[3]  # exact duplicates
  c[m - 2] = c[3]
  return q, c


@pytest.mark.parametrize("block_size,query_block", [(8, 4), (16, 13), (24, 5), (1000, 100)])
def test_sharded_top_k_equals_brute_force_with_ties(block_size, query_block):
  assert jax.device_count() == 8
  q, c = _tied_case(0)
  k = 6
  vals, idx = neighbours.top_k(q, c, k, block_size=block_size, query_block=query_block)
  ref_vals, ref_idx = _reference(q, c, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(vals, ref_vals, rtol=0, atol=1e-6)


def test_exclusions_duplicates_and_short_rows():
  q, c = _tied_case(1, n=9, m=21)
  valid = np.ones(len(c), bool)
  valid[[7, len(c) - 2]] = False  # duplicates of earlier rows
  rng = np.random.default_rng(3)
  exclude = rng.integers(-1, len(c), (len(q), 4)).astype(np.int32)
  exclude[0] = np.arange(4)
  k = 5
  vals, idx = neighbours.top_k(q, c, k, collection_valid=valid, exclude=exclude, block_size=8,
                               query_block=4)
  ref_vals, ref_idx = _reference(q, c, k, valid, exclude)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(vals, ref_vals, atol=1e-6)
  # Fewer eligible rows than k: -1 / -inf fill the tail.
  small = np.ones(3, bool)
  small[1] = False
  vals, idx = neighbours.top_k(q[:2], c[:3], 4, collection_valid=small)
  assert (idx[:, 2:] == -1).all() and np.isneginf(vals[:, 2:]).all()
  assert set(idx[0, :2]) == {0, 2}


def test_float_case_callable_collection_and_stats():
  rng = np.random.default_rng(5)
  q = rng.normal(size=(30, 16)).astype(np.float32)
  c = rng.normal(size=(203, 16)).astype(np.float32)
  stats = {}
  vals, idx = neighbours.top_k(q, lambda a, b: c[a:b], 10, num_items=len(c), block_size=64,
                               query_block=7, stats=stats)
  ref_vals, ref_idx = _reference(q, c, 10)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(vals, ref_vals, rtol=1e-5, atol=1e-5)
  assert stats["block"] == 64 and stats["scores_per_device"] == 7 * 8
  assert stats["items_per_s"] > 0
  # The per-device buffer is set by the block, not the collection: 10x the rows, same bound.
  big = rng.normal(size=(2030, 16)).astype(np.float32)
  more = {}
  _, idx = neighbours.top_k(q, big, 3, block_size=64, query_block=7, stats=more)
  assert more["scores_per_device"] == stats["scores_per_device"]
  np.testing.assert_array_equal(idx, _reference(q, big, 3)[1])


def test_single_device_mesh_gives_the_same_result():
  q, c = _tied_case(2)
  one = neighbours.default_mesh(jax.devices()[:1])
  a = neighbours.top_k(q, c, 4, block_size=16, mesh=one)
  b = neighbours.top_k(q, c, 4, block_size=16)
  np.testing.assert_array_equal(a[1], b[1])


def test_embed_all_pads_and_keeps_row_order():
  x = np.arange(21 * 3, dtype=np.float32).reshape(21, 3)
  fn = jax.jit(lambda p, b: b["x"] * p)
  out = neighbours.embed_all(fn, 2.0, {"x": x}, batch_size=8)
  np.testing.assert_array_equal(out, 2 * x)


def test_bad_shapes():
  with pytest.raises(ValueError, match="collection must be"):
    neighbours.top_k(np.zeros((2, 3)), np.zeros((4, 5)), 1)
  with pytest.raises(ValueError, match="num_items"):
    neighbours.top_k(np.zeros((2, 3)), lambda a, b: None, 1)
