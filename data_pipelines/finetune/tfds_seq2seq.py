"""Seq2seq (summarisation) from TFDS, read from a local data_dir, as the TSV reader's rows.

``seq2seq_rows(name, split, data_dir, tokenizer, ...)`` gives exactly what
``text.seq2seq_rows`` gives for the same (source, target) pairs in a ``source,target`` TSV:
the rows of ``text.seq2seq_table`` (``ids`` ``[N, max_source + max_target]`` and the rest of
``layouts.seq2seq_layout``, ``source_ids`` ``[N, max_source]``), the dropped counts and the
source / target strings, in the order TFDS stores the split (``shuffle_files=False``: the same
order on every read, which exact resume relies on).

The features read are ``data.source_key`` / ``data.target_key``, by default the dataset's
entry in ``unimo_jax.finetune.config.SEQ2SEQ_TFDS_KEYS``:

  cnn_dailymail       article -> highlights
  gigaword, xsum      document -> summary
  (and multi_news, billsum, samsum, scientific_papers, wikihow, aeslc)

Both must be scalar text features of the dataset; a missing or non-text one is one error
naming the dataset, the split, the field and the features it has. A TSV row is one line, so
the line breaks inside a text (CNN/DM's highlights hold one sentence a line) become single
spaces: a TFDS run and a TSV run of the same texts read the same rows.

Nothing is downloaded (``tfds_text.open_split``: a dataset not prepared under ``data_dir`` is
one error giving the ``tfds build`` command). Rows skipped and counted, never fatal, with the
TSV reader's names:

  not_utf8      the source or the target is not UTF-8
  empty_text    the source or the target is empty after stripping
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterator

import numpy as np

from data_pipelines.finetune import text, tfds_text
from unimo_jax.finetune import config as config_lib

_LINE_BREAKS = re.compile(r"\s*[\r\n\t]\s*")


def one_line(value: str) -> str:
  """``value`` with each run of line breaks / tabs (and the spaces around it) as one space."""
  return _LINE_BREAKS.sub(" ", value)


def _is_scalar_text(feature) -> bool:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    return feature.dtype == tf.string and tuple(feature.shape) == ()
  except (AttributeError, TypeError):  # a FeaturesDict: a dict of dtypes, no single shape
    return False


def check_keys(name: str, split: str, features, keys: tuple[str, str]):
  """One-line ValueError unless ``keys`` (source, target) are scalar text features."""
  have = sorted(features.keys())
  for field, key in zip(("data.source_key", "data.target_key"), keys):
    if key not in have:
      raise ValueError(f"TFDS {name}:{split} has no feature {key!r} ({field}); its features: "
                       f"{', '.join(have)}")
    if not _is_scalar_text(features[key]):
      raise ValueError(f"TFDS {name}:{split}: feature {key!r} ({field}) is not text "
                       f"({type(features[key]).__name__}); its features: {', '.join(have)}")


def _pairs(ds, keys: tuple[str, str], dropped: Counter) -> Iterator[tuple[str, str]]:
  for ex in ds.as_numpy_iterator():
    try:
      s, t = (ex[k].decode("utf-8") for k in keys)
    except UnicodeDecodeError:
      dropped["not_utf8"] += 1
      continue
    yield one_line(s), one_line(t)


def seq2seq_rows(name: str, split: str, data_dir: str, tokenizer, *, max_source: int,
                 max_target: int, source_key: str = "", target_key: str = ""
                 ) -> tuple[dict[str, np.ndarray], dict[str, int], list[str], list[str]]:
  """-> (rows, dropped, sources, targets) of ``split`` of the TFDS dataset ``name`` (see the
  module docstring); one-line ValueErrors for unknown keys, an unprepared dataset or split."""
  keys = config_lib.seq2seq_tfds_keys(name, source_key, target_key)
  ds, features = tfds_text.open_split(name, split, data_dir)
  check_keys(name, split, features, keys)
  dropped = Counter()
  rows, sources, targets = text.seq2seq_table(_pairs(ds, keys, dropped), tokenizer,
                                              max_source=max_source, max_target=max_target,
                                              dropped=dropped)
  return rows, dict(dropped), sources, targets
