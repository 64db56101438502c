"""What every ``unimo-jax`` command shares: exit codes, one-line errors, ``--help``, flag spelling.

Each command module's ``main(argv) -> int`` returns one of the exit codes below (``argv[0]`` is
the command's name, e.g. ``"unimo-jax evaluate"``). Commands built on ``argparse`` use
``ArgumentParser`` here; commands built on absl flags + ``ml_collections.config_flags``
(``train``, and ``finetune`` beside it) parse with ``parse_absl``, which adds ``-h``/``--help``
(a short listing with one line per flag, plus the config flags) and absl's ``--helpfull``.

Flag spelling: ``--batch-size`` and ``--batch_size`` are the same flag in every command (the
argparse commands are written with dashes, the absl ones with underscores; both spellings
reach both).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Iterable, Sequence

# ------------------------------------------------------------------------------ exit codes
OK = 0           # done (train: also stopped cleanly by a signal after saving a checkpoint)
ERROR = 1        # unexpected error (a traceback: a bug or a broken environment), or a checkpoint
                 # that could not be saved or restored (one line naming the path)
USAGE = 2        # usage or bad input: one line on stderr naming the flag, file or config field
NONFINITE = 3    # train/finetune: stopped by the non-finite guard; the last good checkpoint stays
TRIALS_FAILED = 4  # sweep: some trials failed (the others ran; ``sweep --summary`` marks them)
INTERRUPTED = 130  # Ctrl-C outside a training loop (the shell's 128 + SIGINT)

EXIT_CODES = (
    (OK, "ok"),
    (ERROR, "unexpected error (a traceback), or a checkpoint not saved or restored (one line)"),
    (USAGE, "usage or bad input: one line on stderr naming the flag, file or config field"),
    (NONFINITE, "train, finetune: stopped by the non-finite guard (train.max_nonfinite_steps); "
                "the last good checkpoint is kept"),
    (TRIALS_FAILED, "sweep: one or more trials failed (`sweep --summary` marks them)"),
    (INTERRUPTED, "interrupted by Ctrl-C outside the training loop"),
)


def exit_codes_text(codes: Iterable[int] = (OK, ERROR, USAGE)) -> str:
  """The ``exit status:`` paragraph of a command's help, for the codes it can return."""
  wanted = set(codes)
  lines = ["exit status:"]
  lines += [f"  {code:<4d} {text}" for code, text in EXIT_CODES if code in wanted]
  return "\n".join(lines)


class UsageError(Exception):
  """Bad usage or input, said in one line; ``fail`` prints it and returns ``USAGE``."""


def fail(prog: str, message, code: int = USAGE) -> int:
  """Prints ``prog: message`` as ONE line on stderr and returns ``code``."""
  text = " ".join(str(message).split())
  print(f"{prog}: {text}", file=sys.stderr)
  return code


# ------------------------------------------------------------------------------ flag spelling
def respell(argv: Sequence[str], known: Iterable[str], sep: str) -> list[str]:
  """``--a-b[=v]`` <-> ``--a_b[=v]``: spells each option of ``argv`` with ``sep`` when that
  spelling names a known flag (``known``: names without dashes; ``--noX`` of boolean flags
  too). Dotted names (``--config.x.y=v``) and everything after ``--`` are left alone."""
  known = set(known)
  out, rest = [], False
  for arg in argv:
    if rest or not arg.startswith("--") or arg == "--":
      rest = rest or arg == "--"
      out.append(arg)
      continue
    name, eq, value = arg[2:].partition("=")
    if "." not in name:
      other = name.replace("-", sep).replace("_", sep)
      if other != name and (other in known or (other.startswith("no") and other[2:] in known)):
        arg = f"--{other}{eq}{value}"
    out.append(arg)
  return out


# ------------------------------------------------------------------------------ argparse
class ArgumentParser(argparse.ArgumentParser):
  """``argparse`` with the project's conventions: a usage error is one line and exit status 2,
  the help ends with the exit codes, and ``--x_y`` is accepted for ``--x-y``.

  Args:
    exit_codes: the codes listed at the end of ``--help`` (default 0, 1, 2).
    (the rest as ``argparse.ArgumentParser``; the description keeps its line breaks)
  """

  def __init__(self, *args, exit_codes: Iterable[int] = (OK, ERROR, USAGE), **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    codes = tuple(exit_codes)
    if kwargs.get("epilog") is None:
      kwargs["epilog"] = exit_codes_text(codes)
    super().__init__(*args, **kwargs)
    self._exit_codes = codes

  def add_subparsers(self, **kwargs):
    action = super().add_subparsers(**kwargs)
    self.epilog = (f"{self.prog} SUBCOMMAND --help lists the flags of each subcommand.\n\n"
                   + (self.epilog or ""))
    # Sub-commands inherit the exit-code listing and the one-line errors.
    original = action.add_parser

    def add_parser(name, **kw):
      kw.setdefault("exit_codes", self._exit_codes)
      if "help" in kw:
        kw.setdefault("description", kw["help"])
      return original(name, **kw)

    action.add_parser = add_parser
    return action

  def _option_names(self) -> set[str]:
    names = set()
    for action in self._actions:
      names.update(s.lstrip("-") for s in action.option_strings if s.startswith("--"))
      for choice in (getattr(action, "choices", None) or {}).values() if isinstance(
          getattr(action, "choices", None), dict) else ():
        names |= choice._option_names()  # pylint: disable=protected-access
    return names

  def parse_known_args(self, args=None, namespace=None):
    if args is not None:
      args = respell(list(args), self._option_names(), "-")
    return super().parse_known_args(args, namespace)

  def error(self, message):
    self.exit(USAGE, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


# ------------------------------------------------------------------------------ absl flags
HELP_WIDTH = 100
def _absl_flags(fv):
  """``[(name, flag)]`` of the flags a command defined itself (absl's own flags left out)."""
  own = []
  for module, defined in fv.flags_by_module_dict().items():
    if module.startswith("absl."):
      continue
    own += [(f.name, f) for f in defined]
  return sorted(dict(own).items())


def _metavar(flag) -> str:
  kind = flag.flag_type()
  if kind == "bool":
    return ""
  enum = getattr(flag.parser, "enum_values", None)
  if enum:
    return "=" + "|".join(enum)
  return "=" + {"int": "N", "float": "X", "multi string": "S", "list": "A,B"}.get(kind, "S")


def absl_help(prog: str, fv, *, usage: str, description: str = "", sections: Sequence[
    tuple[str, Sequence[tuple[str, str]]]] = (), skip: Iterable[str] = (),
              exit_codes: Iterable[int] = (OK, ERROR, USAGE)) -> str:
  """The ``--help`` text of an absl command: usage, description, extra sections (e.g. the
  config flags) as ``(title, [(flag, meaning)])``, then every other flag the command defines
  with its one-line meaning and default, the exit codes, and where ``--helpfull`` is."""
  skip = set(skip)
  rows = []
  for name, flag in _absl_flags(fv):
    if name in skip:
      continue
    label = f"--{name}" if flag.flag_type() != "bool" else f"--[no]{name}"
    meaning = " ".join(flag.help.split())
    if meaning.startswith("<") and ">: " in meaning:  # absl prefixes an enum's values
      meaning = meaning.split(">: ", 1)[1]
    if flag.default not in (None, "", [], False):
      meaning += f" (default: {flag.default})"
    rows.append((label + _metavar(flag), meaning))
  lines = [f"usage: {usage}", ""]
  if description:
    lines += [description.strip(), ""]
  for title, entries in list(sections) + [("flags", rows)]:
    lines.append(f"{title}:")
    width = min(max([len(k) for k, _ in entries] + [0]), 24)
    for key, text in entries:
      wrapped = textwrap.wrap(text, max(40, HELP_WIDTH - width - 4)) or [""]
      if len(key) > width:
        lines.append(f"  {key}")
      else:
        lines.append(f"  {key:<{width}}  {wrapped.pop(0)}")
      lines += [f"  {'':<{width}}  {line}" for line in wrapped]
    lines.append("")
  lines.append("  -h, --help    this listing;  --helpfull    every flag, absl's own included")
  lines += ["", exit_codes_text(exit_codes)]
  return "\n".join(lines)


def wants_help(argv: Sequence[str]) -> str | None:
  """``"short"`` for ``-h``/``--help``/``--helpshort``, ``"full"`` for ``--helpfull`` in
  ``argv[1:]`` (before any ``--``), else None."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in ("-h", "--help", "--helpshort"):
      return "short"
    if arg == "--helpfull":
      return "full"
  return None


def parse_absl(fv, argv: Sequence[str], help_text: str) -> int | None:
  """Parses ``argv`` into ``fv``; returns an exit code when the command should stop now.

  ``-h``/``--help`` print ``help_text``, ``--helpfull`` absl's full listing (both return
  ``OK``); an unknown flag or bad value prints one line and returns ``USAGE``; otherwise the
  flags are parsed and None is returned. ``--x-y`` is accepted for ``--x_y``.
  """
  argv = respell(list(argv), list(fv), "_")
  which = wants_help(argv)
  if which == "short":
    print(help_text)
    return OK
  if which == "full":
    print(f"usage: {argv[0]} [flags]\n{fv.get_help()}")
    return OK
  try:
    fv(argv)
  except Exception as e:  # pylint: disable=broad-except
    # absl reports a bad flag as flags.Error; config_flags' --config.x=y overrides raise
    # KeyError / AttributeError / ValueError / TypeError, and a config file that does not
    # load raises from its own code: all of them are bad input, said in one line.
    cause = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], Exception) else e
    if isinstance(cause, KeyError):  # config_flags: an override names no field of the config
      # ml_collections' message is "key'\nDid you mean ...?": the key, then a hint line
      lines = [line.strip().strip("'\"") for line in str(cause.args[0] if cause.args else "?")
               .splitlines() if line.strip()] or ["?"]
      key, hint = lines[0], (f" ({lines[-1]})" if len(lines) > 1 else "")
      flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                   key in a.split("=")[0].split(".")), key)
      return fail(argv[0], f"{flag}: the config has no field {key!r}{hint}")
    return fail(argv[0], error_line(cause))
  return None


def error_line(e: BaseException) -> str:
  """One line for an exception: its message (a KeyError's without the quotes); a multi-line
  message (ml_collections' "Failed loading config file ...") gives its first and last line."""
  message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"
