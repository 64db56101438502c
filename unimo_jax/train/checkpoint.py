"""Checkpoints: orbax CheckpointManager for the train state, data position and config.

Layout of a workdir::

  WORKDIR/checkpoints/<step>/state/    the TrainState (sharded arrays, OCDBT)
  WORKDIR/checkpoints/<step>/data/     the input pipeline's position of every process (JSON)
  WORKDIR/checkpoints/<step>/config/   the run's config (JSON)

- Saves are asynchronous: the arrays are copied to host memory at the step boundary and written
  by a background thread while training continues. A save counts as done only when orbax has
  committed it (the step directory renamed into place): ``poll()`` (non-blocking), the next
  ``save()`` and ``close()`` check the outcome, log "checkpoint saved at step N" and raise
  ``CheckpointError`` (one line: the path and the error) if the write failed. After a failure
  orbax's signalling threads, which would otherwise wait minutes for a signal that never comes
  and hold up interpreter exit, are released.
- Retention: the newest ``keep`` checkpoints plus every checkpoint whose step is a multiple of
  ``keep_period`` (long-term history) are kept; the rest are deleted.
- Restore takes an abstract state (``jax.ShapeDtypeStruct`` leaves carrying the CURRENT mesh's
  shardings), so a checkpoint written on one mesh shape restores onto another.
- Restore walks back: when the latest checkpoint cannot be restored (missing or truncated files,
  a metadata mismatch, no data position) one warning names it and the reason and the newest one
  that restores is used; an explicitly requested step that fails raises ``CheckpointError``.
  Damaged checkpoints are never deleted: when training resumes past one, it is renamed
  ``<step>.damaged`` (orbax ignores the name), so it neither counts towards retention (which
  would delete intact ones) nor blocks the new save of that step. ``restore_params``
  (evaluation) only reads.
- ``restore_params`` reads only the parameters (evaluation, fine-tuning), onto any shardings or
  as host numpy arrays, without knowing the optimizer that wrote them. Parameters written before
  the encoder was scanned (``encoder/layer_0 .. layer_{n-1}``) are stacked into the scanned
  layout (``encoder/layers``) on the way; a full train-state restore (resuming) needs the
  scanned layout.
- ``StopSignal`` turns SIGTERM (preemption) and SIGINT into a request that the loop serves at the
  next step boundary by saving and exiting cleanly; all processes agree on the request.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from unimo_jax.model.layers import LAYERS, to_scanned_layout
from unimo_jax.train.checkpoint_failures import (CheckpointError, quiet_orbax_tracebacks,
                                                 reason as _reason, release_orbax_threads)

CHECKPOINT_DIR = "checkpoints"


def _all_processes(ok: bool) -> bool:
  """True when ``ok`` on every process (processes must agree on which checkpoint they use)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
  return bool(np.asarray(flags).all())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able ``obj``, in process order (one collective when multi-process)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [json.loads(bytes(r[:n]).decode("utf-8")) for r, n in zip(rows, sizes)]


_gather_json = gather_json  # the former private name


# Keys of a data state that are this process's own bookkeeping, not its position (the
# pipeline's per-process counts of dropped records).
PER_PROCESS_KEYS = ("dropped",)


def _position(state: Any) -> Any:
  if isinstance(state, Mapping):
    return {k: v for k, v in state.items() if k not in PER_PROCESS_KEYS}
  return state


def select_data_state(saved: Mapping[str, Any] | None) -> Any:
  """This process's data position from a saved ``{"process_count", "states"}`` record.

  With the same process count each process takes its own entry. With a different count the
  positions can only be reused when they are identical (a pipeline whose position is global,
  e.g. index-based); per-process bookkeeping (``PER_PROCESS_KEYS``) is then dropped and starts
  over. Different positions would silently read the wrong shards, so that raises.
  """
  if not saved:
    return None
  states = saved["states"]
  if saved["process_count"] == jax.process_count():
    return states[jax.process_index()]
  if all(_position(s) == _position(states[0]) for s in states):
    return _position(states[0])
  raise ValueError(
      f"checkpoint data position was saved by {saved['process_count']} processes with different "
      f"per-process states; it cannot be resumed on {jax.process_count()} processes")


# Replicated arrays larger than this are written cooperatively by their replicas (orbax's
# replica-parallel saving). Smaller ones are written whole by one replica: splitting them costs
# an eagerly compiled slice per shape on the first save (11 s for a tiny model's 140 arrays on 8
# CPU devices) and saves nothing.
MIN_REPLICA_PARALLEL_BYTES = 16 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """Saves and restores train states under ``WORKDIR/checkpoints``.

  Args:
    workdir: the run's directory.
    keep: newest checkpoints to keep (None keeps all).
    keep_period: also keep every checkpoint whose step is a multiple of this (None: none).
    async_save: write in a background thread.
  """

  def __init__(self, workdir: str, *, keep: int | None = 3, keep_period: int | None = None,
               async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None, create=True,
        enable_async_checkpointing=async_save, save_interval_steps=1)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handler = _state_handler()
    registry.add("state", ocp.args.PyTreeSave, handler)
    registry.add("state", ocp.args.PyTreeRestore, handler)
    for item in ("data", "config"):
      json_handler = ocp.JsonCheckpointHandler()
      registry.add(item, ocp.args.JsonSave, json_handler)
      registry.add(item, ocp.args.JsonRestore, json_handler)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    self._async = async_save
    self._pending: int | None = None   # the step whose write is in flight
    self._failed = False
    quiet_orbax_tracebacks()

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ------------------------------------------------------------------ save
  def save(self, step: int, state: Any, *, data_state: Any = None,
           config: Mapping[str, Any] | None = None) -> bool:
    """Starts saving ``state`` at ``step`` (returns once the arrays are copied off device).

    The previous save's outcome is checked first. "checkpoint saved at step N" is logged when
    the write is committed (``poll``, the next ``save``, ``wait`` or ``close``).

    Args:
      step: the update count the state corresponds to.
      state: the TrainState (sharded arrays).
      data_state: this process's JSON-able input position; every process's is stored.
      config: the run's config as a JSON-able dict.

    Returns:
      True if a save was started (False if ``step`` is already saved).

    Raises:
      CheckpointError: this or the previous save failed.
    """
    self._finish()
    if step in self._manager.all_steps():
      return False
    data = {"process_count": jax.process_count(), "states": gather_json(data_state)}
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data),
                              config=ocp.args.JsonSave(dict(config or {})))
    try:
      saved = self._manager.save(int(step), args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      raise CheckpointError(f"checkpoint at step {step} could not be saved to "
                            f"{self._path(step)}: {_reason(e)}") from e
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
      self._pending = int(step)
      if not self._async:
        self._finish()
    return bool(saved)

  def _set_aside(self, step: int, reason: str) -> None:
    """Renames a damaged checkpoint to ``<step>.damaged`` (kept, never deleted): it no longer
    counts towards retention (which would delete intact ones) nor blocks a new save."""
    path, n = self._path(step) + ".damaged", 1
    while os.path.exists(path):
      n += 1
      path = f"{self._path(step)}.damaged-{n}"
    if jax.process_index() == 0:
      os.rename(self._path(step), path)
      logging.info("checkpoint: kept the damaged step %d as %s (%s)", step, path, reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"unimo_jax_set_aside_{step}")
    self._manager.reload()

  def _finish(self) -> None:
    """Waits for the save in flight; logs it as saved, or raises ``CheckpointError``."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      raise CheckpointError(f"checkpoint at step {step} could not be saved to "
                            f"{self._path(step)}: {_reason(e)}") from e
    if jax.process_index() == 0 and not os.path.isdir(self._path(step)):
      self._failed = True
      raise CheckpointError(f"checkpoint at step {step} could not be saved to "
                            f"{self._path(step)}: the write was not committed")
    logging.info("checkpoint saved at step %d", step)

  def poll(self) -> None:
    """Reports the save in flight if it has finished (never blocks on a running write)."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish()

  def wait(self) -> None:
    """Blocks until the pending save is committed (raises ``CheckpointError`` if it failed)."""
    self._finish()

  def close(self) -> None:
    """Waits for the pending save and closes; raises ``CheckpointError`` if it failed."""
    try:
      self._finish()
    finally:
      self._shutdown()

  def abort(self) -> None:
    """Closes on an error path: the pending save's outcome is logged, never raised."""
    try:
      self._finish()
    except CheckpointError as e:
      logging.error("%s", e)
    finally:
      self._shutdown()

  def _shutdown(self) -> None:
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except  (already reported as CheckpointError)
      if not self._failed:
        self._failed = True
        raise CheckpointError(f"closing the checkpoints in {self.directory}: {_reason(e)}"
                              ) from e
    finally:
      if self._failed:
        release_orbax_threads()

  # ------------------------------------------------------------------ restore
  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any, dict]:
    """Restores the state onto the shardings carried by ``abstract_state``.

    Args:
      abstract_state: the state's tree with ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``
        leaves for the current mesh (``state.state_shardings``).
      step: which checkpoint (default: the newest one that restores, see the module doc).

    Returns:
      ``(state, data_state, config)``: the data position for this process (see
      ``select_data_state``) and the saved config dict.

    Raises:
      FileNotFoundError: there is no checkpoint. CheckpointError: ``step`` (or, by default,
      every checkpoint) cannot be restored.
    """
    damaged: dict[int, str] = {}
    out, step = _walk_back(self.directory, step,
                           lambda path: self._restore_step(abstract_state, int(
                               os.path.basename(path))), damaged)
    for bad, reason in sorted(damaged.items()):
      self._set_aside(bad, reason)
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return out

  def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, Any, dict]:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(abstract_state,
                                                           restore_args=restore_args),
                              data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    restored = self._manager.restore(int(step), args=args)
    data = restored.data
    if not isinstance(data, Mapping) or "states" not in data or "process_count" not in data:
      raise ValueError(f"no data position in {self._path(step)}/data")
    return restored.state, select_data_state(data), dict(restored.config or {})


def _steps(workdir_or_checkpoints: str) -> tuple[str, list[int]]:
  """(checkpoint folder, its finished steps ascending); in-flight ``N.orbax-checkpoint-tmp``
  and set-aside ``N.damaged`` folders are not steps."""
  directory = os.path.abspath(workdir_or_checkpoints)
  if os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
    directory = os.path.join(directory, CHECKPOINT_DIR)
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
      directory) else []
  return directory, steps


def _step_dir(workdir_or_checkpoints: str, step: int | None) -> tuple[str, int]:
  directory, steps = _steps(workdir_or_checkpoints)
  if step is None:
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory} (have {steps})")
  return os.path.join(directory, str(step)), step


def _walk_back(workdir: str, step: int | None, read: Callable[[str], Any],
               damaged: dict[int, str] | None = None) -> tuple[Any, int]:
  """``(read(step_path), step)`` for ``step``, or by default for the newest step that reads.

  A requested step that fails raises ``CheckpointError``; by default each failing step is
  named in one warning (and recorded in ``damaged``) and the one before it is tried. Every
  process must succeed on the same step."""
  directory, steps = _steps(workdir)
  if step is not None:
    path, step = _step_dir(workdir, step)
    try:
      out, error = read(path), None
    except Exception as e:  # pylint: disable=broad-except
      out, error = None, _reason(e)
    if not _all_processes(error is None):
      raise CheckpointError(f"checkpoint {path} cannot be restored: "
                            f"{error or 'failed on another process'}")
    return out, step
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  failures = []
  for s in reversed(steps):
    path = os.path.join(directory, str(s))
    try:
      out, error = read(path), None
    except Exception as e:  # pylint: disable=broad-except
      out, error = None, _reason(e)
    if _all_processes(error is None):
      return out, s
    error = error or "failed on another process"
    failures.append(f"step {s}: {error}")
    if damaged is not None:
      damaged[s] = error
    logging.warning("checkpoint %s cannot be restored (%s); trying the one before it (the "
                    "damaged one is kept)", path, error)
  raise CheckpointError(f"no checkpoint in {directory} can be restored: " + "; ".join(failures))


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step under ``workdir`` (None if there is none)."""
  try:
    return _step_dir(workdir, None)[1]
  except FileNotFoundError:
    return None


def read_config(workdir: str, step: int | None = None) -> dict:
  """The config dict saved with a checkpoint (default: the newest readable one)."""
  def read(path):
    with open(os.path.join(path, "config", "metadata")) as f:
      return json.load(f)
  return _walk_back(workdir, step, read)[0]


_HOST = object()  # _read_params: host numpy arrays in the checkpoint's own layout


def _unscanned(params_meta: Any) -> bool:
  """Whether a checkpoint's parameters hold the encoder as ``layer_0 .. layer_{n-1}`` (written
  before the encoder was one scanned stack)."""
  model = params_meta.get("model") if isinstance(params_meta, Mapping) else None
  encoder = model.get("encoder") if isinstance(model, Mapping) else None
  return (isinstance(encoder, Mapping) and LAYERS not in encoder
          and any(str(k).startswith("layer_") for k in encoder))


def _read_params(path: str, shardings: Any) -> Any:
  state_path = os.path.join(path, "state")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_path).item_metadata
  if metadata is None:
    raise ValueError(f"no readable metadata in {state_path}")
  params_meta = metadata.tree["params"]

  if _unscanned(params_meta) and shardings is not _HOST:
    # read on the host, stack the layers into the scanned layout, then place on `shardings`
    params = _read_params(path, _HOST)
    params["model"]["encoder"] = to_scanned_layout(params["model"]["encoder"])
    if shardings is None:
      return params
    if isinstance(shardings, jax.sharding.Sharding):
      return jax.device_put(params, shardings)
    return jax.tree.map(jax.device_put, params, shardings)

  if shardings is None or shardings is _HOST:
    abstract = jax.tree.map(lambda m: np.empty(0, m.dtype), params_meta)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
  else:
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, params_meta)
    abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                            params_meta, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  restored = checkpointer.restore(
      state_path, args=ocp.args.PyTreeRestore(item={"params": abstract},
                                              restore_args={"params": restore_args},
                                              partial_restore=True))
  return restored["params"]


def restore_params(workdir: str, step: int | None = None, shardings: Any = None
                   ) -> tuple[Any, int]:
  """Restores only the parameters of a checkpoint, without its optimizer state.

  Args:
    workdir: a workdir or its ``checkpoints`` folder.
    step: which checkpoint (default: the newest one that restores; a damaged newer one is named
      in a warning and skipped).
    shardings: None (host numpy arrays), one ``jax.sharding.Sharding`` for every leaf (e.g.
      replicated on the evaluation mesh), or a tree of shardings shaped like the parameters.

  Returns:
    ``(params, step)``.

  Raises:
    FileNotFoundError: no such checkpoint. CheckpointError: ``step`` (or, by default, every
    checkpoint) cannot be restored.
  """
  return _walk_back(workdir, step, lambda path: _read_params(path, shardings))


class StopSignal:
  """Turns SIGTERM / SIGINT into a stop request served at the next step boundary.

  A second SIGINT restores Python's default behaviour (KeyboardInterrupt) so an impatient user
  can still interrupt at once. Handlers are only installed from the main thread (Python's rule);
  elsewhere the object still works through ``request()``.

  Use as a context manager around the loop; ``should_stop()`` is called once per step by every
  process, and returns True everywhere as soon as any process received a signal.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._received: int | None = None

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self._received is not None and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self._received = signum
    logging.warning("received %s: saving a checkpoint at the next step boundary",
                    signal.Signals(signum).name)

  def request(self, signum: int = signal.SIGTERM) -> None:
    """Requests a stop as if ``signum`` had been received."""
    self._received = signum

  @property
  def received(self) -> int | None:
    return self._received

  def should_stop(self) -> bool:
    """True (on every process) once any process has received a signal."""
    local = self._received is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.array([int(local)], np.int32))
    return bool(np.asarray(flags).any())
