"""Training metrics: TensorBoard event files, a JSONL log, and console progress.

TensorBoard events are written with the protobufs and record writer of the ``tensorboard``
package, with plain Python files: ``flax.metrics.tensorboard`` and tensorboard's own
``EventFileWriter`` import TensorFlow, which ``unimo_jax`` never does.

Only process 0 writes files. Metrics arrive as device scalars every step; ``MeanAccumulator``
sums them on device and fetches them once per logging window, so logging never blocks the
step pipeline between log points. A resumed run first cuts ``metrics.jsonl`` back to the
restored step, so the steps it trains again are not listed twice.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Any, Mapping, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


class TensorBoardWriter:
  """Writes scalar summaries to ``logdir/events.out.tfevents.*`` (TFRecord framing).

  Args:
    logdir: directory of the event file (created).
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path, n = os.path.join(logdir, name), 0
    while os.path.exists(self.path):  # a second writer of this process within the second
      n += 1
      self.path = os.path.join(logdir, f"{name}.{n}")
    self._file = open(self.path, "wb")
    self._writer = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    self._writer.write(event.SerializeToString())

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def text(self, step: int, tag: str, text: str) -> None:
    """A text summary (TensorBoard's Text tab), e.g. the run's config."""
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                    string_val=[text.encode("utf-8")])
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata,
                                                                   tensor=tensor)])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def restart(self, step: int) -> None:
    """Marks a run that resumes after ``step``: TensorBoard drops the earlier events of steps
    after it (its purge of orphaned data: a ``SessionLog.START`` at step s keeps the steps
    before s), as ``metrics.jsonl`` does."""
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step) + 1,
                                session_log=event_pb2.SessionLog(
                                    status=event_pb2.SessionLog.START)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    if not self._writer.closed:
      self._writer.flush()
      self._writer.close()


class JsonlWriter:
  """Appends one JSON object per logging step: ``{"step": s, "time": t, <metric>: value}``.

  Appending keeps the history of a resumed run in one file. With ``resume_step`` the file is
  first cut back to the rows of steps ``<= resume_step`` (the rows a restored checkpoint
  covers; the resumed run writes the later steps again), dropping any torn last line.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    if resume_step is not None and os.path.exists(path):
      truncate_jsonl(path, resume_step)
    self._file = open(path, "a")

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    row = {"step": int(step), "time": time.time()}
    for k, v in values.items():
      v = float(v) if isinstance(v, (int, float, np.number, np.ndarray)) else v
      row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str, last_step: int) -> int:
  """Keeps the rows of ``path`` with ``step <= last_step`` (and drops unreadable lines, e.g. a
  row torn by a kill); rewrites the file atomically. Returns the number of rows dropped."""
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        keep = int(row["step"]) <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    logging.info("%s: dropped %d rows after step %d (the run resumes from there)", path,
                 dropped, last_step)
  return dropped


class MeanAccumulator:
  """Averages per-step metric dicts over a logging window, on device.

  ``add`` folds one step's device scalars into running sums and counts with one jitted call
  (no device-to-host transfer: the step pipeline keeps running); ``result`` / ``fetch``
  transfer the window once. NaN entries are ignored (an objective that did not run this step
  reports NaN), so a metric's mean is over the steps where it ran; a window where a metric
  never ran gives NaN.

  Args:
    watch: optional ``(key, threshold)``: the accumulator also records the first step of the
      window (1-based) at which ``metrics[key] >= threshold`` (the non-finite guard's streak).
  """

  def __init__(self, watch: tuple[str, float] | None = None):
    self._watch = watch
    self._acc = None  # (sums, counts, steps, first_reached) device arrays
    self._fold = jax.jit(self._fold_fn, donate_argnums=0)

  def _fold_fn(self, acc, metrics):
    sums, counts, n, first = acc
    vals = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    ok = {k: ~jnp.isnan(v) for k, v in vals.items()}
    sums = {k: sums[k] + jnp.where(ok[k], vals[k], 0.0) for k in sums}
    counts = {k: counts[k] + ok[k].astype(jnp.int32) for k in counts}
    n = n + 1
    if self._watch is not None:
      key, threshold = self._watch
      reached = (vals[key] >= threshold) if key in vals else jnp.bool_(False)
      first = jnp.where((first == 0) & reached, n, first)
    return sums, counts, n, first

  def add(self, metrics: Mapping[str, Any]) -> None:
    metrics = dict(metrics)
    if self._acc is None:
      zeros = {k: jnp.zeros((), jnp.float32) for k in metrics}
      self._acc = (zeros, {k: jnp.zeros((), jnp.int32) for k in metrics},
                   jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    sums, counts, n, first = self._acc
    if set(metrics) != set(sums):  # a new key joins with zero counts, a missing one is NaN
      for k in set(metrics) - set(sums):
        sums, counts = dict(sums, **{k: jnp.zeros((), jnp.float32)}), dict(
            counts, **{k: jnp.zeros((), jnp.int32)})
      metrics.update({k: jnp.float32(float("nan")) for k in set(sums) - set(metrics)})
    self._acc = self._fold((sums, counts, n, first), metrics)

  def __len__(self) -> int:
    return 0 if self._acc is None else int(self._acc[2])

  def first_reached(self) -> int | None:
    """The window's first step (1-based) where the watched key reached its threshold, or None.

    Transfers one scalar (a host sync): for checks at log and save steps only."""
    if self._acc is None or self._watch is None:
      return None
    return int(self._acc[3]) or None

  def fetch(self) -> tuple[dict[str, float], int | None]:
    """(window means, ``first_reached``), in one transfer; starts a new window."""
    if self._acc is None:
      return {}, None
    sums, counts, _, first = jax.device_get(self._acc)
    self._acc = None
    out = {k: float(sums[k]) / int(counts[k]) if int(counts[k]) else float("nan")
           for k in sorted(sums)}
    return out, (int(first) or None) if self._watch is not None else None

  def result(self) -> dict[str, float]:
    return self.fetch()[0]


class ProgressBar:
  """The console progress bar (tqdm): steps done of the run's total, elapsed time, ETA, steps/s
  and the caller's metrics line (the main losses) after them; drawn only on a terminal.

  Args:
    total: the last step of the run.
    initial: the step the run starts (or resumes) from; the rate counts the steps of this run.
    stream: where to draw (default stderr); drawing is on only if it is a TTY (or ``force``).
    force: True / False overrides the TTY test (``train.progress_bar`` on / off).
    min_interval: seconds between redraws.
  """

  BAR_FORMAT = ("{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}, ETA {remaining}, {rate_fmt}{postfix}]")

  def __init__(self, total: int, initial: int = 0, stream: TextIO | None = None,
               force: bool | None = None, min_interval: float = 0.2):
    self.total, self.initial = int(total), int(initial)
    self.stream = stream or sys.stderr
    isatty = getattr(self.stream, "isatty", lambda: False)()
    self.enabled = isatty if force is None else bool(force)
    self._bar = None
    self._redirect = None
    self._isatty = isatty
    if self.enabled:
      import tqdm  # pylint: disable=import-outside-toplevel
      from tqdm.contrib import logging as tqdm_logging  # pylint: disable=import-outside-toplevel
      # dynamic_ncols: the line is fitted to the terminal (a long metrics line is cut, never
      # wrapped); smoothing: the rate and ETA follow recent steps (compilation is excluded
      # since the bar starts after it).
      # a terminal that reports no size (a bare pty) gets 120 columns
      dynamic = self._width() > 0
      self._bar = tqdm.tqdm(total=self.total, initial=self.initial, file=self.stream,
                            unit=" steps", mininterval=min_interval, smoothing=0.1,
                            dynamic_ncols=dynamic, ncols=None if dynamic else 120,
                            nrows=None if dynamic else 24,  # tqdm hides its bar at 0 rows
                            bar_format=self.BAR_FORMAT, leave=True)
      # log lines (checkpoints, evaluations) are printed above the bar, not into it
      self._redirect = tqdm_logging.logging_redirect_tqdm()
      self._redirect.__enter__()

  def _width(self) -> int:
    """The terminal's columns (0 when not a terminal or it reports no size)."""
    if not self._isatty:
      return 0
    try:
      return os.get_terminal_size(self.stream.fileno()).columns
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
      return 0

  def _fit(self, info: str) -> str:
    """``info`` cut at a metric boundary so that the bar itself keeps about 20 columns."""
    width = self._width() or 120
    room = max(20, width - 20 - 52)  # 52: percentage, counts, times and rate
    if len(info) <= room:
      return info
    parts, out = info.split(" "), ""
    for part in parts:
      if len(out) + len(part) + 1 > room:
        break
      out = f"{out} {part}".strip()
    return out

  def update(self, step: int, info: str = "", force: bool = False) -> None:
    """Moves the bar to ``step``; ``info`` (e.g. ``loss=2.31 pair_cmcl/loss_i2t=1.9``) replaces
    the metrics shown after the rate; ``force`` redraws now."""
    if self._bar is None:
      return
    if info:
      self._bar.set_postfix_str(self._fit(info), refresh=False)
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)
    if force:
      self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
      self._redirect.__exit__(None, None, None)


class MetricWriter:
  """TensorBoard + JSONL under a workdir, written by process 0 only.

  Files: ``WORKDIR/tensorboard/events.out.tfevents.*`` and ``WORKDIR/metrics.jsonl``.
  ``resume_step``: the step the run starts from; ``metrics.jsonl`` keeps only the rows up to it
  and TensorBoard is told to drop the earlier events of later steps.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.logdir = os.path.join(workdir, "tensorboard")
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = TensorBoardWriter(self.logdir) if self.enabled else None
    self._jsonl = JsonlWriter(self.jsonl_path, resume_step) if self.enabled else None
    if self.enabled and resume_step:
      self._tb.restart(resume_step)

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(float(v))}
    self._tb.scalars(step, finite)
    self._tb.flush()
    self._jsonl.write(step, values)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.text(step, tag, text)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def format_metrics(values: Mapping[str, float], keys: list[str] | None = None,
                   max_items: int = 12) -> str:
  """``k=v`` pairs for a log line, in ``keys`` order (default: sorted), 4 significant digits."""
  keys = keys if keys is not None else sorted(values)
  parts = []
  for k in keys:
    if k in values and len(parts) < max_items:
      v = values[k]
      parts.append(f"{k}={v:.4g}" if isinstance(v, (float, int)) else f"{k}={v}")
  return " ".join(parts)
