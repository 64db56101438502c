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
The train step and the FLOP count both read the plan from here, so they cannot disagree.
"""
from __future__ import annotations

from typing import Any, Iterable

OBJECTIVES = ("text_mlm", "text_s2s", "image_mrp", "pair_cmcl", "pair_mlm", "pair_caption",
              "pair_mrp")
STREAM_OF = {"text_mlm": "text", "text_s2s": "text", "image_mrp": "image", "pair_cmcl": "pair",
             "pair_mlm": "pair", "pair_caption": "pair", "pair_mrp": "pair"}
TEXT_MODES = ("alternate", "both", "mlm", "s2s")


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
  alternates = [(cfg.text_mode, "text_mlm", "text_s2s"),
                (cfg.pair_text_mode, "pair_mlm", "pair_caption")]
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
  run = {"image_mrp", "pair_cmcl", "pair_mrp"}
  run |= _language(cfg.text_mode, phase, "text_mlm", "text_s2s", w)
  run |= _language(cfg.pair_text_mode, phase, "pair_mlm", "pair_caption", w)
  return tuple(o for o in OBJECTIVES if o in run and w[o] > 0 and STREAM_OF[o] in streams)


def all_active(cfg: Any, streams: Iterable[str]) -> tuple[str, ...]:
  """Every objective some phase runs (what the batch must provide)."""
  streams = tuple(streams)
  names = set()
  for phase in range(num_phases(cfg)):
    names |= set(active(cfg, streams, phase))
  return tuple(o for o in OBJECTIVES if o in names)
