"""What the memory-mapped stores (``region_store``, ``token_store``) share: the checks every
store manifest gets, and shard file names confined to the store's folder."""
from __future__ import annotations

import json
import os
import re

SHARD_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def fail(kind: str, path: str, field: str, msg: str):
  """One-line ValueError naming the store kind, the file and the field."""
  raise ValueError(f"{kind} {path}: {field}: {msg}")


def inside(kind: str, root: str, name, manifest: str) -> str:
  """root/name, refusing names that are not plain file names or that resolve outside root."""
  if not isinstance(name, str) or not SHARD_NAME.match(name) or ".." in name:
    fail(kind, manifest, "shards.name", f"{name!r} is not a plain file name")
  path = os.path.join(root, name)
  real_root = os.path.realpath(root)
  if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
    fail(kind, manifest, "shards.name", f"{name!r} resolves outside {root}")
  return path


def load(kind: str, root: str, name: str, fmt: str, version: int, write_with: str
         ) -> tuple[dict, str]:
  """(manifest dict, its path) of the store at ``root``: present, a JSON object, of ``fmt``
  and ``version``; ``write_with`` is the command that writes one (named when it is missing)."""
  path = os.path.join(root, name)
  if not os.path.isfile(path):
    raise ValueError(f"{kind} {root}: no {name} (write one with: {write_with} --out {root})")
  try:
    with open(path, encoding="utf-8") as f:
      m = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{kind} {path}: unreadable manifest: {e}") from None
  if not isinstance(m, dict):
    fail(kind, path, "manifest", "not a JSON object")
  if m.get("format") != fmt or m.get("version") != version:
    fail(kind, path, "format", f"{m.get('format')!r} version {m.get('version')!r}, expected "
         f"{fmt!r} version {version}")
  return m, path


def read_keys(kind: str, root: str, name: str, count: int, valid, what: str) -> list:
  """The ``count`` JSON lines of the store's key file, each passing ``valid`` (``what`` says
  what a line must be, for the error)."""
  path = os.path.join(root, name)
  try:
    with open(path, encoding="utf-8") as f:
      keys = [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError) as e:
    raise ValueError(f"{kind} {path}: unreadable: {e}") from None
  if len(keys) != count or not all(valid(k) for k in keys):
    raise ValueError(f"{kind} {path}: needs {count} lines, each {what}")
  return keys
