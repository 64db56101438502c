"""A module imported on first attribute access: `from data_pipelines.lazy import tensorflow as tf`.

Row-building worker processes (`workers`) import the row code (sources, examples, streams) but
never run a TensorFlow op; importing TensorFlow there would cost each worker ~10 s and ~700 MB.
Modules whose TF use sits inside functions take `tf` from here, so TF loads only when one runs.
"""
import importlib


class LazyModule:
  """Stands for module `name`; the first attribute read imports it."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return getattr(importlib.import_module(self._name), attr)

  def __repr__(self):
    return f"<lazy module {self._name}>"


tensorflow = LazyModule("tensorflow")
