"""Tokenizers: UNIMO special ids, round trips, word starts, SentencePiece training, and
byte-level BPE parity with transformers' RobertaTokenizer on a hand-made vocabulary."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import tokenizers as tok

CORPUS = [
    "a large red circle to the left of a small blue square.",
    "there is a small blue square, and a large red circle is on its left.",
    "a small green triangle above a large yellow star.",
    "the white diamond is below the purple cross.",
    "how many shapes are there? there are three shapes in the picture.",
    "red and yellow paint mixed together make orange.",
] * 20


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("spm") / "spm")
  return tok.train_sentencepiece(CORPUS, prefix, vocab_size=80, model_type="bpe")


def test_sentencepiece_special_layout(spm_model):
  t = tok.load_tokenizer(f"sentencepiece:{spm_model}")
  assert t.vocab_size == 80 and t.mask_id == 79
  assert (t.cls_id, t.pad_id, t.sep_id, t.unk_id) == (0, 1, 2, 3)
  pieces = [t.sp.id_to_piece(i) for i in (0, 1, 2, 3, 79)]
  assert pieces == ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
  ids = t.encode("a large red circle.")
  assert ids.dtype == np.int32 and ids.min() >= 4 and ids.max() < 79
  # Special-token strings in text are ordinary text, never special ids.
  assert not set(t.encode("[MASK] [CLS]").tolist()) & {0, 1, 2, 79}


def test_sentencepiece_round_trip_and_word_starts(spm_model):
  t = tok.load_tokenizer(spm_model)  # bare path
  for text in CORPUS[:6]:
    ids = t.encode(text)
    assert t.decode(ids) == text
    pieces = [t.sp.id_to_piece(int(i)) for i in ids]
    np.testing.assert_array_equal(t.word_starts(ids), [p.startswith("\u2581") for p in pieces])
    assert t.word_starts(ids).sum() == len(text.split())
  batch = t.encode_batch(CORPUS[:3])
  for text, ids in zip(CORPUS[:3], batch):
    np.testing.assert_array_equal(ids, t.encode(text))
  # Decoding drops specials; word_starts marks them as starts.
  ids = np.concatenate([[0], t.encode("a red circle"), [2, 1, 1, 79]])
  assert t.decode(ids) == "a red circle"
  assert t.word_starts(ids)[[0, -4, -3, -1]].all()


def test_encode_padded_layout(spm_model):
  t = tok.load_tokenizer(spm_model)
  out = t.encode_padded(["a red circle", CORPUS[1]], max_length=8)
  ids = t.encode("a red circle")
  assert out.dtype == np.int32 and out.shape == (2, 8)
  np.testing.assert_array_equal(out[0, :len(ids) + 2], np.concatenate([[0], ids, [2]]))
  assert (out[0, len(ids) + 2:] == 1).all()
  np.testing.assert_array_equal(out[1], np.concatenate([[0], t.encode(CORPUS[1])[:6], [2]]))


def test_sentencepiece_fit_vocab_and_determinism(tmp_path):
  with pytest.raises(ValueError, match="vocabulary size 5000 is too large for this corpus") as e:
    tok.train_sentencepiece(CORPUS, str(tmp_path / "a"), vocab_size=5000, model_type="bpe")
  assert "\n" not in str(e.value)
  path = tok.train_sentencepiece(CORPUS, str(tmp_path / "b"), vocab_size=5000,
                                 model_type="bpe", fit_vocab=True)
  again = tok.train_sentencepiece(CORPUS, str(tmp_path / "c"), vocab_size=5000,
                                  model_type="bpe", fit_vocab=True)
  t = tok.load_tokenizer(path)
  assert 4 < t.vocab_size < 5000 and t.sp.id_to_piece(t.vocab_size - 1) == "[MASK]"
  u = tok.load_tokenizer(again)
  assert [t.sp.id_to_piece(i) for i in range(t.vocab_size)] == [
      u.sp.id_to_piece(i) for i in range(u.vocab_size)]


def test_tokenizer_train_command(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(CORPUS) + "\n")
  jsonl = tmp_path / "more.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": s}) for s in CORPUS[:6]) + "\n")
  out = tmp_path / "tok" / "m"
  from data_pipelines import tokenizer_cli
  rc = tokenizer_cli.main(["unimo-jax tokenizer", "train", "--input", str(corpus), str(jsonl),
                           "--vocab-size", "64", "--model-type", "bpe", "--out", str(out)])
  assert rc == 0
  t = tok.load_tokenizer(f"sentencepiece:{out}.model")
  assert t.vocab_size == 64 and t.decode(t.encode(CORPUS[0])) == CORPUS[0]


# ---------------------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------------------

# Every merge joins two tokens already in the vocabulary (transformers checks this).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("l", "o"), ("lo", "w"),
          ("e", "r"), ("Ġ", "low"), ("Ġlow", "er"), ("i", "n"), ("Ġ", "c"), ("i", "r"),
          ("Ġc", "ir"), ("c", "l"), ("cl", "e"), ("Ġcir", "cle"), ("Ġ", "r"), ("e", "d"),
          ("Ġr", "ed"), ("Ã", "©"), ("c", "a"), ("f", "Ã©")]


def _write_bpe(directory, layout="roberta"):
  """A tiny byte-level vocabulary: all 256 byte symbols plus the merges' results."""
  symbols = list(tok.bytes_to_unicode().values())
  merged = [a + b for a, b in MERGES]
  ordinary = symbols + [m for m in merged if m not in symbols]
  if layout == "roberta":
    names = ["<s>", "<pad>", "</s>", "<unk>"] + ordinary + ["<mask>"]
  else:  # specials elsewhere: ids must be remapped
    names = ordinary[:10] + ["<unk>", "<s>"] + ordinary[10:] + ["<mask>", "</s>", "<pad>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(names)}, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  return names


TEXTS = ["the lower red circle", "The  lower\tcircle\n\nred", "café in the circle!",
         "a 12 circles' lower-case e-mail", "emoji 🙂 and naïve  ", "   leading spaces",
         "", "the"]


def test_bpe_matches_transformers_roberta(tmp_path):
  transformers = pytest.importorskip("transformers")
  _write_bpe(tmp_path)
  ref = transformers.RobertaTokenizer.from_pretrained(str(tmp_path))
  t = tok.load_tokenizer(f"bpe:{tmp_path}")
  assert t.vocab_size == len(ref) == ref.mask_token_id + 1
  assert (t.cls_id, t.pad_id, t.sep_id, t.unk_id, t.mask_id) == (
      ref.cls_token_id, ref.pad_token_id, ref.sep_token_id, ref.unk_token_id, ref.mask_token_id)
  for text in TEXTS:
    want = ref.encode(text, add_special_tokens=False)
    np.testing.assert_array_equal(t.encode(text), want, err_msg=repr(text))
    assert t.decode(t.encode(text)) == text
    assert t.decode(np.concatenate([[0], t.encode(text), [2, 1]])) == text


def test_bpe_word_starts(tmp_path):
  _write_bpe(tmp_path)
  t = tok.BPETokenizer.from_dir(str(tmp_path))
  ids = t.encode("the lower circle")
  assert [t.id_to_token[i] for i in ids] == ["t", "he", "Ġlower", "Ġcircle"]
  np.testing.assert_array_equal(t.word_starts(ids), [True, False, True, True])
  ids = t.encode("red\nthe")  # a word after a newline starts a word without 'Ġ'
  assert [t.id_to_token[i] for i in ids] == ["r", "ed", "Ċ", "t", "he"]
  np.testing.assert_array_equal(t.word_starts(ids), [True, False, True, True, False])
  ids = np.concatenate([[0], t.encode("red"), [2]])
  np.testing.assert_array_equal(t.word_starts(ids), [True, True, False, True])


def test_bpe_remaps_a_foreign_layout(tmp_path):
  names = _write_bpe(tmp_path, layout="foreign")
  t = tok.BPETokenizer.from_dir(str(tmp_path))
  assert [t.id_to_token[i] for i in (0, 1, 2, 3, t.mask_id)] == [
      "<s>", "<pad>", "</s>", "<unk>", "<mask>"]
  assert t.vocab_size == len(names)
  ordinary = [n for n in names if n not in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]
  assert t.id_to_token[4:-1] == ordinary
  ids = t.encode("the lower circle")
  assert [t.id_to_token[i] for i in ids] == ["t", "he", "Ġlower", "Ġcircle"]


def test_cli_registers_commands():
  out = subprocess.run([sys.executable, "-m", "unimo_jax.cli", "--help"], capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert "tokenizer" in out.stdout and "prepare" in out.stdout


def test_pretokenizer_fallback_matches_regex_package(monkeypatch):
  exact = tok._pretokenizer()
  monkeypatch.setitem(sys.modules, "regex", None)  # import regex -> ImportError
  fallback = tok._pretokenizer()
  assert fallback.__class__.__module__ == "re"
  for text in TEXTS + ["snake_case __init__ a_b! _!? (x)", "it's 3.14 ... we'll"]:
    assert fallback.findall(text) == exact.findall(text), text
