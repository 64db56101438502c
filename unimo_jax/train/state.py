"""The train state and its sharded creation.

Parameters are never materialised on one device and then scattered: the shapes come from
``jax.eval_shape`` of the initialiser, the shardings from the parameters' logical axis names and
the config's rules, and a jitted initialiser with ``out_shardings`` creates every array directly
where it lives. The optimizer state takes the shardings of the parameters it mirrors (Adam's
moments); its scalars are replicated.

Dropout randomness is not part of the state: step ``s`` uses ``fold_in(key(seed), s)``, so a
resumed run draws the same masks as an uninterrupted one.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from unimo_jax import parallel
from unimo_jax.train import optimizer as opt_lib


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue training.

  Attributes:
    step: int32 [], number of updates done (skipped non-finite updates included).
    params: parameter tree (float32 storage unless the model says otherwise).
    opt_state: optax state (moments sharded like the parameters).
    nonfinite_streak: int32 [], consecutive steps whose loss or gradient was not finite.
    nonfinite_total: int32 [], all such steps of the run.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


def _new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_streak=zero,
                    nonfinite_total=zero)


def state_shardings(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh, rules: Sequence[tuple[str, Any]], rng: jax.Array
                    ) -> tuple[TrainState, TrainState]:
  """Shapes and shardings of the train state, without creating any array.

  Args:
    init_params: ``rng -> params``; leaves may be boxed by ``nn.with_logical_partitioning``.
    tx: the optimizer.
    mesh, rules: the device mesh and logical-axis rules.
    rng: the initialisation key.

  Returns:
    ``(abstract, shardings)``: a TrainState of ``jax.ShapeDtypeStruct`` leaves carrying their
    target sharding (what checkpoint restore needs), and the same tree of ``NamedSharding``.
  """
  boxed = jax.eval_shape(init_params, rng)
  logical = parallel.logical_axes(boxed)
  abstract_params = parallel.unbox(boxed)
  param_shardings = parallel.tree_shardings(abstract_params, logical, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = parallel.replicated(mesh)
  opt_shardings = opt_lib.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings,
                         nonfinite_streak=repl, nonfinite_total=repl)
  shapes = jax.eval_shape(lambda p: _new_state(p, tx), abstract_params)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def create_train_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                       mesh: Mesh, rules: Sequence[tuple[str, Any]], rng: jax.Array,
                       params: Any | None = None) -> tuple[TrainState, TrainState]:
  """Creates a fresh, sharded train state.

  Args:
    init_params, tx, mesh, rules, rng: see ``state_shardings``.
    params: optional parameters to start from (e.g. the result of ``merge_params`` with a
      converted RoBERTa checkpoint); they are moved to their shardings and the optimizer state
      is initialised for them.

  Returns:
    ``(state, shardings)``.
  """
  _, shardings = state_shardings(init_params, tx, mesh, rules, rng)
  if params is None:
    init = jax.jit(lambda k: _new_state(parallel.unbox(init_params(k)), tx),
                   out_shardings=shardings)
    return init(rng), shardings
  params = jax.device_put(params, shardings.params)
  init = jax.jit(lambda p: _new_state(p, tx), in_shardings=(shardings.params,),
                 out_shardings=shardings)
  return init(params), shardings


def param_count(params: Any) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def merge_params(fresh: Mapping[str, Any], loaded: Mapping[str, Any], *, strict_shapes: bool = True
                 ) -> tuple[dict, dict[str, list[str]]]:
  """Overlays loaded parameters (a sub-tree, e.g. a converted RoBERTa) on a fresh init.

  Parameters present in both take the loaded value (cast to the fresh dtype); parameters only in
  ``fresh`` keep their initialisation (e.g. visual embeddings and CMCL heads when starting from a
  text-only model); parameters only in ``loaded`` are reported and ignored.

  Args:
    fresh: nested dict of arrays (or ShapeDtypeStructs' concrete counterparts).
    loaded: nested dict of arrays, keyed like ``fresh`` (a subset of it).
    strict_shapes: raise on a shape mismatch instead of keeping the fresh value.

  Returns:
    ``(params, report)`` with ``report = {"loaded": [...], "initialised": [...], "ignored":
    [...], "mismatched": [...]}`` of '/'-joined paths.
  """
  f, l = _flatten(fresh), _flatten(loaded)
  report: dict[str, list[str]] = {"loaded": [], "initialised": [], "ignored": [], "mismatched": []}
  merged = {}
  for path, value in f.items():
    name = "/".join(path)
    if path in l:
      new = l[path]
      if tuple(np.shape(new)) != tuple(np.shape(value)):
        if strict_shapes:
          raise ValueError(f"init_from: {name} has shape {np.shape(new)}, the model expects "
                           f"{np.shape(value)}")
        report["mismatched"].append(name)
        merged[path] = value
        continue
      merged[path] = np.asarray(new).astype(value.dtype)
      report["loaded"].append(name)
    else:
      merged[path] = value
      report["initialised"].append(name)
  report["ignored"] = sorted("/".join(p) for p in l if p not in f)
  logging.info("init_from: %d loaded, %d initialised, %d ignored, %d mismatched",
               len(report["loaded"]), len(report["initialised"]), len(report["ignored"]),
               len(report["mismatched"]))
  return _unflatten(merged), report
