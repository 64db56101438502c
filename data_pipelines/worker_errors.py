"""Errors of the row-building worker pool (``data_pipelines.workers``), in a module of their own
so that the streams that catch them need not import the pool (which imports the streams in each
worker process): the import graph stays acyclic."""


class WorkerError(RuntimeError):
  """A worker failed to build a batch, or died."""


class PoolStopped(WorkerError):
  """The pool was closed or reset while a batch was awaited (the caller may build it itself:
  only a tf.data iterator being released asks for it)."""
