"""Every fine-tuning config loads and validates at every size; the demo text tasks; the
`unimo-jax finetune` and `unimo-jax evaluate` commands end to end on smoke configs."""
import importlib
import json
import os

import numpy as np
import pytest

from data_pipelines.finetune import demo_text
from unimo_jax.finetune import config as config_lib

TASKS = ("sst2", "cola", "mnli", "stsb", "cnndm", "gigaword", "squad_qg", "snli_ve", "vqa",
         "flickr30k", "coco_caption")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arg", [None, "smoke", "base", "large"])
def test_config_validates(task, arg):
  c = importlib.import_module(f"experiments.configs.finetune.{task}").get_config(arg)
  # the official batches (12, 4, 2 on some tasks) are checked on one device
  config_lib.validate(c, num_devices=1 if arg in ("base", "large") else 8, check_files=False)
  if arg in ("base", "large"):
    assert c.optimizer.b2 == 0.98 and c.optimizer.eps == 1e-6
    assert c.optimizer.warmup_steps == int(0.06 * c.train.total_steps)


@pytest.mark.parametrize("arg, batch", [("base", 4), ("large", 2)])
def test_flickr30k_drops_the_learning_rate_at_epochs_24_and_32(arg, batch):
  """The official recipe: 40 epochs of 145,000 pairs, warmup 6%, x0.1 after epochs 24 and 32."""
  from unimo_jax.train import optimizer as opt_lib
  c = importlib.import_module("experiments.configs.finetune.flickr30k").get_config(arg)
  epoch = 145000 // batch
  assert c.train.total_steps == 40 * epoch and c.optimizer.schedule == "step"
  _, sched = opt_lib.make_optimizer(c.optimizer, c.train.total_steps)
  lr = 5e-6
  for step, want in ((c.optimizer.warmup_steps, lr), (24 * epoch - 1, lr), (24 * epoch, lr / 10),
                     (32 * epoch - 1, lr / 10), (32 * epoch, lr / 100),
                     (40 * epoch - 1, lr / 100)):
    assert float(sched(step)) == pytest.approx(want, rel=1e-5), step
  assert float(sched(c.optimizer.warmup_steps // 2)) == pytest.approx(lr / 2, rel=1e-3)


def test_step_schedule_errors_before_anything_compiles():
  c = importlib.import_module("experiments.configs.finetune.flickr30k").get_config("smoke")
  c.optimizer.schedule = "step"
  with pytest.raises(config_lib.ConfigError, match="optimizer.step_boundaries is empty"):
    config_lib.validate(c, num_devices=8, check_files=False)
  c.optimizer.step_boundaries = (0.5,)
  c.optimizer.step_factor = 1.5
  with pytest.raises(config_lib.ConfigError, match="optimizer.step_factor must be a number"):
    config_lib.validate(c, num_devices=8, check_files=False)


def test_sweeps_are_the_official_grid():
  from unimo_jax.train import sweep
  for task in ("sst2", "cola", "mnli", "stsb"):
    s = sweep.load(f"experiments/sweeps/finetune_{task}.py")
    assert s.command == "finetune" and len(s.trials) == 2 * 3 * 5
    assert {(t["data.batch_size"], t["optimizer.learning_rate"]) for t in s.trials} == {
        (b, lr) for b in (16, 32) for lr in (1e-5, 2e-5, 3e-5)}


def test_demo_text_tasks(tmp_path):
  paths = demo_text.write_tasks(str(tmp_path), size="tiny", counts=dict(train=10, validation=4))
  lines = open(paths["paraphrase_train"]).read().splitlines()
  assert lines[0] == "text_a\ttext_b\tlabel" and len(lines) == 11
  labels = [int(line.split("\t")[2]) for line in lines[1:]]
  assert set(labels) == {0, 1}
  canon = open(paths["canonical_validation"]).read().splitlines()
  assert canon[0] == "source\ttarget" and len(canon) == 5
  again = demo_text.write_tasks(str(tmp_path / "b"), size="tiny", counts=dict(train=10))
  assert open(again["paraphrase_train"]).read() == "\n".join(lines) + "\n"


def _demo_dir(tmp_path):
  """A demo data dir for the smoke configs: the generated text tasks and a tokenizer."""
  from data_pipelines import tokenizers
  from data_pipelines.synthetic_scenes import generate
  d = tmp_path / "data"
  demo_text.write_tasks(str(d / "finetune"), size="tiny",
                        counts=dict(train=24, validation=8, test=8))
  o = generate.SceneOptions(size="tiny")
  sentences = []
  for split in ("train", "validation"):
    for i in range(16):
      _, f = generate.language_fields(o, split, i)
      sentences += f["captions"] + f["hard_negatives"] + f["qa"]["question"]
  os.makedirs(d / "tokenizer")
  tokenizers.train_sentencepiece(sentences * 4, str(d / "tokenizer" / "spm_pairs_tiny"), 120,
                                 model_type="bpe", fit_vocab=True)
  return str(d)


@pytest.mark.slow
def test_finetune_and_evaluate_commands_on_smoke_configs(tmp_path, capsys):
  from unimo_jax import cli
  data = _demo_dir(tmp_path)
  for task, metric in (("sst2", "accuracy"), ("vqa", "vqa_accuracy")):
    wd = str(tmp_path / task)
    cfg = f"experiments/configs/finetune/{task}.py:smoke,data_dir={data}"
    assert cli.main(["unimo-jax", "finetune", "--config", cfg, "--workdir", wd]) == 0
    out = capsys.readouterr().out
    assert "trained steps 0 -> 2" in out
    assert cli.main(["unimo-jax", "evaluate", "--workdir", wd]) == 0
    out = capsys.readouterr().out
    assert metric in out and "| 2 | validation |" in out
    res = json.load(open(os.path.join(wd, "results.json")))
    assert np.isfinite(res["evaluations"][-1]["metrics"][metric])
  # a config error is one line and exit status 2
  rc = cli.main(["unimo-jax", "finetune", "--config", f"experiments/configs/finetune/sst2.py:"
                 f"smoke,data_dir={data}", "--workdir", str(tmp_path / "x"),
                 "--config.task.num_labels=1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "task.num_labels=1" in err[0]
