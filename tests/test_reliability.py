"""Reliability trials: training processes killed (-9) at a random step and during a save,
stopped by SIGTERM, or left with an unwritable checkpoint folder, then resumed; evaluation's
restore of a damaged run. A resumed run must end bit for bit where an uninterrupted one does.

The subprocess trials (``reliability_worker.py``, 5-15 s each) are marked slow.
"""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import reliability_util as ru
import train_util as tu
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import metrics as metrics_lib

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reliability_worker.py")
STEPS = 12  # reliability_worker's default, checkpoints every 3 steps


def start(workdir, *args):
  return subprocess.Popen([sys.executable, WORKER, str(workdir), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"worker did not exit within {timeout}s; stderr tail:\n{err[-3000:]}")
  return proc.returncode, out, err


def run(workdir, *args, timeout=120):
  rc, out, err = finish(start(workdir, *args), timeout)
  assert rc == 0, err[-3000:]
  return out, err


def final_params(workdir):
  params, step = ckpt_lib.restore_params(str(workdir))
  assert step == STEPS
  return jax.tree_util.tree_leaves_with_path(params)


def assert_same_params(a, b):
  a, b = final_params(a), final_params(b)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=str(path))


def logged_steps(workdir):
  return [r["step"] for r in metrics_lib.read_jsonl(os.path.join(str(workdir), "metrics.jsonl"))]


def wait_for(predicate, proc, timeout=90):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      pytest.fail("timed out waiting for the worker")
    time.sleep(0.01)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run to step 12."""
  wd = tmp_path_factory.mktemp("straight")
  run(wd)
  return wd


@pytest.mark.slow
def test_kill9_at_a_random_step_then_resume_is_exact(straight, tmp_path):
  at = random.Random().randint(2, STEPS - 2)
  print("killing at step", at)
  wd = tmp_path / "killed"
  proc = start(wd, "--sleep", "0.3")
  path = os.path.join(str(wd), "metrics.jsonl")
  wait_for(lambda: os.path.exists(path) and any(s >= at for s in logged_steps(wd)), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  run(wd)
  assert_same_params(straight, wd)
  assert logged_steps(wd) == list(range(1, STEPS + 1))  # no step listed twice


@pytest.mark.slow
def test_kill9_during_a_save_then_resume_is_exact(straight, tmp_path):
  wd = tmp_path / "killed"
  proc = start(wd, "--slow_commit", "2")
  lines = []

  def committing_6():
    lines.append(proc.stdout.readline())
    return lines[-1].startswith("COMMITTING 6")
  wait_for(committing_6, proc)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  directory = os.path.join(str(wd), "checkpoints")
  assert os.path.isdir(os.path.join(directory, "6.orbax-checkpoint-tmp"))
  assert "checkpoint saved at step 6" not in err and "checkpoint saved at step 3" in err
  out, err = run(wd)
  assert "resumed from step 3" in err, err[-2000:]
  assert_same_params(straight, wd)
  assert logged_steps(wd) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_exactly(straight, tmp_path):
  wd = tmp_path / "stopped"
  proc = start(wd, "--sleep", "0.3")
  path = os.path.join(str(wd), "metrics.jsonl")
  wait_for(lambda: os.path.exists(path) and any(s >= 4 for s in logged_steps(wd)), proc)
  proc.send_signal(signal.SIGTERM)
  rc, out, err = finish(proc)
  assert rc == 0 and "signal" in out, err[-2000:]
  stopped_at = int(out.split()[2])
  assert stopped_at < STEPS and ckpt_lib.latest_step(str(wd)) == stopped_at
  assert f"checkpoint saved at step {stopped_at}" in err
  assert logged_steps(wd)[-1] == stopped_at  # the partial logging window was written
  run(wd)
  assert_same_params(straight, wd)
  assert logged_steps(wd) == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before_the_save", "during_the_commit"])
def test_unwritable_checkpoint_dir_fails_in_one_line_and_exits(tmp_path, when):
  wd = tmp_path / "run"
  # Batch 5 locks the folder: the step-6 save cannot create its folder, or (with a slow
  # commit, locked while the save of step 6 waits to rename) cannot rename it into place.
  args = ["--lock_at", "5"] if when == "before_the_save" else ["--lock_at", "7", "--slow_commit",
                                                                "3", "--sleep", "0.2"]
  directory = os.path.join(str(wd), "checkpoints")
  t0 = time.time()
  proc = start(wd, *args)
  try:
    rc, out, err = finish(proc, timeout=90)  # before the fix: never exits (orbax threads)
  finally:
    ru.unlock(directory)
  assert rc == 1, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("reliability_worker: checkpoint at step 6 could not be saved to "
                         f"{os.path.join(directory, '6')}:"), err[-3000:]
  assert "Permission" in last or "not permitted" in last, last
  assert "checkpoint saved at step 6" not in err and "checkpoint saved at step 3" in err
  assert "Traceback" not in err, err[-3000:]
  assert time.time() - t0 < 80
  # The last good checkpoint is intact.
  params, step = ckpt_lib.restore_params(str(wd))
  assert step == 3 and all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_evaluation_restores_the_newest_intact_checkpoint(tmp_path):
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  from unimo_jax.evaluation import main as eval_main  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  from test_train_loop import text_config  # pylint: disable=import-outside-toplevel
  c = text_config()
  c.train.checkpoint_every = 2
  wd = str(tmp_path)
  trainer.train(c, wd, data=tu.batches(c), max_steps=4)
  ru.damage(os.path.join(wd, "checkpoints", "4"), "state_data_truncated")
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  params, step = eval_main.restore_model_params(wd, None, c, tu.model_config(c), mesh)
  assert step == 2
  want, _ = ckpt_lib.restore_params(wd, 2)
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want["model"])):
    np.testing.assert_array_equal(np.asarray(x), y)
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoints/4 cannot be restored"):
    eval_main.restore_model_params(wd, 4, c, tu.model_config(c), mesh)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4"))  # never deleted
