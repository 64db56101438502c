"""Device mesh, logical-axis sharding rules, multi-host start-up and global batches.

The mesh always has the three axes ``('data', 'fsdp', 'tensor')``:

- ``data``: pure data parallelism (parameters replicated),
- ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
- ``tensor``: Megatron-style tensor parallelism inside layers (heads, MLP, vocabulary).

The batch dimension is split over ``('data', 'fsdp')``. Parameters carry logical axis names
(``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``, ...) and a list of rules maps each logical name to
mesh axes; the rules live in the config so that a run can change its layout without code changes.
A logical dimension whose size is not divisible by its mesh axes is left replicated (tiny models on
many devices), never an error.

Meshes use ``AxisType.Auto`` (classic GSPMD propagation): jax 0.10's default ``Explicit`` axes make
``shard_map`` reject unsharded inputs and require ``jax.set_mesh`` around every optax call.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Default logical-axis rules: (logical name, mesh axes or None). Parameters are sharded over
# `fsdp` along their embedding dimension and over `tensor` along heads / MLP / vocabulary; the
# activations' batch dimension goes over both data axes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("classes", "tensor"),
    ("features", None),
    ("patch", None),
    ("projection", None),
    ("layers", None),
)


def mesh_shape(requested: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves a requested mesh shape with at most one ``-1`` against ``num_devices``.

  Args:
    requested: sizes for ``('data', 'fsdp', 'tensor')``, as a mapping or a sequence; one entry may
      be ``-1`` ("all remaining devices").
    num_devices: total number of devices (all processes).

  Returns:
    The concrete 3-tuple of axis sizes whose product is ``num_devices``.

  Raises:
    ValueError: with one line naming the problem (two ``-1``, non-positive sizes, a product that
      does not divide or does not equal the device count).
  """
  if isinstance(requested, Mapping):
    unknown = set(requested) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(requested.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in requested]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % fixed:
      raise ValueError(
          f"mesh: {dict(zip(MESH_AXES, sizes))} needs a multiple of {fixed} devices, "
          f"but there are {num_devices}")
    sizes[fills[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"mesh: {dict(zip(MESH_AXES, sizes))} uses {fixed} devices, but there are {num_devices}")
  return tuple(sizes)


def make_mesh(requested: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types.

  ``jax.make_mesh`` orders the devices for the physical topology (TPU ICI rings, GPU NVLink
  islands) so that the fastest-varying axis (``tensor``) sits on the closest devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(requested, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Normalises config rules (lists from a ConfigDict) into ``((name, axes), ...)``.

  An axes entry may be ``None``, one mesh axis name, or a list of names.
  """
  if rules is None:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    name, axes = rule[0], rule[1]
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      for a in axes:
        if a not in MESH_AXES:
          raise ValueError(f"axis rule {name!r}: unknown mesh axis {a!r}")
    elif axes is not None and axes not in MESH_AXES:
      raise ValueError(f"axis rule {name!r}: unknown mesh axis {axes!r}")
    out.append((str(name), axes))
  return tuple(out)


def _axes_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    return mesh.shape[axes]
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """Maps one array's logical axis names to a ``PartitionSpec`` for ``mesh``.

  Each logical name takes the mesh axes of its first matching rule, unless those mesh axes are
  already used by an earlier dimension of the same array or the dimension is not divisible by the
  product of their sizes; in those cases the dimension stays replicated. Names without a rule
  stay replicated.

  Args:
    logical: one logical name (or None) per dimension, or None for a fully replicated array.
    shape: the array's shape.
    mesh: the device mesh.
    rules: ``((logical name, mesh axes), ...)``.
  """
  if logical is None:
    return P()
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
  table: dict[str, Any] = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    axes = table.get(name) if name is not None else None
    if axes is not None:
      names = (axes,) if isinstance(axes, str) else tuple(axes)
      # Size-1 mesh axes add nothing; dropping them keeps specs readable and comparable.
      names = tuple(a for a in names if mesh.shape[a] > 1 and a not in used)
      if names and dim % _axes_size(mesh, names) == 0:
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
        continue
    spec.append(None)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_partitioned(x: Any) -> bool:
  import flax.core.meta as meta  # flax is only needed when boxed parameters are used
  return isinstance(x, meta.Partitioned)


def logical_axes(tree: Any) -> Any:
  """Logical axis names of every leaf of a tree of (possibly boxed) flax parameters.

  Leaves boxed by ``nn.with_logical_partitioning`` give their names; plain leaves give None.
  The result has the structure of ``unbox(tree)`` with tuples (or None) as leaves.
  """
  def names(x):
    if _is_partitioned(x):
      return tuple(x.names)
    return None
  return jax.tree_util.tree_map(names, tree, is_leaf=_is_partitioned)


def unbox(tree: Any) -> Any:
  """Removes flax partitioning boxes, keeping the values (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map(lambda x: x.unbox() if _is_partitioned(x) else x, tree,
                                is_leaf=_is_partitioned)


# Arrays at least this large that the rules leave unsharded over `fsdp` get their largest
# divisible free dimension sharded over it (ZeRO-3 must not keep big heads replicated just
# because their logical names map elsewhere, e.g. a projection whose input is labelled "mlp").
FSDP_FALLBACK_MIN_SIZE = 2**16


# Logical names the fallback never shards: the scanned encoder's stacked-layer axis (a scan
# step slices one layer; a layer axis split over devices would gather the whole stack).
FSDP_FALLBACK_EXCLUDED = ("layers",)


def with_fsdp_fallback(spec: P, shape: Sequence[int], mesh: Mesh,
                       min_size: int = FSDP_FALLBACK_MIN_SIZE,
                       logical: Sequence[str | None] | None = None) -> P:
  """Adds ``fsdp`` to the largest unsharded dimension divisible by its size, if the array is
  large and ``spec`` does not use ``fsdp`` yet. Dimensions whose logical name (``logical``) is
  in ``FSDP_FALLBACK_EXCLUDED`` are never chosen."""
  size = mesh.shape.get("fsdp", 1)
  if size <= 1 or math.prod(shape) < min_size:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)}
  if "fsdp" in used:
    return spec
  names = list(logical) if logical is not None else [None] * len(shape)
  free = [i for i, e in enumerate(entries) if e is None and shape[i] % size == 0
          and names[i] not in FSDP_FALLBACK_EXCLUDED]
  if not free:
    return spec
  best = max(free, key=lambda i: shape[i])
  entries[best] = "fsdp"
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def tree_shardings(abstract: Any, logical: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   fsdp_min_size: int | None = FSDP_FALLBACK_MIN_SIZE) -> Any:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given their logical names.

  Args:
    abstract: tree with ``.shape`` leaves.
    logical: tree of the same structure with a tuple of logical names (or None) per leaf.
    mesh, rules: the mesh and logical-axis rules.
    fsdp_min_size: see ``with_fsdp_fallback`` (None turns the fallback off).
  """
  flat, treedef = jax.tree_util.tree_flatten(abstract)
  flat_logical = treedef.flatten_up_to(logical)
  out = []
  for x, names in zip(flat, flat_logical):
    spec = logical_to_spec(names, np.shape(x), mesh, rules)
    if fsdp_min_size is not None:
      spec = with_fsdp_fallback(spec, np.shape(x), mesh, fsdp_min_size, names)
    out.append(NamedSharding(mesh, spec))
  return treedef.unflatten(out)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
  """Sharding of an array whose leading dimension is the batch (split over the data axes).

  Trailing dimensions are replicated (a PartitionSpec pads with None).
  """
  axes = tuple(a for a in batch_axes if a in mesh.shape)
  return NamedSharding(mesh, P(axes))


def data_parallel_size(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> int:
  """Number of distinct batch shards (product of the batch axes' sizes)."""
  return math.prod(mesh.shape[a] for a in batch_axes if a in mesh.shape)


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 batch_axes: Sequence[str] = BATCH_AXES) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's rows.

  Every process passes its own ``[B / process_count, ...]`` rows of every field; the result is a
  dict of global ``[B, ...]`` arrays sharded over ``batch_axes`` (leading dimension). With one
  process this is a sharded ``device_put``.

  Args:
    host_batch: ``{name: np.ndarray [local_batch, ...]}``; scalars (0-d) are replicated as is.
    mesh: the device mesh.
    batch_axes: mesh axes the batch dimension is split over.
  """
  out = {}
  sharding = batch_sharding(mesh, batch_axes=batch_axes)
  for name, value in host_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[name] = jax.make_array_from_process_local_data(replicated(mesh), value, value.shape)
      continue
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


# ---------------------------------------------------------------------------------------------
# Multi-host start-up
# ---------------------------------------------------------------------------------------------

def _cluster_from_env(env: Mapping[str, str]) -> str | None:
  """Names the cluster environment that ``jax.distributed.initialize()`` can auto-detect."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and env.get("SLURM_JOB_ID"):
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "mpi"
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if hosts and len([h for h in hosts.split(",") if h]) > 1:
    return "tpu"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               platform: str | None = None, env: Mapping[str, str] | None = None) -> str:
  """Starts ``jax.distributed`` when the run spans several processes; a no-op otherwise.

  Must run before anything touches a JAX backend. The decision, in order:

  1. an explicit ``coordinator_address`` (flags): use it with ``num_processes``/``process_id``;
  2. an environment JAX can read itself (``JAX_COORDINATOR_ADDRESS``, SLURM with several tasks,
     Open MPI, a multi-host TPU slice): ``jax.distributed.initialize()`` with no arguments;
  3. otherwise one process: nothing to do.

  On CPU (``platform == 'cpu'`` or ``JAX_PLATFORMS=cpu``) cross-process collectives need gloo.

  Returns:
    What was done: ``"explicit"``, ``"env"``, ``"slurm"``, ``"mpi"``, ``"tpu"`` or ``"single"``.
  """
  env = os.environ if env is None else env
  how = "explicit" if coordinator_address else _cluster_from_env(env)
  if how is None:
    return "single"
  platform = platform or env.get("JAX_PLATFORMS", "").split(",")[0] or None
  if platform == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if how == "explicit":
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id),
                               local_device_ids=local_device_ids)
  else:
    jax.distributed.initialize(local_device_ids=local_device_ids)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return how
