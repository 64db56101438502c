"""Tokenizers behind one interface, with UNIMO's special-token layout.

Layout (any tokenizer): [CLS]=0 (<s>), [PAD]=1, [SEP]=2 (</s>), [UNK]=3, [MASK]=vocab_size-1
(50264 for RoBERTa's 50265 tokens); every other id is an ordinary token. A model input is
``[CLS] w1..wN [SEP]`` then [PAD] (``encode_padded``).

- ``SentencePieceTokenizer``: a model trained by ``train_sentencepiece`` (the command
  ``unimo-jax tokenizer train``); word starts are pieces beginning with '▁'.
- ``BPETokenizer``: RoBERTa/GPT-2 byte-level BPE read from local ``vocab.json`` +
  ``merges.txt`` (the files of roberta-base or of official UNIMO); word starts are tokens
  beginning with 'Ġ', the first token, and tokens after whitespace or a special token.

``load_tokenizer("sentencepiece:/path/x.model" | "bpe:/dir")`` returns either. Both are plain
Python (no TensorFlow): tf.data calls them through ``encode_batch`` / ``encode_padded``.
"""
import functools
import hashlib
import json
import os
import pickle
import re

import numpy as np

CLS_ID, PAD_ID, SEP_ID, UNK_ID = 0, 1, 2, 3
SPM_SPECIALS = ("[CLS]", "[PAD]", "[SEP]", "[UNK]")
SPM_MASK = "[MASK]"
BPE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BPE_MASK = "<mask>"


class Tokenizer:
  """Shared behaviour; subclasses set ``vocab_size``/``mask_id`` and implement
  ``encode``, ``_word_start_table``/``word_starts`` and ``decode``."""
  cls_id, pad_id, sep_id, unk_id = CLS_ID, PAD_ID, SEP_ID, UNK_ID
  vocab_size: int
  mask_id: int

  @property
  def special_ids(self) -> tuple:
    return (self.cls_id, self.pad_id, self.sep_id, self.unk_id, self.mask_id)

  def fingerprint(self) -> str:
    """sha256 prefix of the files that decide the ids (a token store records it)."""
    return hashlib.sha256(self._identity()).hexdigest()[:16]

  def _identity(self) -> bytes:
    # Subclasses return their model files' bytes; other tokenizers are what they pickle to.
    return pickle.dumps(self, protocol=4)

  def _is_special(self, ids: np.ndarray) -> np.ndarray:
    return (ids <= UNK_ID) | (ids == self.mask_id)

  def encode_batch(self, texts) -> list:
    """list[str] -> list of int32 arrays (no special tokens)."""
    return [self.encode(t) for t in texts]

  def encode_padded(self, texts, max_length: int) -> np.ndarray:
    """list[str] -> int32 [B, max_length]: ``[CLS] w.. [SEP]`` then PAD; words beyond
    ``max_length - 2`` tokens are cut (the [SEP] is always kept)."""
    out = np.full((len(texts), max_length), self.pad_id, np.int32)
    for row, ids in enumerate(self.encode_batch(texts)):
      ids = ids[:max_length - 2]
      out[row, 0] = self.cls_id
      out[row, 1:1 + len(ids)] = ids
      out[row, 1 + len(ids)] = self.sep_id
    return out


# ---------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------

# Texts longer than this (characters) are encoded through SentencePiece's numpy buffer; a
# caption's few ids come faster as a list (the buffer's wrapper costs ~0.7 us more there).
_BUFFER_CHARS = 200


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with the UNIMO layout (checked when loading)."""

  def __init__(self, model_file: str):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.model_file = model_file
    self.sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = self.sp.get_piece_size()
    self.mask_id = self.vocab_size - 1
    pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
    want = dict(zip(SPM_SPECIALS, range(4)))
    want[SPM_MASK] = self.mask_id
    wrong = {p: i for p, i in want.items() if pieces[i] != p}
    if wrong:
      raise ValueError(f"{model_file}: not a UNIMO-layout SentencePiece model (expected "
                       f"{want}); train it with `unimo-jax tokenizer train`")
    table = np.array([p.startswith("\u2581") for p in pieces], bool)
    table[list(self.special_ids)] = True
    self._starts = table

  def _identity(self) -> bytes:
    return b"sentencepiece\0" + self.sp.serialized_model_proto()

  def encode(self, text: str) -> np.ndarray:
    if len(text) > _BUFFER_CHARS:
      # int32 from SentencePiece's buffer (copied: it is read-only, callers may write): a list
      # of Python ints made into an array cost ~17 us of a 1,000-word document's ~105.
      return self.sp.encode(text, out_type="numpy").copy()
    return np.asarray(self.sp.encode(text), np.int32)  # shorter: the list costs less

  def encode_batch(self, texts) -> list:
    return [np.asarray(x, np.int32) for x in self.sp.encode(list(texts))]

  def word_starts(self, ids) -> np.ndarray:
    """bool [L]: True where a token begins a word ('▁' pieces and special tokens)."""
    return self._starts[np.asarray(ids)]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return self.sp.decode([int(i) for i in ids[~self._is_special(ids)]])


def _append_mask_piece(model_file: str):
  """Adds [MASK] as the last piece (a control symbol: never produced from text)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_file, "rb") as f:
    proto.ParseFromString(f.read())
  piece = proto.pieces.add()
  piece.piece = SPM_MASK
  piece.score = 0.0
  piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
  with open(model_file, "wb") as f:
    f.write(proto.SerializeToString())
  vocab_file = model_file[:-len(".model")] + ".vocab"
  if os.path.exists(vocab_file):
    with open(vocab_file, "a", encoding="utf-8") as f:
      f.write(f"{SPM_MASK}\t0\n")


_TOO_HIGH = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")


def train_sentencepiece(sentences, prefix: str, vocab_size: int, model_type: str = "unigram",
                        character_coverage: float = 1.0, fit_vocab: bool = False,
                        num_threads: int = 2, input_sentence_size: int = 2_000_000) -> str:
  """Trains a UNIMO-layout SentencePiece model; returns ``prefix + ".model"``.

  Args:
    sentences: iterable of str (one training sentence or line each).
    prefix: output path prefix (``prefix.model``, ``prefix.vocab``).
    vocab_size: total size including the four specials and [MASK].
    model_type: "unigram" | "bpe" | "word" | "char".
    fit_vocab: if the corpus cannot fill ``vocab_size`` (SentencePiece reports the largest
      size it can reach), train with that size instead of failing.
  Raises:
    ValueError: no sentences, or (without ``fit_vocab``) a vocabulary the corpus cannot fill,
      in one line naming the largest size it can.
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sentences = [s for s in sentences if s.strip()]
  if not sentences:
    raise ValueError("no training sentences")
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  size = vocab_size - 1  # [MASK] is appended after training
  while True:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=size,
          model_type=model_type, character_coverage=character_coverage,
          bos_id=CLS_ID, pad_id=PAD_ID, eos_id=SEP_ID, unk_id=UNK_ID,
          bos_piece=SPM_SPECIALS[0], pad_piece=SPM_SPECIALS[1], eos_piece=SPM_SPECIALS[2],
          unk_piece=SPM_SPECIALS[3], num_threads=num_threads,
          input_sentence_size=input_sentence_size, shuffle_input_sentence=False,
          max_sentence_length=1 << 16, minloglevel=2)
      break
    except RuntimeError as e:
      m = _TOO_HIGH.search(str(e))
      if m is None:
        raise
      if not fit_vocab or int(m.group(1)) >= size:
        # SentencePiece's message is a C++ traceback; say what to do in one line.
        raise ValueError(
            f"vocabulary size {vocab_size} is too large for this corpus ({len(sentences)} "
            f"texts): it fills at most {int(m.group(1)) + 1} (with [MASK]); pass --vocab-size "
            f"{int(m.group(1)) + 1} or less, --fit-vocab to use the largest size, or more "
            "text") from None
      size = int(m.group(1))
  _append_mask_piece(prefix + ".model")
  return prefix + ".model"


# ---------------------------------------------------------------------------------------
# Byte-level BPE (RoBERTa / GPT-2)
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict:
  """GPT-2's reversible map from bytes to printable unicode characters."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _pretokenizer():
  """GPT-2's pre-tokenisation pattern. With the `regex` package it is exact; the stdlib
  fallback approximates \\p{L} by [^\\W\\d_] and \\p{N} by \\d (differs only on rare
  numeric characters such as '²' or Roman numerals)."""
  try:
    import regex  # pylint: disable=import-outside-toplevel
    return regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
  except ImportError:
    return re.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


class BPETokenizer(Tokenizer):
  """RoBERTa byte-level BPE from ``vocab.json`` + ``merges.txt``, mapped to UNIMO ids.

  When the vocabulary already has RoBERTa's layout (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask>
  last, ids contiguous) ids are unchanged. Otherwise the specials are moved to 0-3 and the end,
  and ordinary tokens keep their relative order from id 4.
  Special-token strings inside a text are encoded as ordinary text, never as specials.
  """

  def __init__(self, vocab_file: str, merges_file: str):
    with open(vocab_file, encoding="utf-8") as f:
      vocab = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
      lines = [l.rstrip("\n") for l in f]
    digest = hashlib.sha256(b"bpe")
    for path in (vocab_file, merges_file):
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
    self._files_hash = digest.digest()
    merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
    self.ranks = {m: k for k, m in enumerate(merges)}
    missing = [t for t in BPE_SPECIALS + (BPE_MASK,) if t not in vocab]
    if missing:
      raise ValueError(f"{vocab_file}: missing special tokens {missing}")
    ordinary = sorted((i, t) for t, i in vocab.items() if t not in BPE_SPECIALS + (BPE_MASK,))
    self.vocab_size = len(ordinary) + 5
    self.mask_id = self.vocab_size - 1
    self.token_to_id = {t: k for k, t in enumerate(BPE_SPECIALS)}
    self.token_to_id.update({t: 4 + k for k, (_, t) in enumerate(ordinary)})
    self.token_to_id[BPE_MASK] = self.mask_id
    self.id_to_token = [None] * self.vocab_size
    for t, i in self.token_to_id.items():
      self.id_to_token[i] = t
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.pattern = _pretokenizer()
    self._cache = {}
    space = set(self.byte_encoder[b] for b in b" \t\n\r\x0b\x0c")
    self._start_table = np.array([t.startswith("\u0120") for t in self.id_to_token], bool)
    self._space_table = np.array([all(c in space for c in t) for t in self.id_to_token], bool)
    specials = list(self.special_ids)
    self._space_table[specials] = True
    # Whitespace tokens (e.g. 'Ċ' for a newline) and specials are words of their own.
    self._start_table |= self._space_table

  def _identity(self) -> bytes:
    return self._files_hash

  @classmethod
  def from_dir(cls, directory: str) -> "BPETokenizer":
    return cls(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))

  def _bpe(self, token: str) -> tuple:
    cached = self._cache.get(token)
    if cached is not None:
      return cached
    word = list(token)
    while len(word) > 1:
      best, best_rank = None, None
      for pair in zip(word, word[1:]):
        rank = self.ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best, best_rank = pair, rank
      if best is None:
        break
      a, b = best
      merged, k = [], 0
      while k < len(word):  # merge every occurrence of (a, b), left to right
        if k < len(word) - 1 and word[k] == a and word[k + 1] == b:
          merged.append(a + b)
          k += 2
        else:
          merged.append(word[k])
          k += 1
      word = merged
    out = tuple(word)
    if len(self._cache) < 1_000_000:
      self._cache[token] = out
    return out

  def tokens(self, text: str) -> list:
    """The BPE token strings of a text."""
    out = []
    for piece in self.pattern.findall(text):
      out.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
    return out

  def encode(self, text: str) -> np.ndarray:
    get = self.token_to_id.get
    return np.asarray([get(t, UNK_ID) for t in self.tokens(text)], np.int32)

  def word_starts(self, ids) -> np.ndarray:
    """bool [L]: 'Ġ' tokens, whitespace tokens, specials, the first token, and tokens that
    follow whitespace or a special token."""
    ids = np.asarray(ids)
    starts = self._start_table[ids].copy()
    if ids.size:
      starts[0] = True
      starts[1:] |= self._space_table[ids[:-1]]
    return starts

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    text = "".join(self.id_to_token[int(i)] for i in ids[~self._is_special(ids)])
    return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


def load_tokenizer(spec: str) -> Tokenizer:
  """``"sentencepiece:/path/x.model"`` or ``"bpe:/dir"`` (with vocab.json + merges.txt); a bare
  path ending in .model or a directory is also accepted. ``~`` in the path is expanded (the one
  place a tokenizer spec is read: training, evaluation and the data pipeline all load here)."""
  kind, _, path = spec.partition(":")
  if not path:
    kind, path = "", spec
  path = os.path.expanduser(path)
  if not kind:
    kind = "bpe" if os.path.isdir(path) else "sentencepiece"
  if kind in ("sentencepiece", "spm"):
    return SentencePieceTokenizer(path)
  if kind == "bpe":
    return BPETokenizer.from_dir(path)
  raise ValueError(f"unknown tokenizer spec {spec!r}; use 'sentencepiece:PATH' or 'bpe:DIR'")
