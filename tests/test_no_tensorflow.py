"""``unimo_jax`` (model, losses, convert and the commands built on them) never imports TensorFlow:
only ``data_pipelines`` may. Checked in a fresh interpreter, since this test process may already
hold TensorFlow."""
import subprocess
import sys

CODE = r"""
import importlib, pkgutil, sys
import unimo_jax, unimo_jax.cli, unimo_jax.model_info
names = []
for pkg in ("unimo_jax.model", "unimo_jax.losses", "unimo_jax.convert"):
  mod = importlib.import_module(pkg)
  names.append(pkg)
  for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
    importlib.import_module(info.name)
    names.append(info.name)
bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print(len(names), "modules;", "tensorflow modules:", bad[:5])
sys.exit(1 if bad else 0)
"""


def test_unimo_jax_does_not_import_tensorflow():
  proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "tensorflow modules: []" in proc.stdout
