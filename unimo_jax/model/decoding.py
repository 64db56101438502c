"""Key/value cache for incremental decoding (captioning and seq2seq generation).

The cache is a plain pytree (a dict of arrays), so beam search can tile, gather and carry it
through ``lax.while_loop`` like any other state:

  k, v      [layers, B, T, heads, d]  keys/values of every slot (compute dtype)
  valid     [B, T] bool               slots a query may attend to (real prefix tokens + decoded)
  index     int32 scalar              next slot to write (same for every row)
  position  [B] int32                 position id of the next text token (per row)

T = prefix length + max_decode_length. Decoding token t costs one position: its query attends to
the T cached slots; nothing already cached is recomputed.

How generation uses it (issue 6's greedy/beam search):

  outputs, cache = model.apply(params, max_decode_length, visual=visual,
                               method=Unimo.prefill)                  # captioning: image prefix
  outputs, cache = model.apply(params, max_decode_length, ids=source_ids,
                               method=Unimo.prefill)                  # seq2seq: text source
  cache = reorder_cache(cache, jnp.repeat(jnp.arange(B), beam))      # [B] -> [B*beam] rows
  out, cache = model.apply(params, token_ids_B, cache, method=Unimo.decode_step)
  # out["logits"] [B, V] (float32) predicts the token after token_ids_B; feed [CLS] first.
  cache = reorder_cache(cache, parent_rows)                          # after each beam step

The prefix (image block ``[IMG] v1..vN``, a padded text source ``[CLS] s.. [SEP] PAD..``, or both)
is encoded once with bidirectional attention among its valid tokens; pad slots stay invalid.
Decoded text tokens then see the valid prefix and every earlier decoded token (and themselves).
This is exactly the uncached forward of the whole sequence under ``masks.captioning`` (image
prefix) or ``masks.seq2seq`` (segments 1 = source, 2 = decoded target), with text positions
continuing after the source's real tokens (``embeddings.text_positions`` skips padding), or
restarting at the first text position with ``prefill(..., restart_positions=True)`` (UNIMO's
seq2seq fine-tuning: then the source and the decoded tokens each need to fit the table).
Writing past slot T-1 is clamped by ``dynamic_update_slice`` (overwrites the last slot): size
``max_decode_length`` for the longest output.
"""
import jax
import jax.numpy as jnp

from unimo_jax.model.config import ModelConfig


def init_cache(config: ModelConfig, batch_size: int, max_length: int) -> dict:
  """An empty cache (no prefix): decoding starts at slot 0 and text position ``offset``."""
  shape = (config.num_layers, batch_size, max_length, config.num_heads, config.head_dim)
  return dict(
      k=jnp.zeros(shape, config.compute_dtype),
      v=jnp.zeros(shape, config.compute_dtype),
      valid=jnp.zeros((batch_size, max_length), bool),
      index=jnp.zeros((), jnp.int32),
      position=jnp.full((batch_size,), config.position_offset, jnp.int32),
  )


def cache_from_prefix(config: ModelConfig, keys, values, prefix_valid, text_count,
                      max_decode_length: int) -> dict:
  """Builds the cache after encoding a prefix.

  keys/values [layers, B, S, h, d] of the prefix, prefix_valid [B, S], text_count [B] number of
  real text tokens in the prefix (0 for an image prefix). Slots S .. S+max_decode_length-1 are
  empty.
  """
  s = keys.shape[2]
  pad = [(0, 0), (0, 0), (0, max_decode_length), (0, 0), (0, 0)]
  return dict(
      k=jnp.pad(keys.astype(config.compute_dtype), pad),
      v=jnp.pad(values.astype(config.compute_dtype), pad),
      valid=jnp.pad(prefix_valid > 0, [(0, 0), (0, max_decode_length)]),
      index=jnp.asarray(s, jnp.int32),
      position=(config.position_offset + text_count).astype(jnp.int32),
  )


def reorder_cache(cache: dict, rows) -> dict:
  """Selects / repeats batch rows: ``rows`` [B'] int -> a cache of B' rows (beam expansion with
  ``jnp.repeat(jnp.arange(B), beam)``, beam reordering with the parents' flat indices)."""
  out = dict(cache)
  out["k"] = jnp.take(cache["k"], rows, axis=1)
  out["v"] = jnp.take(cache["v"], rows, axis=1)
  out["valid"] = jnp.take(cache["valid"], rows, axis=0)
  out["position"] = jnp.take(cache["position"], rows, axis=0)
  return out


def cache_shapes(config: ModelConfig, batch_size: int, max_length: int):
  """``jax.ShapeDtypeStruct`` tree of a cache (for shardings / while_loop carries)."""
  return jax.eval_shape(lambda: init_cache(config, batch_size, max_length))
