"""A tiny training run in its own process, for the kill / signal / full-disk trials.

  python reliability_worker.py WORKDIR [--steps N] [--checkpoint_every K] [--sleep S]
      [--slow_commit S] [--lock_at B]

Trains the text-only test config (``test_train_loop.text_config``) on random batches to
``--steps``. ``--sleep`` waits that long per batch (time to kill it mid-run); ``--slow_commit``
holds every checkpoint's final rename for that long after printing ``COMMITTING <step>`` (time
to kill it during a save); ``--lock_at B`` makes ``WORKDIR/checkpoints`` unwritable when batch
B is fetched (after waiting for the saves before it to finish). Exits like ``unimo-jax train``:
0 done or stopped by a signal, 1 with one line on stderr when a checkpoint fails, 3 non-finite.
"""
import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "UNIMO_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "unimo_jax", "xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


class Batches:
  """The test batches, slowed down and with a checkpoint-folder lock at a chosen batch."""

  def __init__(self, it, sleep, lock_at, directory):
    self.it, self.spec, self.sleep, self.lock_at, self.directory = it, it.spec, sleep, lock_at, \
        directory
    self.count = 0

  def __next__(self):
    self.count += 1
    if self.count == self.lock_at:
      import reliability_util as ru  # pylint: disable=import-outside-toplevel
      time.sleep(2.0)  # the saves before this batch have committed by now
      how = ru.lock(self.directory)
      print(f"LOCKED {how}", flush=True)
    if self.sleep:
      time.sleep(self.sleep)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def slow_commits(seconds):
  """Holds orbax's final rename of ``<step>.orbax-checkpoint-tmp`` for ``seconds``."""
  rename = os.rename

  def slow(src, dst, *a, **kw):
    if str(src).endswith(".orbax-checkpoint-tmp"):
      print(f"COMMITTING {os.path.basename(str(dst))}", flush=True)
      time.sleep(seconds)
    return rename(src, dst, *a, **kw)
  os.rename = slow


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("--steps", type=int, default=12)  # as text_config: one compile
  p.add_argument("--checkpoint_every", type=int, default=3)
  p.add_argument("--sleep", type=float, default=0.0)
  p.add_argument("--slow_commit", type=float, default=0.0)
  p.add_argument("--lock_at", type=int, default=0)
  args = p.parse_args(argv)
  import logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s",
                      stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  import train_util as tu  # pylint: disable=import-outside-toplevel
  from test_train_loop import text_config  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  c = text_config()
  c.train.total_steps = args.steps
  c.train.checkpoint_every = args.checkpoint_every
  if args.slow_commit:
    slow_commits(args.slow_commit)
  data = Batches(tu.batches(c), args.sleep, args.lock_at,
                 os.path.join(os.path.abspath(args.workdir), "checkpoints"))
  try:
    r = trainer.train(c, args.workdir, data=data)
  except ckpt_lib.CheckpointError as e:
    print(f"reliability_worker: {e}", file=sys.stderr, flush=True)
    return 1
  except trainer.NonFiniteError as e:
    print(f"reliability_worker: {e}", file=sys.stderr, flush=True)
    return 3
  print(f"DONE {r.first_step} {r.last_step} {r.stopped_by}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
