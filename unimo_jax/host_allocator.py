"""The host allocator a CPU-backend run starts with: glibc kept to its main heap.

XLA:CPU allocates a compiled program's temporary buffer (hundreds of MiB for a train step) at
every execution, from one of its worker threads. glibc serves a block that large from a thread
arena with a fresh ``mmap`` whatever ``MALLOC_MMAP_MAX_`` says (a thread arena's heap is at most
64 MiB) and ``munmap``s it when the step frees it, so the kernel faults in and zeroes every page
of the buffer on every step: 150,000-240,000 minor faults and 0.35-0.54 s of system CPU time a
step for the text-MLM benchmark shapes (``benchmarks/step_profile.py`` prints both). With

  MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736

every thread allocates from the main heap, nothing is mmap'd and the heap is never trimmed, so
the step reuses the block it freed: no faults, and the step's system time goes to ~0.02 s
(measurements in ``benchmarks/README.md``). glibc reads these variables once, when the process
starts, so ``apply`` re-executes the command with them set (``os.execve`` of the same command
line, before anything else has run), once.

The policy, from ``UNIMO_JAX_HOST_ALLOCATOR``:
  auto       (default) main_heap when the run's JAX platform is the CPU (``JAX_PLATFORMS``
             starts with ``cpu``, or it is unset and no accelerator plugin is installed) on
             Linux with glibc; otherwise system
  main_heap  the three variables above, whatever the platform
  system     the allocator as the process found it
A variable the user already set (any ``MALLOC_*`` of the three) wins: nothing is re-executed.
The costs of main_heap: one arena for every thread (a multi-threaded tf.data pipeline in the
same process contends for its lock: the demo's input pipeline alone ran at 0.92 of its
throughput on a 2-vCPU host) and a process that keeps its peak heap.

No TensorFlow, no JAX: this runs before either is imported.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Callable, Mapping, Sequence

ENV = "UNIMO_JAX_HOST_ALLOCATOR"
APPLIED = "UNIMO_JAX_HOST_ALLOCATOR_APPLIED"  # set in the re-executed process
POLICIES = ("auto", "main_heap", "system")
MAIN_HEAP = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
}
# Modules whose presence means JAX may pick an accelerator by default.
ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "jax_plugins")


def is_glibc() -> bool:
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def accelerator_plugin_installed() -> bool:
  """Whether a PJRT plugin JAX would try before the CPU is installed (without importing JAX)."""
  # jax_plugins: the namespace package plugins install into; entry points: the other way JAX
  # discovers them
  if any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_MODULES):
    return True
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def decide(environ: Mapping[str, str], *, glibc: bool, plugin: Callable[[], bool]) -> str:
  """The policy in effect, ``main_heap`` or ``system``, for a process started with ``environ``
  on a host with (``glibc``) or without glibc, ``plugin()`` saying whether an accelerator plugin
  is installed."""
  requested = environ.get(ENV, "auto").strip().lower() or "auto"
  if requested not in POLICIES:
    raise ValueError(f"{ENV}={environ.get(ENV)!r}: expected one of {', '.join(POLICIES)}")
  if environ.get(APPLIED):  # this process was re-executed under the settings
    return "main_heap"
  if any(k in environ for k in MAIN_HEAP) or requested == "system" or not glibc:
    return "system"  # the caller's own MALLOC_* win; nothing to tune without glibc
  if requested == "main_heap":
    return "main_heap"
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:  # JAX tries them in order: the CPU first or not at all
    return "main_heap" if platforms.split(",")[0].strip() == "cpu" else "system"
  return "system" if plugin() else "main_heap"  # no plugin: JAX runs on the CPU


def policy(environ: Mapping[str, str], *, glibc: bool | None = None,
           plugin: Callable[[], bool] | None = None) -> str:
  """`decide` on this host (its libc, its installed plugins) unless told otherwise."""
  return decide(environ, glibc=is_glibc() if glibc is None else glibc,
                plugin=plugin or accelerator_plugin_installed)


def main_heap_environ(environ: Mapping[str, str]) -> dict:
  """``environ`` with the main-heap settings and the marker of a process started under them."""
  return {**environ, **MAIN_HEAP, APPLIED: "1"}


def describe(environ: Mapping[str, str] | None = None) -> str:
  """One line for a run's log: which allocator this process runs with."""
  environ = os.environ if environ is None else environ
  if environ.get(APPLIED):
    return ("glibc main heap (" + " ".join(f"{k}={environ.get(k, '')}" for k in MAIN_HEAP) +
            f"; {ENV}=system turns it off)")
  user_set = {k: environ[k] for k in MAIN_HEAP if k in environ}
  if user_set:
    return "glibc as set by the caller (" + " ".join(f"{k}={v}" for k, v in user_set.items()) + ")"
  return "the process's default allocator"


def apply(environ: Mapping[str, str] | None = None,
          orig_argv: Sequence[str] | None = None,
          execv: Callable[[str, Sequence[str], Mapping[str, str]], None] | None = None,
          *, glibc: bool | None = None, plugin: Callable[[], bool] | None = None) -> str:
  """Re-execute this command under the main-heap settings when the policy says so.

  Returns the policy in effect when it does not re-execute (``execv`` does not return). Call it
  first thing in a command's process, before any thread has allocated.
  """
  environ = dict(os.environ if environ is None else environ)
  chosen = policy(environ, glibc=glibc, plugin=plugin)
  if chosen != "main_heap" or environ.get(APPLIED):
    return chosen
  argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  (execv or os.execve)(sys.executable, argv, main_heap_environ(environ))
  return chosen  # only an injected execv returns
