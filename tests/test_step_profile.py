"""benchmarks/step_profile.py's plumbing (never its speed): the instruction classes and dot FLOPs
of a hand-written HLO module and of a compiled product, self times of nested trace events
against hand-computed ones, and the ``--smoke`` run end to end."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from benchmark_util import ROOT, load_benchmark

PATH = os.path.join(ROOT, "benchmarks", "step_profile.py")


HLO = """HloModule m, is_scheduled=true

%fused_dot (param_0: f32[4,3], param_1: f32[3,5]) -> f32[4,5] {
  %param_0 = f32[4,3]{1,0} parameter(0)
  %param_1 = f32[3,5]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,5]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_bdot (param_0.1: f32[2,4,3], param_1.1: f32[2,5,3]) -> f32[2,4,5] {
  %param_0.1 = f32[2,4,3]{2,1,0} parameter(0)
  %param_1.1 = f32[2,5,3]{2,1,0} parameter(1)
  ROOT %dot.2 = f32[2,4,5]{2,1,0} dot(%param_0.1, %param_1.1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}
}

%fused_transpose (param_0.2: f32[4,5]) -> f32[5,4] {
  %param_0.2 = f32[4,5]{1,0} parameter(0)
  %constant.1 = f32[] constant(2)
  %broadcast.1 = f32[4,5]{1,0} broadcast(%constant.1), dimensions={}
  %multiply.1 = f32[4,5]{1,0} multiply(%param_0.2, %broadcast.1)
  %transpose.1 = f32[5,4]{0,1} transpose(%multiply.1), dimensions={1,0}
  ROOT %copy.1 = f32[5,4]{1,0} copy(%transpose.1)
}

%add_c (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b)
}

%fused_reduce (param_0.3: f32[4,5]) -> f32[4] {
  %param_0.3 = f32[4,5]{1,0} parameter(0)
  %constant.2 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%param_0.3, %constant.2), dimensions={1}, to_apply=%add_c
}

%fused_tanh (param_0.4: f32[4,5]) -> f32[4,5] {
  %param_0.4 = f32[4,5]{1,0} parameter(0)
  ROOT %tanh.1 = f32[4,5]{1,0} tanh(%param_0.4)
}

ENTRY %main (x: f32[4,3], w: f32[3,5], q: f32[2,4,3], k: f32[2,5,3], p: pred[]) -> f32[4] {
  %x = f32[4,3]{1,0} parameter(0)
  %w = f32[3,5]{1,0} parameter(1)
  %q = f32[2,4,3]{2,1,0} parameter(2)
  %k = f32[2,5,3]{2,1,0} parameter(3)
  %p = pred[] parameter(4)
  %ynn_fusion = f32[4,5]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %ynn_fusion.1 = f32[2,4,5]{2,1,0} fusion(%q, %k), kind=kCustom, calls=%fused_bdot
  %dot.3 = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %copy_fusion = f32[5,4]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_transpose
  %reduce_fusion = f32[4]{0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_reduce
  %tanh_fusion = f32[4,5]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_tanh
  %all-reduce.1 = f32[4]{0} all-reduce(%reduce_fusion), replica_groups={}, to_apply=%add_c
  ROOT %conditional.1 = f32[4]{0} conditional(%p, %all-reduce.1, %all-reduce.1), true_computation=%t, false_computation=%f
}
"""


def test_classify_a_hand_written_module():
  classes = load_benchmark("step_profile").classify(HLO)
  assert classes["ynn_fusion"] == ("dot", "f32[4,5]", 2.0 * 4 * 5 * 3)
  assert classes["ynn_fusion.1"] == ("batched dot", "f32[2,4,5]", 2.0 * 2 * 4 * 5 * 3)
  assert classes["dot.3"] == ("dot", "f32[4,4]", 2.0 * 4 * 4 * 3)  # operands from the entry
  assert classes["copy_fusion"][0] == "transpose"
  assert classes["reduce_fusion"][0] == "reduction"
  assert classes["tanh_fusion"][0] == "elementwise"
  assert classes["all-reduce.1"][0] == "collective"
  assert classes["conditional.1"][0] == "control flow"


def test_classify_a_compiled_product():
  m, k, n = 64, 48, 80
  f = jax.jit(lambda x, w: jnp.tanh(x @ w))
  text = f.lower(jnp.ones((m, k)), jnp.ones((k, n))).compile().as_text()
  dots = [v for v in load_benchmark("step_profile").classify(text).values() if v[0] == "dot"]
  assert [v[2] for v in dots] == [2.0 * m * n * k]


def test_self_times_subtract_direct_children_only():
  ev = lambda name, ts, dur, tid=1: dict(ph="X", name=name, ts=ts, dur=dur, pid=1, tid=tid)
  events = [ev("parent", 0, 100), ev("a", 10, 20), ev("b", 40, 50), ev("c", 50, 10),
            ev("a", 200, 5), ev("other_thread", 0, 100, tid=2), dict(ph="i", name="instant")]
  times = load_benchmark("step_profile").self_times(events)
  assert times["parent"] == [100 - 20 - 50, 1]
  assert times["b"] == [50 - 10, 1] and times["c"] == [10, 1]
  assert times["a"] == [20 + 5, 2] and times["other_thread"] == [100, 1]
  assert "instant" not in times


def test_summarize_credits_only_program_instructions():
  prof = load_benchmark("step_profile")
  classes = {"ynn_fusion": ("dot", "f32[4,5]", 2e9), "tanh_fusion": ("elementwise", "f32", 0)}
  times = {"ynn_fusion": [20000.0, 2], "tanh_fusion": [4000.0, 2], "ThunkExecutor": [9e9, 1]}
  by_kind, rows = prof.summarize(classes, times, steps=2)
  assert by_kind["dot"] == pytest.approx(10.0) and by_kind["elementwise"] == pytest.approx(2.0)
  assert sum(by_kind.values()) == pytest.approx(12.0)
  assert rows[0][:3] == (10.0, "ynn_fusion", "dot")
  assert rows[0][4] == pytest.approx(2e9 / 0.01 / 1e9)  # GFLOP/s of 2 GFLOP in 10 ms


def test_smoke_run(tmp_path):
  out = tmp_path / "profile.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, PATH, "--smoke", "--top", "5", "--json", str(out)],
                        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| kind | ms/step | share |" in proc.stdout
  result = json.loads(out.read_text())
  assert result["impl"] == "ours_unrolled" and result["shape"] == "T1"
  assert result["devices"] == 1 and result["seconds"] > 0
  assert result["by_kind"]["dot"] > 0 and result["by_kind"]["batched dot"] > 0
  assert len(result["rows"]) > 10
  assert result["temp_mib"] > 0  # the compiled step's temp buffer
  # one tiny step can fall inside one clock tick: counted, not necessarily nonzero
  assert min(result["page_faults"], result["user_seconds"], result["system_seconds"]) >= 0
  assert "minor page faults" in proc.stdout
