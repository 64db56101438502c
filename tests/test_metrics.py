"""Metric writers: TensorBoard event framing, JSONL, averaging, progress bar; no TensorFlow."""
import io
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from tensorboard.compat.proto import event_pb2

from unimo_jax.train import metrics as metrics_lib


def _crc32c(data: bytes) -> int:
  """Bitwise CRC-32C (Castagnoli), written from the definition."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
  """TFRecord reader checking both CRCs of every record."""
  events = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert hcrc == _masked(_crc32c(header))
    payload = data[pos + 12:pos + 12 + length]
    (dcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert dcrc == _masked(_crc32c(payload))
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  return events


def test_tensorboard_events_are_valid_records(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
  w.write_scalars(10, {"loss": 2.5, "lr": 1e-4, "bad": float("nan")})
  w.write_scalars(20, {"loss": 1.5})
  w.write_text(0, "config", "model: tiny")
  w.close()
  (name,) = os.listdir(tmp_path / "tensorboard")
  events = _read_events(tmp_path / "tensorboard" / name)
  assert events[0].file_version == "brain.Event:2"
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value
             if v.HasField("simple_value")]
  assert (10, "loss", 2.5) in scalars and (20, "loss", 1.5) in scalars
  assert not any(tag == "bad" for _, tag, _ in scalars)  # non-finite values are left out
  texts = [v.tensor.string_val[0] for e in events for v in e.summary.value
           if v.metadata.plugin_data.plugin_name == "text"]
  assert texts == [b"model: tiny"]
  rows = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [10, 20]
  assert rows[0]["loss"] == 2.5 and rows[0]["bad"] is None


def test_jsonl_appends_across_writers(tmp_path):
  for step in (1, 2):
    w = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
    w.write_scalars(step, {"x": step})
    w.close()
  assert [r["x"] for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), enabled=False)
  w.write_scalars(1, {"x": 1.0})
  w.close()
  assert os.listdir(tmp_path) == []


def test_mean_accumulator_ignores_nan():
  acc = metrics_lib.MeanAccumulator()
  acc.add({"a": jnp.float32(1.0), "b": jnp.float32(float("nan"))})
  acc.add({"a": jnp.float32(3.0), "b": jnp.float32(4.0)})
  acc.add({"a": jnp.float32(5.0), "b": jnp.float32(float("nan")), "c": np.float32(float("nan"))})
  out = acc.result()
  assert out["a"] == 3.0 and out["b"] == 4.0 and np.isnan(out["c"])
  assert len(acc) == 0 and acc.result() == {}


def test_mean_accumulator_matches_numpy_and_watches_a_threshold():
  rng = np.random.default_rng(0)
  vals = rng.normal(size=(7, 3)).astype(np.float32)
  vals[[1, 4], 2] = np.nan
  streak = np.array([0, 1, 2, 3, 0, 1, 4], np.int32)
  acc = metrics_lib.MeanAccumulator(watch=("streak", 3))
  for row, s in zip(vals, streak):
    acc.add({"x": jnp.asarray(row[0]), "y": jnp.asarray(row[1]), "z": jnp.asarray(row[2]),
             "streak": jnp.asarray(s)})
  assert len(acc) == 7 and acc.first_reached() == 4  # streak reached 3 at the 4th step
  out, first = acc.fetch()
  np.testing.assert_allclose([out["x"], out["y"], out["z"]], np.nanmean(vals, axis=0),
                             rtol=1e-6)
  assert first == 4 and out["streak"] == streak.mean()
  acc.add({"x": jnp.float32(1.0), "y": jnp.float32(1.0), "z": jnp.float32(1.0),
           "streak": jnp.int32(2)})
  assert acc.fetch() == ({"streak": 2.0, "x": 1.0, "y": 1.0, "z": 1.0}, None)


def test_resumed_writer_cuts_the_jsonl_back(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3, 4):
    w.write_scalars(step, {"x": float(step)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "x": ')  # a row torn by a kill
  w = metrics_lib.MetricWriter(str(tmp_path), enabled=True, resume_step=2)
  w.write_scalars(3, {"x": 30.0})
  w.close()
  rows = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  # Two event files (the first is not overwritten); the resumed one starts with TensorBoard's
  # purge marker at its first step (TensorBoard then keeps the earlier file's steps 1 and 2).
  files = [_read_events(tmp_path / "tensorboard" / n) for n in
           sorted(os.listdir(tmp_path / "tensorboard"))]
  assert len(files) == 2
  first, resumed = sorted(files, key=lambda ev: any(e.HasField("session_log") for e in ev))
  assert [e.step for e in first if e.summary.value] == [1, 2, 3, 4]
  assert resumed[1].step == 3 and resumed[1].session_log.status == event_pb2.SessionLog.START
  assert [e.step for e in resumed if e.summary.value] == [3]
  # TensorBoard's own reader shows each step once, the resumed run's value for step 3.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


class _Tty(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_draws_on_tty_only():
  stream = _Tty()
  bar = metrics_lib.ProgressBar(total=100, initial=0, stream=stream, min_interval=0.0)
  bar.update(50, "loss=1.0")
  bar.close()
  out = stream.getvalue()
  assert " 50%|" in out and "50/100" in out  # tqdm's bar
  assert "ETA" in out and "steps/s" in out and "loss=1.0" in out and out.endswith("\n")
  plain = io.StringIO()
  bar = metrics_lib.ProgressBar(total=100, stream=plain)
  bar.update(50)
  bar.close()
  assert plain.getvalue() == ""


def test_format_metrics():
  assert metrics_lib.format_metrics({"b": 2.0, "a": 0.123456}) == "a=0.1235 b=2"
  assert metrics_lib.format_metrics({"b": 2.0, "a": 1.0}, keys=["b"]) == "b=2"


def test_train_package_does_not_import_tensorflow():
  code = ("import sys\n"
          "import unimo_jax.train.metrics, unimo_jax.train.checkpoint, unimo_jax.train.state, "
          "unimo_jax.train.optimizer, unimo_jax.train.flops, unimo_jax.parallel\n"
          "import tempfile\n"
          "from unimo_jax.train import metrics\n"
          "w = metrics.MetricWriter(tempfile.mkdtemp(), enabled=True)\n"
          "w.write_scalars(1, {'x': 1.0}); w.write_text(1, 't', 'x'); w.close()\n"
          "bad = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))\n"
          "assert not bad, bad[:5]\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-2000:]
