"""Test set-up: 8 fake CPU devices and the persistent compilation cache.

XLA_FLAGS must be set before jax (or tensorflow, which imports jax when both are installed) is
imported anywhere, so this runs at conftest import time, before any test module.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

_cache = os.environ.get(
    "UNIMO_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "unimo_jax", "xla"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
