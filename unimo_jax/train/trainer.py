"""The training loop: ``train(config, workdir, data=...)`` from a fresh start or the workdir's
latest checkpoint.

Read top to bottom: workdir / the run (``setup.build_run``: model, mesh, optimizer, shardings,
step) / state (restore, ``init_from`` or fresh) / compiled step / FLOPs / the loop (step,
non-finite guard, metrics, checkpoints, stop signals, evaluation) / the end (final checkpoint
and summary).

The input is any iterator of per-process numpy batches with ``spec`` and ``get_state()`` /
``set_state()`` (``data_pipelines.pipeline.DataIterator``, wired in by ``unimo_jax.train.main``,
or ``random_data.RandomBatches`` in tests); its state is saved with every checkpoint, so a
resumed run sees exactly the batches an uninterrupted run would, and with the per-step dropout
key ``fold_in(seed, step)`` computes exactly its updates. Evaluation comes in the same way, as a
``(params, step) -> metrics`` callback; this module imports neither data nor evaluation code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from unimo_jax import host_allocator, parallel
from unimo_jax.model import ModelConfig
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import flops as flops_lib
from unimo_jax.train import metrics as metrics_lib
from unimo_jax.train import setup as setup_lib
from unimo_jax.train import state as state_lib

# Metrics shown on the console (the files get all of them).
CONSOLE_KEYS = ("loss", "text_mlm/loss", "text_s2s/loss", "image_mrp/loss", "pair_cmcl/loss_i2t",
                "pair_cmcl/accuracy_i2t", "pair_mlm/loss", "pair_caption/loss", "pair_mrp/loss",
                "grad_norm", "steps_per_second", "mfu")


class NonFiniteError(RuntimeError):
  """Training stopped: too many consecutive non-finite steps."""


@dataclasses.dataclass
class TrainResult:
  """What a run did (returned by ``train``)."""
  first_step: int
  last_step: int
  stopped_by: str          # "done" | "signal" | "max_steps"
  first_metrics: dict
  last_metrics: dict
  workdir: str
  checkpoint_step: int | None
  compile_seconds: float
  train_seconds: float
  flops_per_step: float
  goodput: dict = dataclasses.field(default_factory=dict)  # seconds by activity


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _dropped_metrics(data) -> dict[str, float]:
  """Dropped records per source and reason, and cut texts per stream, summed over processes."""
  if not hasattr(data, "dropped_counts"):
    return {}
  per_process = ckpt_lib.gather_json(data.dropped_counts())
  out: dict[str, float] = {}
  for counts in per_process:
    for source, reasons in counts.items():
      for reason, n in reasons.items():
        key = f"data/dropped/{source}/{reason}"
        out[key] = out.get(key, 0.0) + float(n)
  out["data/dropped_total"] = float(sum(out.values()))
  if hasattr(data, "truncated_counts"):  # texts cut to the configured lengths
    for counts in ckpt_lib.gather_json(data.truncated_counts()):
      for key, n in counts.items():  # "<stream>/<source>", and the stream's total
        for k in (f"data/truncated/{key}", f"data/truncated/{key.split('/', 1)[0]}"):
          out[k] = out.get(k, 0.0) + float(n)
  return out


# ModelConfig fields a converted checkpoint and the run must share (shapes alone do not show a
# different position layout or normalisation order).
INIT_FROM_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                    "max_positions", "roberta_positions", "pre_ln", "pad_id")


def _init_from(path: str, fresh_params: Any, shardings: Any, model_cfg: ModelConfig) -> Any:
  """Overlays a converted RoBERTa checkpoint (``unimo-jax convert roberta``) on freshly
  initialised parameters: the text embeddings, encoder and LM head come from it, the visual
  embeddings, region heads, CMCL projections and temperature keep their initialisation."""
  from unimo_jax.convert import roberta  # pylint: disable=import-outside-toplevel
  loaded_cfg, loaded = roberta.load_converted(os.path.expanduser(path))
  for field in INIT_FROM_FIELDS:
    if getattr(loaded_cfg, field) != getattr(model_cfg, field):
      raise ValueError(f"train.init_from: {path} has {field}={getattr(loaded_cfg, field)!r}, "
                       f"config.model has {getattr(model_cfg, field)!r}")
  host = jax.device_get(fresh_params)
  merged_model, report = state_lib.merge_params(host["model"], loaded)
  logging.info("init_from %s: %d tensors loaded, %d newly initialised (%s...), %d ignored",
               path, len(report["loaded"]), len(report["initialised"]),
               ", ".join(report["initialised"][:4]), len(report["ignored"]))
  return jax.device_put(dict(host, model=merged_model), shardings.params)


def train(config, workdir: str, *, data: Iterator,
          evaluate: Callable[[Any, int], Mapping[str, float]] | None = None,
          vocab_size: int | None = None, stop: ckpt_lib.StopSignal | None = None,
          max_steps: int | None = None, run: setup_lib.Run | None = None) -> TrainResult:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Args:
    config: a validated run config (``unimo_jax.train.config``).
    workdir: checkpoints, TensorBoard events, ``metrics.jsonl`` and ``config.json`` go here.
    data: an iterator of per-process numpy batches with ``spec`` (``{name: (shape, dtype)}``)
      and ``get_state``/``set_state``; the caller owns it (and closes it).
    evaluate: ``(params, step) -> metrics`` run every ``train.eval_every`` steps.
    vocab_size: the tokenizer's vocabulary size, used when ``config.model.vocab_size`` is 0.
    stop: the stop-request object (default: one handling SIGTERM/SIGINT during the loop).
    max_steps: stop after this many steps of THIS call (a checkpoint is saved), e.g. to split a
      run in tests; the schedule still follows ``train.total_steps``.
    run: a prebuilt run with ``setup.Run``'s interface (fine-tuning passes its own); default
      ``setup.build_run(config, data.spec)``.

  Returns:
    A ``TrainResult``. Raises ``NonFiniteError`` after ``train.max_nonfinite_steps``
    consecutive non-finite steps (the last checkpoint is left as it was).
  """
  t_start = time.time()
  tc = config.train
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- the run
  if run is None:
    run = setup_lib.build_run(config, data.spec, vocab_size=vocab_size)
  mesh, model_cfg, schedule = run.mesh, run.model_cfg, run.schedule
  logging.info("mesh %s over %d devices (%d processes), %s", dict(mesh.shape), jax.device_count(),
               jax.process_count(), jax.devices()[0].device_kind)
  logging.info("host allocator: %s", host_allocator.describe())
  rows = run.stream_rows()
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(_config_json(config), f, indent=2, sort_keys=True)
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      f.write(model_cfg.to_json())

  # ---------------------------------------------------------------- state
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints or None,
                                       keep_period=tc.keep_period or None,
                                       async_save=tc.async_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    # The newest checkpoint that restores (a damaged newer one is named and skipped).
    state, data_state, _ = checkpointer.restore(run.abstract_state)
    if data_state is not None and hasattr(data, "set_state"):
      data.set_state(data_state)
    logging.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
  else:
    state = run.new_state()
    if tc.init_from:
      state = run.new_state(_init_from(tc.init_from, state.params, run.shardings, model_cfg))
  n_params = state_lib.param_count(state.params)
  logging.info("model: %s parameters (%s, compute %s)", f"{n_params:,}", model_cfg.visual_input,
               model_cfg.dtype)

  # ---------------------------------------------------------------- the step
  t0 = time.time()
  compiled = run.compile()
  compile_seconds = time.time() - t0
  logging.info("compiled the train step in %.1fs", compile_seconds)
  if tc.compile_report:
    try:
      mem = compiled.memory_analysis()
      logging.info("step memory per device: arguments %.1f MiB, outputs %.1f MiB, temporaries "
                   "%.1f MiB", mem.argument_size_in_bytes / 2**20,
                   mem.output_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)
    except Exception as e:  # pylint: disable=broad-except  (not every backend reports it)
      logging.info("no memory analysis on this backend (%s)", e)

  flops = run.flops()
  peak = flops_lib.current_peak_flops(model_cfg.dtype, tc.peak_flops_per_device)
  logging.info("analytic %.3g TFLOP per step; peak %.3g TFLOP/s per device", flops["train"] / 1e12,
               peak / 1e12)

  # ---------------------------------------------------------------- the loop
  # No device-to-host transfer per step: metrics are summed on device and fetched at log
  # steps; the non-finite guard's streak is watched on device and checked at log steps and
  # before every save (so no checkpoint is written past the stop point). A save counts only
  # once committed (the checkpointer logs it); a failed one ends the run with CheckpointError.
  start = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)  # cuts metrics.jsonl back
  if start == 0 and is_main:
    writer.write_text(0, "config", "```\n" + json.dumps(_config_json(config), indent=2) + "\n```")
  end = tc.total_steps if max_steps is None else min(tc.total_steps, start + max_steps)
  bar = metrics_lib.ProgressBar(tc.total_steps, start, force={"on": True, "off": False}.get(
      tc.progress_bar)) if is_main else metrics_lib.ProgressBar(1, force=False)
  max_streak = max(1, int(tc.max_nonfinite_steps))
  acc = metrics_lib.MeanAccumulator(watch=("nonfinite_streak", max_streak))
  own_stop = stop is None
  stop = stop or ckpt_lib.StopSignal()
  first_metrics: dict = {}
  last_metrics: dict = {}
  stopped_by = "done"
  window_start, data_wait, window_steps = time.time(), 0.0, 0
  in_flight: list = []
  max_in_flight = 3  # steps dispatched ahead of the device at most
  step = start
  failed = False

  goodput = {"compile": compile_seconds, "data_wait": 0.0, "checkpoint": 0.0, "eval": 0.0}

  def nonfinite_error(at_step):
    checkpointer.wait()  # the last checkpoint named below must be on disk
    good = checkpointer.latest_step()
    return NonFiniteError(
        f"stopping at step {step}: loss or gradient not finite for {max_streak} consecutive "
        f"steps by step {at_step} (updates skipped); the last checkpoint "
        f"({'step ' + str(good) if good is not None else 'none'}) holds the last good state. "
        f"Lower optimizer.learning_rate or check the data.")

  def save(step_now, state_now):
    first = acc.first_reached()
    if first is not None:
      raise nonfinite_error(step_now - window_steps + first)
    t_save = time.time()
    checkpointer.save(step_now, state_now, data_state=getattr(data, "get_state", dict)(),
                      config=_config_json(config))
    goodput["checkpoint"] += time.time() - t_save

  def log(step_now):
    nonlocal first_metrics, last_metrics, window_start, data_wait, window_steps
    values, first = acc.fetch()
    elapsed = time.time() - window_start
    sps = window_steps / elapsed if elapsed > 0 else 0.0
    values.update({
        "learning_rate": float(schedule(step_now - 1)),
        "steps_per_second": sps,
        "data_wait_share": data_wait / elapsed if elapsed > 0 else 0.0,
        "tflops_per_device": flops["train"] * sps / jax.device_count() / 1e12,
        "mfu": flops_lib.mfu(flops["train"], sps, peak, jax.device_count()),
        "nonfinite_total": float(state.nonfinite_total),
    })
    for s, n in rows.items():
      values[f"examples_per_second/{s}"] = n * sps
    values.update(_dropped_metrics(data))
    writer.write_scalars(step_now, values)
    if not first_metrics:
      first_metrics = dict(values, step=step_now)
    last_metrics = dict(values, step=step_now)
    line = metrics_lib.format_metrics(values, [k for k in CONSOLE_KEYS if k in values])
    if bar.enabled:
      bar.update(step_now, line, force=True)
    else:
      logging.info("step %d/%d %s", step_now, tc.total_steps, line)
    at_step = step_now - window_steps + first if first is not None else None
    window_start, data_wait, window_steps = time.time(), 0.0, 0
    if at_step is not None:
      raise nonfinite_error(at_step)

  if own_stop:
    stop.__enter__()
  t_loop = time.time()
  try:
    while step < end:
      t_fetch = time.time()
      host_batch = next(data)
      data_wait += time.time() - t_fetch
      goodput["data_wait"] += time.time() - t_fetch
      batch = parallel.global_batch(host_batch, mesh)
      state, m = compiled(state, batch)
      step += 1
      window_steps += 1
      acc.add(m)
      # Dispatch is asynchronous; waiting (without a transfer) for the step max_in_flight back
      # bounds how many batches the host queues on the device while keeping it busy.
      in_flight.append(m["loss"])
      if len(in_flight) > max_in_flight:
        in_flight.pop(0).block_until_ready()
      stopping = stop.should_stop()
      checkpointer.poll()  # host-only: logs a save committed meanwhile, raises if it failed

      if step % tc.log_every == 0 or step == end or stopping:  # a stop flushes the window
        log(step)
      else:
        bar.update(step)

      if tc.eval_every and evaluate is not None and step % tc.eval_every == 0:
        t_eval = time.time()
        results = {k: float(v) for k, v in dict(evaluate(state.params, step)).items()
                   if isinstance(v, (int, float, np.number))}
        results["seconds"] = time.time() - t_eval
        goodput["eval"] += results["seconds"]
        writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        logging.info("eval at step %d: %s", step, metrics_lib.format_metrics(
            {k: v for k, v in results.items() if "R@1" in k or "accuracy" in k or k == "seconds"},
            max_items=8))
        window_start = time.time()  # evaluation time is not training throughput

      if stopping:
        stopped_by = "signal"
        save(step, state)
        checkpointer.wait()
        logging.warning("stop requested: saved step %d, exiting", step)
        break
      if tc.checkpoint_every and step % tc.checkpoint_every == 0:
        save(step, state)
    else:
      stopped_by = "done" if step >= tc.total_steps else "max_steps"
      save(step, state)
  except BaseException:
    failed = True
    raise
  finally:
    if own_stop:
      stop.__exit__(None, None, None)
    bar.close()
    writer.close()
    if failed:
      checkpointer.abort()  # the pending save's outcome is logged; orbax's threads released
    else:
      checkpointer.close()  # waits for the last save; raises CheckpointError if it failed
  train_seconds = time.time() - t_loop
  logging.info("finished at step %d (%s) in %.1fs (total %.1fs)", step, stopped_by,
               train_seconds, time.time() - t_start)
  # Where the time went (MaxText's goodput split): the rest of the loop is the steps.
  goodput["steps"] = train_seconds - goodput["data_wait"] - goodput["checkpoint"] - goodput["eval"]
  logging.info("time: %s", ", ".join(f"{k} {v:.1f}s" for k, v in goodput.items()))
  return TrainResult(first_step=start, last_step=step, stopped_by=stopped_by,
                     first_metrics=first_metrics, last_metrics=last_metrics, workdir=workdir,
                     checkpoint_step=ckpt_lib.latest_step(workdir),
                     compile_seconds=compile_seconds, train_seconds=train_seconds,
                     flops_per_step=flops["train"], goodput=goodput)
