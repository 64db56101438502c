"""Text seq2seq (CNN/DailyMail, Gigaword, SQuAD question generation) with the UniLM mask.

Source ``[CLS] s.. [SEP]``, target ``[CLS] t.. [MASK]`` (bos [CLS], eos [MASK]), target
positions restart at 0, label smoothing 0.1, weight decay 0.01; beam search with a length
penalty, a minimum length and trigram blocking; ROUGE-1/2/L and BLEU-4.

Official recipes (UNIMO ``script/*/model_conf``), base (large):
  CNN/DM    bs 8, lr 4e-5 (2e-5), 20 epochs, source 512, target 128, beam 5 (6), lp 0.6 (1.2),
            min out 20, trigram blocking; paper R-1/2/L 42.42/20.12/39.61 (43.51/20.65/40.63)
  Gigaword  bs 32, lr 3e-5, 10 epochs, source 128, target 32, beam 5 (6), lp 0.6 (1.2),
            min out 5; paper 38.80/19.99/36.27 (39.71/20.37/36.88)
  SQuAD-QG  bs 8, lr 1.25e-5 (5e-6), 20 epochs, source 416, target 96, out 48, beam 5 (6),
            lp 1.0 (1.2); paper BLEU-4 22.78 (24.59)
The target's positions restart at 0, so the source and the target must each fit the
position table, not their sum: CNN/DM's 512 + 128 runs on the base model's 514 positions
(512 text positions), in training and beam search. Data (``base|large``):
``DATA_DIR/<task>/{train,dev,test}.tsv`` with the header ``source,target``. ``demo``: the
generated canonical-caption task (``python -m data_pipelines.finetune.demo_text --out
DATA_DIR/finetune``). ``tfds`` (CNN/DM, Gigaword; any size): TFDS ``cnn_dailymail`` (article
-> highlights) or ``gigaword`` (document -> summary) prepared under ``tfds_dir=D``, splits
train / validation / test, nothing downloaded at run time:

  tfds build cnn_dailymail --data_dir D     # once, where the network is reachable
  unimo-jax finetune --config experiments/configs/finetune/cnndm.py:base,tfds,tfds_dir=D \\
      --workdir W --config.init_from=/models/unimo_base_converted

Another TFDS summarisation set: ``--config.data.tfds_name=xsum`` (its features from
``SEQ2SEQ_TFDS_KEYS`` in ``unimo_jax/finetune/config.py``), or any dataset with
``--config.data.source_key=F --config.data.target_key=G``.
"""
import os

from experiments.configs.finetune import common

# task -> base recipe, large changes, train examples
TASKS = {
    "cnndm": (dict(batch=8, lr=4e-5, epochs=20, src=512, tgt=128, beam=5, lp=0.6, min_out=20,
                   block=True), dict(lr=2e-5, beam=6, lp=1.2), 287227),
    "gigaword": (dict(batch=32, lr=3e-5, epochs=10, src=128, tgt=32, beam=5, lp=0.6, min_out=5,
                      block=False), dict(beam=6, lp=1.2), 3803957),
    "squad_qg": (dict(batch=8, lr=1.25e-5, epochs=20, src=416, tgt=96, beam=5, lp=1.0,
                      min_out=1, block=False, out=48), dict(lr=5e-6, beam=6, lp=1.2), 75722),
}
# task -> its TFDS dataset (config arg ``tfds``); SQuAD-QG's answer-marked sources are not in TFDS
TFDS_NAMES = {"cnndm": "cnn_dailymail", "gigaword": "gigaword"}


def seq2seq_config(name: str, arg=None):
  args = common.parse(arg)
  c = common.new_config("seq2seq", args, label_smoothing=0.1)
  c.data.source = "tsv"
  size = common.size_of(args)
  if size == "demo":
    paths = common.demo_text(args, "canonical")
    examples = TASKS[name][2] if args["tfds"] and name in TFDS_NAMES else 2000
    common.recipe(c, batch=32, lr=5e-4, epochs=3, train_examples=examples)
    c.data.max_source, c.data.max_target = 48, 48
    c.evaluation.update(dict(beam_size=3, max_length=40, alpha=0.6, min_length=3,
                             block_trigrams=False))
  else:
    base, large, examples = TASKS[name]
    r = dict(base, **(large if size == "large" else {}))
    root = os.path.join(os.path.expanduser(args["data_dir"]), name)
    paths = {s: os.path.join(root, f"{f}.tsv") for s, f in (("train", "train"),
                                                            ("validation", "dev"),
                                                            ("test", "test"))}
    common.recipe(c, batch=r["batch"], lr=r["lr"], epochs=r["epochs"], train_examples=examples)
    # target positions restart at 0: each block fits the table on its own (512 + 128 on 514)
    c.data.max_source, c.data.max_target = r["src"], r["tgt"]
    c.evaluation.update(dict(beam_size=r["beam"], max_length=r.get("out", r["tgt"]),
                             alpha=r["lp"], min_length=r["min_out"],
                             block_trigrams=r["block"]))
  if args["tfds"]:
    if name not in TFDS_NAMES:
      raise ValueError(f"config arg tfds: {name} has no TFDS dataset (TFDS: "
                       f"{', '.join(sorted(TFDS_NAMES))}); it reads TSV files")
    c.data.source = "tfds"
    c.data.tfds_name = TFDS_NAMES[name]
    c.data.tfds_data_dir = args["tfds_dir"]
    paths = dict(train="train", validation="validation", test="test")
  c.data.train, c.data.validation, c.data.test = (paths["train"], paths["validation"],
                                                  paths["test"])
  if args["smoke"]:
    common.smoke(c)
    c.evaluation.max_length = 4
  return c
