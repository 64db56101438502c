"""Memory and time of CMCL loss+grad: all_gather vs ring, on 8 fake CPU devices.

  python benchmarks/cmcl_memory.py [--batch 4096] [--dim 256] [--negatives 0,4] [--runs 5]

For each number of hard-negative texts per row (Kn) it compiles jit(value_and_grad(cmcl_loss))
with the batch sharded over a ('data',) mesh, prints the per-device temporary memory of the
compiled program (``memory_analysis().temp_size_in_bytes``; on CPU ``peak_memory_in_bytes``
leaves temporaries out) and the median wall time of ``--runs`` calls, then the ratios
ring / all_gather. It also checks that the two implementations agree.
"""
import os
import sys

# Must precede the first jax import.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unimo_jax.losses import contrastive  # noqa: E402

MiB = 2 ** 20


def make_inputs(mesh, batch, dim, negatives, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  emb = dict(image=unit(rng.normal(size=(batch, dim))), text=unit(rng.normal(size=(batch, dim))))
  if negatives:
    emb["negative_texts"] = unit(rng.normal(size=(batch, negatives, dim)))
  sharding = NamedSharding(mesh, P("data"))
  return jax.device_put(emb, sharding), jax.device_put(np.ones(batch, bool), sharding)


def loss_and_grad(mesh, implementation):
  def loss_fn(emb, log_t, pair_valid):
    loss, _ = contrastive.cmcl_loss(
        emb["image"], emb["text"], log_temperature=log_t, pair_valid=pair_valid,
        negative_texts=emb.get("negative_texts"), mesh=mesh, batch_axes=("data",),
        implementation=implementation)
    return loss
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))


def measure(mesh, implementation, emb, pair_valid, runs):
  log_t = contrastive.init_log_temperature()
  fn = loss_and_grad(mesh, implementation)
  t0 = time.perf_counter()
  compiled = fn.lower(emb, log_t, pair_valid).compile()
  compile_s = time.perf_counter() - t0
  temp = compiled.memory_analysis().temp_size_in_bytes
  out = jax.block_until_ready(compiled(emb, log_t, pair_valid))  # Warm-up.
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(emb, log_t, pair_valid))
    times.append(time.perf_counter() - t0)
  return dict(temp=temp, time=statistics.median(times), compile=compile_s, out=out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4096, help="global batch (pairs)")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--negatives", default="0,4", help="comma-separated Kn values")
  parser.add_argument("--runs", type=int, default=5)
  args = parser.parse_args(argv)

  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
  print(f"devices={n} global_batch={args.batch} local={args.batch // n} d={args.dim} "
        f"runs={args.runs} (median)")
  print(f"{'Kn':>3} {'impl':>10} {'temp MiB':>9} {'time ms':>9} {'compile s':>9}")
  for kn in (int(k) for k in args.negatives.split(",")):
    emb, pair_valid = make_inputs(mesh, args.batch, args.dim, kn)
    res = {}
    for impl in ("all_gather", "ring"):
      r = res[impl] = measure(mesh, impl, emb, pair_valid, args.runs)
      print(f"{kn:>3} {impl:>10} {r['temp'] / MiB:>9.1f} {1e3 * r['time']:>9.1f} "
            f"{r['compile']:>9.2f}")
    (la, ga), (lr, gr) = res["all_gather"]["out"], res["ring"]["out"]
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(ga), jax.tree.leaves(gr)))
    print(f"{kn:>3} ratio ring/all_gather: memory {res['ring']['temp'] / res['all_gather']['temp']:.3f}"
          f"  time {res['ring']['time'] / res['all_gather']['time']:.3f}"
          f"  (|loss diff| {abs(float(la) - float(lr)):.1e}, max |grad diff| {grad_diff:.1e})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
