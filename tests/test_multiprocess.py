"""2 processes x 4 CPU devices (gloo, localhost) train exactly like 1 process x 8 devices.

The worker processes run this file as a script; each feeds only its own rows of the global
batch, the CMCL loss gathers its columns across both processes, and the orbax checkpoint is
written cooperatively. The test compares the losses of every step and the final parameters; the
parameters' tolerance is derived from AdamW's update (``adam_tolerances``): a gradient component that
nearly cancels (|g| << eps) turns a float-order difference of the reduction into an update
difference of up to lr * |dg| / eps.
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
  tolerances = adam_tolerances(one, c)
  flat1 = jax.tree_util.tree_flatten_with_path(p1)[0]
  flat2 = jax.tree_util.tree_leaves(p2)
  assert len(flat1) == len(flat2) == len(tolerances)
  tight = total = 0
  for (path, a), b in zip(flat1, flat2):
    name = jax.tree_util.keystr(path)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=tolerances[name], err_msg=name)
    tight += int(np.sum(np.abs(b - a) <= 1e-6 + 1e-5 * np.abs(a)))
    total += a.size
  # Float order alone moves only the few near-cancelling gradient components.
  assert tight >= 0.999 * total, (tight, total)


# Float-order bound of a reduced gradient component, as a fraction of the rms gradient (f32 sums
# over a different number or order of partial sums differ by ~1e-7 of the summed magnitudes; 1e-5
# leaves a margin of 100).
GRAD_FLOAT_ORDER = 1e-5


def adam_tolerances(workdir: str, c) -> dict:
  """Per-parameter absolute tolerance on the parameters after STEPS AdamW updates.

  1 and 2 processes reduce the gradients in a different order, so each gradient component may
  differ by float rounding of the summed terms: |dg| <= GRAD_FLOAT_ORDER * G, with G the larger of
  the tensor's rms gradient and the rms gradient of all parameters (both from the optimizer's second
  moment nu; the global one covers tensors whose true gradient is exactly zero, e.g. the attention
  key bias, where what is left is rounding of terms that cancel). AdamW's update
  lr * m/(sqrt(v) + eps) changes by at most lr * |dg| / eps per step (the derivative peaks where
  |g| << eps: a component whose gradient nearly cancels), and never by more than 2 lr. So after
  STEPS updates ``atol = STEPS * lr * min(2, GRAD_FLOAT_ORDER * G / eps)``. A real difference (a
  row counted twice or missing, one token changed) moves the components of many tensors by O(lr)
  and fails this bound.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import train_util as tu  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, "checkpoints", str(STEPS), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(directory).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  state = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  nu = tu.find_key(state["opt_state"], "nu")
  lr, eps, b2 = c.optimizer.learning_rate, c.optimizer.eps, c.optimizer.b2
  leaves = jax.tree_util.tree_flatten_with_path(nu)[0]
  correction = 1 - b2**STEPS
  rms_all = float(np.sqrt(sum(float(np.sum(v)) for _, v in leaves) /
                          sum(v.size for _, v in leaves) / correction))
  out = {}
  for path, v in leaves:
    rms = max(float(np.sqrt(np.mean(v) / correction)), rms_all)
    out[jax.tree_util.keystr(path)] = STEPS * lr * min(2.0, GRAD_FLOAT_ORDER * rms / eps)
  return out


if __name__ == "__main__":
  sys.path.insert(0, HERE)
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
