"""Row-building worker processes: whole batches built in parallel, handed out in order.

`WorkerPool(cfg, tokenizer, process_index=, process_count=, workers=N)` starts N Python processes
(``python -m data_pipelines.workers``), each holding the same `streams.Stream`s as the calling
process. ``pool.fetch(stream, base, step)`` returns exactly what ``Stream.batch(base, step)``
returns in-process: a batch is a pure function of (seed, stream, slot), so which worker builds
it changes nothing, and batches are byte-identical for 0 (in-process), 1 or N workers. The pool
keeps ``ahead`` batches per stream in flight (assigned to the least busy worker) and buffers the
finished ones until tf.data asks for them, in any order. There is no reader thread: a thread
waiting in `fetch` reads every finished result (one such thread at a time), so handing a batch
over costs no thread switch in this process.

Guarantees kept:
- exact O(1) resume: `reset()` (on `DataIterator.set_state`) starts a new generation; workers
  skip stale tasks and stale results are discarded. Nothing is replayed.
- bad records: counted from each row's ``_drops`` by the iterator, as in-process, so a record is
  counted once whichever worker reads it.
- errors: an exception while building a batch becomes a `WorkerError` naming the stream, step,
  slot, source and record; a worker that dies (killed, segfault, out of memory) does the same
  from the progress record it writes before each row (never a hang: the thread waiting for a
  batch reads the results itself and sees the dead worker's EOF).
- shutdown: the workers read their tasks from a pipe whose only writer is this process, so when
  it exits for any reason (close, exit, SIGTERM, SIGKILL) they see EOF and exit; `close()` also
  terminates, then kills, any that do not stop within a few seconds.

Transport: each batch is built in place in a shared-memory segment that the pool lends with
the task (`shm_ring`: a ring of one-batch buffers per stream, grown on demand, recycled when
the consumer drops the batch); only a small header crosses the pipe and the batch is handed on
as numpy views, without a copy in this process. Segments are sized from the stream's spec
(`Stream.batch_bytes`; a worker that needed more says so, and later segments grow); object
arrays (encoded images for a TF decode) travel through the pipe with the header. Region
features are written as float32 by the workers (no cast in this process), and with
``data.jpeg_decode = "pillow"`` the workers decode the images too (`pil_decode`).

Processes are started with `subprocess` (fresh interpreters, never `fork` of a process running
TensorFlow and JAX threads; unlike multiprocessing's spawn they do not re-import the caller's
main module). Workers do not import TensorFlow unless a source needs it (TFDS sources do), see
`data_pipelines.lazy`. Memory per worker: the interpreter with numpy, scipy and sentencepiece
(~60 MB), the sources' indexes, plus ``ahead`` batches in flight (benchmarks/README.md).
Shared memory (in /dev/shm, i.e. RAM, counted once for the host, not per worker): per stream,
``ahead`` + 1 + (batches the consumer still holds) segments of one batch each.
"""
import atexit
import collections
import itertools
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import traceback
import weakref

import numpy as np

from data_pipelines import schema, shm_ring
from data_pipelines.worker_errors import PoolStopped, WorkerError  # noqa: F401  (raised here)

_HEADER = struct.Struct("<Q")
_PROGRESS = 8  # int64 per worker: generation, stream id, step, slot, source, record, -, -
_LIVE = weakref.WeakSet()
_POOL_IDS = itertools.count()


def resolve_workers(value) -> int:
  """``data.workers`` -> a count. -1 (auto): cores - 2 on hosts with >= 4 cores (the training
  process keeps a core for the step and one for TF image decoding), else 0 (in-process)."""
  n = int(value)
  if n < -1:
    raise ValueError(f"data.workers must be -1 (from the host's cores), 0 (in-process) or a "
                     f"count, got {value!r}")
  if n >= 0:
    return n
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return cores - 2 if cores >= 4 else 0


def _widen(fd):
  """Grows a pipe to hold a whole text batch (Linux: up to pipe-max-size, 1 MiB by default), so
  a worker's write returns at once instead of waiting for this process's reader in 64 KiB
  steps; elsewhere, or when refused, the pipe keeps its size (only slower)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
    with open("/proc/sys/fs/pipe-max-size") as f:
      size = min(int(f.read()), 1 << 20)
    fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
  except (ImportError, OSError, ValueError):
    pass


def _write(fd, data):
  view = memoryview(data).cast("B")
  while view:
    view = view[os.write(fd, view):]


def _send(fd, obj):
  """Frame: [pickle length, number of buffers, buffer lengths...], the pickle, the buffers.

  Arrays travel as protocol-5 out-of-band buffers, written straight from their memory and read
  into buffers they then use: one copy per batch each way instead of three."""
  buffers = []
  data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
  raws = [b.raw() for b in buffers]
  # Frame head and pickle in one write: the reader, woken by the first byte, then finds the
  # whole header there instead of waiting in `read` for a second write.
  _write(fd, struct.pack(f"<{2 + len(raws)}Q", len(data), len(raws), *(r.nbytes for r in raws))
         + data)
  for r in raws:
    _write(fd, r)


def _read_exact(f, n):
  buf = bytearray(n)
  view, got = memoryview(buf), 0
  while got < n:
    k = f.readinto(view[got:])
    if not k:
      return None
    got += k
  return buf


def _recv(f):
  """One object from binary file `f` (see `_send`), or None at EOF."""
  head = _read_exact(f, 2 * _HEADER.size)
  if head is None:
    return None
  n, nbuf = struct.unpack("<2Q", head)
  sizes = struct.unpack(f"<{nbuf}Q", _read_exact(f, nbuf * _HEADER.size) or b"") if nbuf else ()
  if len(sizes) != nbuf:
    return None
  data = _read_exact(f, n)
  bufs = [_read_exact(f, k) for k in sizes]
  if data is None or any(b is None for b in bufs):
    return None
  return pickle.loads(data, buffers=bufs)


class _Worker:
  def __init__(self, index, proc, task_fd, result_file):
    self.index, self.proc, self.task_fd, self.result_file = index, proc, task_fd, result_file
    self.in_flight = 0
    self.lock = threading.Lock()
    self.eof = False  # its result pipe is closed: it exited


class WorkerPool:
  """N worker processes building `Stream.batch(base, step)` (see the module docstring)."""

  def __init__(self, cfg, tokenizer, *, process_index: int, process_count: int, workers: int,
               source_names: dict, ahead: int = 0, batch_bytes: dict | None = None):
    import mmap  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    self.n = int(workers)
    self.ahead = int(ahead) if ahead else self.n + 1
    self.source_names = source_names  # {stream: [name per source index]}
    try:
      payload = pickle.dumps((cfg, tokenizer, process_index, process_count), protocol=5)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"data.workers = {self.n} needs a picklable tokenizer and config ({e!r});"
                       " use data.workers = 0 (in-process)") from e
    self._cond = threading.Condition()
    self._gen = 0
    self._next = {}  # (stream, base) -> first step not yet issued
    self._done = {}  # (gen, stream, base, step) -> (ok, header or message, segment path)
    self._error = None
    self._closing = False
    self._reading = False  # a fetching thread is reading the result pipes (one at a time)
    # Shared batch segments (shm_ring): by path; free ones per stream; bytes a batch needs.
    self.shm_prefix = f"unimo_{os.getpid()}_{next(_POOL_IDS)}_"
    self._segments = {}
    self._free = collections.defaultdict(collections.deque)
    self._need = dict(batch_bytes or {})  # grown if a worker reports more
    self._seg_ids = itertools.count()
    self._shm_warned = False
    fd, self._progress_path = tempfile.mkstemp(prefix="unimo_workers_")
    os.write(fd, bytes(8 * _PROGRESS * self.n))
    self._progress_mm = mmap.mmap(fd, 8 * _PROGRESS * self.n)
    os.close(fd)
    self._progress = np.frombuffer(self._progress_mm, np.int64).reshape(self.n, _PROGRESS)
    self._progress[:] = -1
    self._progress[:, 0] = 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    self._workers = []
    try:
      for k in range(self.n):
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        _widen(result_w)
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_pipelines.workers", str(task_r), str(result_w),
             self._progress_path, str(k), self.shm_prefix], pass_fds=(task_r, result_w), env=env,
            stdin=subprocess.DEVNULL)
        os.close(task_r)
        os.close(result_w)
        # Unbuffered: `select` on the descriptor then says whether a result is waiting.
        w = _Worker(k, proc, task_w, os.fdopen(result_r, "rb", buffering=0))
        _send(task_w, payload)
        self._workers.append(w)
    except BaseException:
      self.close()
      raise
    _LIVE.add(self)

  @property
  def pids(self):
    return [w.proc.pid for w in self._workers]

  # -- results ---------------------------------------------------------------------------------
  # Results are read by the fetching threads themselves, not by a reader thread per worker: a
  # thread that waits for its batch reads whatever the workers have finished (one thread at a
  # time, outside the lock), so a batch costs this process no thread hand-off. A worker whose
  # results are not read meanwhile still has its pipe (1 MiB) to write into; a batch in shared
  # memory sends a header of a few hundred bytes.
  def _poll(self, timeout: float) -> list:
    """(worker, message or None at EOF) for every result that is ready within `timeout`
    seconds (called without the lock by the one reading thread)."""
    live = [w for w in self._workers if not w.eof]
    if not live:
      return []
    try:
      ready, _, _ = select.select([w.result_file for w in live], [], [], timeout)
    except (OSError, ValueError):  # closed under us (close())
      return []
    by_file = {id(w.result_file): w for w in live}
    return [(by_file[id(f)], self._next_message(by_file[id(f)])) for f in ready]

  @staticmethod
  def _next_message(w: _Worker):
    """The next message of worker `w`, or None (and `w.eof` set) at EOF or a broken frame."""
    try:
      msg = _recv(w.result_file)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError):
      msg = None
    if msg is None:
      w.eof = True
    return msg

  def _handle(self, w: _Worker, msg):
    """One message from worker `w` (under the lock)."""
    if msg is None:
      if not self._closing and self._error is None:
        self._error = WorkerError(self._died(w))
      return
    kind = msg[0]
    if kind == "fatal":
      self._error = WorkerError(f"input worker {w.index} could not start: {msg[1]}")
    elif kind == "batch":
      _, gen, stream, base, step, ok, value, path, needed = msg
      w.in_flight = max(0, w.in_flight - 1)
      if needed:
        self._need[stream] = max(self._need.get(stream, 0), int(needed))
      if gen == self._gen and not self._closing:
        self._done[(gen, stream, base, step)] = (ok, value, path)
      else:
        self._give_back(stream, path)
    elif kind == "skip":
      _, stream, path = msg
      w.in_flight = max(0, w.in_flight - 1)
      self._give_back(stream, path)

  def _collect(self, timeout: float):
    """Reads and handles the ready results (called with the lock held; the lock is released
    while reading). Returns at once when another thread is reading: it notifies when done."""
    if self._reading:
      if timeout:
        self._cond.wait(timeout)
      return
    self._reading = True
    self._cond.release()
    try:
      got = self._poll(timeout)
    finally:
      self._cond.acquire()
      self._reading = False
    for w, msg in got:
      self._handle(w, msg)
    self._cond.notify_all()

  # -- shared segments -------------------------------------------------------------------------
  def _take(self, stream):
    """A free segment big enough for a batch of `stream` (a new one if none is), or None
    (the batch then comes through the pipe) when its size is unknown or /dev/shm is full."""
    need = self._need.get(stream)
    if not need or self._closing:
      return None
    free = self._free[stream]
    while free:
      seg = free.pop()
      if seg.size >= need:
        return seg
      self._drop(seg)  # from before the stream's size was known to be larger
    path = os.path.join(shm_ring.SHM_DIR, f"{self.shm_prefix}{next(self._seg_ids)}")
    try:
      seg = shm_ring.Segment(path, need)
    except OSError as e:
      if not self._shm_warned:
        self._shm_warned = True
        logging.warning("input workers: no room for a %d-byte shared batch in %s (%s); "
                        "batches go through the pipe (slower)", need, shm_ring.SHM_DIR, e)
      return None
    self._segments[path] = seg
    return seg

  def _give_back(self, stream, path):
    """Segment `path` is no longer used by a worker or a consumer (any thread)."""
    seg = self._segments.get(path) if path else None
    if seg is None:
      return
    if self._closing:
      self._drop(seg)
    else:
      self._free[stream].append(seg)  # deque.append: atomic, safe from a finalizer

  def _drop(self, seg):
    self._segments.pop(seg.path, None)
    seg.unlink()
    seg.close()

  def _arrays(self, stream, value, path) -> tuple:
    """A worker's header -> the batch's arrays (views of the segment, or as sent)."""
    seg = self._segments.get(path) if path else None
    if seg is None:
      return tuple(entry[1] for entry in value)
    return seg.views(value, lambda: self._give_back(stream, path))

  def _died(self, w: _Worker) -> str:
    try:
      code = w.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      code = "unknown (still running)"
    _, sid, step, slot, src, rec = (int(v) for v in self._progress[w.index, :6])
    where = "before its first batch"
    if sid >= 0:
      stream = schema.STREAMS[sid]
      names = self.source_names.get(stream, [])
      name = names[src] if 0 <= src < len(names) else f"#{src}"
      where = (f"while building stream {stream} step {step}: slot {slot}, source {name!r} "
               f"record {rec}")
    return f"input worker {w.index} (pid {w.proc.pid}) exited with code {code} {where}"

  # -- tasks -----------------------------------------------------------------------------------
  def _issue(self, stream, base, step):
    w = min(self._workers, key=lambda x: (x.in_flight, x.index))
    w.in_flight += 1
    seg = self._take(stream)
    try:
      with w.lock:
        _send(w.task_fd, ("batch", self._gen, stream, int(base), int(step),
                          seg.path if seg is not None else ""))
    except OSError:  # the worker is gone: what it last said (EOF on its results) says why
      if self._closing:
        raise PoolStopped("input workers closed") from None
      self._drain(w)
      raise self._error or WorkerError(self._died(w)) from None

  def _drain(self, w: _Worker):
    """Handles what a dead worker wrote before its EOF (a "fatal" message, say)."""
    while not w.eof:
      self._handle(w, self._next_message(w))

  def fetch(self, stream: str, base: int, step: int) -> tuple:
    """`Stream.batch(base, step)` of `stream`, built by a worker; raises WorkerError."""
    with self._cond:
      self._collect(0)  # what is finished: each worker's load is then known when issuing
      if self._error is not None:
        raise self._error
      gen = self._gen
      first = self._next.get((stream, base), 0)
      # Steps [0, first) are issued; keep `ahead` issued beyond this one at every call (a
      # refill only every `ahead` calls left workers idle while the last of them was built).
      last = step + self.ahead
      if last >= first:
        for s in range(first, last + 1):
          self._issue(stream, base, s)
        self._next[(stream, base)] = last + 1
      key = (gen, stream, base, step)
      while key not in self._done:
        if self._error is not None:
          raise self._error
        if self._closing:
          raise PoolStopped("input workers closed")
        if gen != self._gen:
          raise PoolStopped("input workers restarted (data state restored)")
        self._collect(1.0)
      ok, value, path = self._done.pop(key)
    if not ok:
      self._give_back(stream, path)
      raise WorkerError(value)
    return self._arrays(stream, value, path)

  def reset(self):
    """A new generation: in-flight and buffered batches of the old one are dropped."""
    with self._cond:
      self._gen += 1
      self._progress[:, 0] = self._gen
      self._next.clear()
      for (_, stream, _, _), (_, _, path) in self._done.items():
        self._give_back(stream, path)
      self._done.clear()
      self._cond.notify_all()

  def close(self, timeout: float = 5.0):
    """Stops every worker (EOF on its task pipe; terminate, then kill, if it lingers)."""
    with self._cond:
      if self._closing:
        return
      self._closing = True
      self._cond.notify_all()
    for w in self._workers:
      try:
        os.close(w.task_fd)
      except OSError:
        pass
    for w in self._workers:
      try:
        w.proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        w.proc.terminate()
        try:
          w.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
          w.proc.kill()
          w.proc.wait()
    with self._cond:  # a thread reading the results has stopped (EOF) before the files close
      self._cond.wait_for(lambda: not self._reading, timeout=2.0)
    for w in self._workers:
      w.result_file.close()
    self._done.clear()
    for seg in list(self._segments.values()):
      self._drop(seg)  # views handed out stay valid; the names are gone
    shm_ring.unlink_all(self.shm_prefix)
    self._progress = None
    try:
      self._progress_mm.close()
    except BufferError:  # a numpy view still alive somewhere: the OS frees it at exit
      pass
    try:
      os.unlink(self._progress_path)
    except OSError:
      pass

  def __del__(self):
    try:
      self.close(timeout=1.0)
    except Exception:  # pylint: disable=broad-except
      pass


@atexit.register
def close_all():
  for pool in list(_LIVE):
    pool.close()


# ---------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------


def _worker_main(task_fd: int, result_fd: int, progress_path: str, index: int, prefix: str):
  try:
    _serve(task_fd, result_fd, progress_path, index)
  finally:
    # EOF on the tasks: the pool closed, or its process ended (exit, SIGTERM, SIGKILL, crash).
    # The segments are unlinked here as well as in `close()`, so none outlives both sides.
    shm_ring.unlink_all(prefix)


def _serve(task_fd: int, result_fd: int, progress_path: str, index: int):
  import mmap  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it closes us
  tasks = os.fdopen(task_fd, "rb")
  with open(progress_path, "r+b") as f:
    mm = mmap.mmap(f.fileno(), 0)
  progress = np.frombuffer(mm, np.int64).reshape(-1, _PROGRESS)[index]
  try:
    from data_pipelines.streams import Stream  # pylint: disable=import-outside-toplevel
    cfg, tokenizer, process_index, process_count = pickle.loads(_recv(tasks))
    # float32 region features written here: the training process has no cast to do.
    streams = {s: Stream(s, cfg, tokenizer, process_index=process_index,
                         process_count=process_count, probe=False, half_regions=False)
               for s in schema.enabled_streams(cfg)}
  except Exception:  # pylint: disable=broad-except
    _send(result_fd, ("fatal", traceback.format_exc(limit=6)))
    return
  current = {}

  def on_row(slot, source, record):
    progress[3:6] = (slot, source, record)
    current.update(slot=slot, source=source, record=record)

  for st in streams.values():
    st.on_row = on_row
  maps = shm_ring.Mappings()
  while True:
    task = _recv(tasks)
    if task is None:  # the parent closed the pipe or exited
      return
    _, gen, stream, base, step, path = task
    if gen < progress[0]:
      # A stale task of a restored iterator (its result would be dropped): the segment and
      # the in-flight count go back at once.
      msg = ("skip", stream, path)
      try:
        _send(result_fd, msg)
      except (BrokenPipeError, OSError):
        return
      continue
    progress[1:3] = (schema.STREAM_IDS[stream], step)
    current.clear()
    needed = 0
    try:
      arena = shm_ring.Arena(maps.get(path) if path else None)
      arrays = streams[stream].batch(base, step, alloc=arena)
      needed = arena.needed
      msg = ("batch", gen, stream, base, step, True, arena.layout(arrays), path, needed)
      del arrays
    except Exception as e:  # pylint: disable=broad-except
      names = streams[stream].names
      where = ""
      if current:
        name = names[current["source"]] if 0 <= current["source"] < len(names) else "?"
        where = (f": slot {current['slot']}, source {name!r} record {current['record']}")
      text = (f"input worker {index}: stream {stream} step {step}{where}: "
              f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
      msg = ("batch", gen, stream, base, step, False, text, path, needed)
    try:
      _send(result_fd, msg)
    except (BrokenPipeError, OSError):
      return  # the parent is gone


if __name__ == "__main__":
  _worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
  os._exit(0)  # pylint: disable=protected-access  (no interpreter teardown of library threads)
