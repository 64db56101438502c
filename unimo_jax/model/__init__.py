"""The unified-modal Transformer: ``from unimo_jax.model import ModelConfig, Unimo, masks``.

Modules: ``config`` (ModelConfig + presets), ``masks`` (attention masks), ``layers`` (encoder),
``embeddings`` (text / regions / patches), ``heads`` (LM, region, CMCL), ``unimo`` (the model and
its entry points), ``decoding`` (key/value cache for generation).
"""
from unimo_jax.model import masks
from unimo_jax.model.config import ModelConfig
from unimo_jax.model.decoding import cache_shapes, init_cache, reorder_cache
from unimo_jax.model.embeddings import patchify, text_positions
from unimo_jax.model.unimo import (Unimo, dummy_visual, init_params, init_variables,
                                   visual_length)

__all__ = [
    "ModelConfig", "Unimo", "masks", "init_cache", "reorder_cache", "cache_shapes", "patchify",
    "text_positions", "dummy_visual", "init_params", "init_variables", "visual_length",
]
