"""Sharded creation of the train state and merging of imported parameters."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unimo_jax import parallel
from unimo_jax.train import optimizer as opt_lib
from unimo_jax.train import state as state_lib


class Boxed(nn.Module):
  """Two logically partitioned layers and a LayerNorm (a stand-in for the encoder)."""

  @nn.compact
  def __call__(self, x):
    def dense(name, shape, axes):
      k = self.param(f"{name}_kernel",
                     nn.with_logical_partitioning(nn.initializers.normal(0.5), axes), shape)
      b = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
                     shape[-1:])
      return k, b
    k1, b1 = dense("up", (x.shape[-1], 16), ("embed", "mlp"))
    k2, b2 = dense("down", (16, x.shape[-1]), ("mlp", "embed"))
    h = jax.nn.relu(x @ k1 + b1) @ k2 + b2
    return nn.LayerNorm(name="layer_norm")(h)


def optimizer_cfg():
  return ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, schedule="constant",
                                        end_lr_factor=0.0, b1=0.9, b2=0.98, eps=1e-6,
                                        weight_decay=0.01, clip_norm=1.0, grad_accum_steps=1))


def make_state(mesh, params=None):
  model = Boxed()
  x = jnp.ones((4, 8))
  init = lambda k: model.init(k, x)["params"]
  tx, _ = opt_lib.make_optimizer(optimizer_cfg(), 100)
  state, shardings = state_lib.create_train_state(init, tx, mesh, parallel.DEFAULT_RULES,
                                                  jax.random.key(0), params=params)
  return model, tx, init, state, shardings


def test_state_is_created_sharded():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, _, _, state, shardings = make_state(mesh)
  assert state.params["up_kernel"].sharding.spec == P("fsdp", "tensor")
  assert state.params["down_kernel"].sharding.spec == P("tensor", "fsdp")
  # Adam's moments follow the parameters; the step count is replicated.
  adam = state.opt_state[1][0]
  assert adam.mu["up_kernel"].sharding.spec == P("fsdp", "tensor")
  assert adam.nu["down_kernel"].sharding.spec == P("tensor", "fsdp")
  assert adam.count.sharding.spec == P()
  assert int(state.step) == 0 and int(state.nonfinite_streak) == 0
  assert state.params["up_kernel"].addressable_shards[0].data.shape == (2, 8)
  assert state_lib.param_count(state.params) == 8 * 16 + 16 + 16 * 8 + 8 + 8 + 8


def test_abstract_state_matches_created_state():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  model, tx, init, state, _ = make_state(mesh)
  abstract, shardings = state_lib.state_shardings(init, tx, mesh, parallel.DEFAULT_RULES,
                                                  jax.random.key(0))
  flat_a = jax.tree_util.tree_leaves(abstract)
  flat_s = jax.tree_util.tree_leaves(state)
  assert len(flat_a) == len(flat_s)
  for a, s in zip(flat_a, flat_s):
    assert a.shape == s.shape and a.dtype == s.dtype
    assert a.sharding.is_equivalent_to(s.sharding, len(s.shape))


def test_create_from_given_params_uses_them():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  given = jax.tree.map(lambda x: np.full(x.shape, 0.25, np.float32),
                       jax.eval_shape(lambda: nn.unbox(Boxed().init(jax.random.key(1),
                                                                    jnp.ones((4, 8)))["params"])))
  _, _, _, state, _ = make_state(mesh, params=given)
  np.testing.assert_array_equal(np.asarray(state.params["up_kernel"]), 0.25)
  assert state.params["up_kernel"].sharding.spec == P("fsdp")


def test_merge_params_overlays_and_reports():
  fresh = {"text": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},
           "visual": {"w": np.ones((4,), np.float32)}}
  loaded = {"text": {"w": np.full((2, 3), 2.0, np.float64)}, "lm_extra": {"x": np.ones(2)}}
  merged, report = state_lib.merge_params(fresh, loaded)
  np.testing.assert_array_equal(merged["text"]["w"], np.full((2, 3), 2.0))
  assert merged["text"]["w"].dtype == np.float32
  np.testing.assert_array_equal(merged["visual"]["w"], np.ones(4))
  assert report["loaded"] == ["text/w"]
  assert sorted(report["initialised"]) == ["text/b", "visual/w"]
  assert report["ignored"] == ["lm_extra/x"]
  with pytest.raises(ValueError, match="text/w has shape"):
    state_lib.merge_params(fresh, {"text": {"w": np.zeros((3, 3))}})
  merged, report = state_lib.merge_params(fresh, {"text": {"w": np.zeros((3, 3))}},
                                          strict_shapes=False)
  assert report["mismatched"] == ["text/w"]
