"""Fine-tuning tasks on synthetic_scenes (no download): VQA, visual entailment, retrieval and
captioning, read by index from ``synthetic_scenes.generate`` (the records the TFDS builder
stores, field for field) so the scenes are exactly those a pre-training run saw or held out.

- vqa: one row per (scene, question) of the scene's QA pairs; the answer vocabulary is every
  answer of the TRAIN split's first ``limit`` scenes, sorted (or the config's ``answers``); each
  question has one exact answer, so its soft score is 1 (``min(#annotators / 3, 1)`` with every
  annotator agreeing); an answer outside the vocabulary is a row scoring 0 (as VQA's).
- entailment (SNLI-VE built from captions vs rewrites): three rows per scene with SNLI-VE's
  three labels in SNLI-VE's order (``ENTAILMENT_LABELS``): 0 entailment, a true caption;
  1 neutral, a true caption plus a clause on the material of the shapes (``neutral_clause``);
  2 contradiction, a scene-graph rewrite that is false of the image, with the same kind of
  material clause on half of the contradictions (picked by the rng). The renderer paints flat,
  untextured fills, so the image neither shows nor excludes any material: the clause cannot be
  decided from the image, while the caption part can. Because contradictions carry the clause
  too, the clause alone does not give the label away (with it: neutral or contradiction;
  without: entailment or contradiction; the image decides). The caption, rewrite, material
  and clause choice come from an rng of (data seed, split, scene index), so each row is a pure
  function of them.
- retrieval: one row per (scene, caption); each batch draws N other scenes' images and M other
  scenes' captions as negatives from an rng of (seed, batch index): among every other scene,
  or among each positive's pool of hard negatives (``data.hard_negatives``).
- captioning: one row per (scene, caption) in ``masking.captioning_layout``.

Pixels are resized (bilinear, antialiased) and normalised ``(x / 255 - mean) / std`` exactly
as the pre-training pipeline does; regions are padded to ``num_regions`` with 5-d boxes.
Scenes with no usable text for the task (no QA pair, no false rewrite) are skipped and counted.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from data_pipelines.synthetic_scenes import generate
from unimo_jax import masking
from unimo_jax.finetune import layouts

TASKS = ("vqa", "entailment", "retrieval", "captioning")
ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")  # SNLI-VE's order
# Materials: nothing in a rendered scene shows or rules out any of them (flat colour fills).
MATERIALS = ("wood", "metal", "paper", "plastic", "stone", "clay", "wax", "felt")


def _pixels(images: Sequence[np.ndarray], size: int, mean, std) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out = []
  for lo in range(0, len(images), 256):
    x = tf.constant(np.stack(images[lo:lo + 256]).astype(np.float32))
    x = tf.image.resize(x, [size, size], method="bilinear", antialias=True).numpy()
    out.append((x / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  return np.concatenate(out).astype(np.float32)


def _regions(record: Mapping, num_regions: int, image_size: int) -> dict:
  reg = record["regions"]
  boxes = np.asarray(reg["boxes"], np.float32)[:num_regions] / float(image_size)
  feats = np.asarray(reg["features"], np.float32)[:num_regions]
  n = len(boxes)
  out_boxes = np.zeros((num_regions, 5), np.float32)
  out_boxes[:n, :4] = boxes
  out_boxes[:n, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  out_feats = np.zeros((num_regions, feats.shape[1]), np.float32)
  out_feats[:n] = feats
  valid = np.zeros(num_regions, bool)
  valid[:n] = True
  return dict(region_features=out_feats, region_boxes=out_boxes, region_valid=valid)


class Scenes:
  """The first ``limit`` scenes of a split: images (model input) and their language fields."""

  def __init__(self, split: str, *, size: str = "demo", image_size: int = 64, seed: int = 0,
               limit: int = 0, visual_input: str = "patches", input_size: int | None = None,
               num_regions: int = 4, feature_dim: int = 64, pixel_mean=(0.5,) * 3,
               pixel_std=(0.5,) * 3):
    self.options = generate.SceneOptions(kind="pairs", size=size, image_size=image_size,
                                         feature_dim=feature_dim, seed=seed)
    self.split = split
    total = self.options.num_examples(split)
    self.count = min(total, limit) if limit else total
    records = [generate.example(self.options, split, i) for i in range(self.count)]
    self.ids = np.array([int(r["image_id"]) for r in records], np.int64)
    self.captions = [list(r["captions"]) for r in records]
    self.negatives = [list(r["hard_negatives"]) for r in records]
    self.qa = [list(zip(r["qa"]["question"], r["qa"]["answer"])) for r in records]
    if visual_input == "regions":
      regs = [_regions(r, num_regions, image_size) for r in records]
      self.visual = {k: np.stack([g[k] for g in regs]) for k in regs[0]}
    else:
      self.visual = {"pixels": _pixels([r["image"] for r in records], input_size or image_size,
                                       pixel_mean, pixel_std)}

  def gather(self, index: np.ndarray, prefix: str = "") -> dict:
    return {prefix + k: v[index] for k, v in self.visual.items()}


def _text(tokenizer, text: str, length: int) -> np.ndarray:
  return layouts.pair_text(tokenizer.encode(text), None, length, cls_id=tokenizer.cls_id,
                           sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id)


def answer_vocabulary(train: Scenes) -> list[str]:
  return sorted({x for qa in train.qa for _, a in qa
                 for x in ([a] if isinstance(a, str) else a)})


def vqa_rows(scenes: Scenes, tokenizer, answers: Sequence[str], max_length: int):
  """-> (rows dict(image_index, ids, answer_scores), dropped, meta dict(gold: each row's
  annotators' answers)). ``scenes.qa`` holds (question, answer) with one agreed answer (as
  three or more annotators giving it) or (question, [each annotator's answer])."""
  vocab = {a: i for i, a in enumerate(answers)}
  image_index, ids, scores, gold = [], [], [], []
  dropped = Counter()
  for i, qa in enumerate(scenes.qa):
    if not qa:
      dropped["no_question"] += 1
    for q, a in qa:
      given = [a] * 3 if isinstance(a, str) else list(a)
      image_index.append(i)
      ids.append(_text(tokenizer, q, max_length))
      scores.append(layouts.vqa_soft_scores(given, vocab))
      gold.append(given)
  rows = dict(image_index=np.asarray(image_index, np.int32), ids=np.asarray(ids, np.int32),
              answer_scores=np.asarray(scores, np.float32).reshape(-1, len(vocab)))
  return rows, dict(dropped), dict(gold=gold)


def neutral_clause(sentence: str, material: str) -> str:
  """``"a red circle above a blue star."`` -> ``"a red circle above a blue star, and every
  shape is made of wood."``: the sentence's claim plus one the image cannot decide."""
  return f"{sentence.rstrip().rstrip('.')}, and every shape is made of {material}."


def entailment_texts(scenes: Scenes) -> tuple[list[tuple[int, str, int]], dict]:
  """-> ([(scene index, hypothesis, label)], dropped): per scene label 0 entailment (a true
  caption), 1 neutral (a true caption + ``neutral_clause``), 2 contradiction (a false
  scene-graph rewrite, half of them with a ``neutral_clause``); SNLI-VE's label order.
  Scenes without a false rewrite are skipped and counted (``no_false_rewrite``)."""
  out, dropped = [], Counter()
  stream = generate.STREAMS.get(scenes.split, 0)
  for i in range(scenes.count):
    caps, negs = scenes.captions[i], scenes.negatives[i]
    if not negs:
      dropped["no_false_rewrite"] += 1
      continue
    rng = np.random.default_rng([scenes.options.seed, 4099, stream, i])
    true_a, true_b = rng.choice(len(caps), 2, replace=len(caps) < 2)
    false = negs[int(rng.integers(len(negs)))]
    material = MATERIALS[int(rng.integers(len(MATERIALS)))]
    if rng.random() < 0.5:
      false = neutral_clause(false, MATERIALS[int(rng.integers(len(MATERIALS)))])
    out += [(i, caps[true_a], 0), (i, neutral_clause(caps[true_b], material), 1), (i, false, 2)]
  return out, dict(dropped)


def entailment_rows(scenes: Scenes, tokenizer, max_length: int):
  """-> (rows dict(image_index, ids, label), dropped) of ``entailment_texts``."""
  texts, dropped = entailment_texts(scenes)
  return (dict(image_index=np.asarray([i for i, _, _ in texts], np.int32),
               ids=np.asarray([_text(tokenizer, t, max_length) for _, t, _ in texts],
                              np.int32).reshape(-1, max_length),
               label=np.asarray([y for _, _, y in texts], np.int32)), dropped)


def caption_table(scenes: Scenes, tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (ids [count, C, L] int32, valid [count, C] bool): every caption of every scene."""
  c = max(len(x) for x in scenes.captions)
  ids = np.full((scenes.count, c, max_length), tokenizer.pad_id, np.int32)
  valid = np.zeros((scenes.count, c), bool)
  for i, caps in enumerate(scenes.captions):
    for j, text in enumerate(caps):
      ids[i, j] = _text(tokenizer, text, max_length)
      valid[i, j] = True
  return ids, valid


def retrieval_rows(scenes: Scenes, tokenizer, max_length: int, *, num_negative_images: int,
                   num_negative_texts: int, hard_pools=None):
  """-> (rows dict(image_index, ids), extra): ``extra`` draws each batch's negatives (other
  scenes only) for ``RowBatches``: uniformly among every other scene, or, with ``hard_pools``,
  uniformly among each positive's pool of hard negatives.

  ``hard_pools(visual, ids, image_index) -> dict(images [R, K], texts [S, K])`` is called once
  with the scenes' visual input, the R rows' ids and scenes: ``images[r]`` are the K scenes
  whose images are the hardest negatives for row r's caption, ``texts[s]`` the K rows whose
  captions are the hardest for scene s's image (``unimo_jax.finetune.hard_negatives``); a pool
  never holds the positive's own scene (checked), and -1 marks a slot with no candidate."""
  table, valid = caption_table(scenes, tokenizer, max_length)
  img, cap = np.nonzero(valid)
  rows = dict(image_index=img.astype(np.int32), ids=table[img, cap])
  n = scenes.count
  if n < 2:
    raise ValueError("retrieval fine-tuning needs at least 2 scenes")
  pools = None
  if hard_pools is not None:
    pools = hard_pools(scenes.visual, rows["ids"], rows["image_index"])
    pools = {k: np.asarray(pools[k]) for k in ("images", "texts")}
    if pools["images"].shape[0] != len(img) or pools["texts"].shape[0] != n:
      raise ValueError(f"hard negative pools: expected [{len(img)}, K] and [{n}, K], got "
                       f"{pools['images'].shape} and {pools['texts'].shape}")
    if (np.any(pools["images"] == img[:, None])
        or np.any(np.where(pools["texts"] >= 0, img[pools["texts"]], -1)
                  == np.arange(n)[:, None])):
      raise ValueError("hard negative pools hold a positive's own scene")

  def others(rng, own, k):
    # k scenes != own, uniformly (with replacement across rows, without within a row if possible)
    shift = rng.integers(1, n, size=(len(own), k))
    return (own[:, None] + shift) % n

  def from_pool(rng, pool, k, fallback):
    # k entries of each row's pool, uniformly; a slot landing on -1 takes the fallback's
    pick = (rng.random((len(pool), k)) * pool.shape[1]).astype(np.int64)
    got = np.take_along_axis(pool, pick, axis=1)
    return np.where(got >= 0, got, fallback)

  def extra(batch, picked, rng):
    own = batch["image_index"].astype(np.int64)
    neg_img = others(rng, own, num_negative_images)
    neg_cap_scene = others(rng, own, num_negative_texts)
    counts = valid.sum(1)[neg_cap_scene]
    neg_cap = (rng.random(neg_cap_scene.shape) * counts).astype(np.int64)
    neg_ids = table[neg_cap_scene, neg_cap]
    if pools is not None:
      neg_img = from_pool(rng, pools["images"][picked], num_negative_images, neg_img)
      rows_hard = from_pool(rng, pools["texts"][own], num_negative_texts, -1)
      neg_ids = np.where((rows_hard >= 0)[..., None], rows["ids"][np.maximum(rows_hard, 0)],
                         neg_ids)
    out = scenes.gather(neg_img, "neg_")
    out.update(scenes.gather(own))
    out["neg_ids"] = neg_ids
    out["neg_image_valid"] = np.ones(neg_img.shape, bool)
    out["neg_text_valid"] = np.ones(neg_cap_scene.shape, bool)
    return out
  return rows, extra


def captioning_rows(scenes: Scenes, tokenizer, max_length: int):
  """-> rows of ``masking.captioning_layout`` (ids, position_ids, positions, targets, weights)
  plus image_index, one per (scene, caption)."""
  return captioning_id_rows([(i, tokenizer.encode(text)) for i, caps in
                             enumerate(scenes.captions) for text in caps], tokenizer, max_length)


def captioning_id_rows(captions, tokenizer, max_length: int):
  """``[(image index, caption token ids)]`` -> the rows of ``captioning_rows``."""
  out: dict[str, list] = {}
  for i, ids in captions:
    lay = masking.captioning_layout(ids, max_length=max_length, max_predictions=max_length,
                                    bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id,
                                    pad_id=tokenizer.pad_id)
    lay["ids"] = lay.pop("input_ids")
    lay.pop("segments")
    lay["image_index"] = np.int32(i)
    for k, v in lay.items():
      out.setdefault(k, []).append(v)
  return {k: np.stack(v) for k, v in out.items()}


def with_images(scenes: Scenes):
  """``RowBatches.extra`` that adds each row's visual input from its image_index."""
  def extra(batch, picked, rng):
    del picked, rng
    return scenes.gather(batch["image_index"].astype(np.int64))
  return extra
