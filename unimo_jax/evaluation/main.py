"""``unimo-jax evaluate --workdir DIR [--step N] [--split test]``: evaluate a training run.

Restores the parameters of a checkpoint (params only, onto the current devices: any device
count), loads the evaluation split(s) of the run's pair source through ``data_pipelines``, runs
the evaluators the config's ``evaluation`` section lists (all by default), and writes
``results.json``, ``report.md`` and figures into the workdir.

  unimo-jax evaluate --workdir W                      # latest checkpoint, config's splits
  unimo-jax evaluate --workdir W --step 0,latest      # the untrained model beside the trained
  unimo-jax evaluate --workdir W --split test,test_compositional --limit 200

``--step 0`` without a step-0 checkpoint evaluates the initial parameters exactly as the run
created them (the config's seed), i.e. the untrained model.

Config keys read from ``evaluation`` (all optional): the ``runner.EvalSettings`` fields
(evaluators, batch_size, caption {max_length, beam_size, alpha, min_length, block_trigrams},
caption_images, ks) plus ``splits`` (default: ``test`` and, where the source has it,
``test_compositional``) and ``limit`` (images per split, 0 = all).
``make_train_evaluator`` gives the training loop the same evaluators as a ``(params, step)``
callback.
"""
import logging
import os
import sys
import time
from typing import Any, Sequence

import jax

from unimo_jax import parallel
from unimo_jax.evaluation import report as report_lib
from unimo_jax.evaluation import runner
from unimo_jax.model import ModelConfig, Unimo
from unimo_jax.train import setup as setup_lib


def load_tokenizer(config):
  from data_pipelines import tokenizers  # pylint: disable=import-outside-toplevel
  return tokenizers.load_tokenizer(config.data.tokenizer)


def load_run(workdir: str, step: int | None = None):
  """(run config as a ConfigDict, ModelConfig) of a training workdir (``setup.read_run``; the
  tokenizer gives the vocabulary size when the run recorded no model config)."""
  return setup_lib.read_run(workdir, step, lambda config: load_tokenizer(config).vocab_size)


def eval_mesh(config):
  """The run's mesh if it fits the devices present, else all devices on the data axis."""
  try:
    return parallel.make_mesh(dict(config.get("mesh", {"data": -1})))
  except ValueError as e:
    logging.warning("evaluation: %s; using a data-parallel mesh over %d devices", e,
                    jax.device_count())
    return parallel.make_mesh((-1, 1, 1))




def restore_model_params(workdir: str, step: int | None, config, model_cfg, mesh):
  """The model parameters (``params["model"]``) of a checkpoint, sharded for ``mesh``.

  step None: the latest checkpoint; step 0 with no such checkpoint: the run's initial
  parameters (seed ``config.seed``). Returns (params, step).
  """
  from unimo_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  run = setup_lib.build_run(config, model_cfg=model_cfg, mesh=mesh)  # no batch spec: no step
  init, shardings = run.init_params, run.shardings.params
  directory = ckpt_lib.checkpoint_dir(workdir)
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
      directory) else []
  if step == 0 and 0 not in steps:
    params = jax.jit(lambda k: parallel.unbox(init(k)), out_shardings=shardings)(
        jax.random.key(int(config.seed)))
    return params["model"], 0
  params, step = ckpt_lib.restore_params(workdir, step, shardings=shardings)
  return params["model"], step


def _eval_section(config) -> dict:
  section = config.get("evaluation", None)
  section = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
  return section


def _load_split(config, split, tokenizer, limit, allow_train_source=None):
  from data_pipelines import eval_data  # pylint: disable=import-outside-toplevel
  return eval_data.load_eval_split(config.data, split, tokenizer=tokenizer, limit=limit,
                                   eval_config=_eval_section(config),
                                   allow_train_source=allow_train_source)


def _default_splits(config) -> list:
  from data_pipelines import eval_data  # pylint: disable=import-outside-toplevel
  return eval_data.default_splits(config.data, eval_config=_eval_section(config))


def make_train_evaluator(config, model_cfg: ModelConfig, mesh, tokenizer,
                         splits: Sequence[str] | None = None):
  """``(params, step) -> {metric: float}`` for the training loop's ``evaluate`` hook.

  ``params`` is the train state's parameter tree (``{"model": ..., "cmcl": ...}``); the splits
  are loaded once, on first use. Metric names are ``<split>/<metric>``.
  """
  section = _eval_section(config)
  splits = list(splits or section.get("splits") or _default_splits(config))
  limit = int(section.get("limit", 0))
  return runner.train_evaluator(Unimo(model_cfg), mesh, section, tokenizer.decode, splits,
                                lambda split: _load_split(config, split, tokenizer, limit))


def evaluate_workdir(workdir: str, steps: Sequence[Any] = ("latest",),
                     splits: Sequence[str] | None = None, limit: int | None = None,
                     batch_size: int | None = None, figures: bool = True,
                     allow_train_source: bool | None = None,
                     sources: dict | None = None) -> dict:
  """Evaluates the given checkpoint steps (ints, or "latest") of a run on its splits.

  ``sources`` ({split: path or source spec}) adds to or replaces the run's
  ``evaluation.sources`` (``data_pipelines.eval_data``) for this evaluation.

  Returns the content of ``results.json`` after adding these evaluations, plus
  ``report_path``.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config, model_cfg = load_run(workdir)
  if sources:  # held-out files named on the command line, e.g. --source test=/data/test-*.tar
    config.evaluation.sources = {**_eval_section(config).get("sources", {}), **sources}
  if "task" in config:  # a fine-tuned run: its task's metrics (unimo_jax.finetune)
    from unimo_jax.finetune import main as finetune_main  # pylint: disable=import-outside-toplevel
    return finetune_main.evaluate_workdir(workdir, steps, splits, config, model_cfg,
                                          figures=figures)
  section = _eval_section(config)
  if batch_size:
    section["batch_size"] = batch_size
  settings = runner.EvalSettings.from_config(section)
  splits = list(splits or section.get("splits") or _default_splits(config))
  limit = int(section.get("limit", 0) if limit is None else limit)
  tokenizer = load_tokenizer(config)
  mesh = eval_mesh(config)
  ev = runner.Evaluator(Unimo(model_cfg), mesh, settings, decode_fn=tokenizer.decode)
  data_cfg = config.data
  mean = tuple(data_cfg.get("pixel_mean", (0.5,) * 3))
  std = tuple(data_cfg.get("pixel_std", (0.5,) * 3))
  is_main = jax.process_index() == 0
  loaded = {s: _load_split(config, s, tokenizer, limit, allow_train_source) for s in splits}
  figs, captions, results = {}, {}, report_lib.load_results(workdir)
  for step in steps:
    want = None if step in (None, "latest") else int(step)
    params, got = restore_model_params(workdir, want, config, model_cfg, mesh)
    for split, (data, meta) in loaded.items():
      t0 = time.time()
      res = ev.run(params, data, meta)
      res["metrics"]["eval_seconds"] = time.time() - t0
      logging.info("step %d %s: %s", got, split, {k: round(v, 4) for k, v in
                                                    res["metrics"].items()
                                                    if isinstance(v, float)})
      if is_main:
        results = report_lib.add_result(
            workdir, got, split, res, dict(images=int(len(data["image_id"])),
                                           dropped=meta.get("dropped", {}),
                                           source=meta.get("source", ""),
                                           records=meta.get("records")))
        if figures and step == steps[-1]:
          figs[split] = report_lib.split_figures(workdir, split, res, data, meta, mean, std)
          captions[split] = res["artefacts"].get("captions", [])
  if is_main and figures:
    report_lib.training_curves(os.path.join(workdir, "metrics.jsonl"),
                               os.path.join(workdir, "training_curves.png"))
  results["report_path"] = (report_lib.write_report(workdir, results, figs, captions)
                            if is_main else "")
  return results


def main(argv) -> int:
  from unimo_jax import commands  # pylint: disable=import-outside-toplevel
  parser = commands.ArgumentParser(prog=argv[0], description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--step", default="latest",
                      help="checkpoint step(s), comma separated; 'latest' (default) or N; "
                           "0 = the untrained initial parameters")
  parser.add_argument("--split", default="",
                      help="split(s) of the pair source, comma separated (default: the "
                           "config's evaluation.splits, else test and test_compositional "
                           "where they exist)")
  parser.add_argument("--limit", type=int, default=None, help="images per split (0 = all)")
  parser.add_argument("--batch-size", type=int, default=None, help="global eval batch size")
  parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
  parser.add_argument("--allow-train-source", action="store_true",
                      help="evaluate a split even when its source is a training source")
  parser.add_argument("--verbose", action="store_true",
                      help="keep the INFO logs of absl, orbax and TensorFlow")
  parser.add_argument("--source", action="append", default=[], metavar="SPLIT=PATH",
                      help="held-out files of a split (a path or glob read like the training "
                           "pair source), added to the config's evaluation.sources; repeatable")
  args = parser.parse_args(argv[1:])
  bad = [s for s in args.source if "=" not in s or not s.split("=", 1)[1]]
  if bad:
    print(f"{argv[0]}: --source {bad[0]!r}: expected SPLIT=PATH", file=sys.stderr)
    return 2
  sources = dict(s.split("=", 1) for s in args.source)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if not args.verbose:  # the table, not the libraries' start-up and checkpoint chatter
    import data_pipelines  # pylint: disable=import-outside-toplevel
    data_pipelines.import_tensorflow_quietly()
    for name in ("absl", "orbax", "jax", "tensorflow"):
      logging.getLogger(name).setLevel(logging.ERROR)
  steps = [s.strip() for s in args.step.split(",") if s.strip()]
  splits = [s.strip() for s in args.split.split(",") if s.strip()] or None
  if not os.path.isdir(os.path.expanduser(args.workdir)):
    print(f"{argv[0]}: no such workdir {args.workdir}", file=sys.stderr)
    return 2
  from unimo_jax.train.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  try:
    results = evaluate_workdir(args.workdir, steps, splits, args.limit, args.batch_size,
                               figures=not args.no_figures,
                               allow_train_source=args.allow_train_source or None,
                               sources=sources)
  except (FileNotFoundError, ValueError, CheckpointError) as e:  # no (restorable) checkpoint /
    print(f"{argv[0]}: {e}", file=sys.stderr)                   # config problems: one line
    return 2
  if jax.process_index() == 0:
    print(results.get("table") or report_lib.results_table(results["evaluations"]))
    for split, e in {e["split"]: e for e in results["evaluations"] if e.get("source")}.items():
      # which files each split read: the held-out ones, never silently the training ones
      print(f"{split}: {e['source']} ({e.get('records')} records, {e.get('images')} images "
            f"evaluated, dropped {e.get('dropped') or 'none'})")
    print(f"report: {results['report_path']}")
  return 0
