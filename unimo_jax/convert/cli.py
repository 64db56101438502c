"""``unimo-jax convert roberta --hf-dir D --out O``: import weights into unimo_jax's format.

``unimo-jax convert unimo --paddle-dir D --out O`` imports an official UNIMO (Paddle) checkpoint.

Writes ``O/config.json`` (ModelConfig) and ``O/params.msgpack``; a training config starts from
them with ``init_from=O`` (``unimo_jax.convert.roberta.load_converted`` + ``merge_params``).
"""
import pickle
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


def _unimo(args) -> int:
  from unimo_jax.convert import roberta, unimo  # pylint: disable=import-outside-toplevel
  start = time.time()
  config, params, notes = unimo.load_checkpoint(args.paddle_dir, args.config, args.num_heads)
  for line in notes:
    print(f"{args.paddle_dir}: {line}")
  roberta.save(args.out, config, params, source={"format": "paddle-unimo",
                                                 "paddle_dir": args.paddle_dir})
  n = sum(x.size for x in _leaves(params))
  print(f"converted {args.paddle_dir} -> {args.out}: {n:,} parameters "
        f"({config.num_layers} layers, H {config.hidden_size}, {config.num_heads} heads, "
        f"vocab {config.vocab_size}, region features {config.region_feature_dim}) "
        f"in {time.time() - start:.1f}s")
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
  uni = sub.add_parser("unimo", help="an official UNIMO (Paddle) parameter directory or .pdparams")
  uni.add_argument("--paddle-dir", required=True,
                   help="directory of per-variable LoDTensor files (the official release), or a "
                        ".pdparams file of the same variables")
  uni.add_argument("--out", required=True, help="output directory")
  uni.add_argument("--config", default=None,
                   help="official model config json (default: a *.json with "
                        "num_attention_heads beside the variables)")
  uni.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (default: the config json's, else hidden_size / 64)")
  uni.set_defaults(run=_unimo)
  args = parser.parse_args(argv[1:])
  try:
    return args.run(args)
  # bad input: one clear line, no traceback
  except (FileNotFoundError, ValueError, pickle.UnpicklingError) as e:
    return commands.fail(f"{parser.prog} {args.source}", f"error: {e}")
