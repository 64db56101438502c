"""unimo_jax: pre-training UNIMO-style unified-modal Transformers in JAX/Flax.

The library never imports TensorFlow; input pipelines live in ``data_pipelines``.
"""

__version__ = "0.1.0"
