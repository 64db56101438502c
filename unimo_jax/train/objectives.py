"""Which pre-training objectives a step runs, and with which weights.

UNIMO trains every kind of data at once, one stream per kind:

  objective      stream  what runs
  text_mlm       text    span MLM on the text corpus (bidirectional mask)
  text_s2s       text    seq2seq infilling on the text corpus (UniLM mask)
  image_mrp      image   masked region prediction on unpaired images
  pair_cmcl      pair    cross-modal contrastive learning, images and texts encoded separately
  pair_mlm       pair    span MLM on the caption, conditioned on the image (joint encoding)
  pair_caption   pair    captioning seq2seq: the caption generated from the image
  pair_mrp       pair    masked region prediction conditioned on the caption

UNIMO alternates its two language objectives rather than running both on every batch. The
config decides per stream (``objectives.text_mode`` / ``objectives.pair_text_mode``):

  'alternate'  phase 0 (even steps) runs MLM, phase 1 (odd steps) seq2seq   (UNIMO); if one of
               the two has weight 0 the other runs every step
  'both'       both every step
  'mlm' / 's2s'  only one of them

An objective whose weight is 0, or whose stream has no data in the run, is not computed at all.

``REGISTRY`` is the one table of the objectives (stream, kind, data layout, attention mask): the
train step (``unimo_objectives``), the FLOP count (``flops``), config validation (``config``) and
the data plan (``data_layouts``: which layouts each stream's rows must carry) all read it and the
plan functions below, so they cannot disagree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable


@dataclasses.dataclass(frozen=True)
class Objective:
  """One pre-training objective.

  name: ``<stream>_<what>``, also the prefix of its metrics and its ``objectives.weights`` key.
  stream: the data stream it trains on (``text`` | ``image`` | ``pair``).
  kind: ``language`` (predict masked / target tokens), ``mrp`` (masked region prediction) or
    ``cmcl`` (contrastive).
  layout: language objectives: the stream's row layout they read, ``mlm`` or ``s2s``
    (``data.streams.<stream>.objectives``; batch fields ``<stream>/<layout>_*``).
  attention: language objectives: the attention mask of their encoder pass.
  """
  name: str
  stream: str
  kind: str
  layout: str = ""
  attention: str = ""

  @property
  def prefix(self) -> str:
    """The batch-field prefix of a language objective's rows (``mlm_`` / ``s2s_``)."""
    return f"{self.layout}_" if self.layout else ""


REGISTRY: dict[str, Objective] = {o.name: o for o in (
    Objective("text_mlm", "text", "language", "mlm", "bidirectional"),
    Objective("text_s2s", "text", "language", "s2s", "seq2seq"),
    Objective("image_mrp", "image", "mrp"),
    Objective("pair_cmcl", "pair", "cmcl"),
    Objective("pair_mlm", "pair", "language", "mlm", "bidirectional"),
    Objective("pair_caption", "pair", "language", "s2s", "captioning"),
    Objective("pair_mrp", "pair", "mrp"),
)}
OBJECTIVES = tuple(REGISTRY)
TEXT_MODES = ("alternate", "both", "mlm", "s2s")
# The ``config.objectives`` key that sets how a stream's two language objectives take turns.
MODE_KEYS = {"text": "text_mode", "pair": "pair_text_mode"}


def language_objectives(stream: str) -> tuple[str, str]:
  """(MLM objective, seq2seq objective) of a stream, e.g. ("pair_mlm", "pair_caption")."""
  by_layout = {o.layout: o.name for o in REGISTRY.values()
               if o.stream == stream and o.kind == "language"}
  return by_layout["mlm"], by_layout["s2s"]


def weights(cfg: Any) -> dict[str, float]:
  """``{objective: weight}`` from ``config.objectives.weights``."""
  return {name: float(cfg.weights[name]) for name in OBJECTIVES}


def _language(mode: str, phase: int, mlm: str, s2s: str, w: dict) -> set[str]:
  if mode not in TEXT_MODES:
    raise ValueError(f"text mode must be one of {TEXT_MODES}, got {mode!r}")
  if mode == "alternate" and not (w[mlm] > 0 and w[s2s] > 0):
    mode = "both"  # one of the two is off: nothing to alternate with, the other runs every step
  if mode == "both":
    return {mlm, s2s}
  if mode == "mlm":
    return {mlm}
  if mode == "s2s":
    return {s2s}
  return {mlm} if phase == 0 else {s2s}


def num_phases(cfg: Any) -> int:
  """2 when a stream's two language objectives alternate (both weighted), else 1."""
  w = weights(cfg)
  alternates = [(cfg[key], *language_objectives(stream)) for stream, key in MODE_KEYS.items()]
  return 2 if any(m == "alternate" and w[a] > 0 and w[b] > 0 for m, a, b in alternates) else 1


def phase_of_step(step: int, cfg: Any) -> int:
  return int(step) % num_phases(cfg)


def active(cfg: Any, streams: Iterable[str], phase: int) -> tuple[str, ...]:
  """The objectives step phase ``phase`` computes, in ``OBJECTIVES`` order.

  Args:
    cfg: ``config.objectives`` (text_mode, pair_text_mode, weights).
    streams: the streams that have data in this run.
    phase: ``step % num_phases(cfg)``.
  """
  streams = set(streams)
  w = weights(cfg)
  run = {o.name for o in REGISTRY.values() if o.kind != "language"}
  for stream, key in MODE_KEYS.items():
    run |= _language(cfg[key], phase, *language_objectives(stream), w)
  return tuple(o for o in OBJECTIVES if o in run and w[o] > 0 and REGISTRY[o].stream in streams)


def all_active(cfg: Any, streams: Iterable[str]) -> tuple[str, ...]:
  """Every objective some phase runs (what the batch must provide)."""
  streams = tuple(streams)
  names = set()
  for phase in range(num_phases(cfg)):
    names |= set(active(cfg, streams, phase))
  return tuple(o for o in OBJECTIVES if o in names)


def data_layouts(cfg: Any, streams: Iterable[str]) -> dict[str, tuple[str, ...]]:
  """The data plan: ``{stream: layouts}`` the rows of each stream must carry (``mlm`` / ``s2s``)
  for the language objectives some phase runs."""
  out: dict[str, tuple[str, ...]] = {}
  for name in all_active(cfg, streams):
    o = REGISTRY[name]
    if o.kind == "language" and o.layout not in out.get(o.stream, ()):
      out[o.stream] = out.get(o.stream, ()) + (o.layout,)
  return out
