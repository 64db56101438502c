"""Training metrics: TensorBoard event files, a JSONL log, and console progress.

TensorBoard events are written with the protobufs and record writer of the ``tensorboard``
package, with plain Python files: ``flax.metrics.tensorboard`` and tensorboard's own
``EventFileWriter`` import TensorFlow, which ``unimo_jax`` never does.

Only process 0 writes files. Metrics arrive as device scalars every step; ``MeanAccumulator``
keeps them on device and fetches them once per logging window, so logging never blocks the
step pipeline between log points.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from typing import Any, Mapping, TextIO

import jax
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
    self.path = os.path.join(logdir, name)
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

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    if not self._writer.closed:
      self._writer.flush()
      self._writer.close()


class JsonlWriter:
  """Appends one JSON object per logging step: ``{"step": s, "time": t, <metric>: value}``.

  Appending (not truncating) keeps the history of a resumed run in one file.
  """

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
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


class MeanAccumulator:
  """Averages per-step metric dicts over a logging window.

  Values stay device arrays until ``result()``, which fetches them all at once. NaN entries are
  ignored (an objective that did not run this step reports NaN), so a metric's mean is over the
  steps where it ran; a window where a metric never ran gives NaN.
  """

  def __init__(self):
    self._steps: list[Mapping[str, Any]] = []

  def add(self, metrics: Mapping[str, Any]) -> None:
    self._steps.append(metrics)

  def __len__(self) -> int:
    return len(self._steps)

  def result(self) -> dict[str, float]:
    if not self._steps:
      return {}
    fetched = jax.device_get(self._steps)
    self._steps = []
    keys = sorted({k for m in fetched for k in m})
    out = {}
    for k in keys:
      vals = np.array([float(np.asarray(m[k])) for m in fetched if k in m], np.float64)
      finite = vals[~np.isnan(vals)]
      out[k] = float(finite.mean()) if finite.size else float("nan")
    return out


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class ProgressBar:
  """A one-line progress bar with rate and ETA on a terminal; silent otherwise.

  Args:
    total: the last step of the run.
    initial: the step the run starts (or resumes) from.
    stream: where to draw (default stderr); drawing is on only if it is a TTY (or ``force``).
    min_interval: seconds between redraws.
  """

  def __init__(self, total: int, initial: int = 0, stream: TextIO | None = None,
               force: bool | None = None, min_interval: float = 0.2, width: int = 24):
    self.total, self.initial = int(total), int(initial)
    self.stream = stream or sys.stderr
    isatty = getattr(self.stream, "isatty", lambda: False)()
    self.enabled = isatty if force is None else force
    self.min_interval, self.width = min_interval, width
    self._start = time.time()
    self._last_draw = 0.0
    self._last_len = 0

  def line(self, step: int, info: str = "") -> str:
    done = step - self.initial
    elapsed = time.time() - self._start
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    frac = min(1.0, step / self.total) if self.total else 1.0
    filled = int(round(frac * self.width))
    bar = "#" * filled + "." * (self.width - filled)
    rate_s = f"{rate:.2f} it/s" if rate == rate else "- it/s"
    text = (f"[{bar}] {step}/{self.total} {100 * frac:3.0f}% {rate_s} "
            f"elapsed {_format_duration(elapsed)} ETA {_format_duration(eta)}")
    return f"{text} {info}".rstrip()

  def update(self, step: int, info: str = "", force: bool = False) -> None:
    if not self.enabled:
      return
    now = time.time()
    if not force and now - self._last_draw < self.min_interval and step < self.total:
      return
    self._last_draw = now
    text = self.line(step, info)
    pad = max(0, self._last_len - len(text))
    self.stream.write("\r" + text + " " * pad)
    self.stream.flush()
    self._last_len = len(text)

  def close(self) -> None:
    if self.enabled and self._last_len:
      self.stream.write("\n")
      self.stream.flush()
      self._last_len = 0


class MetricWriter:
  """TensorBoard + JSONL under a workdir, written by process 0 only.

  Files: ``WORKDIR/tensorboard/events.out.tfevents.*`` and ``WORKDIR/metrics.jsonl``.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.logdir = os.path.join(workdir, "tensorboard")
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = TensorBoardWriter(self.logdir) if self.enabled else None
    self._jsonl = JsonlWriter(self.jsonl_path) if self.enabled else None

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
