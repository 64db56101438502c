"""Zero-shot image-text retrieval: Recall@K from dual-encoder similarities.

Images and captions are encoded separately (``Unimo.encode_image`` / ``encode_text`` and the CMCL
projections, exactly what CMCL trains), every caption of the split is a candidate, and the
similarity is the cosine of the projected features.

Ranks are computed on the host in row blocks, so the full [images, captions] matrix is never
held at once. Ties count against the model: a wrong candidate scored *equal* to the best correct
one ranks above it, so a collapsed encoder (all scores equal) gets recall of chance or less,
never 1.
"""
from typing import Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Batch fields that form the model's ``visual`` input.
VISUAL_KEYS = ("pixels", "region_features", "region_boxes", "region_valid")


def i2t_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
              block: int = 1024) -> np.ndarray:
  """Rank of the best-scored correct caption of each image.

  Args:
    image_emb: [I, d] image features (L2-normalised for cosine similarity).
    text_emb: [T, d] caption features.
    text_image: [T] int, the row of ``image_emb`` each caption belongs to.
  Returns:
    [I] int64: the number of wrong captions scoring at least as high as the image's best correct
    caption (0 = retrieved first). An image with no caption gets rank T.
  """
  image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
  text_image = np.asarray(text_image)
  n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
  ranks = np.full((n_img,), n_txt, np.int64)
  for start in range(0, n_img, block):
    rows = np.arange(start, min(start + block, n_img))
    scores = image_emb[rows] @ text_emb.T  # [b, T]
    correct = text_image[None, :] == rows[:, None]
    best = np.where(correct, scores, -np.inf).max(axis=1)
    wrong_above = (~correct) & (scores >= best[:, None])
    has = correct.any(axis=1)
    ranks[rows] = np.where(has, wrong_above.sum(axis=1), n_txt)
  return ranks


def t2i_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
              block: int = 1024) -> np.ndarray:
  """Rank of each caption's image among all images.

  Returns:
    [T] int64: the number of other images scoring at least as high as the caption's own image.
  """
  image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
  text_image = np.asarray(text_image)
  n_txt = text_emb.shape[0]
  ranks = np.zeros((n_txt,), np.int64)
  for start in range(0, n_txt, block):
    rows = np.arange(start, min(start + block, n_txt))
    scores = text_emb[rows] @ image_emb.T  # [b, I]
    own = text_image[rows]
    mine = scores[np.arange(len(rows)), own]
    above = scores >= mine[:, None]
    above[np.arange(len(rows)), own] = False
    ranks[rows] = above.sum(axis=1)
  return ranks


def recall_sums(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, prefix: str = "") -> dict:
  """{f"{prefix}r@{k}": (hits, count)}: the (sum, count) pairs Recall@K is the ratio of."""
  ranks = np.asarray(ranks)
  return {f"{prefix}r@{k}": (float(np.sum(ranks < k)), float(ranks.size)) for k in ks}


def recall_metrics(image_emb, text_emb, text_image, ks: Sequence[int] = DEFAULT_KS) -> dict:
  """Recall@K both ways as (sum, count) pairs, plus the ranks for reports.

  Returns:
    dict with ``i2t_r@K`` / ``t2i_r@K`` (sum, count) pairs, ``i2t_chance_r@1`` and
    ``t2i_chance_r@1`` (expected R@1 of random scores, as (value, 1) pairs), and the arrays
    ``i2t_ranks`` [I] and ``t2i_ranks`` [T] under the key ``"ranks"``.
  """
  text_image = np.asarray(text_image)
  ri = i2t_ranks(image_emb, text_emb, text_image)
  rt = t2i_ranks(image_emb, text_emb, text_image)
  out = {}
  out.update(recall_sums(ri, ks, "i2t_"))
  out.update(recall_sums(rt, ks, "t2i_"))
  n_img, n_txt = len(ri), len(rt)
  # Chance R@1: i2t hits if any of an image's c captions comes first among T -> mean c / T.
  per_image = np.bincount(text_image, minlength=n_img)
  out["i2t_chance_r@1"] = (float(np.mean(per_image / max(n_txt, 1))), 1.0)
  out["t2i_chance_r@1"] = (1.0 / max(n_img, 1), 1.0)
  out["ranks"] = {"i2t": ri, "t2i": rt}
  return out


def top_captions(image_emb, text_emb, rows: Iterable[int], k: int = 5) -> np.ndarray:
  """Indices of the k best captions for the given image rows: [len(rows), k] (for reports)."""
  rows = np.asarray(list(rows))
  scores = np.asarray(image_emb, np.float32)[rows] @ np.asarray(text_emb, np.float32).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def flatten_captions(caption_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps an [I, C] caption-validity mask to flat caption indices.

  Returns:
    (flat [T, 2] int64 (image row, caption slot) of every valid caption in row-major order,
     text_image [T] int64 = flat[:, 0]).
  """
  flat = np.argwhere(np.asarray(caption_valid) > 0).astype(np.int64)
  return flat, flat[:, 0].copy()


# ---------------------------------------------------------------------------------------------
# The embedding pass (device side)
# ---------------------------------------------------------------------------------------------

def _apply(model, params, *args, method):
  return model.apply({"params": params}, *args, method=method)


def embed_batch(model, params, batch: dict) -> dict:
  """CMCL embeddings of one eval batch (jit-able; rows are independent).

  Args:
    model: a ``Unimo`` module.
    params: its parameter tree (without the ``"params"`` wrapper).
    batch: the visual fields (``pixels`` or ``region_*``), ``caption_ids`` [B, C, L] and,
      optionally, ``negative_ids`` [B, K, L].
  Returns:
    dict(image [B, d], caption [B, C, d], and negative [B, K, d] when negatives are given),
    float32, unit L2 norm.
  """
  from unimo_jax.model import Unimo  # pylint: disable=import-outside-toplevel
  visual = {k: batch[k] for k in VISUAL_KEYS if k in batch}
  img = _apply(model, params, visual, method=Unimo.encode_image)["img"]
  out = {"image": _apply(model, params, img, method=Unimo.cmcl_image)}

  def texts(ids):  # [B, C, L] -> [B, C, d]
    b, c, length = ids.shape
    cls = _apply(model, params, ids.reshape(b * c, length), method=Unimo.encode_text)["cls"]
    return _apply(model, params, cls, method=Unimo.cmcl_text).reshape(b, c, -1)

  out["caption"] = texts(batch["caption_ids"])
  if "negative_ids" in batch and batch["negative_ids"].shape[1] > 0:
    out["negative"] = texts(batch["negative_ids"])
  return out

