"""``unimo-jax sweep``: a sweep's trials run here one after another, handed to a scheduler, or
gathered into one table.

A sweep file (``experiments/sweeps/*.py``) names a config and lists its trials as override
dicts; ``COMMAND`` (default ``train``) is the ``unimo-jax`` command each trial runs, so a sweep
over fine-tuning configs is the same file with ``COMMAND = "finetune"``; ``METRIC`` (default
``loss``, the final training loss) is what the summary plots::

  CONFIG = "experiments/configs/demo.py"
  COMMAND = "train"
  METRIC = "test/i2t_r@1"        # a results.json metric as SPLIT/KEY, or a training metric
  def get_sweep():
    return sweep.product({"optimizer.learning_rate": [1e-3, 3e-4]},
                         {"cmcl.temperature_init": [0.05, 0.07]})

Trial ``i`` is ``unimo-jax COMMAND --config CONFIG --workdir ROOT/<trial name> --config.k=v ...``
in its own workdir (so a re-run resumes unfinished trials). Modes:

  (default)   run the trials here, each in a fresh process; exit status 4 if any failed
  --print     print one command per trial
  --array     write ROOT/commands.txt (trial k on line k+1: ``xargs``, xpk, JobSet take it) and
              ROOT/sweep_array.sh, a SLURM array script running trial $SLURM_ARRAY_TASK_ID
  --summary   ROOT/summary.md + summary.csv (every trial's overrides, status, final training
              metrics and results.json) and summary.png (METRIC against the swept values);
              also ``unimo-jax sweep report --workdir ROOT``
  --evaluate  (with a run or --array) ``unimo-jax evaluate`` each trial once it has trained

``ROOT/sweep.json`` lists the trials; ``ROOT/status/trial_<i>.json`` holds each finished trial's
exit status (written by the local runner and by the array script).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

from unimo_jax import commands as commands_lib

MANIFEST = "sweep.json"
COMMANDS_FILE = "commands.txt"
ARRAY_SCRIPT = "sweep_array.sh"
STATUS_DIR = "status"


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


def _short_keys(keys: Sequence[str]) -> list[str]:
  """Each dotted key's shortest tail that no other key shares (``seed`` and ``data.seed``)."""
  out = []
  for k in keys:
    parts = k.split(".")
    n = 1
    while n < len(parts) and sum(o.split(".")[-n:] == parts[-n:] for o in keys) > 1:
      n += 1
    out.append(".".join(parts[-n:]))
  return out


def trial_name(index: int, overrides: Mapping[str, Any]) -> str:
  """``03_learning_rate=0.001_temperature_init=0.05``: the index, then the last part of each
  overridden key (more parts where two keys end alike) with its value (file-name safe)."""
  parts = [f"{k}={format_value(v)}" for k, v in zip(_short_keys(list(overrides)),
                                                     overrides.values())]
  name = f"{index:02d}" + ("_" + "_".join(parts) if parts else "")
  return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)[:180]


@dataclasses.dataclass
class Sweep:
  """A loaded sweep file."""
  path: str
  config: str                 # config file (path[:arg]) of every trial
  trials: list[dict]          # overrides per trial
  command: str = "train"      # the unimo-jax command of each trial
  metric: str = "loss"        # what the summary plots

  @property
  def name(self) -> str:
    return os.path.splitext(os.path.basename(self.path))[0]


def load(path: str) -> Sweep:
  """Reads a sweep file; a missing file or a malformed one raises ``UsageError`` naming it."""
  if not os.path.isfile(path):
    raise commands_lib.UsageError(f"sweep file {path} does not exist")
  spec = importlib.util.spec_from_file_location("unimo_sweep", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    for attr in ("CONFIG", "get_sweep"):
      if not hasattr(module, attr):
        raise commands_lib.UsageError(f"{path}: defines no {attr}")
    trials = [dict(t) for t in module.get_sweep()]
  except commands_lib.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the file's own error, in one line)
    raise commands_lib.UsageError(
        f"{path}: {type(e).__name__}: {commands_lib.error_line(e)}") from e
  if not trials:
    raise commands_lib.UsageError(f"{path}: get_sweep() returned no trials")
  for i, t in enumerate(trials):
    if not all(isinstance(k, str) and k for k in t):
      raise commands_lib.UsageError(f"{path}: trial {i} has a key that is not a field name: {t}")
  command = getattr(module, "COMMAND", "train")
  from unimo_jax import cli  # pylint: disable=import-outside-toplevel
  if command not in cli.COMMANDS or command == "sweep":
    raise commands_lib.UsageError(f"{path}: COMMAND {command!r} is not a unimo-jax command that "
                                  f"takes a config ({', '.join(sorted(cli.COMMANDS))})")
  return Sweep(path=path, config=str(module.CONFIG), trials=trials, command=command,
               metric=str(getattr(module, "METRIC", "loss")))


def load_sweep(path: str) -> tuple[str, list[dict]]:
  """``(config path, trials)`` of a sweep file."""
  s = load(path)
  return s.config, s.trials


def commands(config: str, trials: Iterable[Mapping[str, Any]], root: str,
             extra: Sequence[str] = (), command: str = "train") -> list[tuple[str, list[str]]]:
  """``[(trial workdir, argv)]`` of ``unimo-jax COMMAND`` for every trial."""
  out = []
  for i, overrides in enumerate(trials):
    workdir = os.path.join(root, trial_name(i, overrides))
    argv = ["unimo-jax", command, "--config", config, "--workdir", workdir]
    argv += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
    out.append((workdir, argv + list(extra)))
  return out


def absolute_config(config: str) -> str:
  """The config's file made absolute when it exists from here (trials run from other
  directories on a cluster); the ``:arg`` part is kept."""
  path, sep, arg = config.partition(":")
  return os.path.abspath(path) + sep + arg if os.path.isfile(path) else config


def write_manifest(root: str, sweep: Sweep, cmds: Sequence[tuple[str, list[str]]],
                   common: Sequence[str]) -> str:
  """``ROOT/sweep.json``: the sweep, its command, metric and every trial's workdir, overrides
  and command (what ``--summary`` reads)."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, MANIFEST)
  with open(path, "w") as f:
    json.dump({"sweep": os.path.abspath(sweep.path), "config": sweep.config,
               "command": sweep.command, "metric": sweep.metric, "common_overrides": list(common),
               "trials": [{"index": i, "name": os.path.basename(w), "workdir": w,
                           "overrides": sweep.trials[i], "argv": argv}
                          for i, (w, argv) in enumerate(cmds)]},
              f, indent=2, default=str)
  return path


def write_status(root: str, index: int, exit_code: int, started: float, runner: str,
                 evaluate_exit_code: int | None = None) -> None:
  os.makedirs(os.path.join(root, STATUS_DIR), exist_ok=True)
  record = {"index": index, "exit_code": int(exit_code), "started": started,
            "finished": time.time(), "runner": runner}
  if evaluate_exit_code is not None:
    record["evaluate_exit_code"] = int(evaluate_exit_code)
  with open(os.path.join(root, STATUS_DIR, f"trial_{index}.json"), "w") as f:
    json.dump(record, f)


def run_local(root: str, cmds: Sequence[tuple[str, list[str]]], chosen: Sequence[int],
              dry_run: bool = False, evaluate: bool = False) -> list[tuple[int, int]]:
  """Runs the chosen trials one after another, each in a fresh process (a clean JAX runtime),
  with ``evaluate`` then ``unimo-jax evaluate`` of each trial that finished; records each exit
  status (not for dry runs). Returns ``[(index, exit status)]`` of failures."""
  failed = []
  for n, i in enumerate(chosen):
    workdir, cmd = cmds[i]
    cmd = cmd + (["--dry_run"] if dry_run else [])
    print(f"[sweep] trial {i} ({n + 1}/{len(chosen)}): {shlex.join(cmd)}", flush=True)
    started = time.time()
    rc = subprocess.call([sys.executable, "-m", "unimo_jax.cli"] + cmd[1:])
    eval_rc = None
    if evaluate and rc == 0 and not dry_run:
      print(f"[sweep] trial {i}: unimo-jax evaluate --workdir {workdir}", flush=True)
      eval_rc = subprocess.call([sys.executable, "-m", "unimo_jax.cli", "evaluate", "--workdir",
                                 workdir])
    if not dry_run:
      write_status(root, i, rc, started, "local", eval_rc)
    if rc or eval_rc:
      failed.append((i, rc or eval_rc))
      print(f"[sweep] trial {i} exited with {rc}" + (f", its evaluation with {eval_rc}"
                                                     if eval_rc else ""), flush=True)
  return failed


ARRAY_TEMPLATE = """#!/bin/bash
# SLURM array of the sweep {sweep}: task k runs trial k (line k+1 of {commands}).
#   sbatch {script}                   every trial
#   sbatch --array=1,3 {script}       some of them
#   SLURM_ARRAY_TASK_ID=2 bash {script} --dry_run    check trial 2 here without training
# Arguments given to the script are appended to the trial's command. `unimo-jax` must be on
# the PATH of the compute nodes (an activated environment is exported by sbatch).
#SBATCH --job-name={job}
#SBATCH --array=0-{last}
#SBATCH --output={root}/slurm-%A_%a.out
{options}set -euo pipefail
{setup}commands_file={commands_q}
status_dir={status_q}
if [[ -z "${{SLURM_ARRAY_TASK_ID:-}}" ]]; then
  echo "$0: SLURM_ARRAY_TASK_ID is not set (submit with sbatch, or set it to a trial index)" >&2
  exit 2
fi
k=$SLURM_ARRAY_TASK_ID
n=$(grep -c '' "$commands_file")
if ! [[ $k =~ ^[0-9]+$ ]] || (( k >= n )); then
  echo "$0: SLURM_ARRAY_TASK_ID=$k is not a trial index (0..$((n - 1)))" >&2
  exit 2
fi
line=$(sed -n "$((k + 1))p" "$commands_file")
eval "cmd=($line)"
echo "[sweep] trial $k of $n on $(hostname): $line $*" >&2
started=$(date +%s)
set +e
"${{cmd[@]}}" "$@"
rc=$?
train_rc=$rc
set -e
dry=0
if [[ " $* " == *" --dry_run "* ]]; then dry=1; fi
eval_field=""
if (( {evaluate} && rc == 0 && ! dry )); then
  for ((i = 0; i < ${{#cmd[@]}} - 1; i++)); do
    if [[ ${{cmd[i]}} == --workdir ]]; then workdir=${{cmd[i + 1]}}; fi
  done
  set +e
  unimo-jax evaluate --workdir "$workdir"
  eval_rc=$?
  set -e
  eval_field=", \\"evaluate_exit_code\\": $eval_rc"
  if (( eval_rc )); then rc=$eval_rc; fi
fi
if (( ! dry )); then
  mkdir -p "$status_dir"
  printf '{{"index": %d, "exit_code": %d, "started": %s, "finished": %s, "runner": "slurm", "job": "%s"%s}}\\n' \\
    "$k" "$train_rc" "$started" "$(date +%s)" "${{SLURM_ARRAY_JOB_ID:-}}" "$eval_field" > "$status_dir/trial_$k.json"
fi
exit "$rc"
"""


def write_array(root: str, sweep: Sweep, cmds: Sequence[tuple[str, list[str]]],
                options: Sequence[str] = (), setup: Sequence[str] = (),
                evaluate: bool = False) -> tuple[str, str]:
  """Writes ``ROOT/commands.txt`` (one shell-quoted command per line, trial k on line k+1) and
  ``ROOT/sweep_array.sh`` (with ``evaluate``, a trial that trained is then evaluated); returns
  their paths."""
  os.makedirs(root, exist_ok=True)
  commands_path = os.path.join(root, COMMANDS_FILE)
  with open(commands_path, "w") as f:
    f.write("".join(shlex.join(argv) + "\n" for _, argv in cmds))
  script = os.path.join(root, ARRAY_SCRIPT)
  text = ARRAY_TEMPLATE.format(
      sweep=sweep.path, commands=commands_path, script=script, job=f"sweep-{sweep.name}",
      last=len(cmds) - 1, root=root, evaluate=int(bool(evaluate)),
      options="".join(f"#SBATCH {o}\n" for o in options), setup="".join(f"{s}\n" for s in setup),
      commands_q=shlex.quote(commands_path), status_q=shlex.quote(os.path.join(root, STATUS_DIR)))
  with open(script, "w") as f:
    f.write(text)
  os.chmod(script, 0o755)
  return commands_path, script


def _parser(prog: str) -> commands_lib.ArgumentParser:
  p = commands_lib.ArgumentParser(
      prog=prog, description=__doc__.replace("``", "`"),
      exit_codes=(commands_lib.OK, commands_lib.ERROR, commands_lib.USAGE,
                  commands_lib.TRIALS_FAILED))
  p.add_argument("--sweep", help="sweep file (experiments/sweeps/*.py); --summary reads "
                                 "ROOT/sweep.json without it")
  p.add_argument("--workdir", required=True, help="sweep root: each trial gets ROOT/<trial name>")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--print", action="store_true", help="print one command per trial")
  mode.add_argument("--array", action="store_true",
                    help="write ROOT/commands.txt and the SLURM array script ROOT/sweep_array.sh")
  mode.add_argument("--summary", action="store_true",
                    help="gather the trials into ROOT/summary.md, summary.csv and summary.png")
  p.add_argument("--only", default="", help="trial indices, comma separated (default: all)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override for every trial, e.g. --set train.total_steps=50 (repeatable)")
  p.add_argument("--evaluate", action="store_true",
                 help="run `unimo-jax evaluate` on each trial that trained (locally and in the "
                      "array script): the summary then has its results.json")
  p.add_argument("--dry-run", action="store_true",
                 help="run each trial's command with --dry_run (checks every trial's config)")
  p.add_argument("--metric", default=None,
                 help="--summary: the metric to plot (default: the sweep file's METRIC, or loss)")
  p.add_argument("--slurm-option", action="append", default=[], metavar="OPT",
                 help="--array: an #SBATCH line, e.g. --slurm-option=--gpus-per-task=1")
  p.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                 help="--array: a shell line run before the trial (module load, source venv)")
  return p


def main(argv: list[str]) -> int:
  if argv[1:2] == ["report"]:  # `unimo-jax sweep report --workdir R` == `... --summary`
    argv = [argv[0]] + argv[2:] + ["--summary"]
  args = _parser(argv[0]).parse_args(argv[1:])
  root = os.path.abspath(os.path.expanduser(args.workdir))
  try:
    if args.summary:
      from unimo_jax.train import sweep_report  # pylint: disable=import-outside-toplevel
      if args.sweep and not os.path.exists(os.path.join(root, MANIFEST)):
        s = load(args.sweep)
        write_manifest(root, s, commands(absolute_config(s.config), s.trials, root,
                                         command=s.command), [])
      paths = sweep_report.summarize(root, metric=args.metric)
      print(open(paths["markdown"]).read().rstrip())
      print("\n".join(f"{k}: {v}" for k, v in paths.items()))
      return commands_lib.OK
    if not args.sweep:
      raise commands_lib.UsageError("--sweep is required (except with --summary)")
    s = load(args.sweep)
    extra = [f"--config.{x}" for x in args.set]
    cmds = commands(absolute_config(s.config), s.trials, root, extra, command=s.command)
    try:
      chosen = [int(i) for i in args.only.split(",") if i.strip()] or list(range(len(cmds)))
    except ValueError as e:
      raise commands_lib.UsageError(f"--only {args.only!r}: not a list of integers") from e
    bad = [i for i in chosen if not 0 <= i < len(cmds)]
    if bad:
      raise commands_lib.UsageError(f"--only: no trial {bad[0]} ({len(cmds)} trials)")
    if args.print:
      for i in chosen:
        print(shlex.join(cmds[i][1] + (["--dry_run"] if args.dry_run else [])))
      return commands_lib.OK
    write_manifest(root, s, cmds, args.set)
    if args.array:
      commands_path, script = write_array(root, s, cmds, args.slurm_option, args.slurm_setup,
                                          evaluate=args.evaluate)
      print(f"wrote {commands_path} ({len(cmds)} trials) and {script}\n"
            f"submit: sbatch {script}   (some trials: sbatch --array=0,2 {script})")
      return commands_lib.OK
  except commands_lib.UsageError as e:
    return commands_lib.fail(argv[0], e)
  failed = run_local(root, cmds, chosen, dry_run=args.dry_run, evaluate=args.evaluate)
  print(f"[sweep] {len(chosen) - len(failed)}/{len(chosen)} trials finished; "
        f"summary: unimo-jax sweep --workdir {root} --summary")
  return commands_lib.TRIALS_FAILED if failed else commands_lib.OK
