"""``unimo-jax model-info``: parameter counts per component and one forward pass per input kind.

  unimo-jax model-info [--preset tiny|base|large] [--visual patches|regions]
                       [--batch-size B] [--text-length L] [--num-regions R] [--dtype D]

The tiny preset runs a real forward pass of a random text, image and image-text batch (jitted;
the first call includes compilation) and prints output shapes and times; base/large are traced
with ``jax.eval_shape`` only (shapes and counts, no memory, no compute).

  unimo-jax model-info --preset base|large --compile [--layers 6,12,24] [--batch 64,32,64]
                       [--no-remat] [--remat-policy P]

lowers and compiles (never runs) the FULL UNIMO train step of the paper's config
(``experiments/configs/base.py``: regions, 512 text tokens, all seven objectives, ring CMCL,
global batch text,image,pair rows) over every device with FSDP, once per depth, and prints the
compile time and the per-device memory of the compiled step (``memory_analysis``: temporaries,
arguments, outputs). For the paper's 8-way layout on a CPU:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from data_pipelines import schema
from unimo_jax import model_info as info
from unimo_jax.model import ModelConfig, init_params, init_variables


def paper_config(preset: str, layers: int, batch=(64, 32, 64), remat: bool = True,
                 remat_policy: str = "nothing_saveable"):
  """The paper's run config (``experiments/configs/base.py``) at ``layers`` layers, FSDP over
  every device, global ``batch`` text,image,pair rows; with its per-process batch spec."""
  try:
    from experiments.configs import base as paper  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("model-info --compile: needs the repository's experiments/configs/base.py "
                     "on the path (run from the repository root)") from e
  c = paper.get_config(size=preset)
  c.model.num_layers = layers
  c.model.remat = remat
  c.model.remat_policy = remat_policy
  c.train.init_from = ""
  for stream, rows in zip(("text", "image", "pair"), batch):
    c.data.streams[stream].batch_size = int(rows)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c, schema.batch_spec(c.data.to_dict())


def _print_compile_table(preset: str, depths, batch, remat: bool, policy: str) -> None:
  print(f"full UNIMO train step, {preset} (experiments/configs/base.py), global batch "
        f"{'/'.join(map(str, batch))} rows, {jax.device_count()} x {jax.devices()[0].platform} "
        f"devices (FSDP), remat {'on (' + policy + ')' if remat else 'off'}: lower + compile only")
  print("| layers | compile s | temp GiB / device | arguments GiB / device |")
  print("|---|---|---|---|")
  for n in depths:
    r = info.compile_train_step(*paper_config(preset, n, batch, remat, policy))
    print(f"| {n} | {r['compile_seconds']:.0f} | {r['temp_gib']:.2f} | {r['argument_gib']:.2f} |",
          flush=True)


def main(argv) -> int:
  from unimo_jax import commands  # pylint: disable=import-outside-toplevel
  parser = commands.ArgumentParser(prog=argv[0] if argv else "unimo-jax model-info",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=("tiny", "base", "large"), default="tiny",
                      help="model size: tiny (tests), base or large (the paper's)")
  parser.add_argument("--visual", choices=("patches", "regions"), default="patches",
                      help="visual input: image patches or detector region features")
  parser.add_argument("--batch-size", type=int, default=4, help="rows of the timed forward pass")
  parser.add_argument("--text-length", type=int, default=None, help="default 32 tiny, 128 else")
  parser.add_argument("--num-regions", type=int, default=None, help="default 10 tiny, 100 else")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of the forward pass")
  parser.add_argument("--compile", action="store_true",
                      help="base/large: compile the paper's full train step per --layers and "
                           "print compile time and per-device memory")
  parser.add_argument("--layers", default="6,12,24", help="--compile: depths to compile")
  parser.add_argument("--batch", default="64,32,64",
                      help="--compile: global text,image,pair rows per step")
  parser.add_argument("--no-remat", action="store_true", help="--compile: remat off")
  parser.add_argument("--remat-policy", default="nothing_saveable",
                      help="--compile: jax.checkpoint policy of each layer")
  args = parser.parse_args(argv[1:])
  if args.compile:
    if args.preset == "tiny":
      parser.error("--compile is for --preset base or large (the paper's configs)")
    _print_compile_table(args.preset, [int(x) for x in args.layers.split(",")],
                         [int(x) for x in args.batch.split(",")], not args.no_remat,
                         args.remat_policy)
    return 0

  config = ModelConfig.preset(args.preset, visual_input=args.visual, dtype=args.dtype)
  tiny = args.preset == "tiny"
  length = args.text_length or (32 if tiny else 128)
  regions = args.num_regions or (10 if tiny else 100)
  print(f"UNIMO {args.preset}: {config.num_layers} layers, H {config.hidden_size}, "
        f"{config.num_heads} heads, MLP {config.mlp_dim}, vocab {config.vocab_size}, "
        f"{'post' if not config.pre_ln else 'pre'}-LN, visual={config.visual_input}, "
        f"compute {config.dtype}")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")

  rng = jax.random.PRNGKey(0)
  start = time.time()
  if tiny:
    variables = {"params": jax.block_until_ready(init_params(config, rng))}
  else:
    variables = nn.unbox(jax.eval_shape(lambda: init_variables(config, rng)))
  print(f"\nparameters ({'initialised' if tiny else 'eval_shape'} in {time.time() - start:.2f}s)")
  for name, n in info.count_params(variables["params"]).items():
    print(f"  {name:<32} {n:>14,}")

  ids, visual = info.random_batch(config, args.batch_size, length, regions)
  text, image, pair = info.forwards(config)
  nv = 1 + (regions if config.visual_input == "regions" else config.num_patches)
  print(f"\nforward passes: batch {args.batch_size}, text length {length}, visual tokens {nv} "
        f"({'run' if tiny else 'eval_shape only'})")
  for name, fn, inputs in (("text", text, (ids,)), ("image", image, (visual,)),
                           ("pair", pair, (visual, ids))):
    if tiny:
      jitted = jax.jit(fn)
      t0 = time.time()
      out = jax.block_until_ready(jitted(variables, *inputs))
      t1 = time.time()
      out = jax.block_until_ready(jitted(variables, *inputs))
      t2 = time.time()
      finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
      timing = f"first call {1e3 * (t1 - t0):.0f} ms (compile), then {1e3 * (t2 - t1):.1f} ms"
      timing += "" if finite else "  NON-FINITE OUTPUT"
    else:
      out = jax.eval_shape(fn, variables, *inputs)
      timing = "shapes only"
    print(f"  {name:<6} {timing}\n         {info.shapes(out)}")
  return 0
