"""``unimo-jax sweep``: run the trials of a sweep one after another, or print their commands.

A sweep file (``experiments/sweeps/*.py``) names a config and lists its trials as override
dicts::

  CONFIG = "experiments/configs/demo.py"
  def get_sweep():
    return sweep.product({"optimizer.learning_rate": [1e-3, 3e-4]},
                         {"cmcl.temperature_init": [0.05, 0.07]})

Each trial is ``unimo-jax train --config CONFIG --workdir ROOT/<trial name> --config.k=v ...``
in its own workdir (so a re-run resumes unfinished trials). Locally the trials run in
sequence, each in a fresh process; ``--print`` writes one command per line instead, for a
cluster scheduler (``| xargs -P``, a SLURM array, ...). ``ROOT/sweep.json`` lists the trials.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Iterable, Mapping, Sequence

from absl import flags


def product(*axes: Mapping[str, Sequence[Any]]) -> list[dict]:
  """The Cartesian product of axes; each axis maps keys to equally long value lists (the keys
  of one axis vary together)."""
  per_axis = []
  for axis in axes:
    lengths = {len(v) for v in axis.values()}
    if len(lengths) != 1:
      raise ValueError(f"sweep axis {sorted(axis)}: value lists differ in length {lengths}")
    (n,) = lengths
    per_axis.append([{k: v[i] for k, v in axis.items()} for i in range(n)])
  return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*per_axis)]


def format_value(v: Any) -> str:
  """A ``--config.k=v`` value string that ml_collections parses back to ``v``."""
  if isinstance(v, bool):
    return "True" if v else "False"
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(format_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def trial_name(index: int, overrides: Mapping[str, Any]) -> str:
  """``03_learning_rate=0.001_temperature_init=0.05``: the index, then the last part of each
  overridden key with its value (file-name safe)."""
  parts = [f"{k.split('.')[-1]}={format_value(v)}" for k, v in overrides.items()]
  name = f"{index:02d}" + ("_" + "_".join(parts) if parts else "")
  return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)[:180]


def load_sweep(path: str) -> tuple[str, list[dict]]:
  """``(config path, trials)`` of a sweep file."""
  spec = importlib.util.spec_from_file_location("unimo_sweep", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot load sweep file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  trials = list(module.get_sweep())
  if not trials:
    raise ValueError(f"{path}: get_sweep() returned no trials")
  return module.CONFIG, [dict(t) for t in trials]


def commands(config: str, trials: Iterable[Mapping[str, Any]], root: str,
             extra: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
  """``[(trial workdir, argv)]`` of ``unimo-jax train`` for every trial."""
  out = []
  for i, overrides in enumerate(trials):
    workdir = os.path.join(root, trial_name(i, overrides))
    argv = ["unimo-jax", "train", "--config", config, "--workdir", workdir]
    argv += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
    out.append((workdir, argv + list(extra)))
  return out


def _flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("sweep", None, "sweep file (experiments/sweeps/*.py)", flag_values=fv)
  flags.DEFINE_string("workdir", None, "root directory; each trial gets a sub-directory",
                      flag_values=fv)
  flags.DEFINE_bool("print", False, "print one command per trial instead of running them",
                    flag_values=fv)
  flags.DEFINE_list("only", [], "run only these trial indices", flag_values=fv)
  flags.DEFINE_multi_string("set", [], "extra override for every trial, e.g. "
                            "--set=train.total_steps=50", flag_values=fv)
  return fv


def main(argv: list[str]) -> int:
  fv = _flags()
  try:
    fv(argv)
  except flags.Error as e:
    print(f"{argv[0]}: {e}", file=sys.stderr)
    return 2
  if not fv.sweep or not fv.workdir:
    print(f"{argv[0]}: --sweep and --workdir are required", file=sys.stderr)
    return 2
  config, trials = load_sweep(fv.sweep)
  extra = [f"--config.{s}" for s in fv.set]
  cmds = commands(config, trials, os.path.abspath(fv.workdir), extra)
  chosen = [int(i) for i in fv.only] if fv.only else list(range(len(cmds)))
  if fv.print:
    for i in chosen:
      print(shlex.join(cmds[i][1]))
    return 0
  os.makedirs(fv.workdir, exist_ok=True)
  with open(os.path.join(fv.workdir, "sweep.json"), "w") as f:
    json.dump({"sweep": fv.sweep, "config": config, "trials": [
        {"index": i, "workdir": cmds[i][0], "overrides": trials[i]} for i in range(len(cmds))]},
              f, indent=2, default=str)
  failed = []
  for i in chosen:
    workdir, cmd = cmds[i]
    print(f"[sweep] trial {i + 1}/{len(cmds)}: {shlex.join(cmd)}", flush=True)
    # A fresh process per trial: a clean JAX runtime and compile state for each.
    rc = subprocess.call([sys.executable, "-m", "unimo_jax.cli"] + cmd[1:])
    if rc:
      failed.append((i, rc))
      print(f"[sweep] trial {i} exited with {rc}", flush=True)
  print(f"[sweep] {len(chosen) - len(failed)}/{len(chosen)} trials finished; results in "
        f"{os.path.abspath(fv.workdir)}")
  return 1 if failed else 0
