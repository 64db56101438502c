"""Batches of fine-tuning rows: epochs of a seeded permutation, exact resume, padding at the end.

A task reader turns its files into ROWS: a dict of fixed-shape numpy arrays ``[N, ...]``, one
entry per valid example (bad records were skipped and counted while reading). ``RowBatches``
serves them:

- training (``repeat=True``): epoch e visits the rows in ``permutation(seed, e)``; global batch
  i holds slots ``i*B .. (i+1)*B - 1`` of that endless sequence and this process takes its
  ``B / process_count`` consecutive rows of it. The state is the next batch index, so a resumed
  run gets exactly the batches an uninterrupted one would (and the same GLOBAL batches for any
  process count);
- evaluation (``repeat=False``): one pass in file order, the last batch padded with rows whose
  ``row_valid`` is False.

``extra(rows_of_batch, slots, rng)`` lets a task add per-batch fields (retrieval draws its
negative images and captions there) from an rng seeded by (seed, batch index) only.
``spec`` is this process's ``{name: (shape, dtype)}``, as the trainer needs.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Mapping

import numpy as np

STATE_VERSION = 1


class RowBatches:
  """Iterator of per-process numpy batches over ``rows`` (see the module docstring)."""

  def __init__(self, rows: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
               repeat: bool = True, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, dropped: Mapping[str, Mapping[str, int]] | None = None,
               extra: Callable[[dict, np.ndarray, np.random.Generator], dict] | None = None,
               name: str = "finetune"):
    sizes = {k: len(v) for k, v in rows.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"{name}: row fields differ in length {sizes}")
    self.num_rows = next(iter(sizes.values())) if sizes else 0
    if self.num_rows == 0:
      raise ValueError(f"{name}: no valid examples (dropped: {dict(dropped or {})})")
    if batch_size % process_count:
      raise ValueError(f"{name}: batch_size {batch_size} is not divisible by "
                       f"{process_count} processes")
    self.rows = {k: np.asarray(v) for k, v in rows.items()}
    self.batch_size, self.seed, self.repeat, self.shuffle = batch_size, seed, repeat, shuffle
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = batch_size // process_count
    self._dropped = {k: dict(v) for k, v in (dropped or {}).items()}
    self._extra = extra
    self.name = name
    self._index = 0
    self._perm_epoch, self._perm = -1, None
    h = hashlib.sha256(json.dumps([self.num_rows, batch_size, seed, sorted(sizes)]).encode())
    self._fingerprint = h.hexdigest()[:16]
    self.spec = {k: (v.shape, v.dtype.str) for k, v in self._local(0).items()}

  # ------------------------------------------------------------------ order
  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_rows)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
      self._perm_epoch = epoch
    return self._perm

  def _slots_rows(self, slots: np.ndarray) -> np.ndarray:
    epoch, pos = np.divmod(slots, self.num_rows)
    out = np.empty(len(slots), np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = self._order(int(e))[pos[sel]]
    return out

  @property
  def num_batches(self) -> int:
    """Batches of one pass (evaluation), the last one padded."""
    return -(-self.num_rows // self.batch_size)

  def _local(self, index: int) -> dict:
    lo = index * self.batch_size + self.process_index * self.local_batch
    slots = np.arange(lo, lo + self.local_batch)
    valid = np.ones(self.local_batch, bool)
    if not self.repeat:
      valid = slots < self.num_rows
      slots = np.where(valid, slots, 0)
    picked = self._slots_rows(slots)
    batch = {k: v[picked] for k, v in self.rows.items()}
    batch["row_valid"] = batch.get("row_valid", valid) & valid
    if not self.repeat:  # evaluation: each row's place in the file order (padding: 0)
      batch["index"] = slots.astype(np.int64)
    if self._extra is not None:
      rng = np.random.default_rng([self.seed, 7919, index])
      batch.update(self._extra(batch, picked, rng))
    return batch

  # ------------------------------------------------------------------ iterator
  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self.repeat and self._index >= self.num_batches:
      raise StopIteration
    batch = self._local(self._index)
    self._index += 1
    return batch

  def get_state(self) -> dict:
    return dict(version=STATE_VERSION, fingerprint=self._fingerprint, index=self._index)

  def set_state(self, state: Mapping):
    if int(state.get("version", -1)) != STATE_VERSION:
      raise ValueError(f"{self.name}: data state version {state.get('version')} != "
                       f"{STATE_VERSION}")
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError(f"{self.name}: the data state was saved for other data (rows, batch "
                       f"size or seed changed); start a new workdir")
    self._index = int(state["index"])

  def dropped_counts(self) -> dict:
    """{source: {reason: count}} of the records skipped while reading."""
    return {k: dict(v) for k, v in self._dropped.items()}

  def close(self):
    pass
