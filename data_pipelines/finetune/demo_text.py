"""Tiny generated text tasks on synthetic_scenes language (the demo's text fine-tuning data).

  python -m data_pipelines.finetune.demo_text --out ~/.cache/unimo_jax/synthetic_scenes/finetune

writes, for the splits train / validation / test of the pair scenes (``size`` scenes each):

- ``paraphrase_<split>.tsv`` (classification, ``text_a, text_b, label``, MRPC-like): a caption
  and another caption of the SAME scene (label 1: a paraphrase) or one of its scene-graph
  rewrites, which is false of the scene (label 0), half and half;
- ``canonical_<split>.tsv`` (seq2seq, ``source, target``): any template caption of a scene ->
  its first template's caption (a learnable rewrite to one canonical phrasing).

Both are pure functions of the scenes (``synthetic_scenes.generate.language_fields``: no
rendering, no TensorFlow), so the files are identical wherever they are built.
"""
from __future__ import annotations

import argparse
import os
import sys

from data_pipelines.synthetic_scenes import generate

SIZES = {"train": 2000, "validation": 200, "test": 200}


def _clean(text: str) -> str:
  return " ".join(text.replace("\t", " ").split())


def write_tasks(out_dir: str, *, size: str = "demo", image_size: int = 64, seed: int = 0,
                counts: dict | None = None) -> dict[str, str]:
  """Writes both tasks' TSVs for every split; returns {file stem: path}."""
  out_dir = os.path.expanduser(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  options = generate.SceneOptions(kind="pairs", size=size, image_size=image_size, seed=seed)
  counts = dict(counts or SIZES)
  paths = {}
  for split, n in counts.items():
    n = min(n, options.num_examples(split))
    para, canon = ["text_a\ttext_b\tlabel"], ["source\ttarget"]
    for i in range(n):
      _, f = generate.language_fields(options, split, i)
      caps, negs = [_clean(c) for c in f["captions"]], [_clean(c) for c in f["hard_negatives"]]
      a = caps[i % len(caps)]
      if i % 2 and negs:
        para.append(f"{a}\t{negs[i % len(negs)]}\t0")
      else:
        para.append(f"{a}\t{caps[(i + 1) % len(caps)]}\t1")
      canon.append(f"{caps[(i % (len(caps) - 1)) + 1] if len(caps) > 1 else a}\t{caps[0]}")
    for stem, lines in (("paraphrase", para), ("canonical", canon)):
      path = os.path.join(out_dir, f"{stem}_{split}.tsv")
      with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
      paths[f"{stem}_{split}"] = path
  return paths


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--size", default="demo", help="synthetic_scenes size preset")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name, path in write_tasks(args.out, size=args.size, seed=args.seed).items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
