"""A real 3-trial sweep of the tiny demo config run here (2 steps a trial, the persistent
compilation cache), one trial made to fail, each trained one evaluated, then summarised: the table is checked against each
trial's own metrics.jsonl, read here, and the learning rate the schedule must have logged."""
import csv
import json
import os

import pytest

from unimo_jax import cli, commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "experiments", "configs", "demo.py")


@pytest.mark.slow
def test_three_trial_sweep_runs_and_is_summarised(tmp_path, capfd):
  from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path / "data")
  prepare.prepare_synthetic(data_dir, size="tiny")
  rates = [0.001, 0.004]
  trials = [{"optimizer.learning_rate": lr} for lr in rates]
  trials.append({"optimizer.learning_rate": 0.01, "model.hidden_size": 66})  # fails validation
  path = tmp_path / "tiny_sweep.py"
  path.write_text(f"CONFIG = {DEMO + ':smoke,data_dir=' + data_dir!r}\n"
                  f"def get_sweep():\n  return {trials!r}\n")
  root = str(tmp_path / "sweep")
  rc = cli.main(["unimo-jax", "sweep", "--sweep", str(path), "--workdir", root, "--evaluate",
                 "--set", "train.total_steps=2", "--set", "train.log_every=1",
                 "--set", "train.progress_bar=off"])
  out, _ = capfd.readouterr()
  assert rc == commands.TRIALS_FAILED and "2/3 trials finished" in out

  assert cli.main(["unimo-jax", "sweep", "--workdir", root, "--summary"]) == 0
  capfd.readouterr()
  with open(os.path.join(root, "summary.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["trial"] for r in rows] == ["0", "1", "2"]
  with open(os.path.join(root, "sweep.json")) as f:
    workdirs = [t["workdir"] for t in json.load(f)["trials"]]
  for row, lr, workdir in zip(rows, rates, workdirs):
    assert row["status"] == "done" and row["step"] == "2"
    assert float(row["optimizer.learning_rate"]) == lr and row["model.hidden_size"] == ""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      last = [json.loads(line) for line in f if '"loss"' in line][-1]
    assert last["step"] == 2
    for key in ("loss", "pair_cmcl/loss_i2t", "image_mrp/loss", "grad_norm"):
      assert float(row[key]) == pytest.approx(last[key], rel=1e-12), key
    # the override reached the optimizer: step 2 trains with the 2-step linear warmup at 1/2
    assert float(row["learning_rate"]) == pytest.approx(lr / 2, rel=1e-6)
    # --evaluate: the latest evaluation of each split in results.json, as SPLIT/KEY
    with open(os.path.join(workdir, "results.json")) as f:
      evaluations = json.load(f)["evaluations"]
    test = [e for e in evaluations if e["split"] == "test"][-1]["metrics"]
    assert float(row["test/i2t_r@1"]) == pytest.approx(test["i2t_r@1"], rel=1e-12)
  assert rows[2]["status"] == "failed (exit 2: bad usage or config)"
  assert rows[2]["model.hidden_size"] == "66" and rows[2]["loss"] == ""
  with open(os.path.join(root, "summary.md")) as f:
    md = f.read()
  assert len([line for line in md.splitlines() if line.startswith("| ") and "---" not in line
              and not line.startswith("| trial")]) == 3
  assert "not done: trial 2 failed (exit 2" in md
  assert os.path.getsize(os.path.join(root, "summary.png")) > 1000
