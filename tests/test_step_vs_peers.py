"""The peer benchmark's plumbing (never its speed): the analytic FLOPs on a hand-computed case,
the MLM batch, the table's ratios, the matmul-ceiling worker; the whole ``--smoke`` run (one
process per implementation) under ``-m slow``."""
import os
import subprocess
import sys

import numpy as np
import pytest
from benchmark_util import load_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(REPO, "benchmarks", "step_vs_peers.py")


def _bench():
  return load_benchmark("step_vs_peers")


def test_flops_batch_and_table(capsys):
  bench = _bench()
  shape = dict(layers=2, hidden=4, heads=2, mlp=8, vocab=10, batch=3, length=20)
  p = 3  # round(0.15 * 20)
  assert bench.predictions(shape) == p
  # per layer: B L 2 (4 H^2 + 2 H M) + B 2 2 L^2 H; head: B P 2 (H^2 + H V); x3 for training
  layer = 3 * 20 * 2 * (4 * 16 + 2 * 32) + 3 * 4 * 400 * 4
  head = 3 * p * 2 * (16 + 40)
  assert bench.train_flops(shape) == 3 * (2 * layer + head)

  ids, pos, targets = bench.mlm_batch(shape)
  assert ids.shape == (3, 20) and pos.shape == targets.shape == (3, p)
  assert np.all(np.take_along_axis(ids, pos, 1) == 9)  # the mask id: vocab - 1
  assert np.all(np.diff(pos, axis=1) > 0) and targets.max() < 9

  results = [dict(impl=i, shape="T1", dtype="float32", round=r, seconds=s, peak_rss_mib=100,
                  own_ceiling_gflops=c)
             for r, (a, b) in enumerate(((1.0, 2.0), (1.5, 2.0))) for i, s, c in (
                 ("ours", a, 40.0), ("flax", b, 20.0 * r + 10.0))]
  ceilings = [dict(gflops=10.0), dict(gflops=30.0)]
  bench.print_table(results, ceilings, 20.0, ["T1"], ["ours", "flax"], False)
  out = capsys.readouterr().out
  assert "10, 30 GFLOP/s" in out
  flax_row = next(line for line in out.splitlines() if "| flax |" in line)
  assert "| 0.500-0.750 |" in flax_row  # ours / flax in rounds 0 and 1
  gflops = bench.train_flops(bench.SHAPES["T1"]) / 2.0 / 1e9
  assert f"| {gflops:.0f} | {gflops / 20:.2f} |" in flax_row
  # own ceiling: the median of flax's processes (10, 30), and per process GFLOP/s over its own
  own = sorted((gflops / 10, gflops / 30))
  assert f"| 20 | {own[0]:.3f}-{own[1]:.3f} | 100 |" in flax_row
  ours = bench.train_flops(bench.SHAPES["T1"]) / 1e9 / 40.0
  assert (f"T1 float32: fastest ours / its own ceiling per round: {ours / 1.0:.2f} (ours, 40 "
          f"GFLOP/s), {ours / 1.5:.2f} (ours, 40 GFLOP/s)") in out


def test_interleaved_timing_probes_the_ceiling_after_every_step():
  bench = _bench()
  calls = []
  step = lambda: calls.append("step")

  def probe():
    calls.append("probe")
    return 0.5
  probe.flops = 10e9
  seconds, gflops = bench.time_interleaved(step, probe, steps=3, warmup=1, probes=2)
  assert calls == ["step"] + ["step", "probe", "probe"] * 3
  assert gflops == pytest.approx(20.0) and seconds >= 0
  real = bench.ceiling_probe(bench.SHAPES["T1"])
  assert real() > 0 and real.flops == 2.0 * 256 ** 3


def test_matmul_products_are_the_analytic_flops(capsys):
  """The matmuls-alone bound times exactly the products train_flops counts (hand-checked
  above), and its line compares them with the fastest of ours."""
  bench, flops = _bench(), load_benchmark("step_shapes")
  for shape in (dict(layers=2, hidden=4, heads=2, mlp=8, vocab=10, batch=3, length=20),
                flops.SHAPES["S1"], flops.SHAPES["S2"]):
    total = sum(count * flops.product_flops(kind, shapes)
                for kind, shapes, count in flops.matmul_products(shape))
    assert total == pytest.approx(flops.train_flops(shape), rel=1e-12)
  out = bench._worker_matmuls(bench.SHAPES["T1"], 1, "float32")
  assert out["seconds"] > 0
  results = [dict(impl="ours_unrolled", shape="T1", dtype="float32", round=0, seconds=3.0),
             dict(impl="hf_masked", shape="T1", dtype="float32", round=0, seconds=1.0)]
  (line,) = bench.matmul_lines(results, {"T1": dict(seconds=2.0, gflops=10.0)}, 20.0)
  assert "alone 2.000 s (10 GFLOP/s, 0.50 of the ceiling)" in line
  assert "ours step 3.000 s spends 1.000 s (33%) beyond them" in line
  # with the torch products: the floor of ours / fastest torch row
  torch_out = bench._worker_matmuls_torch(bench.SHAPES["T1"], 1, "float32")
  assert torch_out["seconds"] > 0
  mm = {"T1": dict(seconds=2.0, gflops=10.0, torch=dict(seconds=1.0, gflops=20.0))}
  _, floor = bench.matmul_lines(results, mm, 20.0)
  assert "in torch 1.000 s (20 GFLOP/s, 2.00x faster than JAX's)" in floor
  assert "fastest torch step 1.000 s" in floor and "ours / that peer >= 2.000" in floor


def test_cpu_devices_divide_the_batch(monkeypatch):
  bench = _bench()
  monkeypatch.setattr(os, "cpu_count", lambda: 6)
  assert bench.cpu_devices(dict(batch=32)) == 4 and bench.cpu_devices(dict(batch=12)) == 6
  monkeypatch.setattr(os, "cpu_count", lambda: None)
  assert bench.cpu_devices(dict(batch=32)) == 1


def test_allocator_modes_choose_each_process_environment(monkeypatch):
  bench = _bench()
  ha = bench.host_allocator
  monkeypatch.setattr(ha, "is_glibc", lambda: True)
  monkeypatch.setattr(ha, "accelerator_plugin_installed", lambda: True)
  monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # the caller's own setting does not leak in
  tuned = lambda name, mode: bench.worker_env(name, "T1", mode).get("MALLOC_ARENA_MAX")
  # cli: ours as `unimo-jax train` starts under JAX_PLATFORMS=cpu, the peers stock
  assert [tuned(n, "cli") for n in ("ours", "ours_dp", "flax", "hf", "ceiling")] == \
      ["1", "1", None, None, None]
  assert [tuned(n, "same") for n in ("ours", "flax", "hf_masked", "matmuls")] == ["1"] * 4
  assert [tuned(n, "stock") for n in ("ours", "ours_unrolled", "flax")] == [None] * 3
  env = bench.worker_env("ours", "T1", "cli")
  assert {k: env[k] for k in ha.MAIN_HEAP} == ha.MAIN_HEAP and env["JAX_PLATFORMS"] == "cpu"
  monkeypatch.setattr(ha, "is_glibc", lambda: False)
  assert tuned("ours", "cli") is None
  assert "ours rows stock, peers and ceilings stock" in bench.allocator_text("cli")


def test_ceiling_worker():
  bench = _bench()
  out = bench._worker_ceiling(bench.SHAPES["T1"], 1, "float32")
  assert out["gflops"] > 0 and out["seconds"] > 0


@pytest.mark.slow
def test_smoke_run_spawns_every_implementation():
  proc = subprocess.run([sys.executable, PATH, "--smoke"], capture_output=True, text=True,
                        timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for impl in ("ours", "ours_dp", "flax", "hf", "hf_masked"):
    assert f"| T1 | float32 | {impl} |" in proc.stdout, proc.stdout
  # the data-parallel row ran on one device per core
  dp = _bench().spawn("ours_dp", "T1", 1, "float32", 600)
  bench = _bench()
  assert dp["devices"] == bench.cpu_devices(bench.SHAPES["T1"])
  assert os.cpu_count() < 2 or dp["devices"] >= 2
