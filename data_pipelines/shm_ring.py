"""Shared-memory segments that carry a worker's batch to the training process without a copy.

The pool (`workers.WorkerPool`, in the training process) owns every segment: a file
``<SHM_DIR>/unimo_<pid>_<pool>_<n>`` (``/dev/shm``: RAM, where it exists), created, mapped
and unlinked by it, one batch of one stream each. A task names the segment its batch goes to;
the worker maps it and builds the batch's arrays in place (`Arena`, handed to `Stream.batch`
as its allocator), then sends only a header over its pipe (offset, shape and dtype of each
array; object arrays, i.e. encoded images for a TF decode, travel in the header itself). The
pool wraps the segment as numpy views (`Segment.views`) and hands them on unchanged. The
segment goes back to its stream's free list when the last of those views is gone (a weakref
finalizer on their common base array), so a batch still held by the consumer (the trainer, a
tf.data tensor aliasing it) is never overwritten; a consumer holding many batches only makes
the ring grow. No copy of the batch's bytes is made between the row builder and the consumer.

Cleanup: `unlink_all(prefix)` removes every segment of one pool. The pool calls it in `close()`
(also run at exit); every worker calls it when its task pipe reaches EOF, i.e. when the pool
closed it or the training process ended in any way (SIGTERM, SIGKILL, a crash), so no segment
outlives both sides. Views already handed out stay valid after the unlink (POSIX semantics).

Memory: per stream, (``data.worker_ahead`` + 1 + batches held by the consumer) segments of one
batch each (`Stream.batch_bytes`: e.g. 19 MB for 16 pair rows at 224 px with Ki 1, 23 MB for 16
image rows of 100 regions; data_pipelines/pipeline.py lists the paper shapes' sizes).
"""
import glob
import mmap
import os
import tempfile
import weakref

import numpy as np

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
ALIGN = 64  # every array starts on a cache line


def aligned(n: int) -> int:
  return (n + ALIGN - 1) // ALIGN * ALIGN


_DTYPES = {}


def _dtype(name: str) -> np.dtype:
  d = _DTYPES.get(name)
  if d is None:
    d = _DTYPES[name] = np.dtype(name)
  return d


def unlink_all(prefix: str):
  """Removes every segment file whose name starts with `prefix` (missing ones are fine)."""
  for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "*")):
    try:
      os.unlink(path)
    except OSError:
      pass


class Segment:
  """One shared batch buffer, created by the pool (`path` under SHM_DIR, `size` bytes)."""

  def __init__(self, path: str, size: int):
    """Raises OSError when the space is not there (a small /dev/shm, e.g. a container's
    64 MB default): the pool then sends batches through the pipe instead."""
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # left by an earlier process that had this pid and was killed
      os.unlink(path)
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
      # Reserve the pages now: on a full tmpfs a write into a merely truncated file would kill
      # the writing worker with SIGBUS; here it is an ENOSPC we can handle.
      if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
      else:
        os.ftruncate(fd, size)
      self.mm = mmap.mmap(fd, size)
    except OSError:
      os.close(fd)
      os.unlink(path)
      raise
    os.close(fd)
    self.path, self.size = path, int(size)

  def views(self, layout, on_free) -> tuple:
    """`Arena.layout` -> the batch's arrays (views of this segment; object arrays as sent).
    `on_free()` runs once the last view is gone."""
    base = np.frombuffer(self.mm, np.uint8)  # a fresh base per batch: the finalizer's anchor
    weakref.finalize(base, on_free)
    # np.ndarray over `base` (not slicing + view + reshape): ~1 us an array instead of ~7.
    return tuple(np.ndarray(e[2], _dtype(e[3]), buffer=base, offset=e[1]) if e[0] == "shm"
                 else e[1] for e in layout)

  def close(self):
    try:
      self.mm.close()
    except BufferError:  # views still alive somewhere: the mapping goes with them
      pass

  def unlink(self):
    try:
      os.unlink(self.path)
    except OSError:
      pass


class Arena:
  """A worker's allocator over one segment (`mm` may be None: everything on the heap).

  ``arena(shape, dtype, zero)`` returns an array inside the segment while it fits, else a heap
  array (the batch then travels partly through the pipe, as before); `needed` counts the bytes
  the whole batch wanted, so the pool sizes the next segments of the stream to fit."""

  def __init__(self, mm=None):
    self.mm, self.used, self.needed = mm, 0, 0
    self.size = len(mm) if mm is not None else 0
    self._where = {}  # id(array) -> offset

  def __call__(self, shape, dtype, zero=False):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    self.needed += aligned(n)
    if n and self.mm is not None and self.used + n <= self.size:
      a = np.frombuffer(self.mm, dtype, count=n // dtype.itemsize, offset=self.used).reshape(
          shape)
      self._where[id(a)] = (self.used, a)
      self.used += aligned(n)
      if zero:
        a.fill(0)
      return a
    return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)

  def layout(self, arrays) -> list:
    """The header for `arrays` (what `Stream.batch` returned): ("shm", offset, shape, dtype)
    for arrays in the segment, ("obj", array) for the rest (pickled into the header)."""
    out = []
    for a in arrays:
      hit = self._where.get(id(a))
      if hit is not None and hit[1] is a:
        out.append(("shm", hit[0], tuple(a.shape), a.dtype.str))
      else:
        out.append(("obj", a))
    self._where.clear()
    return out


class Mappings:
  """A worker's mappings of the segments it was given, by path (the least recently used
  beyond `keep` are closed: segments the pool replaced are not used again)."""

  def __init__(self, keep: int = 32):
    self.keep, self._maps = keep, {}

  def get(self, path: str):
    mm = self._maps.pop(path, None)
    if mm is None:
      fd = os.open(path, os.O_RDWR)
      try:
        mm = mmap.mmap(fd, 0)
      finally:
        os.close(fd)
    self._maps[path] = mm
    while len(self._maps) > self.keep:
      old = self._maps.pop(next(iter(self._maps)))
      try:
        old.close()
      except BufferError:
        pass
    return mm
