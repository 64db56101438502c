"""The boundary: ``unimo_jax`` outside its command modules (``cli``, ``*/main``, ``*/cli``) never
imports TensorFlow or ``data_pipelines``; only the command modules wire data in. Checked in a
fresh interpreter (this test process may already hold both), by importing every module."""
import subprocess
import sys

CODE = r"""
import importlib, pkgutil, sys
import unimo_jax

def is_command(name):
  return name == "unimo_jax.cli" or name.endswith(".main") or name.endswith(".cli")

names = []
for info in pkgutil.walk_packages(unimo_jax.__path__, "unimo_jax."):
  if not is_command(info.name):
    importlib.import_module(info.name)
    names.append(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "data_pipelines"))
print(len(names), "modules; forbidden modules loaded:", bad[:5])
sys.exit(1 if bad or len(names) < 40 else 0)
"""


def test_unimo_jax_imports_neither_tensorflow_nor_data_pipelines():
  proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "forbidden modules loaded: []" in proc.stdout
