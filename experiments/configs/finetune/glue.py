"""GLUE-style text classification / regression (SST-2, CoLA, MNLI, STS-B) on the pooled h[CLS].

  unimo-jax finetune --config experiments/configs/finetune/sst2.py:base,data_dir=D --workdir W \\
      --config.init_from=/models/unimo_base_converted

Official recipe (UNIMO ``script/*/model_conf``; base and large alike): batch {16, 32} x lr
{1e-5, 2e-5, 3e-5} x 5 seeds (the sweeps ``experiments/sweeps/finetune_<task>.py``), 10
epochs, weight decay 0, max length 512, warmup 6%, dropout 0.1. Pairs are ``[CLS] A [SEP] B
[SEP]``. STS-B starts from the MNLI model (``init_from`` = the MNLI workdir: its poolers load,
the output layer of another size starts fresh). Paper: SST-2 95.1 / 96.8, MNLI 86.8 / 89.8,
CoLA 65.4 / 68.5 (Matthews), STS-B 91.0 / 92.6 (Pearson), base / large.

Data (``base|large``): ``DATA_DIR/<task>/{train,dev,test}.tsv`` with the header
``text_a[,text_b],label`` (MNLI labels by name). ``demo``: the generated paraphrase task
(``python -m data_pipelines.finetune.demo_text --out DATA_DIR/finetune``). ``tfds`` (any
size): TFDS ``glue/<task>`` prepared under ``tfds_dir=D`` (``tfds build glue --config sst2
--data_dir D`` once, where the network is reachable); MNLI validates on validation_matched
and validation_mismatched, its labels mapped by name onto the TSV config's order.
"""
import os

from experiments.configs.finetune import common

# task -> (kind, num_labels, label names, train examples, eval metric)
# TFDS split names where they are not train / validation / test
TFDS_SPLITS = {"mnli": dict(validation="validation_matched", test="test_matched")}
TASKS = {
    "sst2": ("classification", 2, [], 67349, "accuracy"),
    "cola": ("classification", 2, [], 8551, "matthews"),
    "mnli": ("classification", 3, ["contradiction", "entailment", "neutral"], 392702,
             "accuracy"),
    "stsb": ("regression", 1, [], 5749, "pearson"),
}


def glue_config(name: str, arg=None):
  args = common.parse(arg)
  kind, labels, names, examples, _ = TASKS[name]
  c = common.new_config(kind, args, num_labels=labels, head_dropout=0.1)
  c.data.source = "tsv"
  if common.size_of(args) == "demo":
    paths = common.demo_text(args, "paraphrase")
    examples = examples if args["tfds"] else 2000
    common.recipe(c, batch=32, lr=5e-4, epochs=3, train_examples=examples)
    c.data.max_length = 96
  else:
    root = os.path.join(os.path.expanduser(args["data_dir"]), name)
    paths = {s: os.path.join(root, f"{f}.tsv") for s, f in (("train", "train"),
                                                            ("validation", "dev"),
                                                            ("test", "test"))}
    c.data.label_names = names
    c.data.max_length = 512
    common.recipe(c, batch=32, lr=2e-5, epochs=10, train_examples=examples, weight_decay=0.0)
  c.evaluation.splits = ["validation"]
  if args["tfds"]:
    c.data.source = "tfds"
    c.data.tfds_name = f"glue/{name}"
    c.data.tfds_data_dir = args["tfds_dir"]
    c.data.label_names = names
    paths = dict(dict(train="train", validation="validation", test="test"),
                 **TFDS_SPLITS.get(name, {}))
    if name == "mnli":
      c.evaluation.splits = ["validation", "validation_mismatched"]
  c.data.train, c.data.validation, c.data.test = (paths["train"], paths["validation"],
                                                  paths["test"])
  if args["smoke"]:
    common.smoke(c)
  return c


def official_grid(name: str, seeds=(1, 2, 3, 4, 5)):
  """UNIMO's official grid for task ``name``: batch {16, 32} x lr {1e-5, 2e-5, 3e-5} x seeds,
  10 epochs (the step count and its 6% warmup follow the batch size)."""
  from unimo_jax.train import sweep  # pylint: disable=import-outside-toplevel
  batches = [16, 32]
  steps = [max(1, int(10 * TASKS[name][3] / b)) for b in batches]
  return sweep.product(
      {"data.batch_size": batches, "train.total_steps": steps,
       "optimizer.warmup_steps": [int(0.06 * n) for n in steps]},
      {"optimizer.learning_rate": [1e-5, 2e-5, 3e-5]},
      {"seed": list(seeds), "data.seed": list(seeds)})
