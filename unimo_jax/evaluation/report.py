"""The evaluation report: ``results.json``, ``report.md`` and PNG figures in a workdir.

Figures (matplotlib, Agg backend, written only by process 0):
  training_curves.png     losses and CMCL accuracy from ``metrics.jsonl`` (the trainer's log);
                          ``line_panels`` draws other panels the same way (the fine-tuning
                          report's, ``unimo_jax.finetune.report``)
  retrieval_<split>.png   query images with their top-5 captions, correct ones marked
  captions_<split>.png    generated captions under their images, with one reference

``results.json`` holds every evaluation run so far (one entry per checkpoint step and split;
a new run of the same step and split replaces the old entry), so the report can set the
trained model beside the untrained one.
"""
import json
import math
import os
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np

RESULTS = "results.json"
REPORT = "report.md"

# (metric key, label, format) rows of the report's main table, in order.
TABLE = (
    ("i2t_r@1", "image->text R@1", "{:.3f}"),
    ("i2t_r@5", "image->text R@5", "{:.3f}"),
    ("i2t_r@10", "image->text R@10", "{:.3f}"),
    ("t2i_r@1", "text->image R@1", "{:.3f}"),
    ("t2i_r@5", "text->image R@5", "{:.3f}"),
    ("t2i_r@10", "text->image R@10", "{:.3f}"),
    ("hard_negative_acc", "hard-negative accuracy", "{:.3f}"),
    ("hard_negative_all_acc", "negatives below all captions", "{:.3f}"),
    ("zero_shot_acc", "zero-shot class accuracy", "{:.3f}"),
    ("zero_shot_acc@5", "zero-shot class top-5", "{:.3f}"),
    ("bleu4", "BLEU-4", "{:.3f}"),
    ("cider", "CIDEr", "{:.3f}"),
    ("mlm_accuracy", "MLM accuracy", "{:.3f}"),
    ("mlm_perplexity", "MLM perplexity", "{:.2f}"),
    ("s2s_perplexity", "infilling perplexity", "{:.2f}"),
    ("caption_perplexity", "caption perplexity", "{:.2f}"),
)


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


# ---------------------------------------------------------------------------------------------
# results.json
# ---------------------------------------------------------------------------------------------

def load_results(workdir: str) -> dict:
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return {"evaluations": []}
  with open(path) as f:
    return json.load(f)


def add_result(workdir: str, step: int, split: str, result: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> dict:
  """Adds (or replaces) the entry of (step, split) in ``results.json``; returns the file's
  content. ``result`` is ``Evaluator.run``'s output (its artefacts are not stored)."""
  data = load_results(workdir)
  entry = dict(step=int(step), split=split, metrics=_jsonable(result["metrics"]),
               pairs=_jsonable({k: list(v) for k, v in result["pairs"].items()}))
  entry.update(_jsonable(dict(extra or {})))
  data["evaluations"] = [e for e in data["evaluations"]
                         if not (e["step"] == entry["step"] and e["split"] == split)] + [entry]
  data["evaluations"].sort(key=lambda e: (e["split"], e["step"]))
  with open(os.path.join(workdir, RESULTS), "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  return data


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def results_table(evaluations: Sequence[Mapping], rows=TABLE, chance: bool = True) -> str:
  """A markdown table: one row per metric, one column per (split, step); ``chance`` adds the
  R@1 of random scores."""
  cols = [(e["split"], e["step"]) for e in evaluations]
  by = {(e["split"], e["step"]): e["metrics"] for e in evaluations}
  head = "| metric | " + " | ".join(f"{s} @ step {t}" for s, t in cols) + " |"
  lines = [head, "|---" * (len(cols) + 1) + "|"]
  for key, label, fmt in rows:
    vals = [by[c].get(key) for c in cols]
    if all(v is None for v in vals):
      continue
    cells = [fmt.format(v) if isinstance(v, (int, float)) else "-" for v in vals]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  for key, label in (("i2t_chance_r@1", "chance R@1 (image->text)"),
                     ("t2i_chance_r@1", "chance R@1 (text->image)"),
                     ("zero_shot_chance", "chance zero-shot accuracy")):
    values = [by[c].get(key) for c in cols]
    if chance and any(v is not None for v in values):
      lines.append(f"| {label} | " + " | ".join(
          f"{v:.4f}" if v is not None else "-" for v in values) + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

CURVES = (("loss", "total loss"), ("pair_cmcl/loss_i2t", "CMCL loss (i2t)"),
          ("pair_cmcl/accuracy_i2t", "CMCL in-batch accuracy (i2t)"),
          ("text_mlm/loss", "text MLM loss"), ("text_s2s/loss", "text infilling loss"),
          ("pair_caption/loss", "captioning loss"), ("image_mrp/loss", "region prediction loss"),
          ("learning_rate", "learning rate"))


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSONL log (``metrics.jsonl``); [] when the file does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def training_curves(metrics_jsonl: str, out_png: str, curves=CURVES) -> bool:
  """Plots the trainer's logged metrics (the keys of ``curves`` that exist) and ``eval/*``
  retrieval metrics if present. Returns False when there is nothing to plot."""
  rows = read_jsonl(metrics_jsonl)
  if not rows:
    return False
  keys = [(k, t) for k, t in curves if any(r.get(k) is not None for r in rows)]
  evals = sorted({k for r in rows for k in r if k.startswith("eval/") and "r@1" in k})
  if evals:
    keys.append((evals, "eval R@1"))
  def lines(ks):
    short = [k.split("/")[-1] for k in ks]
    labels = short if len(set(short)) == len(short) else list(ks)  # keep every line
    return {label: [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            for label, k in zip(labels, ks)}
  panels = [(title, lines(key if isinstance(key, list) else [key])) for key, title in keys]
  return line_panels(out_png, panels, legend={t for key, t in keys if isinstance(key, list)})


def line_panels(out_png: str, panels: Sequence[tuple[str, Mapping[str, Sequence]]],
                xlabel: str = "step", ncol: int = 3, legend=None) -> bool:
  """One panel per ``(title, {line label: [(x, y), ...]})``, ``ncol`` panels a row, each with
  a legend (``legend``: only the panels whose titles it holds). Returns False when no panel has
  a point."""
  panels = [(t, {k: v for k, v in lines.items() if v}) for t, lines in panels]
  panels = [(t, lines) for t, lines in panels if lines]
  if not panels:
    return False
  plt = _plt()
  nrow = -(-len(panels) // ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.8 * nrow), squeeze=False)
  for ax, (title, lines) in zip(axes.flat, panels):
    for label, pts in lines.items():
      pts = sorted(pts)
      ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if legend is None or title in legend:
      ax.legend(fontsize=6)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out_png, dpi=90)
  plt.close(fig)
  return True


def _show_image(ax, pixels, mean, std):
  img = np.asarray(pixels, np.float32) * np.asarray(std) + np.asarray(mean)
  ax.imshow(np.clip(img, 0.0, 1.0))
  ax.set_xticks([])
  ax.set_yticks([])


def retrieval_grid(out_png: str, pixels, rows, top5, caption_rows, caption_slots, captions,
                   mean=(0.5,) * 3, std=(0.5,) * 3, correct=None) -> bool:
  """Each query image with its five best captions; correct captions are marked ``[v]``.

  Args:
    pixels: [N, S, S, 3] normalised pixels of the split (None: text only).
    rows: the query images (rows of the split).
    top5: [len(rows), 5] indices of their best candidates among all M candidates, in the
      metric's order (``retrieval.hit_ranks``: ties rank wrong candidates first).
    caption_rows, caption_slots: [M] the split row and caption slot of each candidate.
    captions: the split's caption strings, ``captions[row][slot]``.
    correct: [len(rows), 5] bool, whether each shown candidate is a caption of the query
      (a deduplicated text counts for every image it captions); default: its row is the query.
  """
  if not len(rows):
    return False
  plt = _plt()
  n = len(rows)
  fig, axes = plt.subplots(n, 2, figsize=(10, 1.9 * n), squeeze=False,
                           gridspec_kw=dict(width_ratios=[1, 3.6]))
  for q, ((ax_img, ax_txt), row, best) in enumerate(zip(axes, rows, top5)):
    if pixels is not None:
      _show_image(ax_img, pixels[row], mean, std)
    else:
      ax_img.axis("off")
    ax_txt.axis("off")
    for j, t in enumerate(best):
      r, slot = int(caption_rows[t]), int(caption_slots[t])
      ok = bool(correct[q][j]) if correct is not None else r == row
      text = textwrap.shorten(captions[r][slot], 90)
      ax_txt.text(0.0, 0.9 - 0.2 * j, f"{'[v]' if ok else '[ ]'} {j + 1}. {text}",
                  fontsize=8, color="green" if ok else "black", transform=ax_txt.transAxes,
                  va="top", family="monospace")
  fig.tight_layout()
  fig.savefig(out_png, dpi=90)
  plt.close(fig)
  return True


def caption_grid(out_png: str, pixels, generated: Sequence[Mapping], mean=(0.5,) * 3,
                 std=(0.5,) * 3, columns: int = 4) -> bool:
  """Images with their generated caption (bold) and the first reference under each."""
  if not generated:
    return False
  plt = _plt()
  n = len(generated)
  nrow = -(-n // columns)
  fig, axes = plt.subplots(nrow, columns, figsize=(3.2 * columns, 4.0 * nrow), squeeze=False)
  for ax, g in zip(axes.flat, generated):
    if pixels is not None:
      _show_image(ax, pixels[g["index"]], mean, std)
    else:
      ax.axis("off")
    # At most two lines each, so the text never runs into the next row.
    gen = textwrap.fill(textwrap.shorten(g["text"] or "(empty)", 76), 38)
    ref = textwrap.fill(textwrap.shorten(g["references"][0] if g["references"] else "-", 70), 38)
    ax.set_title(gen, fontsize=7.5, fontweight="bold")
    ax.set_xlabel(f"ref: {ref}", fontsize=6.5)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out_png, dpi=90)
  plt.close(fig)
  return True


def split_figures(workdir: str, split: str, result: Mapping, data: Mapping, meta: Mapping,
                  mean=(0.5,) * 3, std=(0.5,) * 3, examples: int = 6) -> dict:
  """Writes the retrieval and caption figures of one split; returns {name: file name}."""
  out = {}
  pixels = data.get("pixels")
  art = result.get("artefacts", {})
  safe = split.replace("/", "_").replace(":", "_")
  if "retrieval" in art:
    ret = art["retrieval"]
    rows = [int(r) for r in ret["query_rows"][:examples]]
    name = f"retrieval_{safe}.png"
    correct = ret.get("top5_correct")
    if retrieval_grid(os.path.join(workdir, name), pixels, rows, ret["top5"][:len(rows)],
                      ret["caption_rows"], ret["caption_slots"], meta["captions"], mean, std,
                      correct=None if correct is None else correct[:len(rows)]):
      out["retrieval"] = name
  if art.get("captions"):
    name = f"captions_{safe}.png"
    if caption_grid(os.path.join(workdir, name), pixels, art["captions"][:8], mean, std):
      out["captions"] = name
  return out


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------

def write_report(workdir: str, results: Mapping, figures: Mapping[str, Mapping[str, str]],
                 captions: Mapping[str, Sequence[Mapping]] | None = None,
                 notes: Sequence[str] = ()) -> str:
  """Writes ``report.md`` (the table of every evaluation, figures, caption examples)."""
  lines = ["# Evaluation report", "", f"Workdir: `{os.path.abspath(workdir)}`", ""]
  lines += list(notes) + ([""] if notes else [])
  evals = results.get("evaluations", [])
  if evals:
    lines += ["## Results", "", results_table(evals), ""]
    lines += ["Recall@K: a query is a hit when a correct item is among its K best-scored "
              "candidates (ties count against the model; every caption of the split is a "
              "candidate; identical caption strings are one candidate, a hit for every image "
              "they caption). Zero-shot class accuracy (records with labels): an image is "
              "assigned the class whose prompt-ensemble embedding (the class name in "
              "evaluation.zero_shot.templates, averaged) is most similar. Hard-negative "
              "accuracy: share of (true caption, rewritten negative) pairs where the negative "
              "scores lower for the image.", ""]
    kinds = sorted({k for e in evals for k in e["metrics"] if k.startswith("hard_negative_acc/")})
    if kinds:
      lines += ["### Hard-negative accuracy by rewrite kind", "",
                results_table(evals, [(k, k.split("/", 1)[1], "{:.3f}") for k in kinds],
                              chance=False), ""]
  if os.path.exists(os.path.join(workdir, "training_curves.png")):
    lines += ["## Training curves", "", "![training curves](training_curves.png)", ""]
  for split, figs in figures.items():
    lines += [f"## {split}", ""]
    for kind, name in figs.items():
      lines += [f"![{kind}]({name})", ""]
    for g in (captions or {}).get(split, [])[:8]:
      refs = "; ".join(g["references"][:2])
      lines.append(f"- image {g['image_id']}: **{g['text']}** (CIDEr {g['cider']:.2f}; "
                   f"references: {refs})")
    lines.append("")
  path = os.path.join(workdir, REPORT)
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  return path
