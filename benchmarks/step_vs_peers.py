"""Text-MLM train-step time of this framework beside its peers, side by side in one run.

  python benchmarks/step_vs_peers.py                 # S1 and S2, f32, 2 rounds, 10 steps each
  python benchmarks/step_vs_peers.py --bf16          # plus a bf16 row per shape
  python benchmarks/step_vs_peers.py --shapes S2 --steps 5 --rounds 1
  python benchmarks/step_vs_peers.py --smoke         # tiny shapes, 2 steps: checks the plumbing
  python benchmarks/step_vs_peers.py --allocator same  # every row under glibc's main heap

Every implementation runs in its OWN process (fresh allocator, no shared thread pools), one
after another; the rounds alternate the order (round 2 runs the list backwards) so that a load
change on the machine hits every implementation alike. Implementations:

  ours        the framework's train step through its public API, the one ``unimo-jax train``
              builds (``unimo_jax.train.setup.build_run``): a text stream with span MLM only,
              the default ``model.scan_unroll = 1`` (one scanned layer body), with
              ``model.remat = True, model.remat_policy = "dots_with_no_batch_dims_saveable"``:
              a scanned layer stacks every residual it keeps into a [layers, ...] buffer
              (zeroed, written, read back), so keeping only the dense products' outputs and
              recomputing the rest is faster than keeping everything (in-process A/B on the
              Intel kind: 0.79 at S1, 0.88 at S2, benchmarks/README.md);
  ours_unrolled  ``model.scan_unroll = layers`` (the layer scan unrolled), no remat (remat with
              that policy measures the same there);
  ours_dp     ours_unrolled data-parallel over one XLA CPU device per core (the process gets
              ``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>``, the mesh is
              ``data = -1``): how ``unimo-jax train`` runs on a CPU host given those flags;
              the same global batch, the gradients all-reduced between the devices;
  flax        the same model written the obvious way in flax.linen + optax (post-LN BERT, the
              LM head at the masked positions), defined in this file;
  hf          Hugging Face ``RobertaForMaskedLM`` (random init, no download), stock: the LM head
              over every position, labels -100 elsewhere; torch.optim.AdamW;
  hf_masked   the same torch model with the head applied at the masked positions only.

Shapes (post-LN, dropout 0.1 on hidden and attention probabilities, 15% of tokens predicted):
  S1: 4 layers, H 768, 12 heads, FFN 3072, vocab 32000, 16 x 128 tokens
  S2: 4 layers, H 256, 4 heads, FFN 1024, vocab 8000, 32 x 128 tokens

Allocator (``--allocator``): by default (``cli``) each ours row's process starts the way
``unimo-jax train`` starts on this host: on a CPU-only Linux host that is glibc's main heap
(``unimo_jax.host_allocator``: the step's temporary buffer is reused instead of faulted in and
zeroed at every step), while the peers and the ceilings run as plain scripts do. ``same`` runs
every process under the main heap (the peers tuned like ours), ``stock`` none. Each process
gets only the settings its mode gives it (the caller's ``MALLOC_*`` variables are dropped).

Each process: build, compile/warm up (2 steps), then the median of ``--steps`` step times
(``block_until_ready`` / torch is synchronous on CPU), its peak RSS, and GFLOP/s from the
analytic training FLOPs (3x the forward matmul FLOPs of the encoder and of the LM head at the
predicted positions: the same useful work for every implementation, so the stock HF row's extra
head work is not credited). The JAX f32 matmul ceiling (2048^2, median of 10) is measured at the
start and the end; "of ceiling" uses their mean. Every JAX implementation's process also times
three of those matmuls after each of its steps ("own ceiling", ``time_interleaved``): "of own
ceiling" is each process's GFLOP/s over the rate the machine gave a matmul while that process
ran (range over rounds), the fraction that does not move with the machine's drift. Last, per
shape, the step's matmuls alone (`matmul_products`: every product of the analytic FLOPs jitted
on its own, summed per step): how close to the ceiling the products themselves get, and how
much of the fastest ``ours`` step is everything else (element-wise work, the optimizer, the
products' slowdown inside one program). With a torch row, the same products alone in torch
(`matmuls_torch`): the JAX products' sum over the fastest torch step is a floor for
``ours / that peer``.

bf16 row (``--bf16``): ours with ``model.dtype = bfloat16`` (float32 parameters, bf16 matmuls
accumulating in float32) beside HF masked-head under ``torch.autocast("cpu", bfloat16)``. To add
another row, add a name to ``IMPLS`` and a ``_worker_<name>(shape, steps, dtype)`` function
returning the built one-step callable (``step_fn`` gives it to in-process comparisons).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

# pylint: disable=wrong-import-position  (neither imports JAX)
from step_shapes import SHAPES, matmul_products, predictions, train_flops
from unimo_jax import host_allocator

IMPLS = ("ours", "ours_unrolled", "ours_dp", "flax", "hf", "hf_masked")
OURS = ("ours", "ours_unrolled", "ours_dp")
BF16_IMPLS = ("ours", "ours_unrolled", "hf_masked")
DROPOUT = 0.1


# ------------------------------------------------------------------------------ data
def mlm_batch(shape, seed=0):
  """Random ids [B, L] (no padding), P predicted slots per row and their targets (numpy)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, l, v, p = shape["batch"], shape["length"], shape["vocab"], predictions(shape)
  ids = rng.integers(4, v - 1, (b, l)).astype(np.int32)
  pos = np.stack([np.sort(rng.choice(np.arange(1, l - 1), p, replace=False)) for _ in range(b)])
  targets = np.take_along_axis(ids, pos, 1).copy()
  masked = ids.copy()
  np.put_along_axis(masked, pos, v - 1, 1)
  return masked, pos.astype(np.int32), targets.astype(np.int32)


# ------------------------------------------------------------------------------ workers
def _time(step, steps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def ceiling_probe(shape):
  """``() -> seconds`` of one JAX f32 n x n matmul (n = 2048; 256 for the smoke shape), the
  same product as the ceiling worker's, built and warmed up."""
  import jax
  import jax.numpy as jnp
  n = 256 if shape is SHAPES["T1"] else 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))

  def probe():
    t = time.perf_counter()
    jax.block_until_ready(f(a, a))
    return time.perf_counter() - t
  probe.flops = 2.0 * n ** 3
  return probe


def time_interleaved(step, probe, steps: int, warmup: int = 2, probes: int = 3) -> tuple:
  """``(median step seconds, median ceiling GFLOP/s)`` with ``probes`` ceiling matmuls after
  every timed step: the machine's matmul rate at the moment the step ran. On a shared VM whose
  speed drifts by 1.5x within a minute (benchmarks/README.md) a ceiling measured minutes apart
  says little about one process; this one is measured beside it."""
  for _ in range(warmup):
    step()
  times, rates = [], []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
    rates += [probe.flops / probe() / 1e9 for _ in range(probes)]
  return statistics.median(times), statistics.median(rates)


def _worker_ceiling(shape, steps, dtype):
  probe = ceiling_probe(shape)
  sec = _time(probe, 10)
  return dict(seconds=sec, gflops=probe.flops / sec / 1e9)


def _products_seconds(shape, steps, einsum, ones, run) -> dict:
  """Every product of `matmul_products` timed alone and summed per step: ``einsum`` is the
  library's, ``ones(shape)`` makes an operand, ``run(kind, fn, args)`` computes one product to
  completion."""
  fns = dict(nn=lambda x, w: x @ w, nt=lambda x, w: x @ w.T, tn=lambda x, w: x.T @ w,
             scores=lambda q, k: einsum("bld,bmd->blm", q, k),
             mix=lambda a, u: einsum("blm,bmd->bld", a, u))
  sec = 0.0
  for kind, shapes, count in matmul_products(shape):
    args = [ones(s) for s in shapes]
    sec += count * _time(lambda: run(kind, fns[kind], args), max(3, steps))
  return dict(seconds=sec, gflops=train_flops(shape) / sec / 1e9)


def _worker_matmuls(shape, steps, dtype):
  """The step's matmuls alone (`matmul_products`, each jitted on its own), summed per step: the
  time a step would take if everything else were free and each product ran as fast as alone."""
  import jax
  import jax.numpy as jnp
  jitted = {}

  def run(kind, fn, args):
    f = jitted.setdefault(kind, jax.jit(fn))
    return jax.block_until_ready(f(*args))
  return _products_seconds(shape, steps, jnp.einsum,
                           lambda s: jnp.ones(s, jnp.dtype(dtype)), run)


def _worker_matmuls_torch(shape, steps, dtype):
  """The same products (`matmul_products`) in torch, each timed alone and summed per step: the
  peer's matrix-multiply library (MKL / oneDNN on x86) on the shapes of the step. Beside the
  JAX sum it bounds what any formulation of the step on XLA:CPU's matmuls can reach against
  the torch rows: ``ours / peer >= (JAX products alone) / (peer step)``."""
  import torch
  with torch.no_grad():
    return _products_seconds(shape, steps, torch.einsum,
                             lambda s: torch.ones(s, dtype=getattr(torch, dtype)),
                             lambda kind, fn, args: fn(*args))


def step_fn(name: str, shape_name: str, dtype: str = "float32"):
  """The one-step callable of implementation ``name`` (built and compiled, not yet run)."""
  return globals()[f"_worker_{name}"](SHAPES[shape_name], 0, dtype)


def _worker_ours(shape, steps, dtype, unroll: int = 1,
                 remat_policy: str = "dots_with_no_batch_dims_saveable"):
  """``remat_policy`` None: no remat."""
  import jax
  import ml_collections
  from data_pipelines import schema
  from unimo_jax import parallel
  from unimo_jax.train import config as config_lib
  from unimo_jax.train import random_data
  from unimo_jax.train import setup as setup_lib

  c = config_lib.default_config()
  c.model.update(dict(
      vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_layers=shape["layers"],
      num_heads=shape["heads"], mlp_dim=shape["mlp"], max_positions=shape["length"] + 2,
      roberta_positions=True, dropout_rate=DROPOUT, attention_dropout_rate=DROPOUT,
      dtype=dtype, remat=remat_policy is not None,
      remat_policy=remat_policy or "nothing_saveable", scan_unroll=unroll))
  src = [dict(name="random", kind="text", path="unused")]
  c.data = ml_collections.ConfigDict(dict(
      seed=0, tokenizer="", visual_input="patches", image_size=c.model.image_size,
      patch_size=c.model.patch_size, num_regions=1, region_feature_dim=1, num_region_classes=1,
      num_positives=0, num_negatives=0, num_related_images=0, num_related_texts=0,
      streams=dict(text=dict(batch_size=shape["batch"], max_length=shape["length"],
                             max_predictions=predictions(shape), objectives=("mlm",),
                             sources=src))))
  c.objectives.text_mode = "mlm"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.seed = 0
  spec = schema.batch_spec(c.data.to_dict())
  run = setup_lib.build_run(c, spec, process_count=1)
  state = run.new_state()
  compiled = run.compile()
  batch = parallel.global_batch(next(random_data.RandomBatches(spec, shape["vocab"])), run.mesh)
  box = [state]

  def step():
    box[0], m = compiled(box[0], batch)
    jax.block_until_ready(m["loss"])
  step.compiled = compiled  # for benchmarks/step_profile.py
  return step


def _worker_ours_unrolled(shape, steps, dtype):
  return _worker_ours(shape, steps, dtype, unroll=shape["layers"], remat_policy=None)


def _worker_ours_dp(shape, steps, dtype):
  # the devices come from XLA_FLAGS, set by ``spawn`` before JAX starts in this process
  return _worker_ours(shape, steps, dtype, unroll=shape["layers"], remat_policy=None)


def cpu_devices(shape) -> int:
  """Devices of the ours_dp row: one per core, as many as divide the batch."""
  n = max(1, os.cpu_count() or 1)
  while shape["batch"] % n:
    n -= 1
  return n


def _worker_flax(shape, steps, dtype):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  h, heads, m, v, l = (shape[k] for k in ("hidden", "heads", "mlp", "vocab", "length"))

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      a = nn.MultiHeadDotProductAttention(num_heads=heads, dropout_rate=DROPOUT,
                                          deterministic=not train)(x, x)
      x = nn.LayerNorm(epsilon=1e-5)(x + nn.Dropout(DROPOUT, deterministic=not train)(a))
      f = nn.Dense(h)(nn.gelu(nn.Dense(m)(x), approximate=False))
      return nn.LayerNorm(epsilon=1e-5)(x + nn.Dropout(DROPOUT, deterministic=not train)(f))

  class Bert(nn.Module):
    @nn.compact
    def __call__(self, ids, pos, train=True):
      word = nn.Embed(v, h)
      x = word(ids) + nn.Embed(l, h)(jnp.arange(l))[None]
      x = nn.Dropout(DROPOUT, deterministic=not train)(nn.LayerNorm(epsilon=1e-5)(x))
      for _ in range(shape["layers"]):
        x = Layer()(x, train)
      x = jnp.take_along_axis(x, pos[..., None], axis=1)
      x = nn.LayerNorm(epsilon=1e-5)(nn.gelu(nn.Dense(h)(x), approximate=False))
      return word.attend(x) + self.param("bias", nn.initializers.zeros, (v,))

  ids, pos, targets = mlm_batch(shape)
  model = Bert()
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, ids, pos)
  tx = optax.adamw(1e-4)
  opt = tx.init(params)

  @jax.jit
  def train_step(params, opt, ids, pos, targets, key):
    def loss_fn(p):
      logits = model.apply(p, ids, pos, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  box = [params, opt, 0]

  def step():
    box[0], box[1], loss = train_step(box[0], box[1], ids, pos, targets,
                                      jax.random.key(box[2]))
    box[2] += 1
    jax.block_until_ready(loss)
  return step


def _hf(shape, masked_head: bool, dtype: str, steps: int):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.RobertaConfig(
      vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
      num_attention_heads=shape["heads"], intermediate_size=shape["mlp"],
      max_position_embeddings=shape["length"] + 2, hidden_dropout_prob=DROPOUT,
      attention_probs_dropout_prob=DROPOUT, type_vocab_size=1, layer_norm_eps=1e-5)
  model = transformers.RobertaForMaskedLM(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  ids, pos, targets = (torch.from_numpy(a).long() for a in mlm_batch(shape))
  labels = torch.full_like(ids, -100).scatter_(1, pos, targets)
  autocast = dtype == "bfloat16"

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      if masked_head:
        hidden = model.roberta(input_ids=ids).last_hidden_state
        picked = torch.gather(hidden, 1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = model.lm_head(picked)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
      else:
        loss = model(input_ids=ids, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  return step


def _worker_hf(shape, steps, dtype):
  return _hf(shape, False, dtype, steps)


def _worker_hf_masked(shape, steps, dtype):
  return _hf(shape, True, dtype, steps)


def worker(name: str, shape_name: str, steps: int, dtype: str) -> None:
  shape = SHAPES[shape_name]
  t0 = time.perf_counter()
  if name in ("ceiling", "matmuls", "matmuls_torch"):
    out = globals()[f"_worker_{name}"](shape, steps, dtype)
  else:
    step = globals()[f"_worker_{name}"](shape, steps, dtype)
    if name.startswith("hf"):  # no JAX thread pool beside torch's: the torch rows get none
      out = dict(seconds=_time(step, steps))
    else:
      seconds, own = time_interleaved(step, ceiling_probe(shape), steps)
      out = dict(seconds=seconds, own_ceiling_gflops=own)
  if "jax" in sys.modules:  # the JAX rows: how many devices the step ran on
    out["devices"] = len(sys.modules["jax"].devices())
  out.update(impl=name, shape=shape_name, dtype=dtype, wall=time.perf_counter() - t0,
             peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------ driver
ALLOCATOR_MODES = ("cli", "same", "stock")


def allocator_text(mode):
  ours = worker_env("ours", "T1", mode).get(host_allocator.APPLIED)
  peers = worker_env("flax", "T1", mode).get(host_allocator.APPLIED)
  name = lambda applied: "glibc main heap" if applied else "stock"
  return f"ours rows {name(ours)}, peers and ceilings {name(peers)}"


def worker_env(name, shape, allocator="cli"):
  """The environment of one row's process.

  allocator: ``cli`` (default): ours rows start the way ``unimo-jax train`` starts on this host
  (``unimo_jax.host_allocator``'s policy: glibc's main heap on a CPU-only Linux host), every
  other process as a plain script does; ``same``: every process under the main-heap settings
  (the peers tuned like ours); ``stock``: every process with the allocator it finds (ours with
  ``UNIMO_JAX_HOST_ALLOCATOR=system``).
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a user's single-machine run
  if name == "ours_dp":
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cpu_devices(SHAPES[shape])}"
  for k in (*host_allocator.MAIN_HEAP, host_allocator.APPLIED):
    env.pop(k, None)
  if allocator == "same" or (allocator == "cli" and name in OURS
                             and host_allocator.policy(env) == "main_heap"):
    return host_allocator.main_heap_environ(env)
  return env


def spawn(name, shape, steps, dtype, timeout, allocator="cli"):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--shape", shape,
         "--steps", str(steps), "--dtype", dtype]
  env = worker_env(name, shape, allocator)
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                        cwd=REPO)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      res = json.loads(line[7:])
      res["allocator"] = "main_heap" if env.get(host_allocator.APPLIED) else "stock"
      return res
  raise RuntimeError(f"{name} {shape} {dtype} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")


def _fmt_range(xs):
  return f"{min(xs):.3f}" if len(xs) == 1 else f"{min(xs):.3f}-{max(xs):.3f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--worker", default="")
  p.add_argument("--shape", default="S1")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--shapes", default="S1,S2")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--bf16", action="store_true", help="add ours-bf16 and hf_masked-autocast rows")
  p.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps, 1 round")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
  p.add_argument("--json", default="", help="also write every result to this file")
  p.add_argument("--allocator", default="cli", choices=ALLOCATOR_MODES,
                 help="cli: ours rows under unimo-jax train's host allocator policy, the rest "
                      "stock; same: every process under glibc's main heap; stock: none")
  a = p.parse_args(argv)
  if a.worker:
    worker(a.worker, a.shape, a.steps, a.dtype)
    return 0
  if a.smoke:
    a.shapes, a.steps, a.rounds = "T1", 2, 1
  shapes = a.shapes.split(",")
  impls = a.impls.split(",")
  unknown = [s for s in shapes if s not in SHAPES] + [i for i in impls if i not in IMPLS]
  if unknown:
    p.error(f"unknown shape/implementation {unknown}; shapes {list(SHAPES)}, impls {IMPLS}")
  load = os.getloadavg()[0]
  print(f"load average at start: {load:.2f} on {os.cpu_count()} cores", flush=True)
  results = []
  ceiling_shape = "T1" if a.smoke else "S1"
  print(f"allocator: {a.allocator} ({allocator_text(a.allocator)})", flush=True)
  ceilings = [spawn("ceiling", ceiling_shape, a.steps, "float32", a.timeout, a.allocator)]
  runs = [(i, s, "float32") for s in shapes for i in impls]
  if a.bf16:
    runs += [(i, s, "bfloat16") for s in shapes for i in BF16_IMPLS if i in impls]
  for r in range(a.rounds):
    for name, shape, dtype in (runs if r % 2 == 0 else runs[::-1]):
      res = spawn(name, shape, a.steps, dtype, a.timeout, a.allocator)
      res["round"] = r
      results.append(res)
      print(f"  round {r} {shape} {name:<10} {dtype:<8} {res['seconds']:.3f} s/step", flush=True)
  ceilings.append(spawn("ceiling", ceiling_shape, a.steps, "float32", a.timeout, a.allocator))
  ceiling = statistics.mean(c["gflops"] for c in ceilings)
  matmuls = {s: spawn("matmuls", s, a.steps, "float32", a.timeout, a.allocator) for s in shapes}
  if any(i.startswith("hf") for i in impls):
    for s in shapes:
      matmuls[s]["torch"] = spawn("matmuls_torch", s, a.steps, "float32", a.timeout,
                                  a.allocator)
  print_table(results, ceilings, ceiling, shapes, impls, a.bf16)
  for line in matmul_lines(results, matmuls, ceiling):
    print(line)
  print(f"load average at end: {os.getloadavg()[0]:.2f}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(results=results, ceilings=ceilings), f, indent=2)
  return 0


def print_table(results, ceilings, ceiling, shapes, impls, bf16):
  cs = ", ".join(f"{c['gflops']:.0f}" for c in ceilings)
  print(f"\nJAX f32 matmul ceiling: {cs} GFLOP/s (start, end)")
  print("step time: median of each process, range over rounds; ratio = ours / peer per round "
        "(range); GFLOP/s and fraction of the ceiling from the analytic FLOPs")
  head = ("| shape | dtype | impl | s/step | ours / impl | GFLOP/s | of ceiling | "
          "own ceiling GFLOP/s | of own ceiling | peak RSS MiB |")
  print(head)
  print("|" + "---|" * 10)
  for shape in shapes:
    flops = train_flops(SHAPES[shape])
    for dtype in (("float32", "bfloat16") if bf16 else ("float32",)):
      for name in impls:
        rows = [x for x in results if x["impl"] == name and x["shape"] == shape
                and x["dtype"] == dtype]
        if not rows:
          continue
        ours = {x["round"]: x["seconds"] for x in results if x["impl"] == "ours"
                and x["shape"] == shape and x["dtype"] == dtype}
        ratios = [ours[x["round"]] / x["seconds"] for x in rows if x["round"] in ours]
        secs = [x["seconds"] for x in rows]
        med = statistics.median(secs)
        gflops = flops / med / 1e9
        own = [x["own_ceiling_gflops"] for x in rows if x.get("own_ceiling_gflops")]
        own_cell = f"{statistics.median(own):.0f}" if own else "-"
        # per process: its step's GFLOP/s over the ceiling measured between its steps
        fracs = [flops / x["seconds"] / 1e9 / x["own_ceiling_gflops"] for x in rows
                 if x.get("own_ceiling_gflops")]
        print(f"| {shape} | {dtype} | {name} | {_fmt_range(secs)} | "
              f"{_fmt_range(ratios) if ratios else '-'} | {gflops:.0f} | "
              f"{gflops / ceiling:.2f} | {own_cell} | "
              f"{_fmt_range(fracs) if fracs else '-'} | "
              f"{max(x['peak_rss_mib'] for x in rows):.0f} |")
  for line in best_ratios(results) + own_ceiling_lines(results):
    print(line)


def own_ceiling_lines(results):
  """Per (shape, dtype): each round's fastest ours as a fraction of its process's own ceiling."""
  lines = []
  for shape, dtype in sorted({(x["shape"], x["dtype"]) for x in results}):
    per_round = []
    for r in sorted({x["round"] for x in results}):
      ours = [x for x in results if (x["shape"], x["dtype"], x["round"]) == (shape, dtype, r)
              and x["impl"] in OURS and x.get("own_ceiling_gflops")]
      if ours:
        o = min(ours, key=lambda x: x["seconds"])
        frac = train_flops(SHAPES[shape]) / o["seconds"] / 1e9 / o["own_ceiling_gflops"]
        per_round.append(f"{frac:.2f} ({o['impl']}, {o['own_ceiling_gflops']:.0f} GFLOP/s)")
    if per_round:
      lines.append(f"{shape} {dtype}: fastest ours / its own ceiling per round: "
                   + ", ".join(per_round))
  return lines


def matmul_lines(results, matmuls, ceiling):
  """Per shape: the step's matmuls alone (s, fraction of the ceiling) against the fastest f32
  row of ours, i.e. how much of its step is everything else plus the matmuls' slowdown inside
  the program."""
  lines = []
  for shape, mm in matmuls.items():
    ours = [x["seconds"] for x in results if x["shape"] == shape and x["impl"] in OURS
            and x["dtype"] == "float32"]
    line = (f"{shape}: the step's matmuls alone {mm['seconds']:.3f} s ({mm['gflops']:.0f} "
            f"GFLOP/s, {mm['gflops'] / ceiling:.2f} of the ceiling)")
    if ours:
      best = min(ours)
      line += (f"; the fastest ours step {best:.3f} s spends {best - mm['seconds']:.3f} s "
               f"({(best - mm['seconds']) / best:.0%}) beyond them; 0.75 of the ceiling is a "
               f"{train_flops(SHAPES[shape]) / (0.75 * ceiling * 1e9):.3f} s step")
    lines.append(line)
    peers = [x["seconds"] for x in results if x["shape"] == shape
             and x["impl"].startswith("hf") and x["dtype"] == "float32"]
    if "torch" in mm and peers:
      tm = mm["torch"]
      lines.append(
          f"{shape}: the same matmuls alone in torch {tm['seconds']:.3f} s ({tm['gflops']:.0f} "
          f"GFLOP/s, {mm['seconds'] / tm['seconds']:.2f}x faster than JAX's); the fastest torch "
          f"step {min(peers):.3f} s, so with JAX's products alone ours / that peer >= "
          f"{mm['seconds'] / min(peers):.3f} even if everything else in the step were free")
  return lines


def best_ratios(results):
  """Per (shape, dtype) and round: the fastest of ours ÷ the fastest peer, as lines."""
  lines = []
  for shape, dtype in sorted({(x["shape"], x["dtype"]) for x in results}):
    per_round = []
    for r in sorted({x["round"] for x in results}):
      rows = [x for x in results if (x["shape"], x["dtype"], x["round"]) == (shape, dtype, r)]
      ours = [x for x in rows if x["impl"] in OURS]
      peers = [x for x in rows if x["impl"] not in OURS]
      if ours and peers:
        o, q = min(ours, key=lambda x: x["seconds"]), min(peers, key=lambda x: x["seconds"])
        per_round.append(f"{o['seconds'] / q['seconds']:.3f} ({o['impl']} / {q['impl']})")
    if per_round:
      lines.append(f"{shape} {dtype}: fastest ours / fastest peer per round: "
                   + ", ".join(per_round))
  return lines


if __name__ == "__main__":
  sys.exit(main())
