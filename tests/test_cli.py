"""The ``unimo-jax`` command line: --help of every command names its flags, and every command
returns the exit codes of ``unimo_jax.commands`` (0 ok, 2 bad usage or input in one line, 3 the
non-finite guard) -- checked against the codes' definitions, command by command."""
import json
import os
import re
import subprocess
import sys

import pytest

from unimo_jax import cli, commands
from unimo_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "experiments", "configs", "demo.py")


def run(capsys, *argv):
  """``unimo-jax ARGV...`` in this process: (exit code, stdout, stderr)."""
  rc = cli.main(["unimo-jax", *argv])
  out, err = capsys.readouterr()
  return rc, out, err.strip()


def one_line(err):
  """The command's own last stderr line (library warnings may come before it)."""
  lines = [line for line in err.splitlines() if line.startswith("unimo-jax")]
  assert len(lines) == 1, err
  return lines[0]


# ------------------------------------------------------------------------------ --help
HELP = {
    ("train",): ["--config FILE[:ARG]", "--config.FIELD=VALUE", "--workdir", "--[no]dry_run",
                 "--coordinator_address", "--num_processes", "--process_id", "--log_level",
                 "unimo_jax/train/config.py", "--helpfull"],
    ("sweep",): ["--sweep", "--workdir", "--print", "--array", "--summary", "--only", "--set",
                 "--dry-run", "--metric"],
    ("evaluate",): ["--workdir", "--step", "--split", "--limit", "--batch-size", "--no-figures"],
    ("convert",): ["roberta"],
    ("convert", "roberta"): ["--hf-dir", "--out", "--visual-input"],
    ("model-info",): ["--preset", "--visual", "--batch-size", "--text-length", "--dtype"],
    ("prepare",): ["synthetic_scenes", "tfidf"],
    ("prepare", "synthetic_scenes"): ["--data-dir", "--size", "--vocab-size", "--force"],
    ("prepare", "tfidf"): ["--captions", "--out", "--k"],
    ("tokenizer",): ["train"],
    ("tokenizer", "train"): ["--input", "--vocab-size", "--out", "--model-type"],
}


# a config-driven command (train, finetune) lists the config flags and the workdir
CONFIG_FLAGS = ["--config FILE[:ARG]", "--config.FIELD=VALUE", "--workdir", "--helpfull"]


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(capsys, name):
  rc, out, _ = run(capsys, name, "--help")
  assert rc == commands.OK and out.startswith("usage: unimo-jax " + name)
  assert "exit status:" in out
  assert (len(set(re.findall(r"--[a-z][a-z_-]+", out))) >= 2
          or f"unimo-jax {name} SUBCOMMAND --help lists the flags" in out)
  if (name,) not in HELP:  # a command without a case below: a config-driven one
    for flag in CONFIG_FLAGS:
      assert flag in out, (name, flag)


@pytest.mark.parametrize("words", sorted(HELP), ids=" ".join)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_and_names_the_flags(capsys, words, flag):
  rc, out, _ = run(capsys, *words, flag)
  assert rc == commands.OK
  for name in HELP[words]:
    assert name in out, (words, name, out)
  assert "exit status:" in out and "  2 " in out
  # every flag line has a meaning: no option is listed bare
  if words[0] not in ("train",):
    assert "show this help message" in out


def options_without_meaning(help_text):
  """Option lines of an argparse or absl help listing that carry no one-line meaning."""
  lines = help_text.splitlines()
  bare = []
  for i, line in enumerate(lines):
    m = re.match(r"^  (-[-\w\[\]]+[^ ]*(?: [^ ]+)*)(\s{2,}\S.*)?$", line)
    if not m or m.group(2):
      continue
    following = lines[i + 1] if i + 1 < len(lines) else ""
    if not re.match(r"^\s{6,}\S", following):  # the meaning wrapped onto the next line
      bare.append(m.group(1))
  return bare


@pytest.mark.parametrize("words", sorted(HELP) + [("finetune",)], ids=" ".join)
def test_every_flag_has_a_one_line_meaning(capsys, words):
  if words[0] not in cli.COMMANDS:
    pytest.skip(f"{words[0]} is not a command here")
  rc, out, _ = run(capsys, *words, "--help")
  assert rc == 0 and options_without_meaning(out) == [], out


def test_train_help_lists_exit_code_3_and_helpfull_is_absl_s_listing(capsys):
  rc, out, _ = run(capsys, "train", "--help")
  assert rc == 0 and "  3 " in out and "non-finite" in out
  rc, out, _ = run(capsys, "train", "--helpfull")
  assert rc == 0 and "absl.flags:" in out and "--flagfile" in out and "--workdir" in out
  rc, same, _ = run(capsys, "help", "train")
  assert rc == 0 and same.strip() == run(capsys, "train", "--help")[1].strip()


def test_top_level_usage(capsys):
  rc, out, _ = run(capsys, "--help")
  assert rc == 0 and all(name in out for name in cli.COMMANDS) and "130" in out
  rc, _, err = run(capsys)
  assert rc == commands.USAGE and "usage: unimo-jax COMMAND" in err
  rc, _, err = run(capsys, "tran")
  assert rc == commands.USAGE and "unknown command 'tran'" in one_line(err)


# ------------------------------------------------------------------------------ exit codes
def test_exit_code_table_is_the_documented_one():
  assert [code for code, _ in commands.EXIT_CODES] == [0, 1, 2, 3, 4, 130]
  assert (commands.OK, commands.USAGE, commands.NONFINITE, commands.TRIALS_FAILED) == (0, 2, 3, 4)
  text = commands.exit_codes_text([0, 2])
  assert text.splitlines()[1].split()[0] == "0" and len(text.splitlines()) == 3
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  for code, _ in commands.EXIT_CODES:  # the README's command table documents each code
    assert f"| {code} |" in readme, code


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--bogus"], "Unknown command line flag 'bogus'"),
    (["train", "--workdir", "/tmp/x"], "--config and --workdir are required"),
    (["train", "--config", "/nonexistent/c.py", "--workdir", "/tmp/x"], "/nonexistent/c.py"),
    (["train", "--config", DEMO, "--workdir", "/tmp/x", "--config.optimizer.lr=1"],
     "--config.optimizer.lr: the config has no field 'lr'"),
    (["train", "--config", DEMO, "--workdir", "/tmp/x", "--config.optimizer.learning_rate=abc"],
     "could not convert"),
    (["train", "--config", DEMO, "--workdir", "/tmp/x", "--coordinator_address", "h:1"],
     "--num_processes"),
    (["evaluate"], "the following arguments are required: --workdir"),
    (["evaluate", "--workdir", "/nonexistent/run"], "no such workdir"),
    (["evaluate", "--workdir", "/tmp", "--limit", "many"], "invalid int value"),
    (["convert"], "required: source"),
    (["convert", "roberta", "--hf-dir", "/nonexistent/hf", "--out", "/tmp/o"], "/nonexistent/hf"),
    (["model-info", "--preset", "huge"], "invalid choice: 'huge'"),
    (["prepare", "synthetic_scenes"], "--data-dir"),
    (["prepare", "tfidf", "--captions", "/nonexistent/c.jsonl", "--out", "/tmp/o.jsonl"],
     "/nonexistent/c.jsonl"),
    (["tokenizer", "train", "--input", "/nonexistent/corpus.txt", "--vocab-size", "64", "--out",
      "/tmp/t"], "/nonexistent/corpus.txt"),
    (["tokenizer", "fit"], "invalid choice: 'fit'"),
    (["finetune", "--bogus"], "Unknown command line flag 'bogus'"),
    (["finetune", "--workdir", "/tmp/x"], "--config and --workdir are required"),
    (["sweep", "--workdir", "/tmp/x"], "--sweep"),
    (["sweep", "--sweep", "/nonexistent/s.py", "--workdir", "/tmp/x"], "/nonexistent/s.py"),
])
def test_bad_usage_or_input_exits_2_with_one_line(capsys, argv, fragment):
  if argv[0] not in cli.COMMANDS:
    pytest.skip(f"{argv[0]} is not a command here")
  rc, _, err = run(capsys, *argv)
  assert rc == commands.USAGE, (argv, err)
  assert fragment in one_line(err), err


def test_an_unexpected_error_is_1_with_a_traceback_and_ctrl_c_is_130(tmp_path):
  script = ("import sys, types\n"
            "m = types.ModuleType('fake_command')\n"
            "def main(argv):\n"
            "  if argv[1:] == ['--interrupt']: raise KeyboardInterrupt\n"
            "  return 1 / 0\n"
            "m.main = main\n"
            "sys.modules['fake_command'] = m\n"
            "from unimo_jax import cli\n"
            "cli.COMMANDS['fake'] = ('fake_command', 'a command with a bug')\n"
            "sys.exit(cli.main(['unimo-jax', 'fake'] + sys.argv[1:]))\n")
  env = dict(os.environ, UNIMO_JAX_COMPILATION_CACHE="")
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert p.returncode == commands.ERROR and "Traceback" in p.stderr
  assert "ZeroDivisionError" in p.stderr
  p = subprocess.run([sys.executable, "-c", script, "--interrupt"], capture_output=True,
                     text=True, env=env)
  assert p.returncode == commands.INTERRUPTED and "unimo-jax fake: interrupted" in p.stderr


def test_both_flag_spellings_reach_every_command(capsys):
  # argparse commands take --x_y for --x-y, absl ones --x-y for --x_y
  rc, _, err = run(capsys, "convert", "roberta", "--hf_dir", "/nonexistent/hf", "--out", "/o")
  assert rc == 2 and "/nonexistent/hf" in err
  rc, _, err = run(capsys, "train", "--config", DEMO, "--workdir", "/tmp/x",
                   "--coordinator-address", "h:1")
  assert rc == 2 and "--num_processes" in err
  assert commands.respell(["--a-b=1", "--config.x_y=2", "--", "--c-d"], ["a_b", "c_d"], "_") == [
      "--a_b=1", "--config.x_y=2", "--", "--c-d"]
  assert commands.respell(["--nodry-run", "--data_dir", "x"], ["dry_run"], "_") == [
      "--nodry_run", "--data_dir", "x"]


def test_ok_exits_0_for_the_cheap_commands(capsys, tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(f"the {c} shape number {i} is left of a {d} one"
                              for i in range(200) for c, d in [("red", "blue"), ("big", "tiny")]))
  rc, out, _ = run(capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "40",
                   "--out", str(tmp_path / "spm"), "--model-type", "bpe")
  assert rc == 0 and os.path.isfile(tmp_path / "spm.model"), out
  captions = tmp_path / "captions.jsonl"
  captions.write_text("\n".join(json.dumps({"id": i, "captions": [f"a {w} circle"]})
                                for i, w in enumerate(["red", "blue", "green", "red"])))
  rc, _, _ = run(capsys, "prepare", "tfidf", "--captions", str(captions), "--out",
                 str(tmp_path / "neg.jsonl"), "--k", "2")
  assert rc == 0 and os.path.isfile(tmp_path / "neg.jsonl")


# ------------------------------------------------------------------------------ train: 0 and 3
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_pipelines import prepare  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp("synthetic_scenes"))
  prepare.prepare_synthetic(d, size="tiny")
  return d


def smoke(data_dir):
  return f"{DEMO}:smoke,data_dir={data_dir}"


def test_train_dry_run_validates_and_exits_0(capsys, data_dir, tmp_path):
  rc, out, err = run(capsys, "train", "--config", smoke(data_dir), "--workdir",
                     str(tmp_path / "run"), "--config.optimizer.learning_rate=0.01", "--dry_run")
  assert rc == commands.OK, err
  assert str(tmp_path / "run") in out and "optimizer.learning_rate=0.01" in out
  assert "fresh" in out and not os.path.exists(tmp_path / "run" / "checkpoints")
  # the same run with a config error stops before anything with 2
  rc, _, err = run(capsys, "train", "--config", smoke(data_dir), "--workdir",
                   str(tmp_path / "run"), "--config.model.hidden_size=66", "--dry_run")
  assert rc == commands.USAGE and "divisible by num_heads" in one_line(err)


def test_train_maps_the_non_finite_guard_to_3(capsys, data_dir, tmp_path, monkeypatch):
  def stopped(*args, **kwargs):
    raise trainer.NonFiniteError("stopping at step 5: loss or gradient not finite")
  monkeypatch.setattr(trainer, "train", stopped)
  rc, _, err = run(capsys, "train", "--config", smoke(data_dir), "--workdir",
                   str(tmp_path / "run"))
  assert rc == commands.NONFINITE
  assert "not finite" in one_line(err)


@pytest.mark.slow
def test_train_really_stopped_by_the_non_finite_guard_exits_3(capsys, data_dir, tmp_path):
  # a 1e30 initialisation overflows the first forward pass: every step is non-finite
  rc, _, err = run(capsys, "train", "--config", smoke(data_dir), "--workdir",
                   str(tmp_path / "run"), "--config.model.init_std=1e30",
                   "--config.train.max_nonfinite_steps=1", "--config.train.total_steps=2",
                   "--config.train.progress_bar=off")
  assert rc == commands.NONFINITE, err
  assert "not finite for 1 consecutive steps" in one_line(err)
