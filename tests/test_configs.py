"""Experiment configs: they load, validate, build and shard; bad configs fail in one line."""
import io
import os
import contextlib

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from data_pipelines import pipeline, schema
from unimo_jax.train import config as config_lib
from unimo_jax.train import main as main_lib
from unimo_jax.train import setup as setup_lib
from unimo_jax.train import state as state_lib
from unimo_jax.train import sweep as sweep_lib
from unimo_jax.train import train_step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
DATA_DEFAULTS = pipeline.default_config()


def load(name, *overrides):
  """Loads a config file the way `unimo-jax train` does (config_flags, with overrides);
  ``name`` is relative to experiments/configs, or an absolute path."""
  argv = ["prog", f"--config={os.path.join(CONFIGS, name)}"] + [f"--config.{o}" for o in overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("name", ["demo.py", "demo.py:smoke", "demo_regions.py", "base.py",
                                  "large.py:/mnt/data"])
def test_configs_validate(name):
  c = load(name)
  data = config_lib.validate(c, num_devices=8, data_defaults=DATA_DEFAULTS, check_files=False)
  assert schema.enabled_streams(data) == ("text", "image", "pair")


def test_overrides_reach_nested_fields():
  c = load("demo.py", "optimizer.learning_rate=0.5", "data.streams.text.batch_size=16",
           "cmcl.use_negatives=False")
  assert c.optimizer.learning_rate == 0.5 and c.data.streams.text.batch_size == 16
  assert c.cmcl.use_negatives is False


def _cli(*args, tmp):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = main_lib.main(["unimo-jax train", "--workdir", str(tmp)] + list(args))
  return rc, err.getvalue().strip()


@pytest.mark.parametrize("args, fragment", [
    (["--config.optimizer.learnig_rate=1"], "learnig_rate"),
    (["--config.data.streams.pair.batch_size=12"], "batch_size=12 is not divisible by 8"),
    (["--config.mesh.data=16"], "uses 16 devices, but there are 8"),
    (["--config.optimizer.grad_accum_steps=3"], "x 3 micro-batches"),
    (["--config.cmcl.implementation=dense"], "cmcl.implementation"),
    (["--config.data.tokenizer=sentencepiece:/nonexistent/spm.model"], "does not exist"),
    (["--config.model.hidden_size=66"], "divisible by num_heads"),
    # numeric ranges, named by field (a negative batch size used to switch the stream off)
    (["--config.data.streams.pair.batch_size=-8"],
     "data.streams.pair.batch_size must be an integer >= 0, got -8"),
    (["--config.train.keep_checkpoints=-1"], "train.keep_checkpoints must be an integer >= 0"),
    (["--config.train.keep_period=-5"], "train.keep_period must be an integer >= 0"),
    (["--config.optimizer.warmup_steps=-1"], "optimizer.warmup_steps must be an integer >= 0"),
    (["--config.optimizer.b2=1.5"], "optimizer.b2 must be a number >= 0 and <= 1, got 1.5"),
    (["--config.optimizer.schedule=step"], "optimizer.step_boundaries is empty"),
    (["--config.optimizer.schedule=step", "--config.optimizer.step_boundaries=(0.9,0.5)"],
     "optimizer.step_boundaries must increase strictly"),
    (["--config.optimizer.step_boundaries=(0.5,)"], "optimizer.schedule='linear'"),
    (["--config.optimizer.step_factor=0"], "optimizer.step_factor must be a number > 0"),
    (["--config.objectives.label_smoothing=-0.1"], "objectives.label_smoothing"),
    (["--config.data.num_negatives=-1"], "data.num_negatives must be an integer >= 0"),
    (["--config.data.streams.text.mask_rate=2.0"], "data.streams.text.mask_rate"),
    (["--config.train.eval_every=-2"], "train.eval_every must be an integer >= 0"),
    # the evaluation keys, before anything compiles
    (["--config.evaluation.limit=-3"], "evaluation.limit must be an integer >= 0"),
    (["--config.train.eval_every=5", "--config.evaluation.train_splits=()"],
     "evaluation.train_splits is empty"),
])
def test_cli_rejects_bad_configs_in_one_line(tmp_path, args, fragment):
  rc, err = _cli("--config", os.path.join(CONFIGS, "demo.py"), *args, tmp=tmp_path)
  assert rc == 2 and fragment in err, err
  assert len(err.splitlines()) == 1 and "\\n" not in err, err
  assert not os.path.exists(tmp_path / "checkpoints")  # failed before any work


def _validate(c, **kw):
  return config_lib.validate(c, num_devices=8, data_defaults=DATA_DEFAULTS, **kw)


def test_evaluation_keys_validate_before_anything_compiles():
  """``train.eval_every`` with ``evaluation.train_splits`` (documented) is a valid config, from
  a file or the command line; an unknown evaluation key or a bad evaluator is one line."""
  c = load("demo.py", "train.eval_every=5", "evaluation.train_splits=('validation', 'test')")
  assert tuple(c.evaluation.train_splits) == ("validation", "test")
  _validate(c, check_files=False)
  c.evaluation.unlock()  # a config file adds the evaluators' settings freely
  c.evaluation.batch_size = 16
  c.evaluation.caption = dict(beam_size=2)
  _validate(c, check_files=False)
  c.evaluation.bogus = 1
  with pytest.raises(config_lib.ConfigError, match=r"evaluation: .*\['bogus'\]"):
    _validate(c, check_files=False)
  del c.evaluation["bogus"]
  c.evaluation.evaluators = ("retrieval", "telepathy")
  with pytest.raises(config_lib.ConfigError, match="telepathy"):
    _validate(c, check_files=False)
  c.evaluation.evaluators = ("retrieval",)
  c.evaluation = {"train_splits": "validation"}  # a string, not a list of names
  with pytest.raises(config_lib.ConfigError, match="evaluation.train_splits must be a list"):
    _validate(c, check_files=False)


def test_unknown_stream_keys_are_named():
  c = load("demo.py")
  c.data.streams.text.unlock()
  c.data.streams.text.max_lenght = 12
  with pytest.raises(config_lib.ConfigError, match="'data.streams.text.max_lenght'"):
    _validate(c, check_files=False)


def test_home_relative_tokenizer_path_validates_and_loads(tmp_path, monkeypatch):
  """``sentencepiece:~/...``: validation and the one loader both expand ``~`` (the loader used
  to fail on the literal path after validation had passed)."""
  from data_pipelines import tokenizers  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("HOME", str(tmp_path))
  words = [f"w{i}" for i in range(40)]
  sentences = [" ".join(words[i:i + 6]) for i in range(34)] * 3
  tokenizers.train_sentencepiece(sentences, str(tmp_path / "spm"), vocab_size=60,
                                 model_type="bpe", fit_vocab=True)
  c = load("demo.py")
  c.data.tokenizer = "sentencepiece:~/spm.model"
  _validate(c)
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  assert tok.vocab_size > 0
  c.data.tokenizer = "sentencepiece:~/missing.model"
  with pytest.raises(config_lib.ConfigError, match=f"{tmp_path}/missing.model does not exist"):
    _validate(c)


def test_unknown_key_in_a_config_file(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from experiments.configs import demo\n"
                  "def get_config(arg=None):\n"
                  "  c = demo.get_config(arg)\n"
                  "  c.train.chekpoint_every = 5\n"
                  "  return c\n")
  rc, err = _cli("--config", str(path), tmp=tmp_path)
  assert rc == 2 and "unknown config key 'train.chekpoint_every'" in err, err


def _expected_params(m, d):
  """UNIMO parameter count written from the architecture (UNIMO.md), regions input."""
  H, M, V, P, F, C, L = (m.hidden_size, m.mlp_dim, m.vocab_size, m.max_positions,
                         m.region_feature_dim, m.num_region_classes, m.num_layers)
  text = V * H + P * H + 2 * H
  regions = F * H + H + 5 * H + H + 2 * H
  layer = 4 * (H * H + H) + (H * M + M) + (M * H + H) + 2 * 2 * H
  lm_head = H * H + H + 2 * H + V
  transform = H * H + H + 2 * H
  region_heads = transform + H * F + F + transform + H * C + C
  projections = 2 * (H * H + H + H * d + d)
  return text + regions + L * layer + lm_head + region_heads + projections + 1  # + log tau


@pytest.mark.parametrize("name, millions", [("base.py", 132), ("large.py", 366)])
def test_paper_configs_build_sharded_on_8_devices(name, millions):
  c = load(name)
  config_lib.validate(c, num_devices=8, data_defaults=DATA_DEFAULTS, check_files=False)
  run = setup_lib.build_run(c)  # no batch spec: model, mesh, optimizer and shardings only
  mcfg, abstract = run.model_cfg, run.abstract_state
  assert dict(run.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  n = state_lib.param_count(abstract.params)
  assert n == _expected_params(mcfg, mcfg.projection_dim)
  assert round(n / 1e6) == millions
  # Every large parameter (and its Adam moments) is split over the 8 devices.
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract.params):
    if np.prod(leaf.shape) >= 2**18:
      shard = leaf.sharding.shard_shape(leaf.shape)
      assert np.prod(shard) * 8 == np.prod(leaf.shape), jax.tree_util.keystr(path)
  mu = abstract.opt_state[1][0].mu["model"]["text_embed"]["word"]
  assert mu.sharding.shard_shape(mu.shape)[1] == mcfg.hidden_size // 8


def test_base_step_traces_at_full_size():
  """The whole base train step (every objective, batch 512/256/512, 512 tokens, 100 regions)
  traces with the config's shardings on 8 devices (abstractly: nothing is allocated)."""
  c = load("base.py")
  data = config_lib.validate(c, num_devices=8, data_defaults=DATA_DEFAULTS, check_files=False)
  run = setup_lib.build_run(c, schema.batch_spec(data), process_count=1)
  abstract = run.abstract_state
  with step_lib.mesh_context(run.mesh, run.rules):
    new_state, metrics = jax.eval_shape(run.step.jitted, abstract, run.abstract_batch())
  assert new_state.params["model"]["encoder"].keys() == abstract.params["model"][
      "encoder"].keys()
  assert {"loss", "pair_cmcl/loss_i2t", "text_mlm/loss", "pair_mrp/class_accuracy"} <= set(
      metrics)


def test_sweeps_expand_to_valid_trials():
  for name in sorted(os.listdir(os.path.join(ROOT, "experiments", "sweeps"))):
    if not name.endswith(".py") or name.startswith("__"):
      continue
    if sweep_lib.load(os.path.join(ROOT, "experiments", "sweeps", name)).command != "train":
      continue  # other commands' sweeps: tests/test_sweep.py validates them with their config
    config_path, trials = sweep_lib.load_sweep(os.path.join(ROOT, "experiments", "sweeps", name))
    cmds = sweep_lib.commands(config_path, trials, "/tmp/sweep")
    assert len({w for w, _ in cmds}) == len(cmds)  # one workdir per trial
    for _, argv in cmds:
      overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
      c = load(os.path.relpath(os.path.join(ROOT, config_path), CONFIGS), *overrides)
      config_lib.validate(c, num_devices=8, data_defaults=DATA_DEFAULTS, check_files=False)


def test_sweep_product_and_names():
  trials = sweep_lib.product({"a.x": [1, 2]}, {"b.y": [0.5, 0.25], "b.z": [True, False]})
  assert trials == [{"a.x": 1, "b.y": 0.5, "b.z": True}, {"a.x": 1, "b.y": 0.25, "b.z": False},
                    {"a.x": 2, "b.y": 0.5, "b.z": True}, {"a.x": 2, "b.y": 0.25, "b.z": False}]
  assert sweep_lib.trial_name(3, {"a.x": 1, "b.y": 0.5}) == "03_x=1_y=0.5"
  assert sweep_lib.format_value((1, 2)) == "(1,2)"
  with pytest.raises(ValueError, match="differ in length"):
    sweep_lib.product({"a": [1], "b": [1, 2]})


def test_pipeline_defaults_cover_the_data_keys():
  """Every data key a config sets is one the pipeline knows (validated the same way)."""
  ref = pipeline.default_config()
  for name in ("demo.py", "base.py"):
    for key in load(name).data:
      assert key in ref, key
