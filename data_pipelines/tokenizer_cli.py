"""``unimo-jax tokenizer train``: trains a UNIMO-layout SentencePiece model on text files.

    unimo-jax tokenizer train --input corpus.txt more.jsonl --vocab-size 32000 --out tok/spm

Inputs: plain text (one sentence or paragraph per line) or JSONL (the ``--text-field`` of each
object, "text" by default). Writes ``OUT.model`` and ``OUT.vocab`` with [CLS]=0 [PAD]=1 [SEP]=2
[UNK]=3 and [MASK] as the last id; use it as ``sentencepiece:OUT.model``.
"""
import json
import time

from data_pipelines import tokenizers


def read_lines(paths, text_field: str = "text"):
  """Yields the non-empty texts of text and JSONL files."""
  for path in paths:
    jsonl = path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        if jsonl:
          value = json.loads(line).get(text_field)
          if isinstance(value, str) and value.strip():
            yield value.strip()
        else:
          yield line


def _parser(prog):
  from unimo_jax import commands  # pylint: disable=import-outside-toplevel
  p = commands.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="action", required=True)
  t = sub.add_parser("train", help="train a SentencePiece model with UNIMO's special ids")
  t.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
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
  lines = list(read_lines(args.input, args.text_field))
  path = tokenizers.train_sentencepiece(
      lines, args.out, args.vocab_size, model_type=args.model_type,
      character_coverage=args.character_coverage, fit_vocab=args.fit_vocab)
  tok = tokenizers.load_tokenizer(f"sentencepiece:{path}")
  print(f"wrote {path}: vocab_size {tok.vocab_size} (mask id {tok.mask_id}) from {len(lines)} "
        f"lines in {time.time() - start:.1f}s")
  return 0
