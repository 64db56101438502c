"""tf.data / TFDS input pipelines for unimo_jax (the only package that imports TensorFlow)."""


def import_tensorflow_quietly():
  """Imports TensorFlow with its C++ start-up lines (oneDNN, CPU features) kept off stderr.

  TF 2.21 logs them through absl before any log level applies (TF_CPP_MIN_LOG_LEVEL does not
  silence them), so file descriptor 2 points at /dev/null for the import alone. Commands call
  this unless asked to be verbose; errors still raise normally.
  """
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=import-outside-toplevel
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  return tensorflow
