"""``unimo-jax sweep``: trial commands for any command, the SLURM array script and commands file,
the local runner's exit statuses, and the summary table / CSV / plot of a sweep's trials (checked
against the files each trial wrote, read here independently)."""
import csv
import json
import os
import subprocess
import sys

import pytest

from test_configs import load as load_config  # the commands' config loading
from unimo_jax import cli, commands
from unimo_jax.train import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "experiments", "configs", "demo.py")


def run(capsys, *argv):
  rc = cli.main(["unimo-jax", "sweep", *argv])
  out, err = capsys.readouterr()
  return rc, out, err.strip()


def sweep_file(tmp_path, trials, config="experiments/configs/demo.py", extra=""):
  path = tmp_path / "my_sweep.py"
  path.write_text(f"CONFIG = {config!r}\n{extra}\ndef get_sweep():\n  return {trials!r}\n")
  return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp("synthetic_scenes"))
  prepare.prepare_synthetic(d, size="tiny")
  return d


# ------------------------------------------------------------------------------ trial commands
def test_print_names_each_trial_s_command_workdir_and_overrides(capsys, tmp_path):
  path = sweep_file(tmp_path, [{"optimizer.learning_rate": 0.001}, {"cmcl.use_negatives": False}],
                    config=os.path.relpath(DEMO) + ":smoke")
  rc, out, _ = run(capsys, "--sweep", path, "--workdir", str(tmp_path / "r"), "--print",
                   "--set", "train.total_steps=5")
  lines = out.strip().splitlines()
  assert rc == 0 and len(lines) == 2
  # the config file made absolute (trials may start elsewhere), its :arg kept
  assert lines[0].startswith(f"unimo-jax train --config {DEMO}:smoke --workdir ")
  assert f"{tmp_path}/r/00_learning_rate=0.001 " in lines[0]
  assert lines[0].endswith("--config.optimizer.learning_rate=0.001 --config.train.total_steps=5")
  assert "--config.cmcl.use_negatives=False" in lines[1]
  assert not os.path.exists(tmp_path / "r")  # --print writes nothing


def test_trial_names_tell_keys_that_end_alike_apart():
  assert sweep_lib.trial_name(0, {"seed": 1, "data.seed": 2}) == "00_seed=1_data.seed=2"
  assert sweep_lib.trial_name(12, {"a.b.lr": 0.5, "c.b.lr": (1, 2)}) == "12_a.b.lr=0.5_c.b.lr=-1-2-"


def test_print_into_a_closed_pipe_is_quiet(tmp_path):
  path = sweep_file(tmp_path, [{"seed": i} for i in range(2000)])
  p = subprocess.run(f"{sys.executable} -m unimo_jax.cli sweep --sweep {path} --workdir "
                     f"{tmp_path}/r --print | head -1", shell=True, capture_output=True, text=True,
                     env=dict(os.environ, UNIMO_JAX_COMPILATION_CACHE=""))
  assert p.stdout.startswith("unimo-jax train ") and p.stderr == ""


def test_a_sweep_names_its_command_finetune_works_the_same(capsys, tmp_path, monkeypatch):
  path = sweep_file(tmp_path, [{}], extra='COMMAND = "pretrain"')
  rc, _, err = run(capsys, "--sweep", path, "--workdir", str(tmp_path / "r"), "--print")
  assert rc == 2 and "COMMAND 'pretrain' is not a unimo-jax command" in err
  path = sweep_file(tmp_path, [{"optimizer.learning_rate": 1e-5}],
                    config="experiments/configs/finetune/vqa.py", extra='COMMAND = "finetune"')
  if "finetune" not in cli.COMMANDS:
    monkeypatch.setitem(cli.COMMANDS, "finetune", ("unimo_jax.train.main", "fine-tune"))
  rc, out, _ = run(capsys, "--sweep", path, "--workdir", str(tmp_path / "r"), "--print")
  assert rc == 0 and out.startswith("unimo-jax finetune --config ") and "finetune/vqa.py" in out
  rc, _, _ = run(capsys, "--sweep", path, "--workdir", str(tmp_path / "r"), "--array")
  with open(tmp_path / "r" / "commands.txt") as f:
    assert f.read().startswith("unimo-jax finetune ")
  with open(tmp_path / "r" / "sweep.json") as f:
    assert json.load(f)["command"] == "finetune"


def _validate_train(config):
  from data_pipelines import pipeline  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  config_lib.validate(config, num_devices=8, data_defaults=pipeline.default_config(),
                      check_files=False)


def _validate_finetune(config):
  from unimo_jax.finetune import config as config_lib  # pylint: disable=import-outside-toplevel
  config_lib.validate(config, num_devices=8, check_files=False)


VALIDATORS = {"train": _validate_train, "finetune": _validate_finetune}


@pytest.mark.parametrize("name", sorted(
    n for n in os.listdir(os.path.join(ROOT, "experiments", "sweeps"))
    if n.endswith(".py") and not n.startswith("__")))
def test_every_sweep_file_expands_to_trials_its_command_accepts(name):
  s = sweep_lib.load(os.path.join(ROOT, "experiments", "sweeps", name))
  assert s.command in cli.COMMANDS and s.command in VALIDATORS and s.metric
  cmds = sweep_lib.commands(os.path.join(ROOT, s.config), s.trials, "/tmp/sweep",
                            command=s.command)
  assert len({w for w, _ in cmds}) == len(cmds)  # one workdir per trial
  validate = VALIDATORS[s.command]
  for _, argv in cmds:
    assert argv[:2] == ["unimo-jax", s.command]
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    validate(load_config(argv[3], *overrides))


@pytest.mark.parametrize("content, fragment", [
    ("def get_sweep():\n  return [{}]\n", "defines no CONFIG"),
    ("CONFIG = 'c.py'\ndef get_sweep():\n  return []\n", "returned no trials"),
    ("CONFIG = 'c.py'\ndef get_sweep():\n  return [{'a': 1, 1: 2}]\n", "not a field name"),
    ("CONFIG = 'c.py'\ndef get_sweep():\n  return 1 / 0\n", "ZeroDivisionError"),
    ("CONFIG = 'c.py'\nCOMMAND = 'sweep'\ndef get_sweep():\n  return [{}]\n", "COMMAND 'sweep'"),
])
def test_bad_sweep_files_exit_2_naming_the_file(capsys, tmp_path, content, fragment):
  path = tmp_path / "bad.py"
  path.write_text(content)
  rc, _, err = run(capsys, "--sweep", str(path), "--workdir", str(tmp_path / "r"))
  assert rc == commands.USAGE and len(err.splitlines()) == 1
  assert str(path) in err and fragment in err, err


def test_only_must_name_trials(capsys, tmp_path):
  path = sweep_file(tmp_path, [{}, {"seed": 1}])
  for only, fragment in [("5", "no trial 5 (2 trials)"), ("x", "not a list of integers")]:
    rc, _, err = run(capsys, "--sweep", path, "--workdir", str(tmp_path / "r"), "--only", only)
    assert rc == 2 and fragment in err


# ------------------------------------------------------------------------------ SLURM array
def test_array_script_is_valid_bash_and_runs_trial_k(capsys, tmp_path, data_dir):
  trials = [{"optimizer.learning_rate": 0.001}, {"optimizer.learning_rate": 0.004},
            {"optimizer.nope": 1}]
  path = sweep_file(tmp_path, trials, config=f"{DEMO}:smoke,data_dir={data_dir}")
  root = tmp_path / "root"
  rc, out, _ = run(capsys, "--sweep", path, "--workdir", str(root), "--array",
                   "--slurm-option=--partition=gpu", "--slurm-setup", "export UNIMO_TEST_SETUP=1")
  script = root / "sweep_array.sh"
  assert rc == 0 and str(script) in out
  text = script.read_text()
  assert "#SBATCH --array=0-2\n" in text and "#SBATCH --partition=gpu\n" in text
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  lines = (root / "commands.txt").read_text().splitlines()
  assert len(lines) == 3 and "--config.optimizer.learning_rate=0.004" in lines[1]

  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

  def task(k, *args):
    e = dict(env) if k is None else dict(env, SLURM_ARRAY_TASK_ID=str(k))
    return subprocess.run(["bash", str(script), *args], env=e, capture_output=True, text=True,
                          timeout=300)

  # trial 1, its training command stubbed by --dry_run: trial 1's workdir and override
  p = task(1, "--dry_run")
  assert p.returncode == 0, p.stderr
  assert f"dry run: would train 4 steps in {root}/01_learning_rate=0.004 (fresh)" in p.stdout
  assert "overrides: optimizer.learning_rate=0.004" in p.stdout
  assert not os.path.exists(root / "status")  # a dry run records no trial status
  # trial 2 really runs and fails on its override: its exit status is recorded for the summary
  p = task(2)
  assert p.returncode == 2 and "the config has no field 'nope'" in p.stderr
  with open(root / "status" / "trial_2.json") as f:
    status = json.load(f)
  assert (status["index"], status["exit_code"], status["runner"]) == (2, 2, "slurm")
  # not a trial / not under SLURM: one line, exit 2
  for k in (3, None):
    p = task(k)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
  rc, out, _ = run(capsys, "--workdir", str(root), "--summary")
  assert rc == 0 and "| 2 | failed (exit 2: bad usage or config) |" in out
  assert "| 0 | not started |" in out


def test_array_script_evaluates_a_trial_that_trained(capsys, tmp_path):
  """The trial and evaluate commands stubbed by a `unimo-jax` on the PATH that logs its
  arguments: train exits 0, evaluate 5 (a failed evaluation is the task's exit status)."""
  path = sweep_file(tmp_path, [{"seed": 0}, {"seed": 1}])
  root = tmp_path / "root"
  assert run(capsys, "--sweep", path, "--workdir", str(root), "--array", "--evaluate")[0] == 0
  stub = tmp_path / "bin" / "unimo-jax"
  stub.parent.mkdir()
  log = tmp_path / "calls.txt"
  stub.write_text(f'#!/bin/bash\necho "$*" >> {log}\n[[ $1 == evaluate ]] && exit 5\nexit 0\n')
  stub.chmod(0o755)
  env = dict(os.environ, PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
             SLURM_ARRAY_TASK_ID="1")
  p = subprocess.run(["bash", str(root / "sweep_array.sh")], env=env, capture_output=True,
                     text=True, timeout=60)
  assert p.returncode == 5, p.stderr
  train, evaluate = log.read_text().splitlines()
  assert train.startswith("train --config ") and "--config.seed=1" in train
  assert evaluate == f"evaluate --workdir {root}/01_seed=1"
  with open(root / "status" / "trial_1.json") as f:
    status = json.load(f)
  assert (status["exit_code"], status["evaluate_exit_code"]) == (0, 5)
  rc, out, _ = run(capsys, "report", "--workdir", str(root))  # `sweep report` == --summary
  assert rc == 0 and "evaluate failed (exit 5)" in out


# ------------------------------------------------------------------------------ summary
def fake_trial(root, name, steps, total, losses, results=None, exit_code=None, index=0):
  """A trial workdir as training and evaluate leave it."""
  wd = os.path.join(root, name)
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump({"train": {"total_steps": total}}, f)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    for step, loss in zip(steps, losses):
      f.write(json.dumps({"step": step, "time": 0.0, "loss": loss, "text_mlm/loss": loss / 2,
                          "pair_cmcl/loss_i2t": loss / 4, "learning_rate": 0.1}) + "\n")
    f.write(json.dumps({"step": steps[-1], "time": 0.0, "eval/validation/i2t_r@1": 0.25}) + "\n")
  if results:
    with open(os.path.join(wd, "results.json"), "w") as f:
      json.dump({"evaluations": results}, f)
  if exit_code is not None:
    sweep_lib.write_status(root, index, exit_code, 0.0, "local")
  return wd


def test_summary_table_csv_and_plot(capsys, tmp_path):
  trials = [{"optimizer.learning_rate": lr, "cmcl.use_negatives": neg}
            for lr in (0.001, 0.01) for neg in (True, False)]
  path = sweep_file(tmp_path, trials, extra='METRIC = "test/i2t_r@1"')
  root = str(tmp_path / "root")
  rc, _, _ = run(capsys, "--sweep", path, "--workdir", root, "--print")
  s = sweep_lib.load(path)
  names = [sweep_lib.trial_name(i, t) for i, t in enumerate(trials)]
  sweep_lib.write_manifest(root, s, sweep_lib.commands(s.config, s.trials, root), [])
  result = lambda step, split, r1: {"step": step, "split": split, "metrics": {"i2t_r@1": r1,
                                                                              "cider": 2 * r1}}
  fake_trial(root, names[0], [2, 4], 4, [3.0, 2.0], [result(0, "test", 0.01),
                                                     result(4, "test", 0.5)], exit_code=0)
  fake_trial(root, names[1], [2], 4, [3.5], exit_code=3, index=1)
  fake_trial(root, names[2], [2], 4, [2.5])  # no exit status: still running or killed
  # trial 3 never started
  rc, out, _ = run(capsys, "--workdir", root, "--summary")
  assert rc == 0
  md = open(os.path.join(root, "summary.md")).read()
  rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
  head = [c.strip() for c in rows[0].strip("|").split("|")]
  assert head[:6] == ["trial", "status", "optimizer.learning_rate", "cmcl.use_negatives", "step",
                      "test/i2t_r@1"]
  assert "loss" in head and "pair_cmcl/loss_i2t" in head and "test/cider" in head
  cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]
  assert len(cells) == 4
  by = {c[0]: dict(zip(head, c)) for c in cells}
  assert by["0"]["status"] == "done" and by["0"]["test/i2t_r@1"] == "0.5"  # the latest step
  assert by["0"]["loss"] == "2" and by["0"]["step"] == "4"
  assert by["0"]["optimizer.learning_rate"] == "0.001" and by["0"]["cmcl.use_negatives"] == "True"
  assert by["1"]["status"] == "failed (exit 3: non-finite guard)" and by["1"]["loss"] == "3.5"
  assert by["2"]["status"] == "unfinished (step 2/4)"
  assert by["3"]["status"] == "not started" and by["3"]["optimizer.learning_rate"] == "0.01"
  assert "not done: trial 1 failed" in md
  with open(os.path.join(root, "summary.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["trial"] for r in table] == ["0", "1", "2", "3"]
  assert float(table[0]["text_mlm/loss"]) == 1.0 and float(table[0]["test/cider"]) == 1.0
  assert float(table[0]["eval/validation/i2t_r@1"]) == 0.25 and table[3]["loss"] == ""
  assert table[2]["name"] == names[2]
  with open(os.path.join(root, "summary.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_plot_of_free_form_trials_and_a_missing_manifest(capsys, tmp_path):
  path = sweep_file(tmp_path, [{}, {"cmcl.use_negatives": False}])
  root = str(tmp_path / "root")
  rc, _, err = run(capsys, "--workdir", root, "--summary")
  assert rc == 2 and "sweep.json does not exist" in err
  rc, _, _ = run(capsys, "--sweep", path, "--workdir", root, "--summary")  # from the sweep file
  assert rc == 0 and os.path.getsize(os.path.join(root, "summary.png")) > 0


def test_local_run_records_a_failed_trial_and_exits_4(capfd, tmp_path, data_dir):
  path = sweep_file(tmp_path, [{}, {"optimizer.nope": 1}],
                    config=f"{DEMO}:smoke,data_dir={data_dir}")
  root = tmp_path / "root"
  rc, out, err = run(capfd, "--sweep", path, "--workdir", str(root), "--only", "1")  # fd 1, 2
  assert "--config.optimizer.nope: the config has no field 'nope'" in err
  assert rc == commands.TRIALS_FAILED and "0/1 trials finished" in out
  with open(root / "status" / "trial_1.json") as f:
    assert json.load(f)["exit_code"] == 2
  assert not os.path.exists(root / "status" / "trial_0.json")
