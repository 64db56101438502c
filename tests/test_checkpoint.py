"""Checkpoint save/restore across meshes, retention, params-only restore and stop signals."""
import os
import signal

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unimo_jax import parallel
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import state as state_lib

from test_train_state import make_state, Boxed, optimizer_cfg  # noqa: F401


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_save_restore_onto_a_different_mesh(tmp_path):
  mesh_a = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  _, tx, init, state, _ = make_state(mesh_a)
  state = state.replace(step=state.step + 7)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  assert ck.save(7, state, data_state={"position": 123, "seed": [1, 2]},
                 config={"model": {"hidden_size": 8}})
  assert not ck.save(7, state)  # already saved
  ck.wait()
  assert ck.latest_step() == 7

  mesh_b = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract, _ = state_lib.state_shardings(init, tx, mesh_b, parallel.DEFAULT_RULES,
                                          jax.random.key(0))
  restored, data_state, config = ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract)
  assert data_state == {"position": 123, "seed": [1, 2]}
  assert config == {"model": {"hidden_size": 8}}
  assert restored.params["up_kernel"].sharding.spec == P("fsdp", "tensor")
  assert restored.params["up_kernel"].sharding.mesh.shape == mesh_b.shape
  for a, b in zip(jax.tree_util.tree_leaves(_host(state)), jax.tree_util.tree_leaves(_host(restored))):
    np.testing.assert_array_equal(a, b)
  assert int(restored.step) == 7
  assert ckpt_lib.read_config(str(tmp_path)) == {"model": {"hidden_size": 8}}
  ck.close()


def test_retention_keeps_newest_and_period(tmp_path):
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  _, _, _, state, _ = make_state(mesh)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_period=4)
  for step in range(1, 10):
    ck.save(step, state, data_state=None)
  ck.wait()
  assert ck.all_steps() == [4, 8, 9]
  assert ckpt_lib.latest_step(str(tmp_path)) == 9
  ck.close()


def test_restore_params_only(tmp_path):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, _, _, state, _ = make_state(mesh)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=None)
  ck.save(3, state)
  ck.save(5, state.replace(params=jax.tree.map(lambda x: x + 1, state.params)))
  ck.close()
  expected = _host(state.params)

  params, step = ckpt_lib.restore_params(str(tmp_path), step=3)  # host numpy arrays
  assert step == 3 and set(params) == set(expected)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, want)

  # onto one device (an evaluation process), latest step by default
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, step = ckpt_lib.restore_params(os.path.join(str(tmp_path), "checkpoints"),
                                         shardings=single)
  assert step == 5
  np.testing.assert_array_equal(np.asarray(params["up_kernel"]), expected["up_kernel"] + 1)
  assert params["up_kernel"].sharding == single

  with pytest.raises(FileNotFoundError, match="step 4"):
    ckpt_lib.restore_params(str(tmp_path), step=4)
  with pytest.raises(FileNotFoundError):
    ckpt_lib.restore_params(str(tmp_path / "nothing"))


def test_select_data_state():
  assert ckpt_lib.select_data_state(None) is None
  assert ckpt_lib.select_data_state({"process_count": 1, "states": [{"p": 3}]}) == {"p": 3}
  # Saved by 2 processes, restored by 1: identical positions are reusable ...
  assert ckpt_lib.select_data_state({"process_count": 2, "states": [{"p": 3}, {"p": 3}]}) == {
      "p": 3}
  # ... per-process bookkeeping (drop counts) is left behind ...
  assert ckpt_lib.select_data_state({"process_count": 2, "states": [
      {"p": 3, "dropped": {"a": 1}}, {"p": 3, "dropped": {"a": 2}}]}) == {"p": 3}
  # ... different per-process positions are not.
  with pytest.raises(ValueError, match="2 processes"):
    ckpt_lib.select_data_state({"process_count": 2, "states": [{"p": 3}, {"p": 4}]})


def test_stop_signal_sigterm_and_handler_restored():
  before = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.StopSignal() as stop:
    assert not stop.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop() and stop.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_interrupts():
  with ckpt_lib.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.should_stop()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
