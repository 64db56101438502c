"""The fine-tuning report: ``report.md`` (a table of every evaluated step and split) and its
figures, PNGs beside it drawn with the pre-training report's helpers (``evaluation.report``):

  training_curves.png   the trainer's log (``metrics.jsonl``): training loss, the task's
                        training metric (accuracy, VQA score, NLL, |error|), gradient norm and
                        the learning rate (the warmup and the decay or the steps of the schedule)
  task_metrics.png      the task's metrics (``TASK_METRICS``) at every evaluated step, one line
                        per split: the evaluations of ``unimo-jax evaluate`` (``results.json``)
                        and the loop's ``train.eval_every`` ones (``eval/<split>/<metric>`` in
                        ``metrics.jsonl``); ``unimo-jax evaluate`` wins where both have a step

Only files that were written are referenced, so every image of report.md exists.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from unimo_jax.evaluation import report as report_lib

# The metrics drawn per task kind (the table lists every numeric metric).
TASK_METRICS = {
    "classification": ("accuracy", "f1", "matthews"),
    "regression": ("pearson", "spearman", "mse"),
    "entailment": ("accuracy",),
    "vqa": ("vqa_accuracy", "vqa_score"),
    "retrieval": ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "dual/i2t_R@1", "dual/t2i_R@1"),
    "captioning": ("bleu4", "cider"),
    "seq2seq": ("rouge1", "rouge2", "rougeL", "bleu4"),
}
# The trainer's fine-tuning metrics (``finetune.run``), as (key, title) like report.CURVES.
TRAIN_CURVES = (("loss", "training loss"), ("accuracy", "training accuracy"),
                ("vqa_score", "training VQA score"), ("nll", "training token NLL"),
                ("abs_error", "training |error|"), ("grad_norm", "gradient norm"),
                ("learning_rate", "learning rate"))
TRAINING_PNG = "training_curves.png"
TASK_PNG = "task_metrics.png"
# Metrics the table leaves out (costs that vary between machines are kept: cross_seconds).
_NOT_IN_TABLE = ("eval_seconds",)


def metric_points(results: Mapping, log_rows: Sequence[Mapping], keys: Sequence[str]
                  ) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """``{metric: {split: [(step, value), ...]}}`` (steps increasing) from results.json's
  evaluations and the loop's ``eval/<split>/<metric>`` log entries."""
  out: dict[str, dict[str, dict[int, float]]] = {k: {} for k in keys}
  for row in log_rows:
    for name, value in row.items():
      if not name.startswith("eval/") or not isinstance(value, (int, float)):
        continue
      split, _, metric = name[len("eval/"):].partition("/")
      if metric in out:
        out[metric].setdefault(split, {})[int(row["step"])] = float(value)
  for e in results.get("evaluations", []):
    for metric in keys:
      value = e.get("metrics", {}).get(metric)
      if isinstance(value, (int, float)):
        out[metric].setdefault(e["split"], {})[int(e["step"])] = float(value)
  return {k: {s: sorted(v.items()) for s, v in by.items()} for k, by in out.items()}


def write_figures(workdir: str, results: Mapping, kind: str) -> dict[str, str]:
  """Draws the figures of the module docstring; returns ``{title: file name}`` of those
  written (nothing to plot: no file)."""
  log = os.path.join(workdir, "metrics.jsonl")
  written = {}
  if report_lib.training_curves(log, os.path.join(workdir, TRAINING_PNG), TRAIN_CURVES):
    written["training curves"] = TRAINING_PNG
  keys = TASK_METRICS.get(kind, ())
  points = metric_points(results, report_lib.read_jsonl(log), keys)
  panels = [(k, points[k]) for k in keys]
  if report_lib.line_panels(os.path.join(workdir, TASK_PNG), panels):
    written[f"{kind} metrics by step"] = TASK_PNG
  return written


def report_text(results: Mapping, figures: Mapping[str, str] | None = None) -> str:
  """A markdown table of every (step, split) evaluation's numeric task metrics, then the
  figures (``{title: file name}`` relative to report.md)."""
  evals = results.get("evaluations", [])
  keys = sorted({k for e in evals for k, v in e["metrics"].items()
                 if isinstance(v, (int, float)) and k not in _NOT_IN_TABLE})
  lines = ["# Fine-tuning results", "", "| step | split | " + " | ".join(keys) + " |",
           "|---|---|" + "---|" * len(keys)]
  for e in evals:
    vals = [e["metrics"].get(k) for k in keys]
    lines.append(f"| {e['step']} | {e['split']} | " + " | ".join(
        "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in vals)
        + " |")
  cost = [e for e in evals if "cross_pairs" in e["metrics"]]
  if cost:
    e = cost[-1]["metrics"]
    how = ("every (image, caption) pair" if e.get("rerank_k") == 0
           else f"each query's dual-encoder top {e.get('rerank_k')}")
    lines += ["", f"Retrieval: the cross-encoder scored {how}: {e['cross_pairs']} pairs in "
                  f"{e.get('cross_seconds', float('nan')):.1f} s (every pair would be "
                  f"{e.get('full_cross_pairs')})."]
  for title, name in (figures or {}).items():
    lines += ["", f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({name})"]
  return "\n".join(lines) + "\n"


def write_report(workdir: str, results: Mapping, kind: str, figures: bool = True) -> str:
  """Writes the figures (unless ``figures`` is False) and ``report.md``; returns its path."""
  figs = write_figures(workdir, results, kind) if figures else {}
  path = os.path.join(workdir, report_lib.REPORT)
  with open(path, "w") as f:
    f.write(report_text(results, figs))
  return path
