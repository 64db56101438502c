"""Two real training steps (one per language phase) of each demo config on synthetic_scenes data built by ``prepare``.

The paper-size configs (base, large) are covered by eval_shape in test_configs.py; these run the
demo configs end to end: prepare (tiny size) -> config file -> validation -> data pipeline ->
sharded train step -> checkpoint.
"""
import importlib
import json
import math
import os

import pytest

from unimo_jax.train import config as config_lib
from unimo_jax.train import main as main_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp("synthetic_scenes"))
  prepare.prepare_synthetic(d, size="tiny")
  return d


@pytest.mark.parametrize("name", ["demo", "demo_regions"])
def test_one_step_of_each_demo_config(name, data_dir, tmp_path):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config(f"smoke,data_dir={data_dir}")
  config.train.total_steps = 2  # the mlm phase, then the seq2seq phase
  config.train.log_every = 1
  config_lib.validate(config, num_devices=8, data_defaults=main_lib.data_defaults())
  workdir = str(tmp_path / "run")
  result = main_lib.train_from_config(config, workdir)
  assert (result.first_step, result.last_step, result.stopped_by) == (0, 2, "done")
  assert result.checkpoint_step == 2
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  # every objective of the three streams ran in one of the two steps with a finite loss (an
  # objective outside its phase logs NaN)
  for objective in ("text_mlm", "text_s2s", "image_mrp", "pair_cmcl", "pair_mlm",
                    "pair_caption", "pair_mrp"):
    values = [row[k] for row in rows for k in row
              if k.startswith(objective + "/loss") and isinstance(row[k], (int, float))]
    assert any(math.isfinite(v) for v in values), (objective, values)
