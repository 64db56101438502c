"""GLUE from TFDS (``glue/<task>``, read from a local data_dir) as the TSV reader's rows.

``classification_rows(name, split, data_dir, tokenizer, ...)`` gives exactly what
``text.classification_rows`` gives for the same examples in a TSV file: ``ids`` ``[N,
max_length]`` int32 (``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``) and ``label`` ``[N]``
(int32 classes, float32 for regression), plus GLUE's ``idx`` of every kept row; rows are in
``idx`` order, the order of GLUE's own files (TFDS stores them shuffled).

Nothing is downloaded: the builder is opened on ``data_dir`` and only ``as_dataset`` is called.
A dataset that was never prepared there is one error saying how to prepare it (``tfds build``
where the network is reachable, then copy the folder).

The text fields of each GLUE config, tried in this order (``TEXT_FIELDS``):

  sentence1, sentence2   MRPC, RTE, WNLI, STS-B
  question1, question2   QQP
  premise, hypothesis    MNLI (validation_matched / validation_mismatched / test_*), AX
  question, sentence     QNLI
  sentence               SST-2, CoLA

``label``: a ClassLabel (MNLI's names entailment, neutral, contradiction) or STS-B's float.
With ``label_names`` set, a class is mapped by its NAME to its place in ``label_names`` (so a
TFDS run and a TSV run of the same config share one output order); otherwise its TFDS index is
the class. Rows skipped and counted, never fatal:

  not_utf8      a text field is not UTF-8
  empty_text    a text field is empty after stripping
  no_label      label -1: GLUE's unlabelled test rows
  bad_label     a class outside [0, num_labels), or a non-finite regression target
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Sequence

import numpy as np

from unimo_jax.finetune import layouts

TEXT_FIELDS = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
               ("question", "sentence"), ("sentence",))


def _prepare_hint(name: str, data_dir: str) -> str:
  base, _, config = name.partition(":")[0].partition("/")
  build = f"tfds build {base}" + (f" --config {config}" if config else "")
  return (f"data.tfds_data_dir {data_dir or '(TFDS default)'} holds no prepared {name} "
          f"(nothing is downloaded at run time): prepare it once where the network is "
          f"reachable with `{build} --data_dir DIR` and copy DIR here, or set "
          f"data.tfds_data_dir")


def open_split(name: str, split: str, data_dir: str = ""):
  """(tf.data of ``split``, the builder's features) of a prepared TFDS dataset; one-line
  ValueError for an unknown name or split, or a dataset not prepared under ``data_dir``."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, unknown config: tfds has no common base
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"data.tfds_name {name!r}: {first}") from None
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError:  # tfds: "Dataset ...: could not find data in ..."
    raise ValueError(_prepare_hint(name, data_dir or "")) from None
  except (ValueError, KeyError) as e:
    if not os.path.isdir(builder.data_dir):
      raise ValueError(_prepare_hint(name, data_dir or "")) from None
    known = ", ".join(sorted(builder.info.splits)) or "none"
    raise ValueError(f"{name}: no split {split!r} (it has {known}): {str(e).splitlines()[0]}"
                     ) from None
  return ds, builder.info.features


def text_fields(name: str, features) -> tuple[str, ...]:
  """The GLUE text fields ``features`` has (see ``TEXT_FIELDS``); else a one-line error."""
  keys = set(features.keys())
  for fields in TEXT_FIELDS:
    if set(fields) <= keys:
      return fields
  raise ValueError(f"{name}: no GLUE text field (expected one of "
                   f"{' | '.join(','.join(f) for f in TEXT_FIELDS)}; it has "
                   f"{','.join(sorted(keys))})")


def _label_map(name: str, feature, kind: str, num_labels: int, label_names: Sequence[str]):
  """TFDS class index -> our class (or None when a float target)."""
  names = list(getattr(feature, "names", None) or [])
  if kind == "regression":
    if names:
      raise ValueError(f"{name}: 'label' is a class label ({len(names)} classes) but "
                       f"task.kind is 'regression'")
    return None
  if not names:
    raise ValueError(f"{name}: 'label' is not a class label; task.kind 'classification' "
                     f"needs one (STS-B is task.kind 'regression')")
  if label_names:
    missing = [n for n in names if n not in label_names]
    if missing:
      raise ValueError(f"{name}: label names {missing} are not in data.label_names "
                       f"{list(label_names)}")
    return {k: list(label_names).index(n) for k, n in enumerate(names)}
  if len(names) != num_labels:
    raise ValueError(f"{name}: 'label' has {len(names)} classes but task.num_labels="
                     f"{num_labels}")
  return {k: k for k in range(len(names))}


def classification_rows(name: str, split: str, data_dir: str, tokenizer, *, max_length: int,
                        kind: str = "classification", num_labels: int = 2,
                        label_names: Sequence[str] = ()
                        ) -> tuple[dict[str, np.ndarray], dict[str, int], list[int]]:
  """-> (rows dict(ids [N, max_length] int32, label [N] int32 | float32), dropped, idx [N])
  of ``split`` of the GLUE dataset ``name`` (see the module docstring)."""
  ds, features = open_split(name, split, data_dir)
  fields = text_fields(name, features)
  if "label" not in features.keys():
    raise ValueError(f"{name}: no 'label' feature (it has {','.join(sorted(features.keys()))})")
  classes = _label_map(name, features["label"], kind, num_labels, label_names)
  ids, labels, idx = [], [], []
  dropped = Counter()
  for k, ex in enumerate(ds.as_numpy_iterator()):
    try:
      texts = [ex[f].decode("utf-8").strip() for f in fields]
    except UnicodeDecodeError:
      dropped["not_utf8"] += 1
      continue
    if not all(texts):
      dropped["empty_text"] += 1
      continue
    raw = ex["label"]
    if float(raw) == -1.0:
      dropped["no_label"] += 1
      continue
    if classes is None:
      label = float(raw)
      if not math.isfinite(label):
        dropped["bad_label"] += 1
        continue
    else:
      label = classes.get(int(raw))
      if label is None or not 0 <= label < num_labels:
        dropped["bad_label"] += 1
        continue
    enc = [tokenizer.encode(t) for t in texts]
    ids.append(layouts.pair_text(enc[0], enc[1] if len(enc) > 1 else None, max_length,
                                 cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                                 pad_id=tokenizer.pad_id))
    labels.append(label)
    idx.append(int(ex["idx"]) if "idx" in ex else k)
  # TFDS stores examples in a hashed order; GLUE's idx restores the order of its files
  order = np.argsort(np.asarray(idx, np.int64), kind="stable")
  dtype = np.float32 if kind == "regression" else np.int32
  rows = dict(ids=np.asarray(ids, np.int32).reshape(-1, max_length)[order],
              label=np.asarray(labels, dtype)[order])
  return rows, dict(dropped), [idx[k] for k in order]
