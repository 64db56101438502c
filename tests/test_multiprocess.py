"""2 processes x 4 CPU devices (gloo, localhost) train exactly like 1 process x 8 devices.

The worker processes run this file as a script; each feeds only its own rows of the global
batch, the CMCL loss gathers its columns across both processes, and the orbax checkpoint is
written cooperatively. The test compares the losses of every step and the final parameters.
"""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3


def config():
  import train_util as tu  # pylint: disable=import-outside-toplevel
  c = tu.run_config(dropout=0.1)
  c.data.streams.image.batch_size = 0
  c.objectives.text_mode = "mlm"
  c.objectives.pair_text_mode = "mlm"
  for name in ("pair_mlm", "pair_mrp"):
    c.objectives.weights[name] = 0.0
  c.train.total_steps = STEPS
  c.train.log_every = 1
  c.train.checkpoint_every = 0
  c.train.progress_bar = "off"
  return c


class ProcessRows:
  """This process's rows of each global batch (the rows its devices hold in the mesh)."""

  def __init__(self, global_batches, mesh):
    import jax  # pylint: disable=import-outside-toplevel
    from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
    self.it = global_batches
    b = next(iter(v.shape[0] for v in self._first().values()))
    index = parallel.batch_sharding(mesh).addressable_devices_indices_map((b,))
    starts = sorted(idx[0].start or 0 for idx in index.values())
    stops = sorted(idx[0].stop or b for idx in index.values())
    self.fraction = (starts[0] / b, stops[-1] / b)
    assert stops[-1] - starts[0] == b // jax.process_count()
    self.spec = {k: ((shape[0] // jax.process_count(),) + tuple(shape[1:]), dtype)
                 for k, (shape, dtype) in global_batches.spec.items()}

  def _first(self):
    return self.it.batch(0)

  def __next__(self):
    batch = next(self.it)
    out = {}
    for k, v in batch.items():
      lo, hi = (int(round(f * v.shape[0])) for f in self.fraction)
      out[k] = v[lo:hi]
    return out

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def worker(process_id: int, port: int, workdir: str) -> None:
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize(f"127.0.0.1:{port}", 2, process_id, platform="cpu")
  import jax  # pylint: disable=import-outside-toplevel
  import train_util as tu  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  assert jax.process_count() == 2 and jax.device_count() == 8
  c = config()
  mesh = parallel.make_mesh(dict(c.mesh))
  data = ProcessRows(tu.batches(c), mesh)
  trainer.train(c, workdir, data=data)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  import multiprocess_util  # pylint: disable=import-outside-toplevel
  import train_util as tu  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel

  one = str(tmp_path / "one")
  c = config()
  trainer.train(c, one, data=tu.batches(c))

  two = str(tmp_path / "two")
  multiprocess_util.run_workers(__file__, two)

  rows_one = metrics_lib.read_jsonl(os.path.join(one, "metrics.jsonl"))
  rows_two = metrics_lib.read_jsonl(os.path.join(two, "metrics.jsonl"))
  assert [r["step"] for r in rows_two] == list(range(1, STEPS + 1))
  for a, b in zip(rows_one, rows_two):
    for k in ("loss", "text_mlm/loss", "pair_cmcl/loss_i2t", "pair_cmcl/loss_t2i",
              "pair_cmcl/num_text_columns", "grad_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f"step {a['step']} {k}")
  p1, s1 = ckpt_lib.restore_params(one)
  p2, s2 = ckpt_lib.restore_params(two)
  assert s1 == s2 == STEPS
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  sys.path.insert(0, HERE)
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
