"""Multi-host launch: which processes form a run, read from the launcher's environment.

Every process of a multi-host run executes the same command; what differs is the environment
its launcher gives it. ``detect`` reads that environment the way ``jax.distributed.initialize()``
does (the same variables, ports and precedence, see jax/_src/clusters) and returns a ``Plan``:
the process index and count, the coordinator (process 0's ``host:port``) and the local devices.
``describe`` says what a run would do with it (mesh, per-process batch) without starting
anything: ``unimo-jax train --print_env`` prints it and exits. ``initialize`` starts
``jax.distributed`` from a plan, waiting at most ``timeout`` seconds for the coordinator and
failing with one line (``LaunchError``) when it never answers, rather than hanging or aborting
(a gRPC deadline inside ``jax.distributed.initialize`` kills the process with a C++ stack
trace).

Launchers, in the order they are tried:
  explicit  --coordinator_address HOST:PORT --num_processes N --process_id I (flags win)
  env       JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID (e.g. a GKE
            JobSet manifest that computes them)
  slurm     srun: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS (> 1), SLURM_PROCID,
            SLURM_LOCALID; coordinator = first node of the step, port 61440 + job id % 4096;
            one process per local device SLURM_LOCALID (jax's rule; run one task per GPU)
  mpi       mpirun (Open MPI): OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE (> 1) / _RANK /
            _LOCAL_RANK
  tpu       a multi-host TPU slice: TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES, GKE/xpk)
            and TPU_WORKER_ID, multislice MEGASCALE_* ; port 8482. On a TPU VM created with
            gcloud the worker list lives in the GCE metadata server, which jax (and
            ``detect``, when /dev/accel* exists) reads
  single    none of these: one process, nothing to initialise
``JAX_COORDINATOR_PORT`` overrides the derived port, as it does for jax.

No TensorFlow and no data_pipelines here: the command modules call this before anything touches
a JAX backend.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import socket
import time
from typing import Callable, Mapping, Sequence

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
TPU_PORT = "8482"  # jax's cloud_tpu_cluster.coordinator_port
DEFAULT_TIMEOUT = 300  # seconds; jax.distributed.initialize's initialization_timeout default


class LaunchError(ValueError):
  """A launch that cannot proceed, said in one line (a missing coordinator, bad flags)."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the run.

  launcher: one of explicit | env | slurm | mpi | tpu | single.
  coordinator: process 0's ``host:port`` (None: single, or read by jax at start-up).
  local_device_ids: the devices this process drives (None: all it sees).
  evidence: the variables (or flags) that decided, ``NAME=value`` pairs.
  """
  launcher: str
  num_processes: int = 1
  process_id: int = 0
  coordinator: str | None = None
  local_device_ids: tuple[int, ...] | None = None
  evidence: tuple[str, ...] = ()

  @property
  def multi_process(self) -> bool:
    return self.launcher != "single"


def _int(env, name) -> int:
  try:
    return int(env[name])
  except (KeyError, ValueError):
    raise LaunchError(f"environment variable {name}={env.get(name)!r} is not an integer") from None


def slurm_first_host(node_list: str) -> str:
  """The first host of a SLURM node list: ``node[001-004,9],gpu2`` -> ``node001``."""
  m = re.match(r"([^,\[]*)(\[([^\]]*)\])?", node_list)
  prefix, bracket = m.group(1), m.group(3)
  if bracket is None:
    return prefix
  return prefix + re.split(r"[,-]", bracket)[0]


def _port(env, derived: str) -> str:
  return env.get("JAX_COORDINATOR_PORT") or derived


def _local_ids(value) -> tuple[int, ...] | None:
  if value in (None, "", ()):
    return None
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  return tuple(int(v) for v in value)


def _gce_metadata(key: str, timeout: float = 2.0) -> str:
  """An attribute of this GCE VM (the TPU worker list lives there on gcloud-created TPU VMs)."""
  import urllib.request  # pylint: disable=import-outside-toplevel
  req = urllib.request.Request(
      f"http://{os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')}"
      f"/computeMetadata/v1/instance/attributes/{key}", headers={"Metadata-Flavor": "Google"})
  with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (fixed host)
    return r.read().decode()


def _tpu_plan(env, metadata: Callable[[str], str] | None) -> Plan | None:
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  evidence = []
  if hosts:
    workers = [h for h in hosts.split(",") if h]
    worker_id = _int(env, "TPU_WORKER_ID") if "TPU_WORKER_ID" in env else 0
    evidence += [f"TPU_WORKER_HOSTNAMES={hosts}", f"TPU_WORKER_ID={worker_id}"]
  elif metadata is not None and env.get("TPU_SKIP_MDS_QUERY") is None:
    try:
      workers = [w.split(":")[-1] for w in metadata("worker-network-endpoints").split(",") if w]
      worker_id = int(metadata("agent-worker-number"))
    except (OSError, ValueError):
      return None
    evidence += [f"metadata worker-network-endpoints={','.join(workers)}",
                 f"metadata agent-worker-number={worker_id}"]
  else:
    return None
  slices = int(env.get("MEGASCALE_NUM_SLICES") or 1)
  slice_id = int(env.get("MEGASCALE_SLICE_ID") or 0)
  if len(workers) * slices <= 1:
    return None
  if slices > 1:
    evidence += [f"MEGASCALE_NUM_SLICES={slices}", f"MEGASCALE_SLICE_ID={slice_id}"]
  host = (env.get("MEGASCALE_COORDINATOR_ADDRESS") or workers[0]).split(":")[0]
  # jax never sets local_device_ids on TPUs: each host drives all its chips.
  return Plan("tpu", len(workers) * slices, worker_id + slice_id * len(workers),
              f"{host}:{_port(env, TPU_PORT)}", None, tuple(evidence))


def detect(env: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None,
           local_device_ids=None, metadata: Callable[[str], str] | None = None) -> Plan:
  """The launch plan of this process (see the module docstring for the order).

  Args:
    env: the environment (default ``os.environ``).
    coordinator_address, num_processes, process_id, local_device_ids: the command's flags.
    metadata: reads a GCE metadata attribute (default: the metadata server, asked only when
      the machine has TPU chips, /dev/accel*, and no TPU worker variables are set).
  Raises:
    LaunchError: incomplete flags or unreadable variables (one line).
  """
  env = os.environ if env is None else env
  local = _local_ids(local_device_ids) or _local_ids(env.get("JAX_LOCAL_DEVICE_IDS"))
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise LaunchError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= int(process_id) < int(num_processes):
      raise LaunchError(f"--process_id {process_id} is outside [0, {num_processes})")
    return Plan("explicit", int(num_processes), int(process_id), coordinator_address, local,
                (f"--coordinator_address={coordinator_address}",
                 f"--num_processes={num_processes}", f"--process_id={process_id}"))
  if env.get("JAX_COORDINATOR_ADDRESS") and "JAX_NUM_PROCESSES" in env:
    n, i = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
    return Plan("env", n, i, env["JAX_COORDINATOR_ADDRESS"], local,
                (f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}",
                 f"JAX_NUM_PROCESSES={n}", f"JAX_PROCESS_ID={i}"))
  if all(v in env for v in SLURM_VARS) and _int(env, "SLURM_NTASKS") > 1:
    port = str(_int(env, "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))
    host = slurm_first_host(env["SLURM_STEP_NODELIST"])
    if local is None and not glob.glob("/dev/accel*"):  # jax: one device per task (not TPUs)
      local = (_int(env, "SLURM_LOCALID"),)
    return _with_coordinator(Plan("slurm", _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"),
                                  f"{host}:{_port(env, port)}", local,
                                  tuple(f"{v}={env[v]}" for v in SLURM_VARS)), env)
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    uri = env["OMPI_MCA_orte_hnp_uri"]
    port = str(int(uri.split(".", 1)[0]) // 2**12 % 2**12 + (65535 - 2**12 + 1))
    m = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
    if m is None:
      raise LaunchError(f"cannot read the launcher's address from OMPI_MCA_orte_hnp_uri={uri!r}")
    host = next(g for g in m.groups() if g is not None)
    if local is None and "OMPI_COMM_WORLD_LOCAL_RANK" in env:
      local = (_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),)
    return _with_coordinator(Plan(
        "mpi", _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK"),
        f"{host}:{_port(env, port)}", local,
        (f"OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}",
         f"OMPI_COMM_WORLD_RANK={env.get('OMPI_COMM_WORLD_RANK')}")), env)
  if metadata is None and glob.glob("/dev/accel*"):
    metadata = _gce_metadata
  plan = _tpu_plan(env, metadata)
  if plan is not None:
    return _with_coordinator(plan, env)
  return Plan("single", 1, 0, None, local, ())


def _with_coordinator(plan: Plan, env) -> Plan:
  """jax takes JAX_COORDINATOR_ADDRESS, when set, over the launcher's derived address."""
  if not env.get("JAX_COORDINATOR_ADDRESS"):
    return plan
  return dataclasses.replace(plan, coordinator=env["JAX_COORDINATOR_ADDRESS"], evidence=(
      plan.evidence + (f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}",)))


# ---------------------------------------------------------------------------------------------
# What the run would do
# ---------------------------------------------------------------------------------------------

def run_layout(plan: Plan, config, local_devices: int) -> dict:
  """Mesh and batch sizes a run of ``config`` would use under ``plan``.

  Assumes every process drives ``local_devices`` devices (true of TPU slices and homogeneous
  GPU nodes). Returns dict(devices, local_devices, mesh {axis: size}, batch {stream: (global,
  per process, per data-parallel device)}, problems [str]).
  """
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  devices = local_devices * plan.num_processes
  problems = []
  try:
    mesh = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(dict(config.mesh), devices)))
  except ValueError as e:
    mesh, problems = {}, [str(e)]
  data_parallel = mesh.get("data", 1) * mesh.get("fsdp", 1) if mesh else 1
  batch = {}
  for stream in ("text", "image", "pair"):
    scfg = config.data.streams.get(stream) if "streams" in config.data else None
    size = int(scfg.get("batch_size", 0) or 0) if scfg is not None else 0
    if not size or not list(scfg.get("sources", [])):
      continue
    batch[stream] = (size, size / plan.num_processes, size / data_parallel)
    if size % plan.num_processes:
      problems.append(f"data.streams.{stream}.batch_size {size} is not divisible by "
                      f"{plan.num_processes} processes")
    elif size % data_parallel:
      problems.append(f"data.streams.{stream}.batch_size {size} is not divisible by the "
                      f"{data_parallel} data-parallel devices")
  return dict(devices=devices, local_devices=local_devices, mesh=mesh, batch=batch,
              problems=problems)


def describe(plan: Plan, config=None, local_devices: int | None = None) -> str:
  """The lines ``--print_env`` prints: launcher, process, coordinator, devices, mesh, batch."""
  lines = [f"launcher: {plan.launcher}" + (f" ({' '.join(plan.evidence)})" if plan.evidence
                                           else " (no multi-host environment found)"),
           f"process: {plan.process_id} of {plan.num_processes}",
           f"coordinator: {plan.coordinator or '-'}"]
  local = "all visible" if plan.local_device_ids is None else ",".join(
      map(str, plan.local_device_ids))
  lines.append(f"local devices: {local}")
  if config is not None and local_devices is not None:
    lay = run_layout(plan, config, local_devices)
    lines.append(f"devices: {lay['devices']} = {local_devices} per process x "
                 f"{plan.num_processes} processes")
    if lay["mesh"]:
      lines.append("mesh: " + ", ".join(f"{a} {s}" for a, s in lay["mesh"].items()))
    for stream, (g, p, d) in lay["batch"].items():
      lines.append(f"batch {stream}: {g} global, {p:g} per process, {d:g} per device")
    lines += [f"problem: {p}" for p in lay["problems"]]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Starting jax.distributed
# ---------------------------------------------------------------------------------------------

def wait_for_coordinator(address: str, timeout: float, poll: float = 0.5) -> float:
  """Polls ``host:port`` until it accepts a TCP connection; returns the seconds waited.

  Raises LaunchError after ``timeout`` seconds (a name that does not resolve, or nothing
  listening yet, is retried until then).
  """
  host, _, port = address.rpartition(":")
  start = time.monotonic()
  last = "no answer"
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=max(poll, 0.1)):
        return time.monotonic() - start
    except OSError as e:
      last = e.strerror or type(e).__name__
    if time.monotonic() - start >= timeout:
      raise LaunchError(f"no coordinator at {address} after {timeout:g}s ({last}); is process 0 "
                        "running, and is the address reachable from this host?")
    time.sleep(poll)


def initialize(plan: Plan, timeout: float = DEFAULT_TIMEOUT,
               platform: str | None = None) -> Plan:
  """Starts ``jax.distributed`` for ``plan`` (nothing for a single process).

  Processes other than 0 first wait (at most ``timeout`` s) for the coordinator to listen, so
  a coordinator that never starts ends in one ``LaunchError`` line; the rest of ``timeout``
  is jax's ``initialization_timeout`` (process 0 waits that long for every process).
  """
  if not plan.multi_process:
    return plan
  waited = 0.0
  if plan.process_id != 0 and plan.coordinator:
    waited = wait_for_coordinator(plan.coordinator, timeout)
  import jax  # pylint: disable=import-outside-toplevel
  platform = platform or os.environ.get("JAX_PLATFORMS", "").split(",")[0] or None
  if platform == "cpu":  # cross-process collectives on CPU
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed (%s): process %d of %d, coordinator %s", plan.launcher,
               plan.process_id, plan.num_processes, plan.coordinator)
  jax.distributed.initialize(
      coordinator_address=plan.coordinator, num_processes=plan.num_processes,
      process_id=plan.process_id,
      local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
      initialization_timeout=max(1, int(timeout - waited)))
  return plan


def initialize_from_flags(coordinator_address=None, num_processes=None, process_id=None,
                          local_device_ids: Sequence[int] | str | None = None,
                          timeout: float = DEFAULT_TIMEOUT) -> Plan:
  """``detect`` + ``initialize``: what a command calls first thing."""
  plan = detect(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id, local_device_ids=local_device_ids)
  return initialize(plan, timeout)
