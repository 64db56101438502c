"""Zero-shot image-text retrieval: Recall@K from dual-encoder similarities.

Images and captions are encoded separately (``Unimo.encode_image`` / ``encode_text`` and the CMCL
projections, exactly what CMCL trains), every caption of the split is a candidate, and the
similarity is the cosine of the projected features.

Repeated texts. Captions written from templates repeat: "a chest scan showing pneumonia" may be
the caption of 40 images. Identical strings get identical embeddings, so counting each copy as a
separate candidate owned by one image would make every copy but one a "wrong" caption tied with
the right one. The candidate set is therefore deduplicated by string (``text_keys``: equal keys
are equal strings) and each distinct text is owned by the UNION of the images it captions:
  - image->text: a query image is a hit at K when one of the K best distinct texts is one of its
    own captions (each distinct text is one candidate);
  - text->image: each distinct text is one query, and a hit at K when one of the K best images
    is an image it captions.
With all-distinct captions this is the usual COCO/Flickr protocol (one query per caption).

Ties count against the model: a wrong candidate scored *equal* to the best correct one ranks
above it, so a collapsed encoder (all scores equal) gets recall of chance or less, never 1. The
report's figure ranks with the same scores and the same tie rule (``hit_ranks(top=...)``), so
its rank-1 marks agree with R@1. Ranks are computed on the host in row blocks, so the full
[queries, candidates] matrix is never held at once.
"""
from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Batch fields that form the model's ``visual`` input.
VISUAL_KEYS = ("pixels", "region_features", "region_boxes", "region_valid")


def hit_ranks(query_emb: np.ndarray, cand_emb: np.ndarray, hit_query: np.ndarray,
              hit_cand: np.ndarray, block: int = 1024, top: Sequence[int] = (),
              k: int = 5):
  """Rank of each query's best-scored correct candidate.

  Args:
    query_emb: [Q, d] query features; cand_emb: [M, d] candidate features.
    hit_query, hit_cand: [H] int, the (query, candidate) pairs that are correct.
    top: query rows whose ``k`` best candidates to return as well (for figures).
  Returns:
    ranks [Q] int64: the number of wrong candidates scoring at least as high as the query's best
    correct one (0 = retrieved first; M when the query has no correct candidate); with ``top``
    also (order [len(top), k] candidate indices, correct [len(top), k] bool), sorted by score
    with wrong candidates before correct ones on ties (the ranks' rule).
  """
  query_emb, cand_emb = np.asarray(query_emb, np.float32), np.asarray(cand_emb, np.float32)
  hit_query, hit_cand = np.asarray(hit_query, np.int64), np.asarray(hit_cand, np.int64)
  n_q, n_c = query_emb.shape[0], cand_emb.shape[0]
  ranks = np.full((n_q,), n_c, np.int64)
  top = [int(t) for t in top]
  order = np.zeros((len(top), min(k, n_c)), np.int64)
  correct_top = np.zeros(order.shape, bool)
  by_query = np.argsort(hit_query, kind="stable")
  hq, hc = hit_query[by_query], hit_cand[by_query]
  for start in range(0, n_q, block):
    stop = min(start + block, n_q)
    scores = query_emb[start:stop] @ cand_emb.T  # [b, M]
    correct = np.zeros(scores.shape, bool)
    lo, hi = np.searchsorted(hq, [start, stop])
    correct[hq[lo:hi] - start, hc[lo:hi]] = True
    best = np.where(correct, scores, -np.inf).max(axis=1)
    wrong_above = (~correct) & (scores >= best[:, None])
    ranks[start:stop] = np.where(correct.any(axis=1), wrong_above.sum(axis=1), n_c)
    for j, t in enumerate(top):
      if start <= t < stop:
        # lexsort: the last key is the primary one (score, descending), then wrong first.
        o = np.lexsort((correct[t - start], -scores[t - start]))[:order.shape[1]]
        order[j], correct_top[j] = o, correct[t - start, o]
  return (ranks, order, correct_top) if top else ranks


def i2t_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
              block: int = 1024) -> np.ndarray:
  """Rank of the best-scored correct caption of each image (each caption one candidate).

  Args:
    image_emb: [I, d] image features (L2-normalised for cosine similarity).
    text_emb: [T, d] caption features.
    text_image: [T] int, the row of ``image_emb`` each caption belongs to.
  Returns:
    [I] int64 (see ``hit_ranks``); an image with no caption gets rank T.
  """
  text_image = np.asarray(text_image, np.int64)
  return hit_ranks(image_emb, text_emb, text_image, np.arange(len(text_image)), block)


def t2i_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
              block: int = 1024) -> np.ndarray:
  """Rank of each caption's image among all images: [T] int64, the number of other images
  scoring at least as high as the caption's own image."""
  text_image = np.asarray(text_image, np.int64)
  return hit_ranks(text_emb, image_emb, np.arange(len(text_image)), text_image, block)


def dedupe_texts(text_image: np.ndarray, text_keys: np.ndarray | None):
  """Distinct candidates of T texts: (first [M] index of each distinct text among the T,
  owner_text [H] candidate index, owner_image [H] image row) with one (candidate, image) pair
  per distinct (text, image). ``text_keys`` None: every text distinct."""
  text_image = np.asarray(text_image, np.int64)
  if text_keys is None:
    n = len(text_image)
    return np.arange(n), np.arange(n), text_image
  _, first, inverse = np.unique(np.asarray(text_keys), return_index=True, return_inverse=True,
                                axis=0 if np.ndim(text_keys) > 1 else None)
  inverse = inverse.reshape(-1)
  # Candidates in the order of their first occurrence (stable for figures and tests).
  by_first = np.argsort(first, kind="stable")
  rename = np.empty_like(by_first)
  rename[by_first] = np.arange(len(by_first))
  pairs = np.unique(np.stack([rename[inverse], text_image], axis=1), axis=0)
  return first[by_first], pairs[:, 0], pairs[:, 1]


def recall_sums(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, prefix: str = "") -> dict:
  """{f"{prefix}r@{k}": (hits, count)}: the (sum, count) pairs Recall@K is the ratio of."""
  ranks = np.asarray(ranks)
  return {f"{prefix}r@{k}": (float(np.sum(ranks < k)), float(ranks.size)) for k in ks}


def recall_metrics(image_emb, text_emb, text_image, ks: Sequence[int] = DEFAULT_KS,
                   text_keys=None, top: Sequence[int] = ()) -> dict:
  """Recall@K both ways as (sum, count) pairs, plus the ranks for reports.

  Args:
    image_emb: [I, d]; text_emb: [T, d]; text_image: [T] the image row of each text.
    text_keys: [T] (or [T, L]) keys; texts with equal keys are one candidate owned by all their
      images (see the module docstring). None: every text is distinct.
    top: image rows whose 5 best distinct texts to return (figures).
  Returns:
    dict with ``i2t_r@K`` / ``t2i_r@K`` (sum, count) pairs, ``i2t_chance_r@1`` and
    ``t2i_chance_r@1`` (expected R@1 of random scores, as (value, 1) pairs), and under
    ``"ranks"``: ``i2t`` [I], ``t2i`` [M] ranks, ``texts`` [M] (the first of the T texts of each
    distinct candidate) and, with ``top``, ``top5`` [len(top), 5] (indices into ``texts``) and
    ``top5_correct``.
  """
  text_emb = np.asarray(text_emb, np.float32)
  first, own_t, own_i = dedupe_texts(text_image, text_keys)
  cand = text_emb[first]
  n_img, n_cand = np.asarray(image_emb).shape[0], len(first)
  got = hit_ranks(image_emb, cand, own_i, own_t, top=top)
  ri, order, correct = got if top else (got, None, None)
  rt = hit_ranks(cand, image_emb, own_t, own_i)
  out = {}
  out.update(recall_sums(ri, ks, "i2t_"))
  out.update(recall_sums(rt, ks, "t2i_"))
  # Chance R@1: a query hits when its first candidate is one of its c correct ones among all.
  per_image = np.bincount(own_i, minlength=n_img)
  per_text = np.bincount(own_t, minlength=n_cand)
  out["i2t_chance_r@1"] = (float(np.mean(per_image / max(n_cand, 1))) if n_img else 0.0, 1.0)
  out["t2i_chance_r@1"] = (float(np.mean(per_text / max(n_img, 1))) if n_cand else 0.0, 1.0)
  out["ranks"] = {"i2t": ri, "t2i": rt, "texts": first}
  if top:
    out["ranks"].update(top5=order, top5_correct=correct)
  return out


def flatten_captions(caption_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps an [I, C] caption-validity mask to flat caption indices.

  Returns:
    (flat [T, 2] int64 (image row, caption slot) of every valid caption in row-major order,
     text_image [T] int64 = flat[:, 0]).
  """
  flat = np.argwhere(np.asarray(caption_valid) > 0).astype(np.int64)
  return flat, flat[:, 0].copy()


def split_retrieval(image_emb, caption_emb, caption_valid, rows, ks: Sequence[int] = DEFAULT_KS,
                    caption_keys=None, caption_ids=None, queries: int = 8):
  """Retrieval over one split's embeddings: ((sum, count) pairs, artefacts for the report).

  Args:
    image_emb: [I, d]; caption_emb: [I, C, d]; caption_valid: [I, C].
    rows: [I] the split row of each image (``runner.map_rows``'s ``index``).
    caption_keys: [I, C] int, equal for equal caption strings (``eval_data``'s
      ``caption_key``); without it, captions with equal token ids ``caption_ids`` [I, C, L]
      are one candidate; with neither, every caption is distinct.
  Returns:
    (pairs, artefacts) where artefacts = dict(query_rows, caption_rows, caption_slots (the
    split row and slot of each distinct candidate), i2t_ranks, t2i_ranks, top5 (candidate
    indices of the first ``queries`` images, ranked as the metric ranks) and top5_correct).
  """
  flat, owner = flatten_captions(caption_valid)
  text_emb = np.asarray(caption_emb)[flat[:, 0], flat[:, 1]]
  keys = None
  if caption_keys is not None:
    keys = np.asarray(caption_keys)[flat[:, 0], flat[:, 1]]
  elif caption_ids is not None:
    keys = np.asarray(caption_ids)[flat[:, 0], flat[:, 1]]
  rows = np.asarray(rows)
  top = list(range(min(queries, len(rows))))
  rec = recall_metrics(image_emb, text_emb, owner, ks, text_keys=keys, top=top)
  ranks = rec.pop("ranks")
  cand = flat[ranks["texts"]]
  art = dict(query_rows=rows[top], caption_rows=rows[cand[:, 0]], caption_slots=cand[:, 1],
             i2t_ranks=ranks["i2t"], t2i_ranks=ranks["t2i"],
             top5=ranks.get("top5", np.zeros((0, 5), np.int64)),
             top5_correct=ranks.get("top5_correct", np.zeros((0, 5), bool)))
  return rec, art


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

