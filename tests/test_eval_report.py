"""results.json bookkeeping, the markdown table and the training-curve figure."""
import json
import os

import numpy as np

from unimo_jax.evaluation import report


def _result(r1, cider=float("nan")):
  return {"metrics": {"i2t_r@1": r1, "t2i_r@1": r1 / 2, "cider": cider, "t2i_chance_r@1": 0.01},
          "pairs": {"i2t_r@1": (r1 * 10, 10.0)}, "artefacts": {"ranks": np.arange(3)}}


def test_add_result_replaces_the_same_step_and_split(tmp_path):
  wd = str(tmp_path)
  report.add_result(wd, 10, "test", _result(0.5))
  report.add_result(wd, 0, "test", _result(0.1))
  report.add_result(wd, 10, "test_compositional", _result(0.3))
  data = report.add_result(wd, 10, "test", _result(0.7), {"images": 10})
  with open(os.path.join(wd, report.RESULTS)) as f:
    assert json.load(f) == data
  got = [(e["split"], e["step"], e["metrics"]["i2t_r@1"]) for e in data["evaluations"]]
  assert got == [("test", 0, 0.1), ("test", 10, 0.7), ("test_compositional", 10, 0.3)]
  assert data["evaluations"][1]["images"] == 10
  assert data["evaluations"][1]["metrics"]["cider"] is None  # NaN is stored as null
  assert data["evaluations"][1]["pairs"]["i2t_r@1"] == [7.0, 10.0]


def test_results_table():
  evals = [dict(split="test", step=0, metrics={"i2t_r@1": 0.1, "t2i_chance_r@1": 0.01}),
           dict(split="test", step=9, metrics={"i2t_r@1": 0.75, "cider": 1.5,
                                               "t2i_chance_r@1": 0.01})]
  lines = report.results_table(evals).splitlines()
  assert lines[0] == "| metric | test @ step 0 | test @ step 9 |"
  assert "| image->text R@1 | 0.100 | 0.750 |" in lines
  assert "| CIDEr | - | 1.500 |" in lines
  assert "| chance R@1 (text->image) | 0.0100 | 0.0100 |" in lines
  assert not any("BLEU" in line for line in lines)  # absent everywhere: no row
  assert not any("chance" in line for line in report.results_table(evals, chance=False)
                 .splitlines())


def test_training_curves_from_the_trainers_jsonl(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w") as f:
    for step in range(10, 110, 10):
      f.write(json.dumps({"step": step, "loss": 5.0 / step, "learning_rate": 1e-3,
                          "pair_cmcl/accuracy_i2t": None if step == 10 else step / 100}) + "\n")
    f.write(json.dumps({"step": 100, "eval/test/i2t_r@1": 0.4}) + "\n")
  out = tmp_path / "curves.png"
  assert report.training_curves(str(path), str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not report.training_curves(str(tmp_path / "missing.jsonl"), str(out))
