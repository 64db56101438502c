"""Mesh construction, logical-axis rules and global batch assembly on 8 fake CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unimo_jax import parallel


def test_mesh_shape_fills_minus_one():
  assert parallel.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
  assert parallel.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert parallel.mesh_shape((1, 1, -1), 8) == (1, 1, 8)
  assert parallel.mesh_shape({"fsdp": 8}, 8) == (1, 8, 1)


@pytest.mark.parametrize("requested, fragment", [
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3, "fsdp": -1}, "multiple of 3"),
    ({"data": 16}, "uses 16 devices, but there are 8"),
    ({"data": 0, "fsdp": -1}, "positive"),
    ({"model": 2}, "unknown axes"),
])
def test_mesh_shape_errors_are_one_line(requested, fragment):
  with pytest.raises(ValueError, match=fragment) as e:
    parallel.mesh_shape(requested, 8)
  assert "\n" not in str(e.value)


def test_make_mesh_has_auto_axes():
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_logical_to_spec_rules_divisibility_and_reuse():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  rules = parallel.DEFAULT_RULES
  # embed -> fsdp (4), mlp -> tensor (2).
  assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
  # 6 is not divisible by 4: replicated instead of failing.
  assert parallel.logical_to_spec(("embed", "mlp"), (6, 128), mesh, rules) == P(None, "tensor")
  # vocab 5 not divisible by tensor 2.
  assert parallel.logical_to_spec(("vocab", "embed"), (5, 64), mesh, rules) == P(None, "fsdp")
  # a mesh axis is used once per array.
  assert parallel.logical_to_spec(("embed", "embed"), (8, 8), mesh, rules) == P("fsdp")
  # unknown names and None stay replicated; batch uses both data axes, size-1 axes dropped.
  assert parallel.logical_to_spec(("foo", None), (8, 8), mesh, rules) == P()
  assert parallel.logical_to_spec(("batch", "length"), (8, 3), mesh, rules) == P("fsdp")
  assert parallel.logical_to_spec(None, (8, 8), mesh, rules) == P()
  mesh2 = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert parallel.logical_to_spec(("batch",), (8,), mesh2, rules) == P(("data", "fsdp"))


def test_rules_from_config_validates_axes():
  assert parallel.rules_from_config([["embed", ["fsdp", "tensor"]], ["kv", None]]) == (
      ("embed", ("fsdp", "tensor")), ("kv", None))
  with pytest.raises(ValueError, match="unknown mesh axis"):
    parallel.rules_from_config([["embed", "model"]])


class _Boxed(nn.Module):

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")),
                   (x.shape[-1], 16))
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (16,))
    s = self.param("scale", nn.initializers.ones, (16,))  # unboxed: replicated
    return (x @ k + b) * s


def test_tree_shardings_from_boxed_params_and_sharded_init():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model = _Boxed()
  x = jnp.ones((2, 8))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  logical = parallel.logical_axes(abstract)
  shardings = parallel.tree_shardings(parallel.unbox(abstract), logical, mesh)
  p = shardings["params"]
  assert p["kernel"].spec == P("fsdp", "tensor")
  assert p["bias"].spec == P("tensor")
  assert p["scale"].spec == P()
  init = jax.jit(lambda k: parallel.unbox(model.init(k, x)), out_shardings=shardings)
  params = init(jax.random.key(0))
  ref = parallel.unbox(model.init(jax.random.key(0), x))
  # Same values as an unsharded init (XLA may fuse the scaling differently: 1 ulp).
  np.testing.assert_allclose(np.asarray(params["params"]["kernel"]),
                             np.asarray(ref["params"]["kernel"]), rtol=1e-6)
  assert params["params"]["kernel"].sharding.spec == P("fsdp", "tensor")
  shard = params["params"]["kernel"].addressable_shards[0].data
  assert shard.shape == (2, 8)


def test_global_batch_single_process():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  host = {"a": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
          "b": np.arange(16, dtype=np.int32), "scalar": np.float32(2.0)}
  batch = parallel.global_batch(host, mesh)
  np.testing.assert_array_equal(np.asarray(batch["a"]), host["a"])
  np.testing.assert_array_equal(np.asarray(batch["b"]), host["b"])
  assert batch["a"].sharding.spec == P(("data", "fsdp"))
  assert len(batch["a"].addressable_shards) == 8
  assert batch["a"].addressable_shards[0].data.shape == (2, 3)
  assert float(batch["scalar"]) == 2.0


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "env"),
])
def test_cluster_detection(env, expected):
  assert parallel._cluster_from_env(env) == expected


def test_initialize_single_process_is_noop():
  assert parallel.initialize(env={}) == "single"
  with pytest.raises(ValueError, match="num_processes"):
    parallel.initialize(coordinator_address="127.0.0.1:1", env={})


def test_fsdp_fallback_shards_large_arrays_the_rules_leave_replicated():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  big = (1024, 256)
  assert parallel.with_fsdp_fallback(P(), big, mesh) == P("fsdp")
  assert parallel.with_fsdp_fallback(P(), (1001, 256), mesh) == P(None, "fsdp")
  assert parallel.with_fsdp_fallback(P("fsdp"), big, mesh) == P("fsdp")  # already sharded
  assert parallel.with_fsdp_fallback(P(), (8, 8), mesh) == P()  # small: left alone
  assert parallel.with_fsdp_fallback(P(), (1023, 255), mesh) == P()  # nothing divisible
  mesh1 = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  assert parallel.with_fsdp_fallback(P(), big, mesh1) == P()
  # the scanned encoder's stacked-layer axis is never the fallback's choice
  assert parallel.with_fsdp_fallback(P(), (1024, 256), mesh,
                                     logical=("layers", None)) == P(None, "fsdp")
  assert parallel.with_fsdp_fallback(P(), (1024, 255), mesh, logical=("layers", None)) == P()
