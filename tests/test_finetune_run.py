"""The fine-tuning run end to end on a tiny TSV task: the pre-training loop with the task's run,
exact resume, initialisation from a pre-training workdir / a converted dir / scratch, config
errors in one line."""
import os

import jax
import numpy as np
import pytest

from data_fixtures import WORDS, WhitespaceTokenizer
from unimo_jax.finetune import config as config_lib
from unimo_jax.finetune import main as ft_main
from unimo_jax.finetune import run as run_lib
from unimo_jax.train import checkpoint as ckpt_lib

TOK = WhitespaceTokenizer()


def write_task(tmp_path, n=24, seed=0):
  """A learnable pair task: label 1 when text_b repeats text_a's first word."""
  r = np.random.default_rng(seed)
  lines = ["text_a\ttext_b\tlabel"]
  for i in range(n):
    a = " ".join(r.choice(WORDS, 4))
    b = a.split()[0] + " " + r.choice(WORDS) if i % 2 else " ".join(r.choice(WORDS, 2))
    lines.append(f"{a}\t{b}\t{i % 2}")
  lines.append("broken row")
  path = tmp_path / "train.tsv"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def tiny_config(tmp_path, steps=6, **task):
  c = config_lib.default_config()
  c.model.update(dict(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                      mlp_dim=64, max_positions=20, image_size=16, patch_size=8,
                      projection_dim=16, dropout_rate=0.1, attention_dropout_rate=0.1))
  c.task.update(dict(kind="classification", num_labels=2, head_hidden=16, **task))
  c.data.train = write_task(tmp_path)
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.max_length = 12
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 1
  c.train.total_steps = steps
  c.train.log_every = 2
  c.train.checkpoint_every = 3
  c.train.progress_bar = "off"
  c.train.async_checkpoints = False
  return c


def finetune_and_evaluate(cfg, workdir, tokenizer=TOK):
  """``finetune`` then ``evaluate`` of a run: (the run's result, the last evaluation entry of
  ``evaluate_workdir``)."""
  from unimo_jax.evaluation import main as eval_main  # pylint: disable=import-outside-toplevel
  result = ft_main.finetune_from_config(cfg, workdir, tokenizer=tokenizer)
  config, model_cfg = eval_main.load_run(workdir)
  out = ft_main.evaluate_workdir(workdir, config=config, model_cfg=model_cfg,
                                 tokenizer=tokenizer)
  return result, out["evaluations"][-1]


def _params(workdir):
  return ckpt_lib.restore_params(workdir)[0]


@pytest.mark.slow
def test_stop_and_resume_equals_straight_through(tmp_path):
  cfg = tiny_config(tmp_path)
  straight = str(tmp_path / "straight")
  res = ft_main.finetune_from_config(cfg, straight, tokenizer=TOK)
  assert res.last_step == 6 and np.isfinite(res.last_metrics["loss"])
  assert "accuracy" in res.last_metrics and res.last_metrics["data/dropped_total"] == 1.0
  split = str(tmp_path / "split")
  first = ft_main.finetune_from_config(cfg, split, tokenizer=TOK, max_steps=3)
  assert first.last_step == 3 and first.stopped_by == "max_steps"
  second = ft_main.finetune_from_config(cfg, split, tokenizer=TOK)
  assert second.first_step == 3 and second.last_step == 6
  a, b = _params(straight), _params(split)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert set(a) == {"model", "head"}


def _fresh_run(cfg):
  from data_pipelines.finetune import make_data
  data, _ = make_data(cfg, "train", TOK, training=True)
  return run_lib.build_finetune_run(cfg, data.spec, vocab_size=TOK.vocab_size)


def test_init_from_pretraining_workdir_and_converted_dir(tmp_path):
  cfg = tiny_config(tmp_path)
  run = _fresh_run(cfg)
  scratch = run.new_state()
  host = jax.device_get(scratch.params)
  # heads' poolers start as the model's pre-trained poolers, from scratch too
  np.testing.assert_array_equal(host["head"]["text_pooler"]["dense"]["kernel"],
                                host["model"]["text_projection"]["pooler"]["kernel"])
  # a "pre-training workdir": a checkpoint whose params are {"model", "cmcl"}
  other = jax.tree.map(lambda x: np.asarray(x) + 0.5, host["model"])
  pre = str(tmp_path / "pre")
  from unimo_jax.train import state as state_lib
  from unimo_jax.train import setup as setup_lib
  import optax
  params = {"model": other, "cmcl": {"log_temperature": np.zeros((), np.float32)}}
  tx = optax.sgd(0.1)
  st = state_lib.TrainState(step=np.int32(7), params=params, opt_state=tx.init(params),
                            nonfinite_streak=np.int32(0), nonfinite_total=np.int32(0))
  ck = ckpt_lib.Checkpointer(pre, async_save=False)
  ck.save(7, st)
  ck.close()
  with open(os.path.join(pre, "model_config.json"), "w") as f:
    f.write(run.model_cfg.to_json())
  cfg.init_from = pre
  state = _fresh_run(cfg).new_state()
  got = jax.device_get(state.params)
  for x, y in zip(jax.tree.leaves(got["model"]), jax.tree.leaves(other)):
    np.testing.assert_allclose(x, y)
  np.testing.assert_allclose(got["head"]["text_pooler"]["dense"]["kernel"],
                             other["text_projection"]["pooler"]["kernel"])
  assert int(state.step) == 0  # a new run: step and optimizer start over
  # a converted dir
  from unimo_jax.convert import roberta
  conv = str(tmp_path / "conv")
  roberta.save(conv, run.model_cfg, {"text_embed": other["text_embed"]})
  cfg.init_from = conv
  got = jax.device_get(_fresh_run(cfg).new_state().params)
  np.testing.assert_allclose(jax.tree.leaves(got["model"]["text_embed"])[0],
                             jax.tree.leaves(other["text_embed"])[0])
  np.testing.assert_array_equal(got["model"]["encoder"] and jax.tree.leaves(got["model"]["encoder"])[0],
                                jax.tree.leaves(host["model"]["encoder"])[0])
  # a mismatching model config is one line naming the field
  cfg2 = tiny_config(tmp_path)
  cfg2.model.hidden_size = 16
  cfg2.init_from = pre
  with pytest.raises(ValueError, match="hidden_size"):
    _fresh_run(cfg2).new_state()
  cfg2.init_from = str(tmp_path)
  with pytest.raises(ValueError, match="neither a workdir"):
    _fresh_run(cfg2).new_state()
  del setup_lib


@pytest.mark.parametrize("change, message", [
    (lambda c: c.task.update(dict(kind="vqa")), "does not read data.source"),
    (lambda c: c.task.update(dict(num_labels=1)), "task.num_labels=1"),
    (lambda c: c.data.update(dict(batch_size=6)), "data.batch_size=6"),
    (lambda c: c.data.update(dict(max_length=40)), "exceeds the model"),
    (lambda c: c.update(dict(init_from="/nonexistent/x")), "init_from: /nonexistent/x"),
    (lambda c: c.train.update(dict(init_from="/x")), "config.init_from"),
])
def test_config_errors_are_one_line(tmp_path, change, message):
  cfg = tiny_config(tmp_path)
  (tmp_path / "x.model").write_bytes(b"")  # exists: only the planted problem is reported
  cfg.data.tokenizer = "sentencepiece:" + str(tmp_path / "x.model")
  change(cfg)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(cfg, num_devices=8, check_files=message.startswith("init_from"))
  assert "\n" not in str(e.value)
  cfg = tiny_config(tmp_path)
  cfg.data.unknown_field = 1
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'data.unknown_field'"):
    config_lib.validate(cfg, num_devices=8, check_files=False)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_batch(tmp_path):
  """k micro-batches normalised by the whole batch's count give the one-batch update."""
  from data_pipelines.finetune import make_data
  from unimo_jax import parallel
  out = []
  for k in (1, 2):
    cfg = tiny_config(tmp_path)
    cfg.model.dropout_rate = cfg.model.attention_dropout_rate = 0.0
    cfg.task.head_dropout = 0.0
    cfg.optimizer.grad_accum_steps = k
    cfg.data.batch_size = 16
    data, _ = make_data(cfg, "train", TOK, training=True)
    run = run_lib.build_finetune_run(cfg, data.spec, vocab_size=TOK.vocab_size)
    batch = next(data)
    batch["row_valid"][-3:] = False  # uneven micro-batch counts
    state, metrics = run.step(run.new_state(), parallel.global_batch(batch, run.mesh))
    out.append((jax.device_get(state.params), float(metrics["loss"]), float(metrics["count"])))
  assert out[0][2] == out[1][2] == 13.0
  assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
  for x, y in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
