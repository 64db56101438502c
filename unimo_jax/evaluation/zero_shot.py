"""Zero-shot classification from the dual encoder, with prompt ensembles (CLIP's recipe).

When a split's records carry class labels, each class k is described by T prompts, the class
name put into templates ("a photo of a {}.", ...). Every prompt is encoded as a text
(``Unimo.encode_text`` + the CMCL projection, unit norm); a class's embedding is the mean of its
prompts' embeddings, normalised again (Radford et al. 2021, section 3.1.4: averaging in
embedding space, so the ensemble costs one text pass per class at test time). An image is
classified as the class of highest cosine similarity; a tie counts against the model.

Data fields (``data_pipelines.eval_data``): ``label`` [N] int (-1: no label),
``prompt_ids`` [K, T, L] int32, ``prompt_valid`` [K, T] bool; ``meta["class_names"]``.
Reported as (sum, count) pairs: ``zero_shot_acc`` (top-1), ``zero_shot_acc@5`` (top-5, when
there are more than 5 classes) and ``zero_shot_chance`` (1 / K).
"""
from typing import Callable, Mapping

import numpy as np

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.",
                     "a photo of the {}.", "{}")


def embed_prompts(model, params, batch: dict) -> dict:
  """CMCL text embeddings of ``batch["prompt_ids"]`` [B, L]: {"text": [B, d]} (jit-able)."""
  from unimo_jax.model import Unimo  # pylint: disable=import-outside-toplevel
  cls = model.apply({"params": params}, batch["prompt_ids"], method=Unimo.encode_text)["cls"]
  return {"text": model.apply({"params": params}, cls, method=Unimo.cmcl_text)}


def class_embeddings(prompt_emb: np.ndarray, prompt_valid: np.ndarray) -> np.ndarray:
  """[K, T, d] prompt embeddings + [K, T] validity -> [K, d] unit class embeddings (the mean of
  each class's valid prompts, renormalised; a class without prompts gets zeros)."""
  emb = np.asarray(prompt_emb, np.float64)
  w = np.asarray(prompt_valid, np.float64)[..., None]
  mean = (emb * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0)
  norm = np.linalg.norm(mean, axis=-1, keepdims=True)
  return (mean / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def accuracy_sums(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray) -> dict:
  """(sum, count) pairs of top-1 (and top-5) accuracy over the images with a label >= 0.

  An image's rank is the number of OTHER classes scoring at least as high as its own class
  (ties count against the model), so a collapsed encoder scores 0, never 1/K by luck.
  """
  labels = np.asarray(labels, np.int64)
  keep = labels >= 0
  n_cls = class_emb.shape[0]
  out = {"zero_shot_chance": (1.0 / max(n_cls, 1), 1.0)}
  if not keep.any() or n_cls == 0:
    out["zero_shot_acc"] = (0.0, 0.0)
    return out
  scores = np.asarray(image_emb, np.float32)[keep] @ np.asarray(class_emb, np.float32).T
  own = scores[np.arange(len(scores)), labels[keep]]
  above = scores >= own[:, None]
  above[np.arange(len(scores)), labels[keep]] = False
  rank = above.sum(axis=1)
  out["zero_shot_acc"] = (float(np.sum(rank < 1)), float(len(rank)))
  if n_cls > 5:
    out["zero_shot_acc@5"] = (float(np.sum(rank < 5)), float(len(rank)))
  return out


def split_sums(embed_texts: Callable[[np.ndarray], np.ndarray], image_emb: np.ndarray,
               rows: np.ndarray, data: Mapping) -> dict:
  """Zero-shot accuracy of one split.

  Args:
    embed_texts: [M, L] prompt ids -> [M, d] embeddings (the evaluator's sharded text pass).
    image_emb: [I, d] image embeddings of split rows ``rows`` [I].
    data: the split's arrays with ``label``, ``prompt_ids``, ``prompt_valid``.
  """
  ids = np.asarray(data["prompt_ids"])
  k, t, length = ids.shape
  prompt_emb = np.asarray(embed_texts(ids.reshape(k * t, length))).reshape(k, t, -1)
  cls = class_embeddings(prompt_emb, data["prompt_valid"])
  return accuracy_sums(image_emb, np.asarray(data["label"])[np.asarray(rows)], cls)
