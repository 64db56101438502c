"""The scanned, rematerialised encoder inside all seven UNIMO objectives, sharded over meshes
with tensor parallelism, equals the same computation on one device: losses, metrics and every
gradient (both alternation phases, dropout on)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import train_util as tu
from unimo_jax import parallel
from unimo_jax.train import objectives as obj_lib
from unimo_jax.train import train_step as step_lib

STREAMS = ("text", "image", "pair")


@pytest.fixture(scope="module")
def problem():
  c = tu.run_config(dropout=0.1)
  c.model.update(dict(num_layers=3, remat=True, remat_policy="dots_with_no_batch_dims_saveable"))
  mcfg = tu.model_config(c)
  init = step_lib.init_params_fn(mcfg, c.cmcl.temperature_init)
  boxed = jax.jit(init)(jax.random.key(3))
  host = next(tu.batches(c, seed=4))
  every = obj_lib.all_active(c.objectives, STREAMS)
  return c, mcfg, boxed, host, every


def _loss_and_grads(c, mcfg, mesh, every):
  objectives = step_lib.UnimoObjectives(mcfg, c, mesh)
  scales = {n: jnp.float32(1) for n in every}

  def f(params, batch, phase):
    return objectives(params, batch, jax.random.key(9), every, scales, phase)
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_scanned_step_equals_unsharded(problem, shape):
  c, mcfg, boxed, host, every = problem
  params = parallel.unbox(boxed)
  rules = parallel.rules_from_config(c.axis_rules)

  dev = jax.devices()[0]
  c.cmcl.implementation = "reference"
  ref_fn = _loss_and_grads(c, mcfg, None, every)
  ref = [_host(ref_fn(jax.device_put(params, dev), jax.device_put(host, dev), p))
         for p in (0, 1)]

  c.cmcl.implementation = "ring"
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))
  shardings = parallel.tree_shardings(params, parallel.logical_axes(boxed), mesh, rules)
  # the stacked layer axis stays whole; heads go over `tensor`, the embedding over `fsdp`
  q = shardings["model"]["encoder"]["layers"]["attention"]["query"]["kernel"]
  assert q.spec == P(None, "fsdp", "tensor"), q.spec
  sharded = jax.device_put(params, shardings)
  batch = parallel.global_batch(host, mesh)
  fn = _loss_and_grads(c, mcfg, mesh, every)
  with step_lib.mesh_context(mesh, rules):
    got = [_host(fn(sharded, batch, p)) for p in (0, 1)]

  for phase in (0, 1):
    ((loss, metrics), grads), ((ref_loss, ref_metrics), ref_grads) = got[phase], ref[phase]
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    for k, v in ref_metrics.items():
      np.testing.assert_allclose(metrics[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat_got = jax.tree.leaves(grads)
    assert len(flat_ref) == len(flat_got)
    # The key projection's bias has an exactly zero gradient (softmax ignores a constant added
    # to a row of logits): both sides are rounding noise, so every leaf is compared relative to
    # the largest gradient of the tree as well as to its own.
    top = max(np.abs(g).max() for _, g in flat_ref)
    bad = []
    for (path, g_ref), g in zip(flat_ref, flat_got):
      scale = max(np.abs(g_ref).max(), 1e-3 * top)
      err = np.abs(g - g_ref).max() / scale
      if err > 5e-5:
        bad.append(f"{jax.tree_util.keystr(path)}: {err:.2e}")
    assert not bad, (phase, bad)
    # the encoder's stacked gradients are non-trivial in every layer
    wi = grads["model"]["encoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert all(np.abs(wi[i]).max() > 0 for i in range(mcfg.num_layers))
