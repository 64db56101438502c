"""``unimo-jax finetune``: fine-tune a (pre-trained) UNIMO model on a downstream task.

  unimo-jax finetune --config experiments/configs/finetune/vqa.py:demo --workdir /tmp/vqa \\
      --config.init_from=/tmp/unimo_demo
  unimo-jax finetune --config experiments/configs/finetune/sst2.py:data_dir=D --workdir W \\
      --config.init_from=/models/unimo_base_converted --config.optimizer.learning_rate=2e-5

The same machinery as ``unimo-jax train``: flags (``--config FILE[:ARG]``, ``--config.FIELD=V``,
``--workdir``, multi-host flags, ``--dry_run``), mesh and sharding, optimizer, orbax
checkpoints, exact resume of a workdir, metrics (TensorBoard, metrics.jsonl), progress bar and
exit codes (0 done, 1 unexpected error, 2 bad usage or config in one line, 3 non-finite guard).
``config.init_from`` is a pre-training (or fine-tuning) workdir, at ``config.init_step`` (0 =
latest), a converted checkpoint dir, or empty (scratch). ``unimo-jax evaluate --workdir W``
then writes the task's metrics to ``W/results.json``.
"""
from __future__ import annotations

import os
import sys

from unimo_jax import commands
from unimo_jax.train import main as train_main

USAGE = ("unimo-jax finetune --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...] "
         "[flags]")
DESCRIPTION = ("Fine-tunes a UNIMO model on a task (classification, regression, entailment, "
               "vqa, retrieval, captioning, seq2seq); a workdir holding checkpoints is resumed.")
CONFIG_HELP = train_main.CONFIG_HELP[:3] + (
    ("fields", "every field with its default and meaning: unimo_jax/finetune/config.py; the "
               "data section: data_pipelines/finetune/__init__.py; tasks: "
               "unimo_jax/finetune/tasks.py"),
    ("--config.init_from=P", "start from a pre-training workdir (latest, or --config.init_step=N), "
                             "a converted checkpoint dir, or nothing (scratch)"),
)


def help_text(fv, prog: str = "unimo-jax finetune") -> str:
  return commands.absl_help(prog, fv, usage=USAGE.replace("unimo-jax finetune", prog),
                            description=DESCRIPTION, sections=[("config", CONFIG_HELP)],
                            skip=("config", "workdir"),
                            exit_codes=(commands.OK, commands.ERROR, commands.USAGE,
                                        commands.NONFINITE))


def load_tokenizer(config):
  from data_pipelines import tokenizers  # pylint: disable=import-outside-toplevel
  spec = config.data.tokenizer
  try:
    return tokenizers.load_tokenizer(spec)
  except (OSError, ValueError, RuntimeError) as e:
    raise ValueError(f"data.tokenizer {spec!r} cannot be loaded ({e})") from e


def _eval_config(config, mesh):
  """The config with ``data.eval_batch_size`` rounded up to fill the evaluation mesh."""
  from unimo_jax.evaluation import runner  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references() if hasattr(
      config, "copy_and_resolve_references") else config
  with config.unlocked() if hasattr(config, "unlocked") else _null():
    config.data.eval_batch_size = runner.global_batch_size(int(config.data.eval_batch_size), mesh)
  return config


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def load_split(config, split: str, tokenizer, mesh):
  """(evaluation batches as a list, meta) of one split, this process's rows."""
  import jax  # pylint: disable=import-outside-toplevel
  from data_pipelines import finetune as data_lib  # pylint: disable=import-outside-toplevel
  data, meta = data_lib.make_data(_eval_config(config, mesh), split, tokenizer, training=False,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  meta["dropped"] = data.dropped_counts()
  return list(data), meta


def make_evaluator(config, model_cfg, mesh, tokenizer, splits):
  """``(params, step) -> {"<split>/<metric>": value}`` for ``train.eval_every``."""
  from unimo_jax.finetune import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  task = tasks_lib.Task(model_cfg, tasks_lib.TaskSpec.from_config(config.task))
  settings = eval_lib.GenerationSettings.from_config(config.evaluation)
  loaded = {s: load_split(config, s, tokenizer, mesh) for s in splits}

  def evaluate(params, step):
    del step
    out = {}
    for split, (batches, meta) in loaded.items():
      res = eval_lib.evaluate_split(task, params, batches, meta, mesh, settings, tokenizer)
      out.update({f"{split}/{k}": v for k, v in res.items() if isinstance(v, (int, float))})
    return out
  return evaluate


def evaluate_workdir(workdir: str, steps=("latest",), splits=None, config=None,
                     model_cfg=None, tokenizer=None, figures: bool = True) -> dict:
  """``unimo-jax evaluate`` on a fine-tuned run: each step's task metrics on each split into
  ``results.json``, and ``report.md`` (a table and, unless ``figures`` is False, the figures of
  ``finetune.report``). Returns results.json's content plus ``report_path``."""
  import time  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import setup as setup_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.evaluation import report as report_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if config is None:
    config, model_cfg = setup_lib.read_run(workdir)
  tokenizer = tokenizer or load_tokenizer(config)
  mesh = parallel.make_mesh((-1, 1, 1))
  task = tasks_lib.Task(model_cfg, tasks_lib.TaskSpec.from_config(config.task))
  settings = eval_lib.GenerationSettings.from_config(config.evaluation)
  splits = list(splits or config.evaluation.get("splits") or ["validation"])
  loaded = {s: load_split(config, s, tokenizer, mesh) for s in splits}
  dual = None
  if (task.spec.kind == "retrieval" and config.get("init_from")
      and config.evaluation.get("dual_encoder", "init") == "init"):
    from unimo_jax.finetune import init as init_lib  # pylint: disable=import-outside-toplevel
    model, _, _ = init_lib.load_source(config.init_from, int(config.get("init_step", 0)),
                                       model_cfg)
    dual = eval_lib.put_params({"model": model}, mesh)
  results = report_lib.load_results(workdir)
  is_main = jax.process_index() == 0
  for step in steps:
    want = None if step in (None, "latest") else int(step)
    params, got = ckpt_lib.restore_params(workdir, want, parallel.replicated(mesh))
    for split, (batches, meta) in loaded.items():
      t0 = time.time()
      res = eval_lib.evaluate_split(task, params, batches, meta, mesh, settings, tokenizer,
                                    dual_params=dual)
      res["dual_encoder"] = "init_from" if dual is not None else "fine-tuned"
      res["eval_seconds"] = time.time() - t0
      if is_main:
        results = report_lib.add_result(
            workdir, got, split, {"metrics": res, "pairs": {}},
            dict(task=config.task.kind, dropped=meta.get("dropped", {})))
  from unimo_jax.finetune import report as ft_report  # pylint: disable=import-outside-toplevel
  path = ft_report.write_report(workdir, results, task.spec.kind, figures) if is_main else ""
  results["report_path"] = path
  results["table"] = ft_report.report_text(results)  # what `unimo-jax evaluate` prints
  return results


def _hard_pools(config, model_cfg, workdir: str):
  """The pools' builder of retrieval with ``data.hard_negatives`` (None otherwise): mined with
  the CMCL towers of the parameters the run starts from (``finetune.hard_negatives``)."""
  k = int(config.data.get("hard_negatives", 0))
  if config.task.kind != "retrieval" or not k:
    return None
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import hard_negatives  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import init as init_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  task = tasks_lib.Task(model_cfg, tasks_lib.TaskSpec.from_config(config.task))
  if config.init_from:
    params = init_lib.load_source(str(config.init_from), int(config.init_step), model_cfg)[0]
  else:
    params = jax.jit(lambda r: nn.unbox(task.init_params(r)))(
        jax.random.key(int(config.seed)))["model"]
  return hard_negatives.pool_builder(task.model, params, k, workdir)


def finetune_from_config(config, workdir: str, *, tokenizer=None, **train_kw):
  """Wires the task's data in and runs the training loop with the task's run.

  The one place a fine-tuning run meets ``data_pipelines``; ``train_kw`` (``stop``,
  ``max_steps``) go to ``trainer.train``. Returns its ``TrainResult``."""
  import jax  # pylint: disable=import-outside-toplevel
  from data_pipelines import finetune as data_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import run as run_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import setup as setup_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizer or load_tokenizer(config)
  model_cfg = setup_lib.resolve_model_config(config, tokenizer.vocab_size)
  setup_lib.check_tokenizer(model_cfg, tokenizer)
  data, _ = data_lib.make_data(config, "train", tokenizer, training=True,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(),
                               hard_pools=_hard_pools(config, model_cfg, workdir))
  run = run_lib.build_finetune_run(config, data.spec, model_cfg=model_cfg)
  evaluate = None
  if config.train.eval_every:
    evaluate = make_evaluator(config, model_cfg, run.mesh, tokenizer,
                              list(config.evaluation.splits))
  try:
    return trainer.train(config, workdir, data=data, evaluate=evaluate, run=run, **train_kw)
  finally:
    data.close()


def main(argv: list[str]) -> int:
  fv = train_main.command_flags(argv)  # the same flags as train
  rc = commands.parse_absl(fv, argv, help_text(fv, argv[0]))
  if rc is not None:
    return rc
  config, _, rc = train_main.load_and_launch(fv, argv, describe_config=False)
  if rc is not None:
    return rc

  import jax  # pylint: disable=import-outside-toplevel
  from unimo_jax.finetune import config as config_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import trainer  # pylint: disable=import-outside-toplevel
  try:
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  except config_lib.ConfigError as e:
    return commands.fail(argv[0], f"config error: {e}")
  if fv.dry_run:
    print(train_main.dry_run(config, fv.workdir, argv).replace("would train", "would fine-tune")
          + f"\n  task: {config.task.kind}, init_from: {config.init_from or '(scratch)'}")
    return commands.OK
  try:
    result = finetune_from_config(config, fv.workdir)
  except trainer.NonFiniteError as e:
    return commands.fail(argv[0], e, commands.NONFINITE)
  except ckpt_lib.CheckpointError as e:  # a failed save (disk), or no checkpoint restores
    return commands.fail(argv[0], e, commands.ERROR)
  except (ValueError, FileNotFoundError) as e:  # data files, tokenizer, init_from mismatches
    return commands.fail(argv[0], e)
  if jax.process_index() == 0:
    print(train_main.summary(result, os.path.abspath(os.path.expanduser(fv.workdir))))
  return commands.OK


if __name__ == "__main__":
  sys.exit(main(["unimo-jax finetune"] + sys.argv[1:]))
