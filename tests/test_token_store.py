"""The pre-tokenised text store (`prepare tokens` + source kind token_store) against the raw text
it replaces: the tokenizer's own ids back, bad records skipped and counted, manifests that cannot
point outside the store, the run's tokenizer enforced, and byte-identical text batches."""
import json
import os

import numpy as np
import pytest

from data_pipelines import pipeline, prepare, schema, tokenizers
from data_pipelines.sources import BadRecord, open_source
from data_pipelines.sources import token_store
import data_fixtures as fx

TOK = fx.WhitespaceTokenizer()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  """A real SentencePiece model (the round trip must hold for the tokenizer runs use)."""
  root = tmp_path_factory.mktemp("spm")
  rng = np.random.default_rng(0)
  lines = [fx.sentence(rng, 5, 30) for _ in range(300)]
  return tokenizers.train_sentencepiece(lines, str(root / "spm"), 120, fit_vocab=True)


def _corpus(tmp_path, n=30, **bad):
  rng = np.random.default_rng(3)
  return fx.write_corpus(tmp_path / "corpus.txt", n, rng, **bad)


def _store(tmp_path, tok=TOK, spec="", **kw):
  src = open_source(dict(kind="text", path=str(tmp_path / "corpus.txt")), name="raw")
  m = token_store.write_store(src, tok, str(tmp_path / "store"), tokenizer_spec=spec, **kw)
  return tmp_path / "store", m


def test_round_trip_gives_the_tokenizers_ids(tmp_path, spm):
  good = _corpus(tmp_path, 25)
  tok = tokenizers.load_tokenizer("sentencepiece:" + spm)
  store, m = _store(tmp_path, tok, "sentencepiece:" + spm, shard_records=7)
  assert m["records"] == 25 and len(m["shards"]) == 4 and m["skipped"] == {}
  assert m["tokenizer"]["fingerprint"] == tok.fingerprint()
  st = open_source(dict(kind="token_store", path=str(store)), name="st")
  raw = open_source(dict(kind="text", path=str(tmp_path / "corpus.txt")), name="raw")
  assert len(st) == len(raw) == 25
  for i, line in enumerate(good):
    rec = st.read(i)
    want = np.asarray(tok.sp.encode(line), np.int32)  # the SentencePiece library's own ids
    assert rec["token_ids"].dtype == np.int32
    np.testing.assert_array_equal(rec["token_ids"], want)
    assert rec["key"] == raw.read(i)["key"] and st.find(rec["key"]) == i


def test_bad_records_skipped_and_counted(tmp_path):
  good = _corpus(tmp_path, 10, empty_lines=2, non_utf8=3, blank_lines=1)
  # a line of words the tokenizer does not know still has ids (UNK); a line of only spaces is
  # empty text (dropped by the raw source when read, as in the pipeline)
  store, m = _store(tmp_path)
  assert m["records"] == 10
  assert m["skipped"] == {"empty_text": 3, "non_utf8_text": 3}
  st = open_source(dict(kind="token_store", path=str(store)), name="st")
  assert st.index_drops == {"empty_text": 3, "non_utf8_text": 3}
  for i, line in enumerate(good):
    np.testing.assert_array_equal(st.read(i)["token_ids"], TOK.encode(line))


def test_damaged_records_are_bad_records(tmp_path):
  _corpus(tmp_path, 6)
  store, _ = _store(tmp_path, shard_records=3)
  tokens = np.load(store / "shard-00000.tokens.npy")
  tokens[0] = TOK.vocab_size + 5  # outside the vocabulary
  np.save(store / "shard-00000.tokens.npy", tokens)
  offsets = np.load(store / "shard-00001.offsets.npy")
  offsets[2] = 10 ** 6  # past the shard's end
  np.save(store / "shard-00001.offsets.npy", offsets)
  st = open_source(dict(kind="token_store", path=str(store)), name="st")
  with pytest.raises(BadRecord) as e:
    st.read(0)
  assert e.value.reason == "bad_token_ids"
  st.read(1)
  st.read(3)
  with pytest.raises(BadRecord) as e:
    st.read(4)
  assert e.value.reason == "bad_token_ids" and "bad_token_ids" in schema.DROP_REASONS
  np.save(store / "shard-00001.tokens.npy", np.zeros(3, np.int64))
  with pytest.raises(ValueError, match=r"shard-00001.tokens.npy: int64"):
    open_source(dict(kind="token_store", path=str(store)), name="st").read(3)


def test_damaged_offsets_and_ids_in_one_shard(tmp_path):
  """Unsorted offsets and an id outside the vocabulary in the same shard: each record is then
  checked on its own, and only the damaged ones are bad."""
  _corpus(tmp_path, 6)
  store, _ = _store(tmp_path)
  offsets = np.load(store / "shard-00000.offsets.npy")
  tokens = np.load(store / "shard-00000.tokens.npy")
  tokens[offsets[4]] = -1  # record 4
  offsets[2] = offsets[3] + 1  # records 1 and 2 overlap / run backwards
  np.save(store / "shard-00000.offsets.npy", offsets)
  np.save(store / "shard-00000.tokens.npy", tokens)
  st = open_source(dict(kind="token_store", path=str(store)), name="st")
  reasons = []
  for i in range(len(st)):
    try:
      st.read(i)
      reasons.append("ok")
    except BadRecord as e:
      reasons.append(e.reason)
  assert reasons == ["ok", "ok", "bad_token_ids", "ok", "bad_token_ids", "ok"]


def _edit_manifest(store, **changes):
  p = store / "tokens.json"
  m = json.load(open(p))
  m.update(changes)
  json.dump(m, open(p, "w"))


@pytest.mark.parametrize("name", ["../corpus", "/etc/passwd", "a/b", "..", ".hidden"])
def test_shard_names_never_escape_the_store(tmp_path, name):
  _corpus(tmp_path, 4)
  store, m = _store(tmp_path)
  m["shards"][0]["name"] = name
  _edit_manifest(store, shards=m["shards"])
  with pytest.raises(ValueError, match=r"tokens.json: shards.name: .* (not a plain|outside)"):
    open_source(dict(kind="token_store", path=str(store)), name="st")


def test_shard_symlink_outside_the_store_is_refused(tmp_path):
  _corpus(tmp_path, 4)
  store, _ = _store(tmp_path)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  os.rename(store / "shard-00000.tokens.npy", outside / "x.tokens.npy")
  os.symlink(outside / "x.tokens.npy", store / "shard-00000.tokens.npy")
  st = open_source(dict(kind="token_store", path=str(store)), name="st")
  with pytest.raises(ValueError, match="outside"):
    st.read(0)


@pytest.mark.parametrize("field,value,message", [
    ("format", "other", "format"), ("tokenizer", {"vocab_size": 3}, "tokenizer"),
    ("records", 99, "records"), ("shards", {"a": 1}, "shards")])
def test_bad_manifest_is_one_line_naming_the_field(tmp_path, field, value, message):
  _corpus(tmp_path, 4)
  store, _ = _store(tmp_path)
  _edit_manifest(store, **{field: value})
  with pytest.raises(ValueError, match=f"tokens.json: {message}") as e:
    open_source(dict(kind="token_store", path=str(store)), name="st")
  assert "\n" not in str(e.value)


def test_missing_store_says_how_to_write_one(tmp_path):
  with pytest.raises(ValueError, match="unimo-jax prepare tokens"):
    open_source(dict(kind="token_store", path=str(tmp_path)), name="st")


def _text_config(kind, path, workers=0):
  c = pipeline.default_config()
  c.seed = 4
  c.workers = workers
  c.streams.text.update(dict(batch_size=4, max_length=12, max_predictions=3, s2s_max_length=16,
                             s2s_max_predictions=6, sources=[
                                 dict(name="docs", kind=kind, path=str(path))]))
  return c


def _batches(cfg, n, tok=TOK):
  it = pipeline.make_pipeline(cfg, tokenizer=tok)
  try:
    return [next(it) for _ in range(n)], it.dropped_counts()
  finally:
    it.close()


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_text_batches_identical_to_the_raw_corpus(tmp_path):
  """Long texts (windows), short ones and both objectives: the same bytes as from the text,
  in-process and from 2 workers (the store's memory maps open in each worker)."""
  rng = np.random.default_rng(5)
  with open(tmp_path / "corpus.txt", "w") as f:
    for _ in range(24):
      f.write(fx.sentence(rng, 2, 40) + "\n")
  store, _ = _store(tmp_path)
  ref, ref_drops = _batches(_text_config("text", tmp_path / "corpus.txt"), 6)
  for workers in (0, 2):
    got, drops = _batches(_text_config("token_store", store, workers), 6)
    for a, b in zip(ref, got):
      _same(a, b)
    assert drops["docs"] == ref_drops["docs"] == {}


def test_store_drops_are_counted_as_the_sources(tmp_path):
  _corpus(tmp_path, 12, non_utf8=2)
  store, _ = _store(tmp_path)
  _, drops = _batches(_text_config("token_store", store), 2)
  assert drops["docs"] == {"non_utf8_text": 2}


def test_another_tokenizer_is_refused(tmp_path, spm):
  _corpus(tmp_path, 6)
  store, _ = _store(tmp_path)
  tok = tokenizers.load_tokenizer("sentencepiece:" + spm)
  with pytest.raises(schema.SchemaError, match=r"source 'docs' \(stream text\): token store .* "
                     r"was written with tokenizer"):
    pipeline.make_pipeline(_text_config("token_store", store), tokenizer=tok)


def test_prepare_tokens_command(tmp_path, spm, capsys):
  _corpus(tmp_path, 9, non_utf8=1)
  code = prepare.main(["prepare", "tokens", "--path", str(tmp_path / "corpus.txt"),
                       "--tokenizer", "sentencepiece:" + spm, "--out", str(tmp_path / "st"),
                       "--shard-records", "4"])
  assert code == 0
  out = capsys.readouterr().out
  assert "tokens: 9 records" in out and "'non_utf8_text': 1" in out and "tokens/s" in out
  m = json.load(open(tmp_path / "st" / "tokens.json"))
  assert m["records"] == 9 and len(m["shards"]) == 3
  assert m["tokenizer"]["spec"] == "sentencepiece:" + spm
  # writing over an existing store is refused (one line)
  code = prepare.main(["prepare", "tokens", "--path", str(tmp_path / "corpus.txt"),
                       "--tokenizer", "sentencepiece:" + spm, "--out", str(tmp_path / "st")])
  assert code != 0


def test_fingerprints_differ_between_tokenizers(spm, tmp_path):
  a = tokenizers.load_tokenizer("sentencepiece:" + spm)
  assert a.fingerprint() == tokenizers.load_tokenizer("sentencepiece:" + spm).fingerprint()
  assert token_store.tokenizer_fingerprint(TOK) != a.fingerprint()
  assert token_store.tokenizer_fingerprint(TOK) == token_store.tokenizer_fingerprint(
      fx.WhitespaceTokenizer())
