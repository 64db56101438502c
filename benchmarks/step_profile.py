"""Where one train step's time goes: a ``jax.profiler`` trace of a JAX row of
``step_vs_peers.py``, each XLA:CPU thunk mapped to its instruction in the compiled program and
summed by kind.

  python benchmarks/step_profile.py --impl ours_unrolled --shape S2      # 3 traced steps
  python benchmarks/step_profile.py --impl ours --shape S1 --top 40
  python benchmarks/step_profile.py --smoke                              # tiny shape, 1 step

The step is built exactly as the benchmark's row builds it (``step_vs_peers.step_fn``), warmed
up, timed untraced, then traced (``create_perfetto_trace``). The trace's complete events are
nested per thread; each event's SELF time (its duration less its direct children's) is credited
to the instruction of the same name in ``compiled.as_text()``, and instructions are sorted into:

  dot            a dense product (a dot without batch dimensions, alone or in a library fusion)
  batched dot    a product with batch dimensions (attention's scores and mixing)
  transpose      a fusion or copy that writes a transposed layout (with whatever XLA fused in)
  reduction      a fusion holding a reduce (LayerNorm and softmax statistics, the loss)
  collective     all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
  control flow   conditional / while: self time only, their bodies' thunks are counted above
  elementwise    every other fusion (GELU, dropout masks, bias adds, the optimizer's update)

It prints milliseconds per step by kind (summed over the devices' threads for a multi-device
row: ``ours_dp`` gets ``--xla_force_host_platform_device_count`` as in the benchmark), then the
costliest instructions with their output shape and, for products, GFLOP/s inside the step, and
the untraced steps' minor page faults and user/system CPU time (``getrusage``): XLA:CPU
allocates the program's temp buffer at every execution, and glibc serves an allocation that
large from a worker thread's arena with a fresh ``mmap`` each time (benchmarks/README.md), so
the process starts the way ``unimo-jax train`` does, under ``unimo_jax.host_allocator``'s
policy (``UNIMO_JAX_HOST_ALLOCATOR=system`` profiles the stock allocator). Run
nothing else meanwhile: the numbers are one process's, on a machine whose speed drifts
(``benchmarks/README.md``).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, REPO)

from unimo_jax import host_allocator  # pylint: disable=wrong-import-position  (no JAX import)

KINDS = ("dot", "batched dot", "transpose", "reduction", "collective", "control flow",
         "elementwise")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*?)\)(.*)$", re.M)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}",
                          re.M | re.S)
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _dims(type_text: str) -> list:
  m = _SHAPE.match(type_text)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(line: str, types: dict) -> float:
  """2 x output elements x contracted size of one HLO ``dot`` line."""
  m = _INSTRUCTION.match(line)
  if not m:
    return 0.0
  out = _dims(m.group(2))
  lhs = types.get(m.group(4).split(",")[0].strip().lstrip("%"), "")
  contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
  size, lhs = 1, _dims(lhs)
  for d in (contract.group(1).split(",") if contract and contract.group(1) else []):
    if int(d) >= len(lhs):
      return 0.0
    size *= lhs[int(d)]
  n = 1
  for d in out:
    n *= d
  return 2.0 * n * size


def classify(hlo_text: str) -> dict:
  """``{instruction name: (kind, output type, dot FLOPs)}`` for the instructions of a compiled
  HLO module that run as thunks: those of every computation but the fused ones (the entry, loop
  and branch bodies), fusions classified by what their fused computation holds."""
  bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
  every = {m.group(1): m.group(2) for m in _INSTRUCTION.finditer(hlo_text)}  # names are unique
  fused = set(re.findall(r"calls=%([\w.\-]+)", hlo_text))
  out = {}
  thunks = "\n".join(body for name, body in bodies.items() if name not in fused)
  for m in _INSTRUCTION.finditer(thunks):
    name, typ, op, _, rest = m.groups()
    called = re.search(r"calls=%([\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else ""
    lines = body.splitlines() if body else [m.group(0)]
    dots = [line for line in lines if re.search(r" dot\(", line)]
    flops = sum(_dot_flops(line, every) for line in dots)
    if op in ("conditional", "while", "call"):
      kind = "control flow"
    elif op in _COLLECTIVES or any(f" {c}(" in body for c in _COLLECTIVES):
      kind = "collective"
    elif dots:
      kind = "batched dot" if any("lhs_batch_dims" in line for line in dots) else "dot"
    elif op in ("transpose", "copy") or re.search(r" transpose\(", body):
      kind = "transpose"
    elif op == "reduce" or re.search(r" reduce\(", body):
      kind = "reduction"
    else:
      kind = "elementwise"
    out[name] = (kind, typ.split("{")[0], flops)
  return out


def self_times(events: list) -> dict:
  """``{event name: [self microseconds summed, count]}`` over a trace's complete ("X")
  events, each event's duration less its direct children's on the same thread."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      by_thread[(e.get("pid"), e.get("tid"))].append(e)
  out = collections.defaultdict(lambda: [0.0, 0])
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [event, children's duration]

    def close(item):
      e, children = item
      out[e["name"]][0] += max(0.0, e["dur"] - children)
      out[e["name"]][1] += 1
      if stack:
        stack[-1][1] += e["dur"]
    for e in evs:
      while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
        close(stack.pop())
      stack.append([e, 0.0])
    while stack:
      close(stack.pop())
  return dict(out)


def summarize(classes: dict, times: dict, steps: int) -> tuple:
  """``(ms per step by kind, rows)``: rows are (ms per step, name, kind, type, GFLOP/s) of the
  trace's events that are instructions of the program."""
  by_kind = dict.fromkeys(KINDS, 0.0)
  rows = []
  for name, (us, _) in times.items():
    if name not in classes:
      continue
    kind, typ, flops = classes[name]
    ms = us / steps / 1e3
    by_kind[kind] += ms
    gflops = flops / (ms / 1e3) / 1e9 if flops and ms > 0 else None
    rows.append((ms, name, kind, typ, gflops))
  rows.sort(key=lambda r: -r[0])
  return by_kind, rows


def profile(impl: str, shape: str, steps: int, warmup: int = 2) -> dict:
  import jax
  import step_vs_peers as bench
  step = bench.step_fn(impl, shape)
  for _ in range(warmup):
    step()
  times = []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  after = resource.getrusage(resource.RUSAGE_SELF)
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        step()
      traced = (time.perf_counter() - t) / steps
    path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_kind, rows = summarize(classify(step.compiled.as_text()), self_times(events), steps)
  temp = step.compiled.memory_analysis().temp_size_in_bytes
  return dict(impl=impl, shape=shape, steps=steps, devices=len(jax.devices()),
              seconds=statistics.median(times), traced_seconds=traced, by_kind=by_kind,
              rows=rows, temp_mib=temp / 2**20,
              page_faults=(after.ru_minflt - before.ru_minflt) / steps,
              user_seconds=(after.ru_utime - before.ru_utime) / steps,
              system_seconds=(after.ru_stime - before.ru_stime) / steps)


def report(result: dict, top: int) -> None:
  total = sum(v for k, v in result["by_kind"].items() if k != "control flow")
  print(f"{result['impl']} {result['shape']}: {result['seconds']:.3f} s/step untraced, "
        f"{result['traced_seconds']:.3f} traced, {result['devices']} device(s); thunk self "
        f"time {total:.1f} ms/step (summed over threads)")
  print(f"untraced, per step: {result['page_faults']:.0f} minor page faults "
        f"({result['page_faults'] * 4096 / 2**20:.0f} MiB of 4 KiB pages; the program's temp "
        f"buffer is {result['temp_mib']:.0f} MiB), CPU {result['user_seconds']:.3f} s user + "
        f"{result['system_seconds']:.3f} s system")
  if result.get("allocator"):
    print(f"host allocator: {result['allocator']}")
  print("| kind | ms/step | share |\n|---|---|---|")
  for k in KINDS:
    v = result["by_kind"][k]
    share = "-" if k == "control flow" else f"{v / total:.2f}" if total else "-"
    print(f"| {k} | {v:.1f} | {share} |")
  print("\n| ms/step | instruction | kind | output | GFLOP/s |\n|---|---|---|---|---|")
  for ms, name, kind, typ, gflops in result["rows"][:top]:
    g = f"{gflops:.0f}" if gflops else ""
    print(f"| {ms:.2f} | {name} | {kind} | {typ} | {g} |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--impl", default="ours_unrolled")
  p.add_argument("--shape", default="S2")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--json", help="also write the result to this file")
  p.add_argument("--smoke", action="store_true", help="tiny shape, 1 step: the plumbing")
  a = p.parse_args(argv)
  if a.smoke:
    a.shape, a.steps = "T1", 1
  if not a.impl.startswith("ours"):
    p.error("only the JAX rows of step_vs_peers.py (ours, ours_unrolled, ours_dp) are traced")
  if a.impl == "ours_dp" and "XLA_FLAGS" not in os.environ:
    import step_vs_peers as bench  # before JAX starts: one CPU device per core, as the row
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                               f"{bench.cpu_devices(bench.SHAPES[a.shape])}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if argv is None:  # start as `unimo-jax train` starts (UNIMO_JAX_HOST_ALLOCATOR=system: stock)
    host_allocator.apply()
  result = profile(a.impl, a.shape, a.steps)
  result["allocator"] = host_allocator.describe()
  report(result, a.top)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
