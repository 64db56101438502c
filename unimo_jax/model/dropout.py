"""Dropout whose mask is a keyed integer hash of each element's index.

``nn.Dropout`` draws its mask with ``jax.random.bernoulli``: a threefry stream of 20 rounds per
32-bit word, unfused from the surrounding ops. On the CPU it took 52-86 ms to mask one
``[32, 4, 128, 128]`` attention-probability tensor, the hash below 1.1-1.5 ms (2 loaded cores;
``benchmarks/README.md``). Here each element's bits are ``fmix32(fmix32(i ^ s0) ^ s1)``: ``i`` is
the element's flat index in the GLOBAL array (an iota, so a sharded array computes exactly its
slice and the mask does not depend on the mesh), ``s0, s1`` are two 32-bit words drawn once per
call from the module's ``dropout`` rng, and ``fmix32`` is MurmurHash3's bijective finaliser (full
avalanche). An element is kept when its bits are ``>= round(rate * 2**32)``, so the drop
probability is ``rate`` to within 2**-32, and the mask is elementwise arithmetic that XLA fuses
into the producer (softmax, residual add). The mask is recomputed in the backward pass from the
same words, so nothing mask-sized is stored.

Arrays of more than 2**32 elements would repeat indices (the index wraps); none of ours come near.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser (a bijection on uint32 with full avalanche)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def flat_index(shape) -> jax.Array:
  """uint32 [*shape]: each element's row-major flat index (wrapping at 2**32)."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return idx


def keep_mask(rng, shape, rate: float) -> jax.Array:
  """bool [*shape]: True with probability ``1 - rate``, independent across elements."""
  words = jax.random.bits(rng, (2,), jnp.uint32)
  bits = _fmix32(_fmix32(flat_index(shape) ^ words[0]) ^ words[1])
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  return bits >= jnp.uint32(threshold)


def dropout(x, rate: float, rng):
  """``x * keep / (1 - rate)`` with ``keep = keep_mask(rng, x.shape, rate)``; x when rate is 0."""
  if rate == 0.0:
    return x
  keep = keep_mask(rng, x.shape, rate)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """Drop-in for ``nn.Dropout(rate)(x, deterministic)`` with the hashed mask (rng collection
  ``dropout``)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))
