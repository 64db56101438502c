"""The ``unimo-jax`` command: ``unimo-jax COMMAND [args...]``.

Each command lives in its own module exposing ``main(argv: list[str]) -> int | None``, where
``argv[0]`` is the command's name. Modules are imported lazily so that, e.g., ``convert`` never
pays for TensorFlow. ``unimo-jax COMMAND --help`` (or ``unimo-jax help COMMAND``) lists a
command's flags; every command returns the exit codes of ``unimo_jax.commands``.
"""
import importlib
import os
import sys

from unimo_jax import commands, host_allocator

# command -> (module, one-line help)
COMMANDS = {
    "convert": ("unimo_jax.convert.cli", "import weights: convert roberta --hf-dir D --out O"),
    "finetune": ("unimo_jax.finetune.main", "fine-tune on a task: finetune --config experiments/configs/finetune/T.py --workdir DIR"),
    "evaluate": ("unimo_jax.evaluation.main", "evaluate a run's checkpoint: retrieval, hard negatives, captioning, language; report"),
    "model-info": ("unimo_jax.model_info.main", "parameter counts and a timed forward pass: model-info [--preset tiny|base|large]"),
    "prepare": ("data_pipelines.prepare", "build a dataset (synthetic_scenes), its tokenizer and side files"),
    "tokenizer": ("data_pipelines.tokenizer_cli", "train a SentencePiece tokenizer: tokenizer train --input F --vocab-size N --out P"),
    "train": ("unimo_jax.train.main", "pre-train: train --config experiments/configs/demo.py --workdir DIR"),
    "sweep": ("unimo_jax.train.sweep", "a sweep's trials: run, --print, --array (SLURM), --summary: sweep --sweep F --workdir R"),
}
# Commands that run compiled steps: on the CPU backend they start under the main-heap allocator
# (``unimo_jax.host_allocator``; ``UNIMO_JAX_HOST_ALLOCATOR=system`` turns it off).
STEP_COMMANDS = ("train", "finetune", "evaluate", "model-info")


def _usage() -> str:
  lines = ["usage: unimo-jax COMMAND [ARGS...]   (unimo-jax COMMAND --help: its flags)", "",
           "commands:"]
  for name, (_, text) in sorted(COMMANDS.items()):
    lines.append(f"  {name:<12} {text}")
  codes = [code for code, _ in commands.EXIT_CODES]
  return "\n".join(lines + ["", commands.exit_codes_text(codes)])


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
  argv_is_process = argv is None  # the process's own command line (not a call from Python)
  argv = list(sys.argv if argv is None else argv)
  if len(argv) >= 3 and argv[1] == "help":  # unimo-jax help COMMAND == COMMAND --help
    argv = [argv[0], argv[2], "--help"]
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
    return commands.OK if len(argv) >= 2 else commands.USAGE
  name = argv[1]
  if name not in COMMANDS:
    return commands.fail("unimo-jax", f"unknown command {name!r} (commands: "
                                      f"{', '.join(sorted(COMMANDS))}; see unimo-jax --help)")
  if argv_is_process and name in STEP_COMMANDS:
    try:
      host_allocator.apply()  # re-executes this command line when the policy says so
    except ValueError as e:
      return commands.fail(f"unimo-jax {name}", e)
  _enable_compilation_cache()
  try:
    module = importlib.import_module(COMMANDS[name][0])
    rc = module.main([f"unimo-jax {name}"] + argv[2:])
  except SystemExit as e:  # argparse exits on --help (0) and on a usage error (2)
    rc = e.code if isinstance(e.code, int) else (commands.USAGE if e.code else commands.OK)
  except commands.UsageError as e:
    rc = commands.fail(f"unimo-jax {name}", e)
  except KeyboardInterrupt:
    rc = commands.fail(f"unimo-jax {name}", "interrupted", commands.INTERRUPTED)
  except BrokenPipeError:  # `unimo-jax sweep --print | head`: the reader has had enough
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    rc = commands.OK
  return int(rc or 0)


if __name__ == "__main__":
  sys.exit(main())
