"""Sharded top-k nearest neighbours: queries x a collection, the collection streamed in blocks.

``top_k(queries, collection, k)`` returns, for every query row, the k collection rows with the
highest dot product (best first) and their scores. It is the retrieval step of UNIMO's related
images X_I and related texts X_T (``data_pipelines.neighbours`` builds the side file the pipeline
reads from it), but knows nothing of data: it takes float matrices.

How. The collection is cut into blocks of ``block_size`` rows (rounded up to a multiple of the
device count); each block is sharded over every device of a 1-D mesh. For one block of queries
(``query_block`` rows, replicated) each device computes its ``[qb, block / D]`` scores, keeps
their local top-k (``lax.top_k``), all-gathers the ``D x k`` candidates and merges them with the
running top-k of the earlier blocks. The full N x M matrix never exists anywhere: the memory per
device is ``qb x block / D`` scores plus ``qb x (D + 1) x k`` candidates, whatever N and M.

Ties are deterministic: among equal scores the LOWER collection index wins (every merge sorts by
(-score, index); ``lax.top_k`` keeps the lower index first among equal values). Exclusions:
``collection_valid[j] = False`` removes row j for every query (e.g. an exact duplicate of an
earlier row), ``exclude[i]`` lists collection rows removed for query i alone (its own image or
caption, a duplicate of the query); ``-1`` pads that list. A query with fewer than k eligible
rows gets index -1 and score -inf in the missing slots.

Periodic refresh (re-mining with the current checkpoint every N steps) runs between training
rounds, not inside a step: ``data_pipelines.neighbours.train_with_refresh(config, workdir, N)``
trains N steps, rebuilds the pair source's neighbours file in place with the newest checkpoint's
towers (this module's ``top_k`` over ``embed_all`` embeddings), and resumes; the pipeline loads
the file once per round, and the data position and seeds continue exactly across rounds. Swapping
the table inside a running pipeline would also need the data state to record which table each
step used, so that a resume reproduces the batches: not done.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "x"


def default_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device (the collection block is split over all of them)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def merge_top_k(vals, idx, k: int):
  """Best k of candidate (vals, idx) [.., C] by (-score, index): ties go to the lower index."""
  neg, idx = jax.lax.sort((-vals, idx), dimension=-1, num_keys=2)
  return -neg[..., :k], idx[..., :k]


def _block_fn(mesh: Mesh, k: int, local: int):
  """Jitted (queries, block, base, valid, exclude, run_vals, run_idx) -> new running top-k."""
  kl = min(k, local)

  def body(q, c, base, valid, excl, run_vals, run_idx):
    # q [qb, d], c [local, d], valid [local], excl [qb, E], run_* [qb, k] (replicated)
    s = jnp.dot(q, c.T, preferred_element_type=jnp.float32)
    gidx = base + jax.lax.axis_index(AXIS) * local + jnp.arange(local, dtype=jnp.int32)
    keep = valid[None, :]
    if excl.shape[1]:
      keep = keep & ~jnp.any(gidx[None, :, None] == excl[:, None, :], axis=-1)
    s = jnp.where(keep, s, -jnp.inf)
    vals, pos = jax.lax.top_k(s, kl)
    cand_idx = jnp.where(jnp.isfinite(vals), gidx[pos], jnp.int32(2**31 - 1))
    vals = jax.lax.all_gather(vals, AXIS, axis=1, tiled=True)
    cand_idx = jax.lax.all_gather(cand_idx, AXIS, axis=1, tiled=True)
    return merge_top_k(jnp.concatenate([run_vals, vals], 1),
                       jnp.concatenate([run_idx, cand_idx], 1), k)

  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(P(), P(AXIS), P(), P(AXIS), P(), P(), P()),
                     out_specs=(P(), P()), check_vma=False)
  return jax.jit(fn)


def _put(x: np.ndarray, sharding) -> jax.Array:
  """A global array from a host array every process holds in full (any process count)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def top_k(queries: np.ndarray, collection, k: int, *, num_items: int | None = None,
          collection_valid: np.ndarray | None = None, exclude: np.ndarray | None = None,
          block_size: int = 4096, query_block: int = 1024, mesh: Mesh | None = None,
          stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The k best collection rows of every query (see the module docstring).

  Args:
    queries: [N, d] float.
    collection: [M, d] float, or a callable ``(start, stop) -> [stop - start, d]`` (a block is
      then built only when it is scored: e.g. densified TF-IDF rows), with ``num_items`` M.
    k: neighbours per query.
    collection_valid: [M] bool, False removes a row for every query (default all valid).
    exclude: [N, E] int, collection rows removed per query (-1 pads), or None.
    block_size: collection rows per block (the memory bound; rounded up to the device count).
    query_block: query rows scored at once.
    mesh: a 1-D mesh with axis ``"x"`` (default: every device).
    stats: filled with ``seconds``, ``queries`` N, ``items`` M, ``items_per_s`` (queries
      answered per second), ``pairs_per_s`` (N x M scores per second), ``block`` and
      ``scores_per_device`` (the per-device score buffer, qb x block / D: the memory bound).

  Returns:
    (scores [N, k] float32, indices [N, k] int32), best first; -inf / -1 where fewer than k
    rows are eligible.
  """
  t0 = time.time()
  queries = np.asarray(queries, np.float32)
  n, d = queries.shape
  if callable(collection):
    if num_items is None:
      raise ValueError("a callable collection needs num_items")
    m, get = int(num_items), collection
  else:
    collection = np.asarray(collection, np.float32)
    if collection.ndim != 2 or collection.shape[1] != d:
      raise ValueError(f"collection must be [M, d={d}], got {collection.shape}")
    m, get = collection.shape[0], lambda a, b: collection[a:b]
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  mesh = default_mesh() if mesh is None else mesh
  ndev = mesh.devices.size
  block = max(ndev, -(-min(block_size, max(m, 1)) // ndev) * ndev)
  local = block // ndev
  valid_all = np.ones(m, bool) if collection_valid is None else np.asarray(collection_valid, bool)
  excl_all = (np.zeros((n, 0), np.int32) if exclude is None
              else np.asarray(exclude, np.int32).reshape(n, -1))
  fn = _block_fn(mesh, k, local)
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  qb = max(1, min(query_block, n))
  out_vals = np.full((n, k), -np.inf, np.float32)
  out_idx = np.full((n, k), -1, np.int32)
  # A block is built once and scored against every query block (the collection is the big side).
  blocks = []
  for start in range(0, m, block):
    stop = min(start + block, m)
    c = np.zeros((block, d), np.float32)
    c[:stop - start] = np.asarray(get(start, stop), np.float32)
    v = np.zeros(block, bool)
    v[:stop - start] = valid_all[start:stop]
    blocks.append((start, c, v))
  for qs in range(0, n, qb):
    qe = min(qs + qb, n)
    q = np.zeros((qb, d), np.float32)
    q[:qe - qs] = queries[qs:qe]
    ex = np.full((qb, excl_all.shape[1]), -1, np.int32)
    ex[:qe - qs] = excl_all[qs:qe]
    q_dev, ex_dev = _put(q, rep), _put(ex, rep)
    run_vals = _put(np.full((qb, k), -np.inf, np.float32), rep)
    run_idx = _put(np.full((qb, k), 2**31 - 1, np.int32), rep)
    for start, c, v in blocks:
      run_vals, run_idx = fn(q_dev, _put(c, shard), jnp.int32(start), _put(v, shard), ex_dev,
                             run_vals, run_idx)
    vals = np.asarray(jax.device_get(run_vals))[:qe - qs]
    idx = np.asarray(jax.device_get(run_idx))[:qe - qs]
    found = np.isfinite(vals)
    out_vals[qs:qe] = np.where(found, vals, -np.inf)
    out_idx[qs:qe] = np.where(found, idx, -1)
  if stats is not None:
    seconds = time.time() - t0
    stats.update(seconds=seconds, queries=n, items=m,
                 items_per_s=n / max(seconds, 1e-9),
                 pairs_per_s=n * m / max(seconds, 1e-9), block=block,
                 scores_per_device=qb * local)
  return out_vals, out_idx


def embed_all(fn: Callable, params, arrays: dict, batch_size: int, mesh: Mesh | None = None
              ) -> np.ndarray:
  """Applies a jitted ``fn(params, batch) -> [b, d]`` to every row of ``arrays`` ({name: [N,
  ...]}) in batches sharded over the mesh (the last batch zero-padded); returns [N, d]."""
  mesh = default_mesh() if mesh is None else mesh
  ndev = mesh.devices.size
  b = max(ndev, -(-batch_size // ndev) * ndev)
  n = len(next(iter(arrays.values())))
  shard = NamedSharding(mesh, P(AXIS))
  outs = []
  for start in range(0, n, b):
    stop = min(start + b, n)
    batch = {}
    for name, x in arrays.items():
      pad = np.zeros((b,) + x.shape[1:], x.dtype)
      pad[:stop - start] = x[start:stop]
      batch[name] = _put(pad, shard)
    outs.append(np.asarray(jax.device_get(fn(params, batch)))[:stop - start])
  return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
