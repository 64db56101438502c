"""The ``unimo-jax`` command: ``unimo-jax COMMAND [args...]``.

Each command lives in its own module exposing ``main(argv: list[str]) -> int | None``, where
``argv[0]`` is the command's name. Modules are imported lazily so that, e.g., ``convert`` never
pays for TensorFlow.
"""
import importlib
import os
import sys

# command -> (module, one-line help)
COMMANDS = {
    "convert": ("unimo_jax.convert.cli", "import weights: convert roberta --hf-dir D --out O"),
    "evaluate": ("unimo_jax.evaluation.main", "evaluate a run's checkpoint: retrieval, hard negatives, captioning, language; report"),
    "model-info": ("unimo_jax.model_info", "parameter counts and a timed forward pass: model-info [--preset tiny|base|large]"),
    "prepare": ("data_pipelines.prepare", "build a dataset (synthetic_scenes), its tokenizer and side files"),
    "tokenizer": ("data_pipelines.tokenizer_cli", "train a SentencePiece tokenizer: tokenizer train --input F --vocab-size N --out P"),
    "train": ("unimo_jax.train.main", "pre-train: train --config experiments/configs/demo.py --workdir DIR"),
    "sweep": ("unimo_jax.train.sweep", "run or print the trials of a sweep: sweep --sweep experiments/sweeps/F.py"),
}


def _usage() -> str:
  lines = ["usage: unimo-jax COMMAND [ARGS...]", "", "commands:"]
  for name, (_, text) in sorted(COMMANDS.items()):
    lines.append(f"  {name:<12} {text}")
  return "\n".join(lines)


def _enable_compilation_cache() -> None:
  """Persistent XLA compilation cache: a rerun of the same step compiles in a fraction of the
  time. ``UNIMO_JAX_COMPILATION_CACHE=DIR`` moves it; an empty value turns it off."""
  path = os.environ.get("UNIMO_JAX_COMPILATION_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "unimo_jax", "xla"))
  if not path:
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    return 0 if len(argv) >= 2 else 2
  name = argv[1]
  if name not in COMMANDS:
    print(f"unimo-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  _enable_compilation_cache()
  module = importlib.import_module(COMMANDS[name][0])
  rc = module.main([f"unimo-jax {name}"] + argv[2:])
  return int(rc or 0)


if __name__ == "__main__":
  sys.exit(main())
