"""tf.data / TFDS input pipelines for unimo_jax (the only package that imports TensorFlow)."""
