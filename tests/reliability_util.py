"""Helpers for the reliability tests: damaging checkpoints, unwritable folders, a worker run.

``damage(step_dir, kind)`` applies one kind of damage a crash, a full disk or a careless user
leaves behind; ``unwritable(path)`` makes a folder refuse writes even for root (``chattr +i``
where the file system supports it, else permissions for a non-root user).
"""
import contextlib
import glob
import os
import shutil
import subprocess

import pytest

DAMAGE = ("state_metadata", "state_data_truncated", "data_metadata", "data_dir", "state_dir")


def damage(step_dir: str, kind: str) -> None:
  """Damages the checkpoint folder ``step_dir`` (``WORKDIR/checkpoints/<step>``) in place."""
  if kind == "state_metadata":     # the tree's metadata (shapes, dtypes, structure) is gone
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "state_data_truncated":  # a partly written array file
    files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
    assert files, step_dir
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif kind == "data_metadata":    # the input position file is gone
    os.remove(os.path.join(step_dir, "data", "metadata"))
  elif kind == "data_dir":
    shutil.rmtree(os.path.join(step_dir, "data"))
  elif kind == "state_dir":
    shutil.rmtree(os.path.join(step_dir, "state"))
  else:
    raise ValueError(kind)


def _chattr(flag: str, path: str) -> bool:
  if not shutil.which("chattr"):
    return False
  return subprocess.run(["chattr", flag, path], capture_output=True).returncode == 0


def lock(path: str) -> str:
  """Makes folder ``path`` unwritable; returns how ("chattr" or "chmod"); skips if impossible."""
  if _chattr("+i", path):
    return "chattr"
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return "chmod"
  pytest.skip("cannot make a folder unwritable for root here (no chattr +i)")
  return ""


def unlock(path: str) -> None:
  if os.path.exists(path):
    _chattr("-i", path)
    os.chmod(path, 0o755)


@contextlib.contextmanager
def unwritable(path: str):
  lock(path)
  try:
    yield
  finally:
    unlock(path)
