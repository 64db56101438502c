"""Text task files: GLUE-style TSV (``text_a[,text_b],label[,qid]``) and seq2seq TSV
(``source,target``; ``src,tgt`` also accepted), as UNIMO's fine-tuning data.

The first line is the header and names the columns (in any order). A file whose header lacks a
required column is refused with one line naming the file and the column. Rows that cannot be
used are skipped and counted by reason, never fatal:

  not_utf8          the line is not UTF-8
  wrong_field_count a row with more or fewer tab-separated fields than the header
  empty_text        a required text field is empty (after stripping)
  bad_label         classification: not a known label name nor an int in [0, num_labels);
                    regression: not a finite float
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from unimo_jax.finetune import layouts


def _open(path: str) -> bytes:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, "rb") as f:
    return f.read()


def read_tsv(path: str, required: Sequence[Sequence[str]], optional: Sequence[str] = ()
             ) -> tuple[dict[str, int], list[list[str]], Counter]:
  """-> (column -> index, rows of fields, dropped counts). ``required`` lists alternatives per
  column (e.g. ``[("source", "src")]``); the first alternative present is used under the first
  name."""
  lines = _open(path).split(b"\n")
  try:
    header = lines[0].decode("utf-8").rstrip("\r").split("\t")
  except UnicodeDecodeError:
    raise ValueError(f"{path}: the header line is not UTF-8") from None
  columns = {}
  for alternatives in required:
    found = [a for a in alternatives if a in header]
    if not found:
      raise ValueError(f"{path}: header has no {alternatives[0]!r} column (expected "
                       f"{','.join(a[0] for a in required)}; got {','.join(header)})")
    columns[alternatives[0]] = header.index(found[0])
  for name in optional:
    if name in header:
      columns[name] = header.index(name)
  rows, dropped = [], Counter()
  for raw in lines[1:]:
    if not raw.strip():
      continue
    try:
      line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
      dropped["not_utf8"] += 1
      continue
    fields = line.split("\t")
    if len(fields) != len(header):
      dropped["wrong_field_count"] += 1
      continue
    rows.append(fields)
  return columns, rows, dropped


def parse_label(value: str, kind: str, label_names: Sequence[str], num_labels: int):
  """A label field -> int class / float target, or None when it is not a valid label."""
  value = value.strip()
  if kind == "regression":
    try:
      x = float(value)
    except ValueError:
      return None
    return x if math.isfinite(x) else None
  if label_names:
    return list(label_names).index(value) if value in label_names else None
  try:
    x = int(value)
  except ValueError:
    return None
  return x if 0 <= x < num_labels else None


def classification_rows(path: str, tokenizer, *, max_length: int, kind: str = "classification",
                        num_labels: int = 2, label_names: Sequence[str] = ()
                        ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """GLUE TSV -> (rows dict(ids [N, max_length] int32, label [N] int32 | float32), dropped).

  Pairs are ``[CLS] A [SEP] B [SEP]``; a single text ``[CLS] A [SEP]``."""
  columns, rows, dropped = read_tsv(path, [("text_a",), ("label",)], optional=("text_b",))
  ids, labels = [], []
  for fields in rows:
    a = fields[columns["text_a"]].strip()
    b = fields[columns["text_b"]].strip() if "text_b" in columns else None
    if not a or (b is not None and not b):
      dropped["empty_text"] += 1
      continue
    label = parse_label(fields[columns["label"]], kind, label_names, num_labels)
    if label is None:
      dropped["bad_label"] += 1
      continue
    ta = tokenizer.encode(a)
    tb = tokenizer.encode(b) if b is not None else None
    ids.append(layouts.pair_text(ta, tb, max_length, cls_id=tokenizer.cls_id,
                                 sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id))
    labels.append(label)
  dtype = np.float32 if kind == "regression" else np.int32
  out = dict(ids=np.asarray(ids, np.int32).reshape(-1, max_length),
             label=np.asarray(labels, dtype))
  return out, dict(dropped)


def seq2seq_table(pairs: Iterable[tuple[str, str]], tokenizer, *, max_source: int,
                  max_target: int, dropped: Counter
                  ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(source, target) strings -> (rows of ``layouts.seq2seq_layout`` plus source_ids [N,
  max_source] (``[CLS] s.. [SEP]`` for decoding), sources, targets (the stripped reference
  strings)). A pair whose source or target is empty after stripping is counted in
  ``dropped["empty_text"]`` and skipped. Shared by the TSV and the TFDS seq2seq readers."""
  out: dict[str, list] = {}
  sources, targets = [], []
  for s, t in pairs:
    s, t = s.strip(), t.strip()
    if not s or not t:
      dropped["empty_text"] += 1
      continue
    src, tgt = tokenizer.encode(s), tokenizer.encode(t)
    row = layouts.seq2seq_layout(src, tgt, max_source=max_source, max_target=max_target,
                                 cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                                 mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id)
    row["source_ids"] = row["ids"][:max_source]
    for k, v in row.items():
      out.setdefault(k, []).append(v)
    sources.append(s)
    targets.append(t)
  if not sources:
    return {}, [], []
  return {k: np.stack(v) for k, v in out.items()}, sources, targets


def seq2seq_rows(path: str, tokenizer, *, max_source: int, max_target: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, int], list[str], list[str]]:
  """Seq2seq TSV -> (rows of ``seq2seq_table``, dropped, sources, targets (the reference
  strings))."""
  columns, rows, dropped = read_tsv(path, [("source", "src"), ("target", "tgt")])
  pairs = ((f[columns["source"]], f[columns["target"]]) for f in rows)
  out, sources, targets = seq2seq_table(pairs, tokenizer, max_source=max_source,
                                        max_target=max_target, dropped=dropped)
  return out, dict(dropped), sources, targets
