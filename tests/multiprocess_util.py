"""Runs a test file as 2 worker processes x 4 CPU devices on localhost (gloo).

Each worker is started as ``python SCRIPT PROCESS_ID PORT ARG`` with ``tests/`` and the checkout on
PYTHONPATH; it calls ``parallel.initialize(f"127.0.0.1:{PORT}", 2, PROCESS_ID, platform="cpu")``.
"""
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(script: str, arg: str, processes: int = 2, devices_per_process: int = 4,
                timeout: float = 900) -> list:
  """Starts the workers, waits for all and asserts each exited 0 (with its output's tail).

  A worker still running after ``timeout`` (e.g. stuck in a collective) is killed, so none
  outlives the test. Returns each worker's combined stdout/stderr.
  """
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
             PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE),
                                         os.environ.get("PYTHONPATH", "")]))
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port), arg], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  return outs
