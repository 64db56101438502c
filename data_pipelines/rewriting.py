"""Text rewriting for CMCL: paraphrase positives and hard negatives.

UNIMO's positives X+ are paraphrases of a caption; its hard negatives X- are rewrites that
change the meaning. Three sources of negatives, from most to least exact:

- ``scene_graph_rewrites``: synthetic_scenes captions are parsed back into their claim and one
  object, attribute or relation is replaced; a rewrite is kept only if it is false for the
  scene (exact, via the scene graph).
- ``lexicon_rewrites``: real captions have one word or phrase of a known class (colour, size,
  number, object of the same category, shape, spatial relation or direction; ``lexicon.py``)
  replaced by one of another meaning, keeping case, plural and the a/an article in agreement.
- ``tfidf_negatives``: for each image, the TF-IDF-nearest captions of OTHER images (sentence
  level). ``unimo-jax prepare`` computes them once into a JSONL side file keyed by example id
  (``write_tfidf_side_file`` / ``load_tfidf_side_file``).

Positives: ``paraphrase_positives`` takes the other captions of the same image and any
``paraphrases`` supplied with the data (e.g. back-translations).
All sampling takes a ``np.random.Generator`` so the pipeline stays a function of its seed.
"""
import json
import os
import re

import numpy as np
from scipy import sparse

from data_pipelines import lexicon
from data_pipelines.synthetic_scenes import captions as captions_lib
from data_pipelines.synthetic_scenes import scene as scene_lib

# ---------------------------------------------------------------------------------------
# Positives
# ---------------------------------------------------------------------------------------


def paraphrase_positives(captions, index: int, k: int, paraphrases=(), rng=None) -> list:
  """Up to ``k`` texts that say what ``captions[index]`` says: the image's other captions
  and the supplied paraphrases, without duplicates of the anchor or of each other. With
  ``rng`` a random subset (in random order), else the first ``k``."""
  anchor = captions[index]
  seen, pool = {anchor}, []
  for text in list(captions[:index]) + list(captions[index + 1:]) + list(paraphrases):
    if text and text not in seen:
      seen.add(text)
      pool.append(text)
  if rng is not None and len(pool) > 1:
    pool = [pool[i] for i in rng.permutation(len(pool))]
  return pool[:k]


# ---------------------------------------------------------------------------------------
# Exact scene-graph rewrites (synthetic_scenes)
# ---------------------------------------------------------------------------------------


def scene_from_record(record, image_size: int = 64) -> scene_lib.Scene:
  """Rebuilds a Scene from a synthetic_scenes record's ``objects`` arrays."""
  o = record["objects"]
  objects = tuple(
      scene_lib.SceneObject(shape=int(o["shape"][k]), colour=int(o["colour"][k]),
                            size=int(o["size"][k]), row=int(o["row"][k]), col=int(o["col"][k]),
                            center=tuple(float(v) for v in o["center"][k]))
      for k in range(len(o["shape"])))
  return scene_lib.Scene(objects=objects, image_size=image_size, background_seed=0)


def scene_graph_rewrites(caption: str, scene, rng: np.random.Generator, count: int,
                         seen_only: bool = True) -> list:
  """Up to ``count`` false rewrites of a synthetic caption, as (text, kind) pairs.

  ``scene`` is a ``Scene`` or a record with ``objects``. Each rewrite uses the caption's own
  template, so it differs from the caption only where the claim was changed. A caption that
  is not a synthetic template gives [].
  """
  if not isinstance(scene, scene_lib.Scene):
    scene = scene_from_record(scene)
  parsed = captions_lib.parse(caption)
  if parsed is None:
    return []
  claim, template = parsed
  candidates = captions_lib.false_rewrites(claim, scene, seen_only)
  out, texts = [], {caption}
  for k in rng.permutation(len(candidates)):
    kind, c = candidates[k]
    text = captions_lib.render_caption(c, template)
    if text not in texts:
      texts.add(text)
      out.append((text, kind))
      if len(out) == count:
        break
  return out


# ---------------------------------------------------------------------------------------
# Lexicon rewrites (real captions)
# ---------------------------------------------------------------------------------------


def _build_index():
  """surface form -> (class, group, plural)."""
  index = {}
  for cls, groups in lexicon.CLASSES.items():
    for g, forms in enumerate(groups):
      for form in forms:
        index[form] = (cls, g, False)
        plural = lexicon.SINGULAR_TO_PLURAL.get(form)
        if plural and cls in ("object", "shape"):
          index[plural] = (cls, g, True)
  return index


_INDEX = _build_index()
_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(f) for f in sorted(_INDEX, key=len, reverse=True)) + r")\b",
    re.IGNORECASE)
_ARTICLE = re.compile(r"\b(a|an)(\s+)$", re.IGNORECASE)


def _match_case(word: str, like: str) -> str:
  if like.isupper() and len(like) > 1:
    return word.upper()
  if like[:1].isupper():
    return word[:1].upper() + word[1:]
  return word


def _replacement(cls: str, group: int, plural: bool) -> str:
  word = lexicon.CLASSES[cls][group][0]
  return lexicon.SINGULAR_TO_PLURAL.get(word, word + "s") if plural else word


def lexicon_candidates(text: str) -> list:
  """Every single-replacement rewrite of ``text``, as (rewritten text, class) pairs."""
  out = []
  for m in _PATTERN.finditer(text):
    surface = m.group(0)
    cls, group, plural = _INDEX[surface.lower()]
    for other in range(len(lexicon.CLASSES[cls])):
      if other == group or (cls == "object" and
                            lexicon.OBJECT_CATEGORY[other] != lexicon.OBJECT_CATEGORY[group]):
        continue
      new = _match_case(_replacement(cls, other, plural), surface)
      head = text[:m.start()]
      article = _ARTICLE.search(head)
      if article:  # keep "a"/"an" in agreement with the new word
        an = new[0].lower() in "aeiou"
        word = _match_case("an" if an else "a", article.group(1))
        head = head[:article.start()] + word + article.group(2)
      out.append((head + new + text[m.end():], cls))
  return out


def lexicon_rewrites(text: str, rng: np.random.Generator, count: int, classes=None) -> list:
  """Up to ``count`` distinct hard negatives of a real caption, as (text, class) pairs.

  Each replaces one word or phrase of a lexicon class by one of another meaning (see
  ``lexicon.py``); classes are visited round-robin in random order so one caption's
  negatives mix colour, number, object and relation changes. ``classes`` restricts the
  classes used.
  """
  by_class = {}
  for new, cls in lexicon_candidates(text):
    if (classes is None or cls in classes) and new != text:
      by_class.setdefault(cls, []).append(new)
  names = sorted(by_class)
  names = [names[i] for i in rng.permutation(len(names))]
  pools = {c: [by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in names}
  out, seen = [], {text}
  while len(out) < count and any(pools.values()):
    for c in names:
      if pools[c] and len(out) < count:
        new = pools[c].pop()
        if new not in seen:
          seen.add(new)
          out.append((new, c))
  return out


# ---------------------------------------------------------------------------------------
# TF-IDF nearest captions of other images (sentence-level negatives)
# ---------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+")


def tfidf_vectors(texts, vocab=None):
  """L2-normalised TF-IDF rows of ``texts``: raw counts times idf = ln((1+N)/(1+df)) + 1.

  Returns (csr_matrix [N, V] float32, vocab dict word -> column). With ``vocab`` given, words
  outside it are ignored and df/idf still come from ``texts``.
  """
  docs = [_TOKEN.findall(t.lower()) for t in texts]
  if vocab is None:
    vocab = {}
    for doc in docs:
      for w in doc:
        vocab.setdefault(w, len(vocab))
  rows, cols = [], []
  for r, doc in enumerate(docs):
    for w in doc:
      c = vocab.get(w)
      if c is not None:
        rows.append(r)
        cols.append(c)
  counts = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                             shape=(len(docs), len(vocab)), dtype=np.float32)
  counts.sum_duplicates()
  df = np.bincount(counts.indices, minlength=len(vocab))
  idf = np.log((1.0 + len(docs)) / (1.0 + df)) + 1.0
  tfidf = counts @ sparse.diags(idf.astype(np.float32))
  norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1))).ravel()
  norms[norms == 0] = 1.0
  return sparse.csr_matrix(sparse.diags(1.0 / norms.astype(np.float32)) @ tfidf), vocab


def tfidf_negatives(captions_per_image, k: int, accept=None, one_per_image: bool = True,
                    block_elements: int = 1 << 25):
  """For each image, the ``k`` captions of other images nearest to its own captions.

  An image's query is the normalised sum of its captions' TF-IDF vectors; candidates are
  single captions (cosine similarity). Candidates equal to one of the image's own captions
  or to an earlier pick are skipped, as are those ``accept(image, caption_index)`` rejects
  (e.g. a synthetic caption that happens to be true of the image). With ``one_per_image``
  at most one caption is taken from each other image, so the negatives are not paraphrases
  of one another.

  Args:
    captions_per_image: list over images of lists of str.
    k: negatives per image (fewer when not enough candidates qualify).
    block_elements: images x captions similarities held in memory at once.
  Returns:
    (indices, scores): per image, a list of flat caption indices (into the concatenation of
    all images' captions) and the list of their cosine similarities, best first.
  """
  flat = [c for caps in captions_per_image for c in caps]
  owner = np.repeat(np.arange(len(captions_per_image)),
                    [len(caps) for caps in captions_per_image])
  vecs, _ = tfidf_vectors(flat)
  pool = sparse.csr_matrix((np.ones(len(flat), np.float32), (owner, np.arange(len(flat)))),
                           shape=(len(captions_per_image), len(flat)))
  queries = pool @ vecs
  qn = np.sqrt(np.asarray(queries.multiply(queries).sum(axis=1))).ravel()
  qn[qn == 0] = 1.0
  queries = sparse.csr_matrix(sparse.diags(1.0 / qn.astype(np.float32)) @ queries)
  block = max(1, block_elements // max(1, len(flat)))
  # Extra candidates cover the skipped ones; widened below if a row runs out.
  want = min(len(flat), 4 * k + 16)
  indices, scores = [], []
  for start in range(0, len(captions_per_image), block):
    sims = (queries[start:start + block] @ vecs.T).toarray()
    for r in range(sims.shape[0]):
      image = start + r
      row = sims[r]
      own = set(captions_per_image[image])
      top = np.argpartition(-row, want - 1)[:want] if want < len(flat) else np.arange(len(flat))
      order = top[np.lexsort((top, -row[top]))]
      picked, picked_scores, texts, owners = [], [], set(), set()
      for depth in (order, None):
        if depth is None:  # rare: widen to every caption
          if len(picked) >= k or want >= len(flat):
            break
          depth = np.lexsort((np.arange(len(flat)), -row))
        for c in depth:
          c = int(c)
          if len(picked) == k:
            break
          text = flat[c]
          if owner[c] == image or text in own or text in texts or c in picked:
            continue
          if one_per_image and owner[c] in owners:
            continue
          if accept is not None and not accept(image, c):
            continue
          picked.append(c)
          picked_scores.append(float(row[c]))
          texts.add(text)
          owners.add(owner[c])
      indices.append(picked)
      scores.append(picked_scores)
  return indices, scores


def tfidf_side_path(data_dir: str, dataset: str, split: str) -> str:
  """Where ``unimo-jax prepare`` writes the TF-IDF negatives of a dataset split."""
  return os.path.join(data_dir, "side", dataset, f"tfidf_negatives-{split}.jsonl")


def write_tfidf_side_file(path: str, ids, captions_per_image, k: int, accept=None) -> int:
  """Writes one JSON line per image: {"id", "negatives": [str], "scores": [float]}.

  Returns the number of lines. Written to a temporary name and renamed, so a present file is
  always complete.
  """
  indices, scores = tfidf_negatives(captions_per_image, k, accept=accept)
  flat = [c for caps in captions_per_image for c in caps]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for example_id, idx, sc in zip(ids, indices, scores):
      f.write(json.dumps({"id": int(example_id), "negatives": [flat[i] for i in idx],
                          "scores": [round(s, 6) for s in sc]}) + "\n")
  os.replace(tmp, path)
  return len(indices)


def load_tfidf_side_file(path: str) -> dict:
  """{example id: [negative caption, ...]} from a side file; {} if the file is absent."""
  if not os.path.exists(path):
    return {}
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        out[int(rec["id"])] = rec["negatives"]
  return out
