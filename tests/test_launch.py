"""Launch detection against the environment each launcher sets, checked against jax's own
cluster detectors (jax/_src/clusters) as the independent reference, and the start-up timeout."""
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from unimo_jax import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _slurm_env(node_list="node[003-006],gpu1", ntasks=4, procid=2, localid=0, job=123456):
  return {"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": node_list,
          "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
          "SLURM_LOCALID": str(localid), "SLURM_STEP_NUM_NODES": "4"}


@pytest.mark.parametrize("node_list", ["node001", "node001,host2", "node[001-0015],host2",
                                       "node[001,007-015],host2", "a-b[9,12]"])
def test_slurm_matches_jax_cluster_detection(monkeypatch, node_list):
  from jax._src.clusters import slurm_cluster
  env = _slurm_env(node_list)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
  plan = launch.detect(env, metadata=lambda key: "")
  jax_cluster = slurm_cluster.SlurmCluster
  assert jax_cluster.is_env_present()
  assert plan.launcher == "slurm"
  assert plan.coordinator == jax_cluster.get_coordinator_address(None, None)
  assert plan.num_processes == jax_cluster.get_process_count() == 4
  assert plan.process_id == jax_cluster.get_process_id() == 2
  assert plan.local_device_ids == (jax_cluster.get_local_process_id(),)


def test_slurm_first_host_of_a_one_node_bracket():
  # (jax 0.10's parser keeps the closing bracket here: "a-b9]")
  assert launch.slurm_first_host("a-b[9]") == "a-b9"
  assert launch.slurm_first_host("gpu[07-08]") == "gpu07"


def test_slurm_single_task_is_a_single_process():
  assert launch.detect(_slurm_env(ntasks=1, procid=0)).launcher == "single"


def test_mpi_matches_jax_cluster_detection(monkeypatch):
  from jax._src.clusters import ompi_cluster
  env = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
         "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5",
         "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  plan = launch.detect(env)
  c = ompi_cluster.OmpiCluster
  assert plan.launcher == "mpi"
  assert plan.coordinator == c.get_coordinator_address(None, None)
  assert (plan.num_processes, plan.process_id) == (c.get_process_count(), c.get_process_id())
  assert plan.local_device_ids == (c.get_local_process_id(),)


def test_tpu_pod_slice_and_multislice(monkeypatch):
  from jax._src.clusters import cloud_tpu_cluster
  env = {"TPU_WORKER_HOSTNAMES": "t-w0,t-w1,t-w2,t-w3", "TPU_WORKER_ID": "2"}
  plan = launch.detect(env)
  assert (plan.launcher, plan.num_processes, plan.process_id) == ("tpu", 4, 2)
  assert plan.coordinator == "t-w0:8482" and plan.local_device_ids is None
  multi = dict(env, MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1",
               MEGASCALE_COORDINATOR_ADDRESS="s0-w0:9999")
  for k, v in multi.items():
    monkeypatch.setenv(k, v)
  c = cloud_tpu_cluster.GkeTpuCluster
  plan = launch.detect(multi)
  assert (plan.num_processes, plan.process_id) == (c.get_process_count(), c.get_process_id())
  assert (plan.num_processes, plan.process_id) == (8, 6)
  assert plan.coordinator == "s0-w0:8482"
  # gcloud-created TPU VMs: the worker list comes from the GCE metadata server.
  md = {"worker-network-endpoints": "x:0:10.0.0.5,x:1:10.0.0.6", "agent-worker-number": "1"}
  plan = launch.detect({}, metadata=md.__getitem__)
  assert (plan.launcher, plan.num_processes, plan.process_id, plan.coordinator) == (
      "tpu", 2, 1, "10.0.0.5:8482")
  assert launch.detect({"TPU_WORKER_HOSTNAMES": "only-one"}).launcher == "single"


def test_explicit_flags_win_and_must_be_complete():
  plan = launch.detect(_slurm_env(), coordinator_address="10.1.2.3:1234", num_processes=2,
                       process_id=1, local_device_ids="0,1")
  assert (plan.launcher, plan.coordinator, plan.num_processes, plan.process_id,
          plan.local_device_ids) == ("explicit", "10.1.2.3:1234", 2, 1, (0, 1))
  with pytest.raises(launch.LaunchError, match="needs --num_processes"):
    launch.detect({}, coordinator_address="h:1")
  with pytest.raises(launch.LaunchError, match="outside"):
    launch.detect({}, coordinator_address="h:1", num_processes=2, process_id=2)
  env = {"JAX_COORDINATOR_ADDRESS": "c:7", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2",
         "JAX_COORDINATOR_PORT": "99"}
  assert launch.detect(env).coordinator == "c:7"
  assert launch.detect(_slurm_env(job=5) | {"JAX_COORDINATOR_PORT": "99"}).coordinator == (
      "node003:99")


def test_run_layout_mesh_and_per_process_batch():
  import ml_collections
  config = ml_collections.ConfigDict(dict(
      mesh=dict(data=-1, fsdp=2, tensor=1),
      data=dict(streams=dict(text=dict(batch_size=64, sources=[{"kind": "text"}]),
                             image=dict(batch_size=0, sources=[]),
                             pair=dict(batch_size=30, sources=[{"kind": "webdataset"}])))))
  plan = launch.Plan("tpu", 4, 1, "h:8482")
  lay = launch.run_layout(plan, config, local_devices=4)
  assert lay["devices"] == 16 and lay["mesh"] == {"data": 8, "fsdp": 2, "tensor": 1}
  assert lay["batch"] == {"text": (64, 16, 4), "pair": (30, 7.5, 30 / 16)}
  assert any("pair.batch_size 30" in p for p in lay["problems"])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_missing_coordinator_fails_within_the_timeout_in_one_line():
  port = _free_port()
  t0 = time.monotonic()
  with pytest.raises(launch.LaunchError) as e:
    launch.wait_for_coordinator(f"127.0.0.1:{port}", timeout=1.5, poll=0.2)
  assert 1.5 <= time.monotonic() - t0 < 5
  assert "\n" not in str(e.value) and f"127.0.0.1:{port}" in str(e.value)
  with socket.socket() as s:  # a listening coordinator is found at once
    s.bind(("127.0.0.1", 0))
    s.listen()
    assert launch.wait_for_coordinator(f"127.0.0.1:{s.getsockname()[1]}", timeout=5) < 1
