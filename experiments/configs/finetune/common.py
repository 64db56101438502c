"""Shared pieces of the fine-tuning configs: sizes (demo / base / large), UNIMO's recipe, data.

Every task file takes one config arg (``task.py:ARG``, comma-separated):

  demo (default)   the demo model (``experiments/configs/demo.py``'s, so the demo pre-training
                   workdir is a valid ``init_from``) on synthetic_scenes data or a tiny
                   generated text task (``python -m data_pipelines.finetune.demo_text``)
  base | large     UNIMO-base / -large shapes, RoBERTa's BPE (``bpe:DATA_DIR/roberta_bpe``) and
                   the official recipe of the task (its values are quoted in each file)
  data_dir=D       where the data are (demo: the synthetic_scenes folder of `unimo-jax prepare`)
  tfds             GLUE tasks, CNN/DM and Gigaword: read ``glue/<task>``, ``cnn_dailymail``
                   or ``gigaword`` through TFDS from ``tfds_dir`` (prepared beforehand:
                   nothing is downloaded at run time) instead of TSV files
  tfds_dir=D       the TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets)
  lines            SNLI-VE / COCO captioning: UNIMO's official ``;``-separated lines with
                   region features (``data_pipelines/finetune/unimo_lines.py``) instead of
                   JSONL + images
  smoke            a few steps on the tiny scenes size (tests, CI)

Recipes follow UNIMO's scripts (``../shared/UNIMO.md``): Adam b1 0.9, b2 0.98, eps 1e-6, linear
warmup over 6% of the steps then linear decay to 0, global-norm clip 1.0; total steps are
``epochs * train examples / batch``.
"""
import os

from experiments.configs import common
from unimo_jax.finetune.config import default_config

DEMO_TEXT = "finetune"  # sub-folder of the demo data dir holding the generated text TSVs


def parse(arg):
  return common.parse_arg(arg, demo=False, base=False, large=False, smoke=False,
                          data_dir=common.DEMO_DATA_DIR, tfds=False, tfds_dir="", lines=False)


def size_of(args) -> str:
  chosen = [s for s in ("base", "large") if args[s]]
  if len(chosen) > 1:
    raise ValueError("config arg: choose one of demo, base, large")
  return chosen[0] if chosen else "demo"


def new_config(kind: str, args, **task):
  """The config of a task: model of the chosen size, the task section, the data's tokenizer."""
  c = default_config()
  c.task.kind = kind
  c.task.update(task)
  size = size_of(args)
  if size == "demo":
    from experiments.configs import demo  # pylint: disable=import-outside-toplevel
    c.model = demo.get_config("smoke").model
    # fine-tuning regularises with dropout 0.1 as UNIMO's recipes (the demo pre-trains without)
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.data.tokenizer = common.synthetic_tokenizer(args["data_dir"], "tiny" if args["smoke"]
                                                  else "demo")
    c.data.scenes.update(dict(size="tiny" if args["smoke"] else "demo", image_size=64,
                              input_size=48))
  else:
    from unimo_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel
    c.model.update(ModelConfig.preset(size).to_dict())
    c.model.dtype = "auto"
    c.data.tokenizer = f"bpe:{os.path.expanduser(args['data_dir'])}/roberta_bpe"
  c.train.progress_bar = "auto"
  c.train.keep_checkpoints = 2
  return c


def recipe(c, *, batch: int, lr: float, epochs: float, train_examples: int,
           weight_decay: float = 0.01, warmup: float = 0.06, eval_batch: int = 0):
  """UNIMO's optimizer recipe on ``train_examples`` examples."""
  c.data.batch_size = batch
  c.data.eval_batch_size = eval_batch or max(batch, 8)
  steps = max(1, int(epochs * train_examples / batch))
  p = c.optimizer
  p.learning_rate = lr
  p.b1, p.b2, p.eps = 0.9, 0.98, 1e-6
  p.weight_decay = weight_decay
  p.warmup_steps = int(warmup * steps)
  p.schedule = "linear"
  p.end_lr_factor = 0.0
  p.clip_norm = 1.0
  c.train.total_steps = steps
  c.train.log_every = max(1, min(50, steps // 10))
  c.train.checkpoint_every = max(1, steps // 4)
  return c


def smoke(c):
  """A few steps, tiny batches (tests, CI)."""
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.scenes.train_limit = 16
  c.data.scenes.eval_limit = 8
  c.train.total_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.optimizer.warmup_steps = 1
  return c


def demo_text(args, stem: str) -> dict:
  """The generated text task's TSV paths (``python -m data_pipelines.finetune.demo_text``)."""
  root = os.path.join(os.path.expanduser(args["data_dir"]), DEMO_TEXT)
  return {split: os.path.join(root, f"{stem}_{split}.tsv")
          for split in ("train", "validation", "test")}
