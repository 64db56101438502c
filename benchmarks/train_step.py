"""Train-step speed of a config on the devices present: step time, TFLOP/s, MFU.

  python benchmarks/train_step.py --config experiments/configs/base.py [--steps 10]
      [--batch 64,32,64] [--layers 12] [--dtype auto|float32|bfloat16]

Runs the real UNIMO train step (every objective of the config) on random schema batches (no
TensorFlow, no data files), after one compile, and prints: compile time; median step time;
the analytic FLOPs per step (``unimo_jax.train.flops``) beside XLA's own count of the compiled
step (``cost_analysis``), and their ratio; achieved TFLOP/s per device and MFU against the peak
table. ``--batch`` sets the GLOBAL (text, image, pair) rows per step.

  python benchmarks/train_step.py --config experiments/configs/demo.py --alone --steps 8

``--alone`` also times every weighted objective ALONE (the same config with every other weight
0, so the others are not computed; same batch shapes, one compile each) and prints the full
step's time beside the sum of the objectives' times, each weighted by the fraction of steps it
runs in (an objective alternating with its stream's other language objective runs every other
step), and their ratio: the cost of running them together rather than one by one (shared
encoder passes make it < 1; anything merged badly or recomputed shows as > 1). Step times are
means over an even number of steps so both alternation phases count alike.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from data_pipelines import schema  # noqa: E402  (numpy only)
from unimo_jax import parallel  # noqa: E402
from unimo_jax.train import flops as flops_lib  # noqa: E402
from unimo_jax.train import objectives as obj_lib  # noqa: E402
from unimo_jax.train import random_data  # noqa: E402
from unimo_jax.train import setup as setup_lib  # noqa: E402
from unimo_jax.train import state as state_lib  # noqa: E402


def load_config(path: str):
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def time_step(c, spec, steps: int):
  """Builds, compiles and times the step of config ``c``: (run, state, compile seconds, XLA
  flops per device, per-step seconds of 2 warm-up + ``steps`` steps, last metrics)."""
  run = setup_lib.build_run(c, spec, vocab_size=50265, process_count=1)
  state = run.new_state()
  batches = random_data.RandomBatches(spec, run.model_cfg.vocab_size)
  t0 = time.time()
  compiled = run.compile()
  compile_s = time.time() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
  times = []
  for _ in range(steps + 2):
    batch = parallel.global_batch(next(batches), run.mesh)
    t = time.time()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.time() - t)
  return run, state, compile_s, xla_flops, times, m


def time_alone(c, spec, steps: int, full_s: float) -> dict:
  """Each weighted objective timed alone, and the full step over their phase-weighted sum."""
  streams = sorted(c.data.streams.keys())
  phases = obj_lib.num_phases(c.objectives)
  plans = [obj_lib.active(c.objectives, streams, p) for p in range(phases)]
  names = [o for o in obj_lib.OBJECTIVES if any(o in plan for plan in plans)]
  alone, weighted = {}, 0.0
  for name in names:
    one = c.copy_and_resolve_references()
    for other in obj_lib.OBJECTIVES:
      if other != name:
        one.objectives.weights[other] = 0.0
    _, _, _, _, times, _ = time_step(one, spec, steps)
    share = sum(name in plan for plan in plans) / phases
    alone[name] = dict(step_seconds=round(statistics.mean(times[2:]), 4), share=share)
    weighted += share * statistics.mean(times[2:])
  return dict(objectives=alone, full_step_seconds=round(full_s, 4),
              weighted_sum_seconds=round(weighted, 4), full_over_sum=round(full_s / weighted, 3))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/configs/base.py")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", default="", help="global text,image,pair rows per step")
  p.add_argument("--layers", type=int, default=0, help="override model.num_layers")
  p.add_argument("--dtype", default="auto")
  p.add_argument("--json", default="", help="also write the results to this file")
  p.add_argument("--alone", action="store_true",
                 help="also time each weighted objective alone; print full / weighted sum")
  a = p.parse_args()
  if a.alone and a.steps % 2:
    p.error("--alone needs an even --steps (both alternation phases count alike)")

  c = load_config(a.config)
  c.model.dtype = a.dtype
  if a.layers:
    c.model.num_layers = a.layers
  if a.batch:
    for s, b in zip(("text", "image", "pair"), a.batch.split(",")):
      c.data.streams[s].batch_size = int(b)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  data = c.data.to_dict()
  spec = schema.batch_spec(data)
  c.seed = 0
  run, state, compile_s, xla_flops, times, m = time_step(c, spec, a.steps)
  model_cfg = run.model_cfg
  step_s = statistics.median(times[2:])
  analytic = run.flops()["train"]
  peak = flops_lib.current_peak_flops(model_cfg.dtype)
  n = jax.device_count()
  out = dict(
      device=jax.devices()[0].device_kind, devices=n, dtype=model_cfg.dtype,
      layers=model_cfg.num_layers, hidden=model_cfg.hidden_size,
      batch={s: data["streams"][s]["batch_size"] for s in ("text", "image", "pair")},
      params=state_lib.param_count(state.params), compile_seconds=round(compile_s, 1),
      step_seconds=round(step_s, 4), analytic_tflop_per_step=analytic / 1e12,
      xla_tflop_per_step=xla_flops * n / 1e12 if xla_flops else None,
      analytic_over_xla=analytic / (xla_flops * n) if xla_flops else None,
      tflops_per_device=analytic / step_s / n / 1e12,
      mfu=flops_lib.mfu(analytic, 1.0 / step_s, peak, n), peak_tflops_per_device=peak / 1e12,
      loss=float(m["loss"]))
  if a.alone:
    out["alone"] = time_alone(c, spec, a.steps, statistics.mean(times[2:]))
  print(json.dumps(out, indent=2))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
