"""What the own-data examples share: config args, a small model and the training schedule.

Each example file (webdataset.py, coco.py, jsonl.py, tfds.py, regions_npz.py, regions_tsv.py)
builds only its ``data`` and ``evaluation.sources`` sections on top of ``base_config``; the
walk-through is docs/own_data.md. Config args (``--config FILE:ARG``, comma separated):

  root=DIR        the data folder (required; the layout is in each example's docstring)
  tokenizer=SPEC  default ``sentencepiece:ROOT/tokenizer/spm.model`` (``unimo-jax tokenizer
                  train --config FILE:root=DIR --out ROOT/tokenizer/spm`` writes it)
  corpus=FILE     a text corpus for the text stream (text lines, or JSON lines with "text");
                  without it the text stream reads the example's own texts or is off
  steps=N         training steps (default 2000)
  smoke           a 1-layer H=32 model at 32 px, batch 8, 2 steps: checks the wiring in seconds
"""
import os

from experiments.configs import common
from unimo_jax.train.config import default_config


def parse(arg, **extra):
  args = common.parse_arg(arg, root="", tokenizer="", corpus="", steps=2000, smoke=False,
                          **extra)
  if not args["root"]:
    raise ValueError("config arg root=DIR (the data folder) is required, e.g. "
                     "--config experiments/configs/examples/webdataset.py:root=/data/mine")
  args["root"] = os.path.abspath(os.path.expanduser(args["root"]))
  args["tokenizer"] = args["tokenizer"] or (
      f"sentencepiece:{os.path.join(args['root'], 'tokenizer', 'spm.model')}")
  return args


def base_config(args, *, visual_input="patches", image_size=64, patch_size=16):
  """A small UNIMO (4 layers, H 256; smoke: 1 layer, H 32) with the example's data fields
  left to the caller. Batch sizes are GLOBAL rows per step."""
  c = default_config()
  smoke = args["smoke"]
  image_size = 32 if smoke else image_size
  m = c.model
  m.vocab_size = 0                      # the tokenizer's
  m.hidden_size = 32 if smoke else 256
  m.num_layers = 1 if smoke else 4
  m.num_heads = 2 if smoke else 4
  m.mlp_dim = 64 if smoke else 1024
  m.max_positions = 130
  m.roberta_positions = False
  m.dropout_rate = m.attention_dropout_rate = 0.0 if smoke else 0.1
  m.init_std = 0.125 if smoke else 0.0625   # ~1/sqrt(H): see experiments/configs/demo.py
  m.visual_input = visual_input
  m.image_size = image_size
  m.patch_size = patch_size
  m.projection_dim = 32 if smoke else 128
  m.dtype = "auto"

  d = c.data
  d.seed = 0
  d.tokenizer = args["tokenizer"]
  d.visual_input = visual_input
  d.image_size = image_size
  d.patch_size = patch_size
  d.num_positives = 2          # Kp: the image's other captions are positives X+
  d.num_negatives = 2          # Kn: lexicon rewrites of the caption (lexicon_negatives)
  d.num_related_images = 0     # Ki, Kt: no neighbours side file in these examples
  d.num_related_texts = 0
  d.streams = dict(text=dict(batch_size=0, sources=[]), image=dict(batch_size=0, sources=[]),
                   pair=dict(batch_size=0, sources=[]))

  p = c.optimizer
  p.learning_rate = 1e-3 if smoke else 5e-4
  p.warmup_steps = 1 if smoke else 100
  p.schedule = "cosine"

  t = c.train
  t.total_steps = 2 if smoke else int(args["steps"])
  t.log_every = 1 if smoke else 50
  t.checkpoint_every = 0 if smoke else 500
  t.progress_bar = "off" if smoke else "auto"
  t.compile_report = not smoke

  c.evaluation.batch_size = 8 if smoke else 64
  c.evaluation.caption = dict(max_length=12 if smoke else 32, beam_size=1 if smoke else 3)
  c.mesh.data = -1
  return c


def batch_sizes(args, text=32, image=32, pair=64):
  """(text, image, pair) global batch sizes; smoke: 8 each (one row per fake CPU device)."""
  return (8, 8, 8) if args["smoke"] else (text, image, pair)


def lengths(stream, args, max_length=40):
  """Text lengths and prediction counts of a stream (text corpus or captions)."""
  L = 16 if args["smoke"] else max_length
  if stream == "text":
    return dict(max_length=L, max_predictions=max(2, L // 6), s2s_max_length=L,
                s2s_max_predictions=max(4, L // 3))
  return dict(max_length=L, max_predictions=max(2, L // 6), s2s_max_predictions=L)


def text_stream(args, default_sources=()):
  """The text stream: the ``corpus=`` file if given, else ``default_sources`` (else off)."""
  corpus = os.path.abspath(os.path.expanduser(args["corpus"])) if args["corpus"] else ""
  if corpus:
    kind = "jsonl" if corpus.endswith((".jsonl", ".json")) else "text"
    default_sources = [dict(name="corpus", kind=kind, path=corpus)]
  size = batch_sizes(args)[0] if default_sources else 0
  return dict(batch_size=size, sources=list(default_sources), **lengths("text", args, 64))
