"""The training loop: exact resume, stop signals, the non-finite guard, metrics files.

Every test here runs the same tiny text-only program (one compile, then persistent-cache hits).
"""
import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

import train_util as tu
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import metrics as metrics_lib
from unimo_jax.train import trainer


def text_config():
  c = tu.run_config(dropout=0.1)  # dropout on: resume must also replay the dropout masks
  c.data.streams.image.batch_size = 0
  c.data.streams.pair.batch_size = 0
  c.objectives.text_mode = "mlm"
  # One schedule for every test: total_steps is part of the compiled program, so equal values
  # let every run reuse one compilation (runs are cut short with max_steps).
  c.train.total_steps = 12
  c.train.log_every = 1
  c.train.checkpoint_every = 0
  c.train.progress_bar = "off"
  c.optimizer.warmup_steps = 2
  c.optimizer.schedule = "linear"
  return c


def losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows}


def host_params(workdir, step=None):
  params, _ = ckpt_lib.restore_params(workdir, step)
  return jax.tree_util.tree_leaves_with_path(params)


def test_resume_is_exact(tmp_path):
  c = text_config()
  straight = str(tmp_path / "straight")
  r = trainer.train(c, straight, data=tu.batches(c), max_steps=6)
  assert (r.first_step, r.last_step, r.stopped_by) == (0, 6, "max_steps")

  split = str(tmp_path / "split")
  r1 = trainer.train(c, split, data=tu.batches(c), max_steps=3)
  assert (r1.last_step, r1.stopped_by, r1.checkpoint_step) == (3, "max_steps", 3)
  # A new iterator at position 0: the checkpoint's data state moves it to batch 3.
  r2 = trainer.train(c, split, data=tu.batches(c), max_steps=3)
  assert (r2.first_step, r2.last_step) == (3, 6)

  assert losses(straight) == losses(split)
  assert sorted(losses(split)) == [1, 2, 3, 4, 5, 6]
  a, b = host_params(straight), host_params(split)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  # Training changed the parameters (the comparison is not trivially true).
  assert any(not np.array_equal(x, y) for (_, x), (_, y) in zip(
      host_params(split, 3), host_params(split, 6)))


class SignalAt:
  """Wraps a batch iterator and sends this process ``signum`` when batch ``at`` is fetched."""

  def __init__(self, it, at, signum=signal.SIGTERM):
    self.it, self.at, self.signum, self.spec = it, at, signum, it.spec
    self.count = 0

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      os.kill(os.getpid(), self.signum)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  c = text_config()
  wd = str(tmp_path)
  before = signal.getsignal(signal.SIGTERM)
  r = trainer.train(c, wd, data=SignalAt(tu.batches(c), at=3))
  assert r.stopped_by == "signal" and r.last_step == 3 and r.checkpoint_step == 3
  assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
  # The checkpoint restores and the run continues from it to the end.
  r2 = trainer.train(c, wd, data=tu.batches(c), max_steps=2)
  assert (r2.first_step, r2.last_step) == (3, 5)
  with open(os.path.join(wd, "checkpoints", "3", "data", "metadata")) as f:
    saved = json.load(f)
  assert saved["states"][0]["position"] == 3


class NaNAt:
  """Makes the MLM weights NaN (so the loss is NaN) in the given 1-based batches."""

  def __init__(self, it, bad):
    self.it, self.bad, self.spec = it, set(bad), it.spec
    self.count = 0

  def __next__(self):
    b = next(self.it)
    self.count += 1
    if self.count in self.bad:
      b = dict(b)
      b["text/mlm_weights"] = np.full_like(b["text/mlm_weights"], np.nan)
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
  c = text_config()
  c.train.max_nonfinite_steps = 3
  c.train.checkpoint_every = 4
  wd = str(tmp_path)
  # Batch 2 is bad alone (skipped, run continues); batches 6.. are all bad: stop after 3.
  data = NaNAt(tu.batches(c), bad=[2] + list(range(6, 13)))
  with pytest.raises(trainer.NonFiniteError, match="not finite for 3 consecutive steps") as e:
    trainer.train(c, wd, data=data)
  assert "step 4" in str(e.value)  # the last good checkpoint is named
  rows = metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  by_step = {r["step"]: r for r in rows}
  assert by_step[2]["nonfinite"] == 1.0 and by_step[3]["nonfinite"] == 0.0
  assert by_step[3]["nonfinite_total"] == 1.0
  # The checkpoint at step 4 is the last one and its parameters are finite.
  assert ckpt_lib.latest_step(wd) == 4
  for _, x in host_params(wd):
    assert np.all(np.isfinite(x))


def test_metrics_files_have_every_series(tmp_path):
  c = text_config()
  c.train.log_every = 2
  wd = str(tmp_path)
  trainer.train(c, wd, data=tu.batches(c), max_steps=2)
  (row,) = metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  for key in ("loss", "text_mlm/loss", "text_mlm/accuracy", "grad_norm", "learning_rate",
              "steps_per_second", "examples_per_second/text", "tflops_per_device", "mfu",
              "data_wait_share", "data/dropped_total", "nonfinite_total", "param_norm"):
    assert key in row, key
  assert row["step"] == 2 and 0 <= row["data_wait_share"] <= 1
  assert os.listdir(os.path.join(wd, "tensorboard"))
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["train"]["log_every"] == 2


def test_init_from_a_converted_checkpoint(tmp_path):
  from unimo_jax.convert import roberta  # pylint: disable=import-outside-toplevel
  c = text_config()
  mcfg = tu.model_config(c)
  # A "converted RoBERTa": the text path only, with recognisable values.
  from unimo_jax.model import init_params  # pylint: disable=import-outside-toplevel
  full = jax.tree.map(np.asarray, init_params(mcfg, jax.random.key(7)))
  text = {k: jax.tree.map(lambda x: np.full_like(x, 0.25), full[k])
          for k in ("text_embed", "encoder", "lm_head")}
  roberta.save(str(tmp_path / "roberta"), mcfg, text)
  c.train.init_from = str(tmp_path / "roberta")
  wd = str(tmp_path / "run")
  trainer.train(c, wd, data=tu.batches(c), max_steps=0)  # saves the initial state (step 0)
  params, step = ckpt_lib.restore_params(wd)
  assert step == 0
  for k in ("text_embed", "encoder", "lm_head"):
    for x in jax.tree_util.tree_leaves(params["model"][k]):
      np.testing.assert_array_equal(x, 0.25)
  for k in ("patch_embed", "region_head", "text_projection"):
    assert not all(np.all(x == 0.25) for x in jax.tree_util.tree_leaves(params["model"][k]))
  # A converted model of another shape is refused by name.
  roberta.save(str(tmp_path / "other"), mcfg.replace(max_positions=30), text)
  c.train.init_from = str(tmp_path / "other")
  with pytest.raises(ValueError, match="max_positions=30"):
    trainer.train(c, str(tmp_path / "run2"), data=tu.batches(c), max_steps=0)


def test_evaluators_run_every_n_steps(tmp_path):
  c = text_config()
  c.train.eval_every = 2
  calls = []

  def evaluate(params, step):
    calls.append((step, sorted(params)))
    return {"validation/R@1_i2t": 0.5 * step, "skipped": "not a number"}

  wd = str(tmp_path)
  trainer.train(c, wd, data=tu.batches(c), max_steps=4, evaluate=evaluate)
  assert calls == [(2, ["cmcl", "model"]), (4, ["cmcl", "model"])]
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
          if "eval/validation/R@1_i2t" in r]
  assert [(r["step"], r["eval/validation/R@1_i2t"]) for r in rows] == [(2, 1.0), (4, 2.0)]
  assert all("eval/seconds" in r for r in rows)


# ------------------------------------------------------------------ reliability
class FailAt:
  """Raises at batch ``at`` (1-based), like a crash between two checkpoints."""

  def __init__(self, it, at):
    self.it, self.at, self.spec, self.count = it, at, it.spec, 0

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      raise RuntimeError("simulated crash")
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def test_resume_cuts_metrics_back_to_the_restored_step(tmp_path):
  c = text_config()
  c.train.checkpoint_every = 3
  wd = str(tmp_path)
  with pytest.raises(RuntimeError, match="simulated crash"):
    trainer.train(c, wd, data=FailAt(tu.batches(c), at=6))  # rows 1-5 written, checkpoint 3
  assert ckpt_lib.latest_step(wd) == 3
  trainer.train(c, wd, data=tu.batches(c), max_steps=3)
  steps = [r["step"] for r in metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 once, from the resumed run


def test_a_stop_signal_flushes_the_logging_window(tmp_path):
  c = text_config()
  c.train.log_every = 10
  wd = str(tmp_path)
  r = trainer.train(c, wd, data=SignalAt(tu.batches(c), at=3))
  assert r.stopped_by == "signal" and r.last_step == 3
  (row,) = metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert row["step"] == 3 and np.isfinite(row["loss"])


def test_nonfinite_guard_checked_at_log_steps_stops_like_every_step(tmp_path):
  c = text_config()
  c.train.max_nonfinite_steps = 3
  c.train.log_every = 4
  c.train.checkpoint_every = 2
  wd = str(tmp_path)
  # Batches 5.. are bad: the streak reaches 3 at step 7, checked at the log step 8. The save
  # at step 6 (streak 2) happens as before; none is written once the limit is reached.
  data = NaNAt(tu.batches(c), bad=range(5, 13))
  with pytest.raises(trainer.NonFiniteError, match="not finite for 3 consecutive steps by "
                     "step 7") as e:
    trainer.train(c, wd, data=data)
  assert "stopping at step 8" in str(e.value) and "(step 6)" in str(e.value)
  assert ckpt_lib.Checkpointer(wd).all_steps() == [2, 4, 6]
  for (_, x), (_, y) in zip(host_params(wd, 6), host_params(wd, 4)):
    np.testing.assert_array_equal(x, y)  # the skipped updates left the parameters alone
    assert np.all(np.isfinite(x))


def test_no_device_to_host_transfer_between_log_steps(tmp_path, monkeypatch):
  """Every device-to-host fetch happens at set-up, a log step or a save, never per step."""
  from jax._src import array as array_lib  # pylint: disable=import-outside-toplevel
  c = text_config()
  c.train.log_every = 4
  data = SignalAt(tu.batches(c), at=-1)  # counts the batches fetched so far
  fetched_at = []
  value = array_lib.ArrayImpl._value
  device_get = jax.device_get
  monkeypatch.setattr(array_lib.ArrayImpl, "_value",
                      property(lambda self: fetched_at.append(data.count) or value.fget(self)))
  monkeypatch.setattr(jax, "device_get",
                      lambda x: fetched_at.append(data.count) or device_get(x))
  trainer.train(c, str(tmp_path), data=data, max_steps=8)
  assert fetched_at and set(fetched_at) <= {0, 4, 8}, sorted(set(fetched_at))
  assert 4 in fetched_at  # the log step fetched its window


def test_train_resumes_from_the_newest_intact_checkpoint(tmp_path, caplog):
  import reliability_util as ru  # pylint: disable=import-outside-toplevel
  c = text_config()
  c.train.checkpoint_every = 2
  straight = str(tmp_path / "straight")
  trainer.train(c, straight, data=tu.batches(c), max_steps=6)
  wd = str(tmp_path / "damaged")
  trainer.train(c, wd, data=tu.batches(c), max_steps=4)  # checkpoints 2 and 4
  ru.damage(os.path.join(wd, "checkpoints", "4"), "state_metadata")
  with caplog.at_level("WARNING"):
    r = trainer.train(c, wd, data=tu.batches(c), max_steps=4)
  assert (r.first_step, r.last_step) == (2, 6)
  assert any("checkpoints/4 cannot be restored" in m for m in caplog.messages)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4.damaged"))  # kept, set aside
  for (path, x), (_, y) in zip(host_params(straight), host_params(wd)):
    np.testing.assert_array_equal(x, y, err_msg=str(path))


class LockAt:
  """Makes the run's checkpoint folder unwritable when batch ``at`` is fetched."""

  def __init__(self, it, at, directory):
    self.it, self.at, self.directory, self.spec, self.count = it, at, directory, it.spec, 0

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      import reliability_util as ru  # pylint: disable=import-outside-toplevel
      time.sleep(1.0)  # the save before this batch has committed
      ru.lock(self.directory)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_a_failed_save_stops_the_run_at_the_next_step(tmp_path, caplog):
  import reliability_util as ru  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.futures import future as ocp_future  # pylint: disable=import-outside-toplevel
  c = text_config()
  c.train.checkpoint_every = 3
  c.train.log_every = 12
  wd = str(tmp_path)
  directory = os.path.join(wd, "checkpoints")
  data = LockAt(tu.batches(c), at=5, directory=directory)
  try:
    with caplog.at_level("INFO"), pytest.raises(ckpt_lib.CheckpointError,
                                                match="step 6 could not be saved") as e:
      trainer.train(c, wd, data=data)
  finally:
    ru.unlock(directory)
  assert "\n" not in str(e.value) and os.path.join(directory, "6") in str(e.value)
  # Found within a step of the failed write, not at the next save (9): the write fails in the
  # background, so on a loaded machine it may fail just after step 7's poll and be found at 8.
  assert data.count <= 8
  assert "checkpoint saved at step 3" in caplog.messages
  assert "checkpoint saved at step 6" not in caplog.messages
  assert not [t for t in threading.enumerate()
              if isinstance(t, ocp_future._SignalingThread) and t.is_alive()]  # pylint: disable=protected-access
  assert ckpt_lib.latest_step(wd) == 3
