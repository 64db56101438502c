"""A sweep's trials in one table and one plot (``unimo-jax sweep --workdir ROOT --summary``).

Reads ``ROOT/sweep.json`` (the trials, their overrides and workdirs) and, per trial, its exit
status (``ROOT/status/trial_<i>.json``), the last training row of ``metrics.jsonl``, the last
in-training evaluation (``eval/*`` rows) and ``results.json`` (``unimo-jax evaluate``: the
latest step of every split, as ``SPLIT/KEY``). Writes:

  ROOT/summary.md    one row per trial: index, status, the swept values, step, the main
                     losses and evaluation metrics
  ROOT/summary.csv   the same rows with every metric found
  ROOT/summary.png   the sweep's metric against the swept values; failed and unfinished trials
                     are marked on the x axis

A trial's status: ``done`` (``, evaluate failed (exit N)`` if its evaluation failed);
``failed (exit N: what N means)``; ``stopped at step s/T`` (exit 0
before the last step, e.g. a signal); ``unfinished (step s/T)`` (no exit status: running, or
killed); ``not started``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping, Sequence

from unimo_jax import commands

# results.json metrics shown in the Markdown table (all of them go to the CSV)
MAIN_RESULTS = ("i2t_r@1", "t2i_r@1", "hard_negative_acc", "bleu4", "cider", "mlm_accuracy")
EXIT_MEANINGS = {commands.USAGE: "bad usage or config", commands.NONFINITE: "non-finite guard",
                 commands.ERROR: "error", commands.INTERRUPTED: "interrupted"}


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed run
          pass
  except OSError:
    pass
  return rows


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def trial_row(trial: Mapping, root: str) -> dict:
  """Everything the summary knows about one trial (see the module docstring)."""
  workdir = trial["workdir"]
  row: dict[str, Any] = {"trial": trial["index"], "name": trial.get("name", "")}
  status = _read_json(os.path.join(root, "status", f"trial_{trial['index']}.json")) or {}
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
  config = _read_json(os.path.join(workdir, "config.json")) or {}
  total = (config.get("train") or {}).get("total_steps")
  step = train_rows[-1]["step"] if train_rows else None
  metrics: dict[str, float] = {}
  if train_rows:
    metrics.update({k: v for k, v in train_rows[-1].items()
                    if k not in ("step", "time") and _number(v)})
  if eval_rows:
    metrics.update({k: v for k, v in eval_rows[-1].items() if k.startswith("eval/") and _number(v)})
  results = _read_json(os.path.join(workdir, "results.json")) or {}
  latest: dict[str, Mapping] = {}
  for e in results.get("evaluations", []):
    if e.get("split") and (e["split"] not in latest or e["step"] >= latest[e["split"]]["step"]):
      latest[e["split"]] = e
  for split, e in sorted(latest.items()):
    metrics.update({f"{split}/{k}": v for k, v in (e.get("metrics") or {}).items() if _number(v)})

  code = status.get("exit_code")
  of = f"/{total}" if total else ""
  if code is not None and code != 0:
    meaning = EXIT_MEANINGS.get(code)
    row["status"] = f"failed (exit {code}{': ' + meaning if meaning else ''})"
  elif code == 0:
    done = step is not None and (total is None or step >= total)
    row["status"] = "done" if done else f"stopped at step {step}{of}"
    if status.get("evaluate_exit_code"):
      row["status"] += f", evaluate failed (exit {status['evaluate_exit_code']})"
  elif not os.path.isdir(workdir):
    row["status"] = "not started"
  elif total is not None and step is not None and step >= total:
    row["status"] = "done"
  else:
    row["status"] = f"unfinished (step {step if step is not None else 0}{of})"
  row["step"] = step
  row["overrides"] = dict(trial.get("overrides") or {})
  row["metrics"] = metrics
  return row


def gather(root: str) -> tuple[dict, list[dict]]:
  """``(manifest, rows)`` of the sweep in ``root``."""
  manifest = _read_json(os.path.join(root, "sweep.json"))
  if not manifest:
    raise commands.UsageError(f"{os.path.join(root, 'sweep.json')} does not exist or is not "
                              f"JSON (run the sweep, or give --sweep)")
  return manifest, [trial_row(t, root) for t in manifest["trials"]]


def _swept_keys(rows: Sequence[Mapping]) -> list[str]:
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r["overrides"] if k not in keys]
  return keys


def _fmt(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}" if math.isfinite(v) else str(v)
  return str(v)


def _main_metrics(rows: Sequence[Mapping], metric: str) -> list[str]:
  found = {k for r in rows for k in r["metrics"]}
  keys = [metric] if metric in found else []
  keys += [k for k in sorted(found, key=lambda k: (k != "loss", k))
           if k not in keys and (k == "loss" or k.split("/")[-1].startswith("loss"))]
  keys += sorted(k for k in found if k not in keys and "/" in k and k.split("/")[-1] in
                 MAIN_RESULTS)
  return keys


def table(rows: Sequence[Mapping], columns: Sequence[str], swept: Sequence[str]) -> list[list]:
  out = []
  for r in rows:
    out.append([r["trial"], r["status"]] + [r["overrides"].get(k) for k in swept] +
               [r["step"]] + [r["metrics"].get(k) for k in columns])
  return out


def markdown(rows: Sequence[Mapping], metric: str, title: str = "") -> str:
  swept = _swept_keys(rows)
  cols = _main_metrics(rows, metric)
  head = ["trial", "status"] + swept + ["step"] + cols
  lines = [f"# {title}", ""] if title else []
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for values in table(rows, cols, swept):
    lines.append("| " + " | ".join(_fmt(v) for v in values) + " |")
  bad = [r for r in rows if r["status"] != "done"]
  if bad:
    lines += ["", "not done: " + "; ".join(f"trial {r['trial']} {r['status']}" for r in bad)]
  return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[Mapping]) -> None:
  swept = _swept_keys(rows)
  cols = sorted({k for r in rows for k in r["metrics"]}, key=lambda k: (k != "loss", k))
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["trial", "status"] + swept + ["step"] + cols + ["name"])
    for r, values in zip(rows, table(rows, cols, swept)):
      w.writerow(["" if v is None else v for v in values] + [r["name"]])


def _axis(rows: Sequence[Mapping]) -> tuple[str | None, list[str]]:
  """The x-axis key (the first swept key taking several values, held by every trial) and the
  keys that split the points into series."""
  swept = _swept_keys(rows)
  if not swept or any(set(r["overrides"]) != set(swept) for r in rows):
    return None, []
  varying = [k for k in swept if len({json.dumps(r["overrides"][k], default=str)
                                      for r in rows}) > 1]
  if not varying:
    return None, []
  return varying[0], varying[1:]


def plot(path: str, rows: Sequence[Mapping], metric: str, title: str = "") -> None:
  """``metric`` against the swept value (one line per combination of the other swept keys);
  trials with no value of the metric are marked at the bottom with their status."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  x_key, series_keys = _axis(rows)
  if x_key is None:  # free-form trials (an ablation): one position per trial
    xs = {r["trial"]: float(i) for i, r in enumerate(rows)}
    ticks = [(float(i), f"{r['trial']}: " + (",".join(f"{k.split('.')[-1]}={v}" for k, v in
                                                     r["overrides"].items()) or "base"))
             for i, r in enumerate(rows)]
    x_label = "trial"
  else:
    values = [r["overrides"][x_key] for r in rows]
    numeric = all(_number(v) for v in values)
    if numeric:
      xs = {r["trial"]: float(r["overrides"][x_key]) for r in rows}
      ticks = None
    else:
      order = list(dict.fromkeys(json.dumps(v, default=str) for v in values))
      xs = {r["trial"]: float(order.index(json.dumps(r["overrides"][x_key], default=str)))
            for r in rows}
      ticks = [(float(i), str(json.loads(v))) for i, v in enumerate(order)]
    x_label = x_key
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  groups: dict[str, list[Mapping]] = {}
  for r in rows:
    label = ", ".join(f"{k.split('.')[-1]}={r['overrides'][k]}" for k in series_keys)
    groups.setdefault(label, []).append(r)
  for label, members in groups.items():
    pts = sorted((xs[r["trial"]], r["metrics"][metric]) for r in members
                 if _number(r["metrics"].get(metric)) and math.isfinite(r["metrics"][metric]))
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if x_key else "o",
              label=label or None)
  missing: dict[float, list[str]] = {}  # x -> labels of the trials with no value there
  for r in rows:
    if not _number(r["metrics"].get(metric)):
      missing.setdefault(xs[r["trial"]], []).append(f"trial {r['trial']}: {r['status']}")
  for x, labels in missing.items():
    ax.axvline(x, color="tab:red", ls=":", lw=1)
    ax.annotate("\n".join(labels), (x, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                fontsize=7, color="tab:red", ha="right", va="bottom")
  if x_key and ticks is None:
    positive = [v for v in xs.values() if v > 0]
    if len(positive) == len(xs) and max(positive) / min(positive) >= 20:
      ax.set_xscale("log")
  if ticks is not None:
    ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=20 if x_key else 30,
                  ha="right", fontsize=7)
  ax.set_xlabel(x_label)
  ax.set_ylabel(metric)
  ax.set_title(title or f"{metric} by trial", fontsize=9)
  if any(groups) and len(groups) > 1:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize(root: str, metric: str | None = None) -> dict[str, str]:
  """Writes ``summary.md``, ``summary.csv`` and ``summary.png`` into ``root``; returns their
  paths by kind."""
  manifest, rows = gather(root)
  metric = metric or manifest.get("metric") or "loss"
  name = os.path.splitext(os.path.basename(manifest.get("sweep", "sweep")))[0]
  title = f"sweep {name}: {manifest.get('command', 'train')} {manifest.get('config', '')}"
  if not any(_number(r["metrics"].get(metric)) for r in rows) and any(
      _number(r["metrics"].get("loss")) for r in rows):
    # e.g. a results.json metric before any trial was evaluated
    title += f" (no trial has {metric} yet: plotting loss)"
    metric = "loss"
  paths = {"markdown": os.path.join(root, "summary.md"), "csv": os.path.join(root, "summary.csv"),
           "plot": os.path.join(root, "summary.png")}
  with open(paths["markdown"], "w") as f:
    f.write(markdown(rows, metric, title))
  write_csv(paths["csv"], rows)
  plot(paths["plot"], rows, metric, f"{name}: {metric}")
  return paths
