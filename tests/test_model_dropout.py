"""Hashed dropout: drop rate, independence, dependence on the key only, gradient, and the same
mask on a sharded array as on one device."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unimo_jax import parallel
from unimo_jax.model import dropout as dropout_lib


def test_rate_and_independence():
  shape, rate = (64, 4, 32, 32), 0.1
  keep = np.asarray(dropout_lib.keep_mask(jax.random.key(0), shape, rate))
  n = keep.size
  # drop fraction within 4 standard deviations of the binomial
  assert abs((~keep).mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
  # neighbours along every axis are independent: P(both dropped) = rate^2
  for axis in range(len(shape)):
    a, b = np.moveaxis(~keep, axis, 0)[:-1], np.moveaxis(~keep, axis, 0)[1:]
    both = (a & b).mean()
    assert abs(both - rate ** 2) < 4 * np.sqrt(rate ** 2 / a.size) + 1e-4, (axis, both)
  # another key gives an unrelated mask; the same key the same mask
  other = np.asarray(dropout_lib.keep_mask(jax.random.key(1), shape, rate))
  assert abs(((~keep) & (~other)).mean() - rate ** 2) < 1e-3
  again = np.asarray(dropout_lib.keep_mask(jax.random.key(0), shape, rate))
  np.testing.assert_array_equal(keep, again)
  # a flat index matches numpy's row-major order
  np.testing.assert_array_equal(np.asarray(dropout_lib.flat_index((3, 5, 2))),
                                np.arange(30).reshape(3, 5, 2))


def test_values_and_gradient():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  key, rate = jax.random.key(3), 0.25
  keep = np.asarray(dropout_lib.keep_mask(key, x.shape, rate))
  y = dropout_lib.dropout(x, rate, key)
  np.testing.assert_allclose(y, np.where(keep, np.asarray(x) / (1 - rate), 0.0), rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(w * dropout_lib.dropout(x, rate, key)))(x)
  np.testing.assert_allclose(g, np.where(keep, np.asarray(w) / (1 - rate), 0.0), rtol=1e-6)
  assert dropout_lib.dropout(x, 0.0, key) is x


def test_sharded_mask_equals_unsharded():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  x = jnp.ones((8, 4, 16, 16), jnp.float32)
  want = dropout_lib.dropout(x, 0.1, jax.random.key(5))
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
  got = jax.jit(lambda x: dropout_lib.dropout(x, 0.1, jax.random.key(5)))(xs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
