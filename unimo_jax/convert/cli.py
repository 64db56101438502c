"""``unimo-jax convert roberta --hf-dir D --out O``: import weights into unimo_jax's format.

Writes ``O/config.json`` (ModelConfig) and ``O/params.msgpack``; a training config starts from
them with ``init_from=O`` (``unimo_jax.convert.roberta.load_converted`` + ``merge_params``).
"""
import time

from unimo_jax import commands


def _roberta(args) -> int:
  from unimo_jax.convert import roberta  # pylint: disable=import-outside-toplevel
  start = time.time()
  overrides = {}
  if args.visual_input:
    overrides["visual_input"] = args.visual_input
  config, params = roberta.load(args.hf_dir, **overrides)
  roberta.save(args.out, config, params, source={"format": "huggingface-roberta",
                                                 "hf_dir": args.hf_dir})
  n = sum(x.size for x in _leaves(params))
  print(f"converted {args.hf_dir} -> {args.out}: {n:,} parameters "
        f"({config.num_layers} layers, H {config.hidden_size}, vocab {config.vocab_size}, "
        f"LM head {'yes' if 'lm_head' in params else 'no'}) in {time.time() - start:.1f}s")
  return 0


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def main(argv) -> int:
  parser = commands.ArgumentParser(prog=argv[0] if argv else "unimo-jax convert",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="source", required=True)
  rob = sub.add_parser("roberta", help="a Hugging Face RoBERTa save_pretrained directory")
  rob.add_argument("--hf-dir", required=True,
                   help="directory with config.json and model.safetensors / pytorch_model.bin")
  rob.add_argument("--out", required=True, help="output directory")
  rob.add_argument("--visual-input", choices=("patches", "regions"), default=None,
                   help="visual input recorded in the written config (default: patches)")
  rob.set_defaults(run=_roberta)
  args = parser.parse_args(argv[1:])
  try:
    return args.run(args)
  except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
    return commands.fail(f"{parser.prog} {args.source}", f"error: {e}")
