"""Hard negatives for retrieval fine-tuning, mined with the starting checkpoint's dual encoder.

UNIMO's recipe draws each positive's negative images and captions uniformly among the other
images and captions (``data.hard_negatives = 0``). Uniform negatives are easy: once the
cross-encoder separates unrelated scenes, they stop teaching it the fine distinctions that
decide the top of a ranking. With ``data.hard_negatives = K`` the negatives of a positive
(image s, caption t) are drawn uniformly among

- images: the K other images whose CMCL embeddings score highest against caption t,
- captions: the K captions of other images that score highest against image s,

as ALBEF / UNITER mine theirs from the contrastive similarities. The pools are built once,
before the first step, with the CMCL towers of the parameters the run starts from
(``init_from``, or the fresh initialisation of ``config.seed``), by the sharded
``neighbours.top_k`` (the full similarity matrix never exists), and written to
``WORKDIR/hard_negatives.npz``; a resumed run reads that file back, so it draws the same
batches as the straight run wherever it resumes.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unimo_jax import neighbours
from unimo_jax.model import Unimo

FILE = "hard_negatives.npz"


def embed(model: Unimo, model_params, visual: Mapping[str, np.ndarray], ids: np.ndarray,
          batch_size: int = 64, mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """CMCL embeddings (unit norm) of every image [S, P] and every caption [R, P], each encoded
  alone, batches sharded over ``mesh`` (default: every device)."""
  mesh = neighbours.default_mesh() if mesh is None else mesh
  params = jax.device_put(model_params, NamedSharding(mesh, P()))
  apply = lambda p, *a, method: model.apply({"params": p}, *a, method=method)

  @jax.jit
  def images(p, b):
    return apply(p, apply(p, dict(b), method=Unimo.encode_image)["img"], method=Unimo.cmcl_image)

  @jax.jit
  def texts(p, b):
    return apply(p, apply(p, b["ids"], method=Unimo.encode_text)["cls"], method=Unimo.cmcl_text)
  img = neighbours.embed_all(images, params, dict(visual), batch_size, mesh)
  txt = neighbours.embed_all(texts, params, {"ids": np.asarray(ids)}, batch_size, mesh)
  return img.astype(np.float32), txt.astype(np.float32)


def mine(image_emb: np.ndarray, text_emb: np.ndarray, text_scene: np.ndarray, k: int,
         mesh=None) -> dict[str, np.ndarray]:
  """Pools of the K hardest negatives: ``images`` [R, K] scene indices per caption row (never
  its own scene), ``texts`` [S, K] caption rows per image (never one of its own captions);
  best first, -1 where fewer than K candidates exist."""
  text_scene = np.asarray(text_scene, np.int64)
  s = len(image_emb)
  _, images = neighbours.top_k(text_emb, image_emb, k, exclude=text_scene[:, None], mesh=mesh)
  own = [np.nonzero(text_scene == i)[0] for i in range(s)]
  width = max(1, max((len(o) for o in own), default=1))
  exclude = np.full((s, width), -1, np.int64)
  for i, o in enumerate(own):
    exclude[i, :len(o)] = o
  _, texts = neighbours.top_k(image_emb, text_emb, k, exclude=exclude, mesh=mesh)
  return {"images": images.astype(np.int32), "texts": texts.astype(np.int32)}


def pool_builder(model: Unimo, model_params, k: int, workdir: str | None = None, mesh=None):
  """``make_data``'s ``hard_pools`` callable: mines the pools with ``model_params`` (or reads
  ``workdir/hard_negatives.npz`` when it exists and fits the rows) and writes them there."""
  path = os.path.join(os.path.expanduser(workdir), FILE) if workdir else None

  def build(visual, ids, image_index):
    n_rows, n_scenes = len(ids), len(next(iter(visual.values())))
    if path and os.path.isfile(path):
      with np.load(path, allow_pickle=False) as f:
        pools = {name: np.asarray(f[name]) for name in ("images", "texts")}
      want = {"images": (n_rows, k), "texts": (n_scenes, k)}
      if all(pools[n].shape == want[n] for n in want):
        logging.info("hard negatives: read the pools of %d captions and %d images from %s",
                     n_rows, n_scenes, path)
        return pools
      raise ValueError(f"{path} holds pools {pools['images'].shape} / {pools['texts'].shape}, "
                       f"this run needs {want['images']} / {want['texts']} (data.hard_negatives "
                       f"or the training data changed; remove the file to mine them again)")
    t0 = time.time()
    img, txt = embed(model, model_params, visual, ids, mesh=mesh)
    pools = mine(img, txt, image_index, k, mesh=mesh)
    logging.info("hard negatives: mined the %d hardest of %d images and %d captions in %.1f s",
                 k, n_scenes, n_rows, time.time() - t0)
    if path and jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + ".tmp.npz"
      np.savez(tmp, **pools)
      os.replace(tmp, path)
    return pools
  return build
