"""Checkpoint save/restore across meshes, retention, params-only restore, stop signals, and
reliability: restore walking back from damaged checkpoints, failed saves reported in one line."""
import logging
import os
import signal
import threading

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unimo_jax import parallel
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import state as state_lib

import reliability_util as ru
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


def test_restore_params_stacks_an_unscanned_encoder(tmp_path):
  """Parameters saved with the encoder as ``layer_0 .. layer_{n-1}`` (before it was scanned)
  come back in the scanned layout: each leaf of ``encoder/layers`` is the per-layer leaves
  stacked in layer order, on the requested shardings."""
  rng = np.random.default_rng(0)
  layer = lambda: {"attention": {"query": {"kernel": rng.normal(size=(4, 2, 2)).astype(
      np.float32), "bias": rng.normal(size=(2, 2)).astype(np.float32)}},
      "mlp_norm": {"scale": rng.normal(size=(4,)).astype(np.float32)}}
  layers = [layer() for _ in range(3)]
  old = {"model": {"encoder": {f"layer_{i}": t for i, t in enumerate(layers)},
                   "text_embed": {"word": rng.normal(size=(6, 4)).astype(np.float32)}}}
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  _, _, _, state, _ = make_state(mesh)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=None)
  ck.save(2, state.replace(params=old))
  ck.close()

  params, step = ckpt_lib.restore_params(str(tmp_path))
  assert step == 2 and set(params["model"]["encoder"]) == {"layers"}
  stacked = params["model"]["encoder"]["layers"]
  np.testing.assert_array_equal(stacked["attention"]["query"]["kernel"],
                                np.stack([t["attention"]["query"]["kernel"] for t in layers]))
  np.testing.assert_array_equal(stacked["mlp_norm"]["scale"][2], layers[2]["mlp_norm"]["scale"])
  np.testing.assert_array_equal(params["model"]["text_embed"]["word"],
                                old["model"]["text_embed"]["word"])
  single = jax.sharding.SingleDeviceSharding(jax.devices()[1])
  placed, _ = ckpt_lib.restore_params(str(tmp_path), shardings=single)
  assert placed["model"]["encoder"]["layers"]["mlp_norm"]["scale"].sharding == single
  np.testing.assert_array_equal(placed["model"]["encoder"]["layers"]["mlp_norm"]["scale"],
                                stacked["mlp_norm"]["scale"])


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


# ------------------------------------------------------------------ reliability: damaged checkpoints
def _two_checkpoints(tmp_path):
  """A workdir with checkpoints at steps 2 and 4 (different parameters and data positions)."""
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  _, tx, init, state, _ = make_state(mesh)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=None)
  ck.save(2, state.replace(step=state.step + 2), data_state={"position": 2})
  later = state.replace(step=state.step + 4, params=jax.tree.map(lambda x: x + 1, state.params))
  ck.save(4, later, data_state={"position": 4})
  ck.close()
  abstract, _ = state_lib.state_shardings(init, tx, mesh, parallel.DEFAULT_RULES,
                                          jax.random.key(0))
  return abstract, _host(state.params)


@pytest.mark.parametrize("kind", ru.DAMAGE)
def test_restore_walks_back_from_a_damaged_checkpoint(tmp_path, kind, caplog):
  abstract, params_at_2 = _two_checkpoints(tmp_path)
  directory = os.path.join(str(tmp_path), "checkpoints")
  step4 = os.path.join(directory, "4")
  ru.damage(step4, kind)
  files = sorted(os.path.relpath(os.path.join(d, f), step4) for d, _, fs in os.walk(step4)
                 for f in fs)
  # An explicit request for the damaged step fails in one line naming it ...
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoints/4 cannot be restored") as e:
    ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract, step=4)
  assert "\n" not in str(e.value)
  # ... parameters-only restore (evaluation) walks back when the parameters are damaged (it
  # does not read the data position), and only reads ...
  params, step = ckpt_lib.restore_params(str(tmp_path))
  if kind.startswith("state"):
    assert step == 2
    np.testing.assert_array_equal(params["up_kernel"], params_at_2["up_kernel"])
    with pytest.raises(ckpt_lib.CheckpointError, match="checkpoints/4 cannot be restored"):
      ckpt_lib.restore_params(str(tmp_path), step=4)
  else:
    assert step == 4
    np.testing.assert_array_equal(params["up_kernel"], params_at_2["up_kernel"] + 1)
  assert os.path.isdir(step4)
  # ... and the training restore takes step 2 with one warning naming step 4 and the reason.
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    state, data_state, _ = ck.restore(abstract)
  assert int(state.step) == 2 and data_state == {"position": 2}
  for got, want in zip(jax.tree_util.tree_leaves(_host(state.params)),
                       jax.tree_util.tree_leaves(params_at_2)):
    np.testing.assert_array_equal(got, want)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and step4 in warnings[0], warnings
  assert "\n" not in warnings[0]
  # The damaged checkpoint is kept, renamed, with every file it had; it no longer counts
  # towards retention (keep=2 must not delete step 2 for it) nor blocks saving step 4 again.
  assert sorted(os.listdir(directory)) == ["2", "4.damaged"]
  assert sorted(os.path.relpath(os.path.join(d, f), step4 + ".damaged") for d, _, fs in
                os.walk(step4 + ".damaged") for f in fs) == files
  assert ck.save(4, state.replace(step=state.step + 2), data_state={"position": 4})
  ck.close()
  assert sorted(os.listdir(directory)) == ["2", "4", "4.damaged"]
  restored, data_state, _ = ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract)
  assert int(restored.step) == 4 and data_state == {"position": 4}


def test_no_restorable_checkpoint_is_one_error(tmp_path):
  abstract, _ = _two_checkpoints(tmp_path)
  for step in (2, 4):
    ru.damage(os.path.join(str(tmp_path), "checkpoints", str(step)), "data_dir")
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint .* can be restored: step 4") \
      as e:
    ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract)
  assert "step 2" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ reliability: failed saves
def test_saved_is_logged_only_once_committed(tmp_path, caplog):
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  _, _, _, state, _ = make_state(mesh)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.INFO):
    ck.save(1, state)
    saved = [r.getMessage() for r in caplog.records if "checkpoint saved" in r.getMessage()]
    committed = os.path.isdir(os.path.join(str(tmp_path), "checkpoints", "1"))
    assert not saved or committed  # never "saved" before the step folder is in place
    ck.wait()
  assert [r.getMessage() for r in caplog.records
          if "checkpoint saved" in r.getMessage()] == ["checkpoint saved at step 1"]
  ck.close()


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_raises_one_line_and_leaves_no_threads(tmp_path, async_save):
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  _, _, _, state, _ = make_state(mesh)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=async_save)
  ck.save(1, state)
  ck.wait()
  directory = os.path.join(str(tmp_path), "checkpoints")
  with ru.unwritable(directory):
    with pytest.raises(ckpt_lib.CheckpointError) as e:
      ck.save(2, state)
      ck.close()  # an asynchronous failure surfaces at the latest here
    msg = str(e.value)
    assert "step 2" in msg and os.path.join(directory, "2") in msg and "\n" not in msg
    assert "Permission" in msg or "not permitted" in msg, msg
    ck.abort()
  # No orbax thread is left waiting for a signal (they would hold up interpreter exit).
  from orbax.checkpoint._src.futures import future as ocp_future
  alive = [t.name for t in threading.enumerate()
           if isinstance(t, ocp_future._SignalingThread) and t.is_alive()]
  assert not alive
  assert ckpt_lib.latest_step(str(tmp_path)) == 1
