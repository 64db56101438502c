"""The fine-tuning report: report.md's figures exist (PNG files beside it), the task-metric
curve holds exactly the evaluated steps, and the table records the retrieval cost."""
import json
import os
import re

from unimo_jax.finetune import report as ft_report

PNG = b"\x89PNG\r\n\x1a\n"


def _workdir(tmp_path, evaluations, log_rows, name="wd"):
  wd = tmp_path / name
  wd.mkdir()
  with open(wd / "metrics.jsonl", "w") as f:
    for row in log_rows:
      f.write(json.dumps(row) + "\n")
  results = {"evaluations": evaluations}
  (wd / "results.json").write_text(json.dumps(results))
  return str(wd), results


def _images(report_path):
  text = open(report_path).read()
  return text, re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def _train_log():
  rows = [dict(step=s, loss=2.0 / s, accuracy=0.1 * s, grad_norm=1.0, learning_rate=1e-3 * s)
          for s in range(1, 7)]
  rows[2]["eval/validation/accuracy"] = 0.5  # the loop's train.eval_every evaluations
  rows[5]["eval/validation/accuracy"] = 0.6
  rows[5]["eval/test/accuracy"] = 0.55
  return rows


def test_report_references_figures_that_exist(tmp_path):
  evals = [dict(step=6, split="validation", metrics=dict(accuracy=0.75, f1=0.7, count=8)),
           dict(step=0, split="validation", metrics=dict(accuracy=0.5, f1=0.4, count=8))]
  wd, results = _workdir(tmp_path, evals, _train_log())
  path = ft_report.write_report(wd, results, "classification")
  text, images = _images(path)
  assert images == ["training_curves.png", "task_metrics.png"], text
  for name in images:
    with open(os.path.join(wd, name), "rb") as f:
      assert f.read(8) == PNG, name
  assert "| 6 | validation | 0.7500 | 8 | 0.7000 |" in text


def test_task_metric_points_are_the_evaluated_steps():
  evals = [dict(step=6, split="validation", metrics=dict(accuracy=0.75)),
           dict(step=0, split="validation", metrics=dict(accuracy=0.5))]
  pts = ft_report.metric_points({"evaluations": evals}, _train_log(), ("accuracy", "f1"))
  # step 6 of `unimo-jax evaluate` replaces the loop's value at the same step
  assert pts["accuracy"] == {"validation": [(0, 0.5), (3, 0.5), (6, 0.75)],
                             "test": [(6, 0.55)]}
  assert pts["f1"] == {}


def test_no_figures_and_nothing_to_plot(tmp_path):
  wd, results = _workdir(tmp_path, [dict(step=2, split="validation",
                                         metrics=dict(rouge1=0.3))], [])
  os.remove(os.path.join(wd, "metrics.jsonl"))
  _, images = _images(ft_report.write_report(wd, results, "seq2seq"))
  assert images == ["task_metrics.png"] and os.path.exists(os.path.join(wd, images[0]))
  _, images = _images(ft_report.write_report(wd, results, "seq2seq", figures=False))
  assert images == []
  wd2, results2 = _workdir(tmp_path, [], [], name="empty")
  _, images = _images(ft_report.write_report(wd2, results2, "vqa"))
  assert images == [] and not os.path.exists(os.path.join(wd2, "task_metrics.png"))


def test_retrieval_cost_is_in_the_report(tmp_path):
  m = {"i2t_R@1": 0.2, "t2i_R@1": 0.1, "rerank_k": 0, "cross_pairs": 40, "cross_seconds": 1.25,
       "full_cross_pairs": 40}
  wd, results = _workdir(tmp_path, [dict(step=4, split="validation", metrics=m)], _train_log())
  text, images = _images(ft_report.write_report(wd, results, "retrieval"))
  assert "scored every (image, caption) pair: 40 pairs in 1.2 s" in text
  assert "cross_seconds" in text and "task_metrics.png" in images
