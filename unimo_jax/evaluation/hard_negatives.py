"""Hard-negative discrimination: do an image's true captions outscore its rewritten negatives?

The negatives are scene-graph rewrites of a true caption (one object, attribute or relation
changed), the texts CMCL's denominator is built to push away. For each image every (true caption,
hard negative) pair is one trial, won when the negative's cosine similarity to the image is
strictly below the caption's (a tie is a loss). Comparing with every true caption, not one chosen
caption, keeps the measure fair when negatives are written with different templates.

Reported as (sum, count) pairs over the whole split:
  ``hard_negative_acc``      wins / trials,
  ``hard_negative_all_acc``  negatives scored below *all* true captions / negatives,
and, when negative kinds are given, ``hard_negative_acc/<kind>`` for each kind.
"""
from typing import Sequence

import numpy as np


def pair_wins(image_emb: np.ndarray, caption_emb: np.ndarray, caption_valid: np.ndarray,
              negative_emb: np.ndarray, negative_valid: np.ndarray) -> np.ndarray:
  """Win indicator of every (image, caption, negative) trial.

  Args:
    image_emb: [B, d] image features.
    caption_emb: [B, C, d] true captions' features.
    caption_valid: [B, C] 1 for real captions.
    negative_emb: [B, K, d] hard negatives' features.
    negative_valid: [B, K] 1 for real negatives.
  Returns:
    [B, C, K] float32: 1 won, 0 lost, NaN where the caption or the negative is absent.
  """
  img = np.asarray(image_emb, np.float32)
  pos = np.einsum("bd,bcd->bc", img, np.asarray(caption_emb, np.float32))
  neg = np.einsum("bd,bkd->bk", img, np.asarray(negative_emb, np.float32))
  win = (neg[:, None, :] < pos[:, :, None]).astype(np.float32)
  valid = (np.asarray(caption_valid)[:, :, None] > 0) & (np.asarray(negative_valid)[:, None, :] > 0)
  return np.where(valid, win, np.nan)


def hard_negative_sums(image_emb, caption_emb, caption_valid, negative_emb, negative_valid,
                       negative_kind: np.ndarray | None = None,
                       kind_names: Sequence[str] = ()) -> dict:
  """(sum, count) pairs of the module's metrics for one batch (or the whole split).

  negative_kind: optional [B, K] int index into ``kind_names`` (-1 or absent: no kind).
  """
  wins = pair_wins(image_emb, caption_emb, caption_valid, negative_emb, negative_valid)
  trial = ~np.isnan(wins)
  won = np.where(trial, wins, 0.0)
  out = {"hard_negative_acc": (float(won.sum()), float(trial.sum()))}
  # A negative is beaten outright when every true caption of its image outscores it.
  neg_valid = (np.asarray(negative_valid) > 0) & trial.any(axis=1)
  beaten = np.all(np.where(trial, wins > 0, True), axis=1) & neg_valid
  out["hard_negative_all_acc"] = (float(beaten.sum()), float(neg_valid.sum()))
  if negative_kind is not None:
    kinds = np.asarray(negative_kind)
    for i, name in enumerate(kind_names):
      sel = trial & (kinds[:, None, :] == i)
      out[f"hard_negative_acc/{name}"] = (float(won[sel].sum()), float(sel.sum()))
  return out
