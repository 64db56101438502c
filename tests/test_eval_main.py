"""End to end: the eval split loader on synthetic_scenes and ``unimo-jax evaluate`` on a workdir.

One tiny synthetic_scenes build, one small SentencePiece model and one checkpoint (written by the
trainer's own state creation and checkpointer) are shared by the tests of this module.
"""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from data_pipelines import eval_data, tokenizers
from data_pipelines.synthetic_scenes import generate
from unimo_jax import cli, parallel
from unimo_jax.model import ModelConfig
from unimo_jax.train import checkpoint as ckpt_lib
from unimo_jax.train import config as config_lib
from unimo_jax.train import optimizer as opt_lib
from unimo_jax.train import state as state_lib
from unimo_jax.train import train_step

OPTIONS = generate.SceneOptions(kind="pairs", size="tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """(workdir, config) of a fake run: data config, tokenizer, config.json, a checkpoint."""
  root = tmp_path_factory.mktemp("evalrun")
  sentences = []
  for split in ("train", "test"):
    for i in range(OPTIONS.num_examples(split)):
      ex = generate.example(OPTIONS, split, i)
      sentences += ex["captions"] + ex["hard_negatives"]
  model_file = tokenizers.train_sentencepiece(sentences, str(root / "spm"), vocab_size=120,
                                              model_type="bpe", fit_vocab=True)
  tok = tokenizers.load_tokenizer(f"sentencepiece:{model_file}")
  c = config_lib.default_config()
  c.model.update(dict(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                      mlp_dim=64, max_positions=64, image_size=64, patch_size=16,
                      projection_dim=16, dropout_rate=0.0, attention_dropout_rate=0.0))
  c.data = ml_collections.ConfigDict(dict(
      tokenizer=f"sentencepiece:{model_file}", visual_input="patches", image_size=64,
      patch_size=16, num_negatives=4,
      streams=dict(
          text=dict(max_length=32, max_predictions=4, s2s_max_length=40,
                    s2s_max_predictions=16),
          pair=dict(max_length=32, max_predictions=4, s2s_max_predictions=32, sources=[dict(
              name="scenes", kind="tfds", tfds_name="synthetic_scenes/pairs_tiny",
              data_dir=str(root / "tfds"), prepare=True)]))))
  c.evaluation = ml_collections.ConfigDict(dict(
      batch_size=8, splits=["test"], limit=12, caption=dict(max_length=6, beam_size=2)))
  workdir = root / "run"
  os.makedirs(workdir)
  with open(workdir / "config.json", "w") as f:
    json.dump(json.loads(c.to_json_best_effort()), f)
  model_cfg = ModelConfig.from_dict(c.model.to_dict())
  with open(workdir / "model_config.json", "w") as f:
    f.write(model_cfg.to_json())
  # A "trained" checkpoint at step 5: the initial parameters, visibly changed.
  mesh = parallel.make_mesh((-1, 1, 1))
  tx, _ = opt_lib.make_optimizer(c.optimizer, 10)
  init = train_step.init_params_fn(model_cfg, 0.07)
  state, _ = state_lib.create_train_state(init, tx, mesh, parallel.DEFAULT_RULES,
                                          jax.random.key(int(c.seed)))
  state = state.replace(params=jax.tree.map(lambda x: x * 1.5, state.params))
  ck = ckpt_lib.Checkpointer(str(workdir), keep=2)
  ck.save(5, state, config=json.loads(c.to_json_best_effort()))
  ck.close()
  return str(workdir), c, tok


def test_eval_split_matches_the_records(run_dir):
  _, c, tok = run_dir
  data, meta = eval_data.load_eval_split(c.data, "test", tokenizer=tok)
  n = OPTIONS.num_examples("test")
  assert len(data["image_id"]) == n and meta["dropped"] == {}
  for i in (0, n - 1):
    ex = generate.example(OPTIONS, "test", i)
    assert data["image_id"][i] == ex["image_id"]
    assert meta["captions"][i] == ex["captions"]
    assert int(data["caption_valid"][i].sum()) == len(ex["captions"])
    assert int(data["negative_valid"][i].sum()) == len(ex["hard_negatives"])
    first = tok.encode(ex["hard_negatives"][0])
    np.testing.assert_array_equal(data["negative_ids"][i, 0, 1:1 + len(first)], first)
    kinds = [meta["kind_names"][k] for k in data["negative_kind"][i] if k >= 0]
    assert kinds == ex["hard_negative_kinds"]
    # Same decode and normalisation as training: (x / 255 - 0.5) / 0.5 at the native 64px.
    np.testing.assert_allclose(data["pixels"][i], ex["image"] / 127.5 - 1.0, atol=1e-6)
  assert data["mlm_weights"].sum() > 0 and data["cap_weights"].sum() > 0
  assert eval_data.default_splits(c.data) == ["test", "test_compositional"]


def test_evaluate_command_writes_results_report_and_figures(run_dir, capsys):
  workdir, _, _ = run_dir
  rc = cli.main(["unimo-jax", "evaluate", "--workdir", workdir, "--step", "0,latest"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "image->text R@1" in printed and "report.md" in printed
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  by_step = {e["step"]: e for e in results["evaluations"]}
  assert sorted(by_step) == [0, 5]
  for e in by_step.values():
    assert e["split"] == "test" and e["images"] == 12
    assert e["pairs"]["i2t_r@1"][1] == 12
    for key in ("i2t_r@1", "t2i_r@1", "hard_negative_acc", "bleu4", "cider", "mlm_accuracy"):
      assert e["metrics"][key] is not None, key
  # Different parameters, different numbers: step 5 is not the untrained model re-evaluated.
  assert by_step[0]["metrics"]["mlm_nll"] != by_step[5]["metrics"]["mlm_nll"]
  for name in ("report.md", "retrieval_test.png", "captions_test.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  assert "test @ step 0" in text and "test @ step 5" in text and "retrieval_test.png" in text


def test_step_zero_equals_the_runs_initial_parameters(run_dir):
  from unimo_jax.evaluation import main as eval_main
  workdir, c, _ = run_dir
  config, model_cfg = eval_main.load_run(workdir)
  mesh = parallel.make_mesh((-1, 1, 1))
  p0, _ = eval_main.restore_model_params(workdir, 0, config, model_cfg, mesh)
  p5, step = eval_main.restore_model_params(workdir, None, config, model_cfg, mesh)
  assert step == 5
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p5)):
    np.testing.assert_allclose(np.asarray(a) * 1.5, np.asarray(b), rtol=1e-6)


def test_training_loop_hook_runs_the_same_evaluators(run_dir):
  from unimo_jax.evaluation import main as eval_main
  workdir, _, tok = run_dir
  config, model_cfg = eval_main.load_run(workdir)
  mesh = parallel.make_mesh((-1, 1, 1))
  params, _ = eval_main.restore_model_params(workdir, None, config, model_cfg, mesh)
  evaluate = eval_main.make_train_evaluator(config, model_cfg, mesh, tok)
  got = evaluate({"model": params, "cmcl": {}}, 5)
  results = eval_main.evaluate_workdir(workdir, ["latest"], figures=False)
  stored = {e["step"]: e for e in results["evaluations"]}[5]["metrics"]
  for key in ("i2t_r@1", "t2i_r@5", "hard_negative_acc", "mlm_nll", "bleu4"):
    np.testing.assert_allclose(got[f"test/{key}"], stored[key], rtol=1e-5, err_msg=key)


def test_regions_input_end_to_end(run_dir):
  """Region features instead of pixels: the split loader and the evaluators (tiny model)."""
  from unimo_jax.evaluation import runner
  from unimo_jax.model import Unimo, init_params
  _, c, tok = run_dir
  data_cfg = c.data.to_dict()
  data_cfg.update(visual_input="regions", num_regions=4, region_feature_dim=64,
                  num_region_classes=48)
  data, meta = eval_data.load_eval_split(data_cfg, "test", tokenizer=tok, limit=6)
  assert "pixels" not in data and data["region_features"].shape == (6, 4, 64)
  ex = generate.example(OPTIONS, "test", 0)
  n = len(ex["regions"]["boxes"])
  np.testing.assert_allclose(data["region_features"][0, :n], ex["regions"]["features"][:4])
  assert data["region_valid"][0].sum() == min(n, 4)
  np.testing.assert_allclose(data["region_boxes"][0, :n, :4],
                             np.clip(ex["regions"]["boxes"][:4] / 64.0, 0, 1), atol=1e-6)
  cfg = ModelConfig.from_dict({**c.model.to_dict(), "visual_input": "regions",
                               "region_feature_dim": 64, "num_region_classes": 48})
  model = Unimo(cfg)
  ev = runner.Evaluator(model, parallel.make_mesh((-1, 1, 1)),
                        runner.EvalSettings(batch_size=8, evaluators=("retrieval", "language")))
  res = ev.run(init_params(cfg, jax.random.key(0)), data, meta)
  assert res["pairs"]["i2t_r@1"][1] == 6
  assert np.isfinite(res["metrics"]["caption_nll"]) and np.isfinite(res["metrics"]["t2i_r@5"])


def test_evaluate_command_errors_are_one_line(tmp_path, capsys):
  assert cli.main(["unimo-jax", "evaluate", "--workdir", str(tmp_path / "missing")]) == 2
  assert "no such workdir" in capsys.readouterr().err


def test_training_command_wires_data_and_evaluators_in(run_dir, tmp_path):
  """``train.main.train_from_config``: the tokenizer, the pipeline and, with train.eval_every,
  the evaluators of ``evaluation.train_splits`` (validated with the rest of the config) go into
  the trainer, which imports none of them; the evaluation equals ``evaluate`` on the same
  checkpoint."""
  from data_pipelines import pipeline  # pylint: disable=import-outside-toplevel
  from unimo_jax.evaluation import main as eval_main
  from unimo_jax.train import main as main_lib
  from unimo_jax.train import metrics as metrics_lib
  _, c, _ = run_dir
  c = c.copy_and_resolve_references()
  c.data.streams.pair.batch_size = 8
  c.train.update(total_steps=2, log_every=1, checkpoint_every=0, eval_every=2,
                 progress_bar="off")
  c.evaluation.train_splits = ["test"]
  c.evaluation.evaluators = ["retrieval", "hard_negatives"]
  config_lib.validate(c, num_devices=8, data_defaults=pipeline.default_config())
  wd = str(tmp_path / "run")
  result = main_lib.train_from_config(c, wd)
  assert (result.last_step, result.checkpoint_step) == (2, 2)
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
          if "eval/test/i2t_r@1" in r]
  assert [r["step"] for r in rows] == [2]
  stored = {e["step"]: e for e in eval_main.evaluate_workdir(wd, ["latest"], figures=False)[
      "evaluations"]}[2]["metrics"]
  for key in ("i2t_r@1", "t2i_r@1", "hard_negative_acc"):
    np.testing.assert_allclose(rows[0][f"eval/test/{key}"], stored[key], rtol=1e-5, err_msg=key)
