"""Launch detection against the environment each launcher sets, checked against jax's own
cluster detectors (jax/_src/clusters) as the independent reference, and the start-up timeout."""
import os
import socket
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------
# `unimo-jax train --print_env` under each launcher's environment
# ---------------------------------------------------------------------------------------------

CONFIG = os.path.join(REPO, "experiments", "configs", "examples", "webdataset.py")
LAUNCH_VARS = ("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def _print_env(monkeypatch, capsys, env, *flags):
  from unimo_jax import cli
  for k in list(os.environ):
    if k.startswith(LAUNCH_VARS):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  rc = cli.main(["unimo-jax", "train", "--config", f"{CONFIG}:root=/nowhere,smoke",
                 "--workdir", "/nowhere/run", "--config.data.streams.pair.batch_size=64",
                 "--print_env", *flags])
  out = capsys.readouterr().out
  assert rc == 0, out
  pairs = [line.split(": ", 1) for line in out.strip().splitlines()]
  got = dict(p for p in pairs if p[0] != "problem")
  got["problems"] = [v for k, v in pairs if k == "problem"]
  return got


def test_print_env_on_a_tpu_pod_slice(monkeypatch, capsys):
  got = _print_env(monkeypatch, capsys, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3",
                                         "TPU_WORKER_ID": "3"})
  assert got["launcher"].startswith("tpu (TPU_WORKER_HOSTNAMES=w0,w1,w2,w3 TPU_WORKER_ID=3")
  assert got["process"] == "3 of 4" and got["coordinator"] == "w0:8482"
  # 8 local (fake CPU) devices per process x 4 processes on the data axis.
  assert got["devices"] == "32 = 8 per process x 4 processes"
  assert got["mesh"] == "data 32, fsdp 1, tensor 1"
  assert got["batch pair"] == "64 global, 16 per process, 2 per device"
  assert got["batch image"] == "8 global, 2 per process, 0.25 per device"
  assert [p.split(" is ")[0] for p in got["problems"]] == [
      "data.streams.text.batch_size 8", "data.streams.image.batch_size 8"]


def test_print_env_under_slurm_srun(monkeypatch, capsys):
  got = _print_env(monkeypatch, capsys, _slurm_env("gpu[12-13]", ntasks=2, procid=1, localid=0,
                                                   job=4242))
  assert got["launcher"].startswith("slurm (SLURM_JOB_ID=4242")
  assert got["process"] == "1 of 2"
  assert got["coordinator"] == f"gpu12:{4242 % 4096 + 61440}"
  assert got["local devices"] == "0"  # one task per device (SLURM_LOCALID), as jax does
  assert got["devices"] == "2 = 1 per process x 2 processes"
  assert got["batch pair"] == "64 global, 32 per process, 32 per device"


def test_print_env_with_explicit_flags(monkeypatch, capsys):
  got = _print_env(monkeypatch, capsys, {}, "--coordinator_address=10.0.0.1:5555",
                   "--num_processes=2", "--process_id=0", "--local_device_ids=0,1,2,3")
  assert got["launcher"].startswith("explicit (--coordinator_address=10.0.0.1:5555")
  assert (got["process"], got["coordinator"], got["local devices"]) == (
      "0 of 2", "10.0.0.1:5555", "0,1,2,3")
  assert got["mesh"] == "data 8, fsdp 1, tensor 1"
  assert got["batch pair"] == "64 global, 32 per process, 8 per device"
  got = _print_env(monkeypatch, capsys, {})
  assert got["launcher"] == "single (no multi-host environment found)"
  assert got["process"] == "0 of 1"


def test_a_missing_coordinator_ends_the_command_in_one_line():
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  t0 = time.monotonic()
  p = subprocess.run(
      [sys.executable, "-m", "unimo_jax.cli", "train", "--config", f"{CONFIG}:root=/nowhere,smoke",
       "--workdir", "/nowhere/run", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", "--process_id=1", "--initialization_timeout=3"],
      capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
  took = time.monotonic() - t0
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [line for line in p.stderr.splitlines() if line.startswith("unimo-jax train:")]
  assert len(lines) == 1 and f"no coordinator at 127.0.0.1:{port} after 3s" in lines[0]
  assert "Traceback" not in p.stderr and "Check failure" not in p.stderr
  assert took < 60


# ---------------------------------------------------------------------------------------------
# The recipes of docs/launch.md: their commands under the environment their pods/tasks get
# ---------------------------------------------------------------------------------------------

def _manifest_command(name):
  import yaml
  with open(os.path.join(REPO, "docs", "launch", name)) as f:
    jobset = yaml.safe_load(f)
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  (container,) = job["template"]["spec"]["containers"]
  return job, container


def _run_print_env(monkeypatch, capsys, command, env):
  from unimo_jax import cli
  for k in list(os.environ):
    if k.startswith(LAUNCH_VARS):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert command[:2] == ["unimo-jax", "train"]
  assert cli.main(command + ["--print_env"]) == 0
  return dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines()
              if not line.startswith("problem"))


def test_gke_tpu_jobset_command(monkeypatch, capsys):
  job, container = _manifest_command("gke_tpu_jobset.yaml")
  n = job["parallelism"]
  hosts = ",".join(f"unimo-base-slice-0-{i}.unimo-base" for i in range(n))
  got = _run_print_env(monkeypatch, capsys, container["command"],
                       {"TPU_WORKER_HOSTNAMES": hosts, "TPU_WORKER_ID": "1"})
  assert got["process"] == f"1 of {n}"
  assert got["coordinator"] == "unimo-base-slice-0-0.unimo-base:8482"


def test_gke_gpu_jobset_command(monkeypatch, capsys):
  job, container = _manifest_command("gke_gpu_jobset.yaml")
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert env["JAX_PROCESS_ID"] is None  # from the pod's completion index
  env["JAX_PROCESS_ID"] = "1"
  got = _run_print_env(monkeypatch, capsys, container["command"], env)
  assert got["process"] == f"1 of {job['parallelism']}"
  assert got["coordinator"] == env["JAX_COORDINATOR_ADDRESS"]


def test_slurm_sbatch_command(monkeypatch, capsys):
  import shlex
  with open(os.path.join(REPO, "docs", "launch", "slurm_gpu.sbatch")) as f:
    text = f.read().replace("\\\n", " ")
  (line,) = [l for l in text.splitlines() if l.startswith("srun ")]
  ntasks = 2 * 8  # --nodes=2 --ntasks-per-node=8
  got = _run_print_env(monkeypatch, capsys, shlex.split(line)[1:],
                       _slurm_env("gpu[01-02]", ntasks=ntasks, procid=9, localid=1))
  assert got["process"] == f"9 of {ntasks}" and got["local devices"] == "1"
  assert got["coordinator"].startswith("gpu01:")


# ---------------------------------------------------------------------------------------------
# Two real processes join through launch.initialize from SLURM variables
# ---------------------------------------------------------------------------------------------

def _worker():
  """Run as a script: detect the plan from this process's SLURM variables, initialise, gather."""
  import json
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  plan = launch.initialize(launch.detect(), timeout=60)
  got = multihost_utils.process_allgather(np.asarray([10 + jax.process_index()]))
  print("RESULT " + json.dumps(dict(launcher=plan.launcher, process=jax.process_index(),
                                    count=jax.process_count(), devices=jax.device_count(),
                                    gathered=np.asarray(got).reshape(-1).tolist())), flush=True)
  jax.distributed.shutdown()


def test_two_processes_join_from_slurm_variables_even_when_a_worker_starts_first():
  import json
  port = _free_port()
  base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
              PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
              JAX_COORDINATOR_PORT=str(port))
  procs = {}
  for rank in (1, 0):  # the worker first: it must wait for the coordinator, not fail
    env = dict(base, **_slurm_env("localhost", ntasks=2, procid=rank, localid=0))
    procs[rank] = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2.0 if rank == 1 else 0)
  outs = {}
  try:
    for rank, p in procs.items():
      outs[rank] = p.communicate(timeout=120)[0]
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
  for rank in (0, 1):
    assert procs[rank].returncode == 0, outs[rank][-3000:]
    (line,) = [l for l in outs[rank].splitlines() if l.startswith("RESULT ")]
    got = json.loads(line[len("RESULT "):])
    assert got == dict(launcher="slurm", process=rank, count=2, devices=2, gathered=[10, 11])


if __name__ == "__main__":
  _worker()
