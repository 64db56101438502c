"""`unimo-jax evaluate` on fine-tuned runs: task metrics in results.json, computed on the
8-device mesh and checked against a one-device numpy computation from the restored params."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_fixtures import WhitespaceTokenizer
from test_finetune_run import TOK, finetune_and_evaluate, tiny_config, write_task
from unimo_jax.finetune import main as ft_main
from unimo_jax.finetune import metrics, tasks
from unimo_jax.train import checkpoint as ckpt_lib


def _scenes_config(tmp_path, kind, steps=2, **task):
  c = tiny_config(tmp_path, steps=steps)
  c.task.update(dict(kind=kind, **task))
  c.data.source = "synthetic_scenes"
  c.data.train = ""
  c.data.max_length = 16
  c.data.scenes.update(dict(size="tiny", image_size=64, input_size=16, train_limit=8,
                            eval_limit=8))
  c.data.num_negative_images = 2
  c.data.num_negative_texts = 2
  c.model.max_positions = 40
  c.evaluation.splits = ["validation"]
  c.evaluation.max_length = 6
  c.evaluation.rerank_k = 3
  return c


@pytest.mark.slow
def test_classification_metrics_match_a_one_device_computation(tmp_path):
  cfg = tiny_config(tmp_path, steps=2)
  val = tmp_path / "val"
  val.mkdir()
  cfg.data.validation = write_task(val, n=13, seed=1)
  wd = str(tmp_path / "wd")
  ft_main.finetune_from_config(cfg, wd, tokenizer=TOK)
  from unimo_jax.evaluation import main as eval_main
  config, model_cfg = eval_main.load_run(wd)
  results = ft_main.evaluate_workdir(wd, config=config, model_cfg=model_cfg, tokenizer=TOK)
  entry = results["evaluations"][-1]
  assert entry["split"] == "validation" and entry["step"] == 2
  got = entry["metrics"]
  # reference: the restored params on one device, all 13 rows at once
  from data_pipelines.finetune import text
  rows, _ = text.classification_rows(cfg.data.validation, TOK, max_length=12)
  params, _ = ckpt_lib.restore_params(wd)
  task = tasks.Task(model_cfg, tasks.TaskSpec.from_config(cfg.task))
  logits = np.asarray(task.outputs(params, {"ids": jnp.asarray(rows["ids"])}))
  pred = logits.argmax(-1)
  assert got["count"] == 13
  assert got["accuracy"] == pytest.approx(metrics.accuracy(pred, rows["label"]))
  assert got["f1"] == pytest.approx(metrics.f1(pred, rows["label"]))
  assert got["matthews"] == pytest.approx(metrics.matthews(pred, rows["label"]))
  on_disk = json.load(open(os.path.join(wd, "results.json")))
  assert on_disk["evaluations"][-1]["metrics"]["accuracy"] == got["accuracy"]
  report = open(results["report_path"]).read()
  assert "| 2 | validation |" in report
  # the figures: the training log and the task metric by step, files beside report.md
  import re
  images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
  assert images == ["training_curves.png", "task_metrics.png"], report
  assert all(os.path.getsize(os.path.join(wd, name)) > 0 for name in images)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vqa", "entailment", "retrieval", "captioning"])
def test_scene_tasks_train_and_evaluate(tmp_path, kind):
  tok = WhitespaceTokenizer(words=_scene_words())
  cfg = _scenes_config(tmp_path, kind)
  cfg.model.vocab_size = tok.vocab_size
  if kind == "vqa":
    from data_pipelines.finetune import answer_vocabulary
    cfg.task.num_labels = len(answer_vocabulary(cfg))
  if kind == "captioning":
    cfg.task.label_smoothing = 0.1
  if kind == "entailment":
    cfg.task.num_labels = 3  # SNLI-VE's entailment, neutral, contradiction
  wd = str(tmp_path / kind)
  res, entry = finetune_and_evaluate(cfg, wd, tokenizer=tok)
  assert np.isfinite(res.last_metrics["loss"])
  m = entry["metrics"]
  want = {"vqa": ("vqa_accuracy", "vqa_score"), "entailment": ("accuracy",),
          "retrieval": ("i2t_R@1", "t2i_R@10", "dual/i2t_R@1"),
          "captioning": ("bleu4", "cider")}[kind]
  for key in want:
    assert 0.0 <= m[key] <= (10.0 if key == "cider" else 1.0), (key, m)
  if kind == "retrieval":
    assert m["cross_pairs"] == (m["images"] + m["texts"]) * 3


def _scene_words():
  from data_pipelines.synthetic_scenes import generate
  o = generate.SceneOptions(size="tiny")
  words = set()
  for split in ("train", "validation"):
    for i in range(8):
      _, f = generate.language_fields(o, split, i)
      for t in f["captions"] + f["hard_negatives"] + f["qa"]["question"]:
        words.update(t.split())
  return sorted(words)


@pytest.mark.slow
def test_seq2seq_trains_and_reports_rouge(tmp_path):
  r = np.random.default_rng(0)
  from data_fixtures import WORDS
  lines = ["source\ttarget"]
  for _ in range(16):
    src = " ".join(r.choice(WORDS, 5))
    lines.append(f"{src}\t{' '.join(src.split()[:2])}")
  (tmp_path / "s.tsv").write_text("\n".join(lines) + "\n")
  cfg = tiny_config(tmp_path, steps=2)
  cfg.task.update(dict(kind="seq2seq", label_smoothing=0.1))
  cfg.data.train = cfg.data.validation = str(tmp_path / "s.tsv")
  cfg.data.max_source, cfg.data.max_target = 8, 6
  cfg.evaluation.update(dict(beam_size=2, max_length=4, min_length=1, block_trigrams=True))
  wd = str(tmp_path / "wd")
  m = finetune_and_evaluate(cfg, wd)[1]["metrics"]
  assert m["count"] == 16 and 0.0 <= m["rouge1"] <= 1.0 and 0.0 <= m["bleu4"] <= 1.0
