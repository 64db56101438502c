"""``unimo-jax train``: pre-train a UNIMO model from a config file.

  unimo-jax train --config experiments/configs/demo.py --workdir /tmp/demo
  unimo-jax train --config experiments/configs/base.py:/mnt/data --workdir DIR \\
      --config.optimizer.learning_rate=5e-5 --config.mesh.fsdp=-1

The config is an ml_collections Python file (``get_config(arg)``, the text after ``:`` is the
arg); ``--config.<field>=<value>`` overrides any field (an unknown field is an error). A workdir
holding checkpoints is resumed from its latest one. Multi-host: started on every host, with
``jax.distributed`` set up from the environment (TPU pods, SLURM, Open MPI) or from
``--coordinator_address`` / ``--num_processes`` / ``--process_id``.

``--help`` lists every flag; ``--dry_run`` loads and validates the config, says what the run
would do and exits without training (a sweep's trials and launch scripts are checked with it).
Exit codes (``unimo_jax.commands``): 0 done (or stopped cleanly by a signal after saving), 1 an
unexpected error, 2 bad usage or config (one line), 3 stopped by the non-finite guard.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from unimo_jax import commands

USAGE = ("unimo-jax train --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...] "
         "[flags]")
DESCRIPTION = ("Pre-trains a UNIMO model; a workdir holding checkpoints is resumed from its "
               "latest one.")
# The config flags, shown first by --help (train and finetune share them).
CONFIG_HELP = (
    ("--config FILE[:ARG]", "experiment config: a Python file whose get_config(ARG) returns a "
                            "ConfigDict, e.g. experiments/configs/demo.py:smoke,data_dir=D"),
    ("--config.FIELD=VALUE", "override any field, e.g. --config.optimizer.learning_rate=5e-4 "
                             "--config.train.total_steps=50 (an unknown field is an error)"),
    ("--workdir DIR", "checkpoints, metrics.jsonl, TensorBoard events and config.json go here; "
                      "an existing run there is resumed"),
    ("fields", "every field with its default and meaning: unimo_jax/train/config.py "
               "(default_config); data fields: data_pipelines/pipeline.py (default_config); "
               "model fields: unimo_jax/model (ModelConfig)"),
)


def command_flags(argv: list[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  # sys_argv: config_flags finds the --config.x=y overrides in this list (default sys.argv,
  # which is not what the `unimo-jax` dispatcher or a test passes).
  config_flags.DEFINE_config_file("config", None, "experiment config file (path[:arg])",
                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and metrics",
                      flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "processes of a multi-host run", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in a multi-host run",
                       flag_values=fv)
  flags.DEFINE_string("local_device_ids", None, "comma-separated local devices of this process",
                      flag_values=fv)
  flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning"], "console log level",
                    flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "load and validate the config, print what the run would "
                    "do, exit without training", flag_values=fv)
  flags.DEFINE_bool("print_env", False, "print the launcher, process index/count, coordinator, "
                    "mesh and per-process batch this process would use (unimo_jax.launch), "
                    "without starting jax.distributed, and exit", flag_values=fv)
  flags.DEFINE_integer("initialization_timeout", 300, "seconds to wait for the coordinator and "
                       "the other processes before failing (multi-host)", flag_values=fv)
  return fv


def help_text(fv: flags.FlagValues, prog: str = "unimo-jax train") -> str:
  return commands.absl_help(prog, fv, usage=USAGE.replace("unimo-jax train", prog),
                            description=DESCRIPTION, sections=[("config", CONFIG_HELP)],
                            skip=("config", "workdir"),
                            exit_codes=(commands.OK, commands.ERROR, commands.USAGE,
                                        commands.NONFINITE))


def dry_run(config, workdir: str, argv: list[str]) -> str:
  """What the run would do: the workdir (fresh or resumed), the overrides and the devices."""
  import jax  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.path.expanduser(workdir))
  latest = ckpt_lib.latest_step(workdir) if os.path.isdir(workdir) else None
  overrides = [a[len("--config."):] for a in argv[1:] if a.startswith("--config.")]
  lines = [f"dry run: would train {config.train.total_steps} steps in {workdir} "
           f"({'resuming from step ' + str(latest) if latest is not None else 'fresh'})",
           f"  overrides: {' '.join(overrides) if overrides else '(none)'}",
           f"  devices: {jax.device_count()} {jax.default_backend()} in "
           f"{jax.process_count()} process(es); this is process {jax.process_index()}"]
  return "\n".join(lines)


def setup_logging(level: str = "info") -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.basicConfig(level=getattr(logging, level.upper()),
                      format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S",
                      stream=sys.stderr, force=True)
  # orbax and absl log every save step at INFO: keep the console for training progress.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" on every start


def data_defaults():
  """The input pipeline's data section with every default (what ``config.validate`` checks
  ``config.data`` against)."""
  from data_pipelines import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.default_config()


def train_from_config(config, workdir: str, **train_kw):
  """Wires the data in and trains: the tokenizer (``data.tokenizer``), the input pipeline and,
  with ``train.eval_every``, the evaluators of ``evaluation.train_splits`` (default
  validation); then ``trainer.train(config, workdir, data=..., evaluate=...)``.

  The one place where a training run meets ``data_pipelines``; ``train_kw`` (``stop``,
  ``max_steps``) go to the trainer. Returns its ``TrainResult``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from data_pipelines import pipeline, tokenizers  # pylint: disable=import-outside-toplevel
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import setup as setup_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  spec = config.data.get("tokenizer")
  tokenizer = None
  if spec:
    try:
      tokenizer = tokenizers.load_tokenizer(spec)
    except (OSError, ValueError, RuntimeError) as e:
      raise ValueError(f"data.tokenizer {spec!r} cannot be loaded ({e})") from e
  vocab_size = getattr(tokenizer, "vocab_size", None)
  model_cfg = setup_lib.resolve_model_config(config, vocab_size)
  if tokenizer is not None:
    setup_lib.check_tokenizer(model_cfg, tokenizer)
  evaluate = None
  if config.train.eval_every:
    from data_pipelines import eval_data  # pylint: disable=import-outside-toplevel
    from unimo_jax.evaluation import runner  # pylint: disable=import-outside-toplevel
    from unimo_jax.model import Unimo  # pylint: disable=import-outside-toplevel
    if tokenizer is None:
      raise ValueError("train.eval_every needs data.tokenizer (the evaluators decode captions)")
    section = config.evaluation.to_dict()
    splits = list(section.get("train_splits", ("validation",)))
    limit = int(section.get("limit", 0))
    evaluate = runner.train_evaluator(
        Unimo(model_cfg), parallel.make_mesh(dict(config.mesh)), section, tokenizer.decode,
        splits, lambda split: eval_data.load_eval_split(config.data, split, tokenizer=tokenizer,
                                                        limit=limit, eval_config=section))
  data = pipeline.make_pipeline(config.data, process_index=jax.process_index(),
                                process_count=jax.process_count(), tokenizer=tokenizer)
  try:
    return trainer.train(config, workdir, data=data, evaluate=evaluate, vocab_size=vocab_size,
                         **train_kw)
  finally:
    data.close()  # a live tf.data iterator can hang interpreter exit (ENVIRONMENT.md)


def data_counts(metrics) -> str:
  """One line: records dropped per source and reason, texts cut to fit per stream and source
  (the trainer's ``data/dropped/<source>/<reason>``, ``data/truncated/<stream>/<source>``)."""
  dropped = {k[len("data/dropped/"):]: int(v) for k, v in metrics.items()
             if k.startswith("data/dropped/") and v}
  cut = {k[len("data/truncated/"):]: int(v) for k, v in metrics.items()  # per stream/source
         if k.startswith("data/truncated/") and k.count("/") == 3 and v}
  text = (f"dropped {sum(dropped.values())} records (" + ", ".join(
      f"{k} {v}" for k, v in sorted(dropped.items())) + ")") if dropped else "no record dropped"
  text += ("; texts cut to fit: " + ", ".join(f"{k} {v}" for k, v in sorted(cut.items()))
           if cut else "; no text cut")
  return "  data: " + text


def summary(result, workdir: str) -> str:
  """First vs last metrics and where the outputs are."""
  first, last = result.first_metrics, result.last_metrics
  lines = [f"trained steps {result.first_step} -> {result.last_step} ({result.stopped_by}) in "
           f"{result.train_seconds:.0f}s (compile {result.compile_seconds:.0f}s)"]
  keys = [k for k in last if (k == "loss" or "/loss" in k or "accuracy" in k) and k in first]
  for k in sorted(keys, key=lambda k: (k != "loss", k)):
    a, b = first.get(k), last.get(k)
    if a is not None and b is not None:
      lines.append(f"  {k:<28} {a:9.4f} (step {first['step']}) -> {b:9.4f} (step {last['step']})")
  if "mfu" in last:
    lines.append(f"  throughput: {last.get('steps_per_second', 0):.2f} steps/s, "
                 f"{last.get('tflops_per_device', 0):.3g} TFLOP/s per device, "
                 f"MFU {100 * last['mfu']:.1f}%")
  if result.goodput:
    lines.append("  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.goodput.items()))
  if any(k.startswith("data/") for k in last):
    lines.append(data_counts(last))
  lines.append(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
  lines.append(f"checkpoints: {os.path.join(workdir, 'checkpoints')} (latest step "
               f"{result.checkpoint_step})")
  lines.append(f"metrics:     {os.path.join(workdir, 'metrics.jsonl')}")
  return "\n".join(lines)


def load_and_launch(fv: flags.FlagValues, argv: list[str], *, describe_config: bool = True):
  """The start shared by ``train`` and ``finetune``: the loaded config (a file that fails to load
  is one line), logging, and the multi-host start-up (``unimo_jax.launch``; ``--print_env`` prints
  what this process WOULD do and starts nothing).

  Returns ``(config, plan, rc)``: the launch plan, and rc an exit status to return now or None
  to go on."""
  try:
    config = fv.config
    if config is not None:
      config.keys()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except  (a missing or broken config file)
    last = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
    return None, None, commands.fail(
        argv[0], f"--config {config_flags.get_config_filename(fv['config'])}: {last[-1]}")
  if config is None or not fv.workdir:
    return None, None, commands.fail(argv[0], "--config and --workdir are required (see --help)")
  setup_logging(fv.log_level)

  from unimo_jax import launch  # pylint: disable=import-outside-toplevel
  try:
    plan = launch.detect(coordinator_address=fv.coordinator_address,
                         num_processes=fv.num_processes, process_id=fv.process_id,
                         local_device_ids=fv.local_device_ids)
    if fv.print_env:  # what this process WOULD do; nothing is started
      if describe_config:
        import jax  # pylint: disable=import-outside-toplevel
        print(launch.describe(plan, config, len(plan.local_device_ids or ()) or
                              jax.local_device_count()))
      else:
        print(launch.describe(plan))
      return config, plan, commands.OK
    launch.initialize(plan, fv.initialization_timeout)
  except ValueError as e:  # incomplete flags; a coordinator that never answered (LaunchError)
    return config, None, commands.fail(argv[0], e)
  return config, plan, None


def main(argv: list[str]) -> int:
  fv = command_flags(argv)
  rc = commands.parse_absl(fv, argv, help_text(fv, argv[0]))
  if rc is not None:
    return rc
  config, plan, rc = load_and_launch(fv, argv)
  if rc is not None:
    return rc

  import jax  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  try:
    config_lib.validate(config, num_devices=jax.device_count(),
                        process_count=jax.process_count(), data_defaults=data_defaults())
  except config_lib.ConfigError as e:
    return commands.fail(argv[0], f"config error: {e}")
  if fv.dry_run:
    from unimo_jax import launch  # pylint: disable=import-outside-toplevel
    print(launch.describe(plan, config, jax.local_device_count()))
    print(dry_run(config, fv.workdir, argv))
    return commands.OK
  try:
    result = train_from_config(config, fv.workdir)
  except trainer.NonFiniteError as e:
    return commands.fail(argv[0], e, commands.NONFINITE)
  except ckpt_lib.CheckpointError as e:  # a failed save (disk), or no checkpoint restores
    return commands.fail(argv[0], e, commands.ERROR)
  except ValueError as e:  # tokenizer / model mismatches found after loading
    return commands.fail(argv[0], e)
  if jax.process_index() == 0:
    print(summary(result, os.path.abspath(os.path.expanduser(fv.workdir))))
  return commands.OK


if __name__ == "__main__":
  sys.exit(main(["unimo-jax train"] + sys.argv[1:]))
