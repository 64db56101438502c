"""``unimo-jax tokenizer train``: trains a UNIMO-layout SentencePiece model on a run's texts.

    unimo-jax tokenizer train --config experiments/configs/examples/webdataset.py:root=D \
        --vocab-size 8000 --out D/tokenizer/spm
    unimo-jax tokenizer train --input corpus.txt train-000.tar more.jsonl --vocab-size 32000 \
        --out tok/spm

Inputs: ``--config`` reads every source of the config's streams through the training readers
(text corpora, WebDataset shards, COCO caption JSON, JSON lines, TFDS datasets; each caption
and text once); ``--input`` names files, read by extension (``data_pipelines.corpus``): .tar
WebDataset, .jsonl JSON lines (the ``--text-field``, "text" by default, and captions), .json
COCO captions, else text lines. A vocabulary larger than the corpus can fill is an error of one
line naming the largest size (``--fit-vocab`` uses it instead). Writes ``OUT.model`` and
``OUT.vocab`` with [CLS]=0 [PAD]=1 [SEP]=2 [UNK]=3 and [MASK] as the last id; use it as
``sentencepiece:OUT.model``.
"""
import itertools
import time

from data_pipelines import corpus, tokenizers


def _parser(prog):
  from unimo_jax import commands  # pylint: disable=import-outside-toplevel
  p = commands.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="action", required=True)
  t = sub.add_parser("train", help="train a SentencePiece model with UNIMO's special ids")
  t.add_argument("--input", nargs="+", default=[],
                 help="files: .tar (WebDataset), .jsonl, .json (COCO captions), text")
  t.add_argument("--config", default="",
                 help="an experiment config FILE[:ARG]: train on the texts of its sources")
  t.add_argument("--max-texts", type=int, default=2_000_000,
                 help="read at most this many texts (SentencePiece samples its input anyway)")
  t.add_argument("--vocab-size", type=int, required=True, help="total size incl. specials")
  t.add_argument("--out", required=True, help="output prefix (writes PREFIX.model/.vocab)")
  t.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "word", "char"),
                 help="SentencePiece model type")
  t.add_argument("--character-coverage", type=float, default=0.9995,
                 help="share of characters the model covers (rarer ones become UNK)")
  t.add_argument("--text-field", default="text", help="field read from JSONL inputs")
  t.add_argument("--fit-vocab", action="store_true",
                 help="shrink the vocabulary to what the corpus can fill instead of failing")
  return p


def main(argv) -> int:
  from unimo_jax import commands  # pylint: disable=import-outside-toplevel
  args = _parser(argv[0]).parse_args(argv[1:])
  try:
    return _train(args)
  # a missing input file; SentencePiece reports bad training input (a vocabulary larger than
  # the corpus can fill) as RuntimeError
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    return commands.fail(f"{argv[0]} {args.action}", e)


def _train(args) -> int:
  start = time.time()
  if not args.input and not args.config:
    raise ValueError("give --config FILE[:ARG] or --input FILE ...")
  texts = corpus.path_texts(args.input, args.text_field)
  if args.config:
    texts = itertools.chain(texts, corpus.config_texts(corpus.load_config_file(args.config)))
  lines = list(itertools.islice(texts, args.max_texts))
  path = tokenizers.train_sentencepiece(
      lines, args.out, args.vocab_size, model_type=args.model_type,
      character_coverage=args.character_coverage, fit_vocab=args.fit_vocab)
  tok = tokenizers.load_tokenizer(f"sentencepiece:{path}")
  print(f"wrote {path}: vocab_size {tok.vocab_size} (mask id {tok.mask_id}) from {len(lines)} "
        f"texts in {time.time() - start:.1f}s; use it as data.tokenizer="
        f"'sentencepiece:{path}'")
  return 0
