"""Where a fine-tuning run's parameters start: a pre-training workdir, a converted checkpoint,
or scratch.

``initial_params(fresh, source, step, model_cfg)`` overlays the source's encoder (``"model"``
sub-tree) on freshly initialised ``{"model", "head"}`` parameters:

- a WORKDIR (it has ``checkpoints/``): the parameters of its checkpoint ``step`` (0 = the newest
  that restores), params only (no optimizer state). A fine-tuning workdir also gives its head
  where shapes agree (e.g. STS-B starting from the MNLI model: the poolers and fusion layer
  load, the differently sized output layer starts fresh).
- a CONVERTED dir (``unimo-jax convert roberta|unimo``): ``config.json`` + ``params.msgpack``.
- "" (scratch): the fresh initialisation.

Either way the source's ModelConfig must agree with the run's on the fields that shapes alone
do not show (``trainer.INIT_FROM_FIELDS``), and the head's poolers then start from the model's
pre-trained poolers (``heads.copy_pretrained_poolers``), unless a fine-tuned head was loaded.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from unimo_jax.finetune import heads as heads_lib
from unimo_jax.model import ModelConfig
from unimo_jax.train import state as state_lib
from unimo_jax.train.trainer import INIT_FROM_FIELDS


def source_kind(path: str) -> str:
  """"workdir" | "converted" | "scratch" (ValueError for a path that is neither)."""
  if not path:
    return "scratch"
  from unimo_jax.convert import roberta  # pylint: disable=import-outside-toplevel
  path = os.path.expanduser(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  if all(os.path.isfile(os.path.join(path, f)) for f in (roberta.CONFIG_FILE, roberta.PARAMS_FILE)):
    return "converted"
  raise ValueError(f"init_from: {path} is neither a workdir (no checkpoints/) nor a converted "
                   f"checkpoint (no {roberta.CONFIG_FILE} + {roberta.PARAMS_FILE})")


def _check_config(path: str, loaded: ModelConfig, model_cfg: ModelConfig):
  for field in INIT_FROM_FIELDS:
    if getattr(loaded, field) != getattr(model_cfg, field):
      raise ValueError(f"init_from: {path} has {field}={getattr(loaded, field)!r}, config.model "
                       f"has {getattr(model_cfg, field)!r}")


def load_source(path: str, step: int, model_cfg: ModelConfig) -> tuple[dict, dict | None, int | None]:
  """-> (model params, head params or None, checkpoint step or None) of ``path`` (host numpy)."""
  kind = source_kind(path)
  path = os.path.expanduser(path)
  if kind == "converted":
    from unimo_jax.convert import roberta  # pylint: disable=import-outside-toplevel
    loaded_cfg, params = roberta.load_converted(path)
    _check_config(path, loaded_cfg, model_cfg)
    return params, None, None
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  mpath = os.path.join(path, "model_config.json")
  if os.path.isfile(mpath):
    with open(mpath) as f:
      _check_config(path, ModelConfig.from_dict(json.load(f)), model_cfg)
  params, got = ckpt_lib.restore_params(path, step or None)
  if "model" not in params:
    raise ValueError(f"init_from: the checkpoint of {path} has no 'model' parameters")
  return params["model"], params.get("head"), int(got)


def initial_params(fresh: dict, source: str, step: int, model_cfg: ModelConfig
                   ) -> tuple[dict, dict[str, Any]]:
  """Fresh host params ``{"model", "head"?}`` -> (starting params, report)."""
  out = dict(fresh)
  report: dict[str, Any] = {"source": source or "scratch", "kind": source_kind(source)}
  head_loaded = False
  if source:
    model, head, got = load_source(source, step, model_cfg)
    out["model"], rep = state_lib.merge_params(fresh["model"], model)
    report.update(step=got, loaded=len(rep["loaded"]), initialised=rep["initialised"],
                  ignored=rep["ignored"])
    if head is not None and "head" in fresh:
      out["head"], hrep = state_lib.merge_params(fresh["head"], head, strict_shapes=False)
      head_loaded = bool(hrep["loaded"])
      report["head_loaded"], report["head_fresh"] = hrep["loaded"], hrep["mismatched"] + hrep[
          "initialised"]
  if "head" in out and not head_loaded:
    out["head"] = heads_lib.copy_pretrained_poolers(out["head"], out["model"])
    # cast like the fresh leaves (the model may store another dtype)
    out["head"] = _like(out["head"], fresh["head"])
  logging.info("fine-tuning starts from %s (%s)%s", report["source"], report["kind"],
               f", step {report.get('step')}" if report.get("step") is not None else "")
  return out, report


def _like(tree, ref):
  if isinstance(ref, dict):
    return {k: _like(tree[k], v) for k, v in ref.items()}
  return np.asarray(tree).astype(np.asarray(ref).dtype)
