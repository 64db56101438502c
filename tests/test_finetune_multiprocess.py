"""Fine-tuning on 2 processes x 4 CPU devices (gloo) equals 1 process x 8 devices: each process
reads only its rows of the task's global batches (a pair-classification TSV, dropout on), the
step's gradients and the orbax checkpoint are shared. Per-step metrics match to 2e-5;
parameters within AdamW's float-order tolerance (``test_multiprocess.adam_tolerances``)."""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3  # test_multiprocess.adam_tolerances reads the checkpoint of this step


def config(root: str):
  from test_finetune_run import tiny_config  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  c = tiny_config(pathlib.Path(root), steps=STEPS)
  c.train.checkpoint_every = 0
  c.train.log_every = 1
  return c


def worker(process_id: int, port: int, root: str) -> None:
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize(f"127.0.0.1:{port}", 2, process_id, platform="cpu")
  import jax  # pylint: disable=import-outside-toplevel
  from test_finetune_run import TOK  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import main as ft_main  # pylint: disable=import-outside-toplevel
  assert jax.process_count() == 2 and jax.device_count() == 8
  ft_main.finetune_from_config(config(root), os.path.join(root, "two"), tokenizer=TOK)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  import multiprocess_util  # pylint: disable=import-outside-toplevel
  import test_multiprocess  # pylint: disable=import-outside-toplevel
  from test_finetune_run import TOK  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import main as ft_main  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  root = str(tmp_path)
  c = config(root)
  ft_main.finetune_from_config(c, os.path.join(root, "one"), tokenizer=TOK)
  multiprocess_util.run_workers(__file__, root)
  rows_one = metrics_lib.read_jsonl(os.path.join(root, "one", "metrics.jsonl"))
  rows_two = metrics_lib.read_jsonl(os.path.join(root, "two", "metrics.jsonl"))
  assert [r["step"] for r in rows_two] == list(range(1, STEPS + 1))
  for a, b in zip(rows_one, rows_two):
    for k in ("loss", "accuracy", "count", "grad_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f"step {a['step']} {k}")
  p1, s1 = ckpt_lib.restore_params(os.path.join(root, "one"))
  p2, s2 = ckpt_lib.restore_params(os.path.join(root, "two"))
  assert s1 == s2 == STEPS
  tol = test_multiprocess.adam_tolerances(os.path.join(root, "one"), c)
  flat1 = jax.tree_util.tree_flatten_with_path(p1)[0]
  flat2 = jax.tree_util.tree_leaves(p2)
  assert len(flat1) == len(flat2) == len(tol)
  for (path, a), b in zip(flat1, flat2):
    name = jax.tree_util.keystr(path)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=tol[name], err_msg=name)


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
