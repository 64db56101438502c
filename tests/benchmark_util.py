"""Loads a script of benchmarks/ as a module (the folder is not a package)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
  """``benchmarks/<name>.py`` executed as a fresh module named ``benchmarks_<name>``."""
  path = os.path.join(ROOT, "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
