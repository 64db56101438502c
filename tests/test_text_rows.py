"""Text batches at the paper's shapes (512-token windows of long documents, span MLM P 80,
infilling 512 / P2 160) against an independent reference written here: SentencePiece's own ids
of the whole document, the window rule, `[CLS] .. [SEP]` padding and the plain-loop masking of
tests/masking_reference.py, row by row, byte for byte."""
import numpy as np
import pytest

from data_pipelines import pipeline, schema, tokenizers
from data_pipelines.streams import Stream
import masking_reference as ref

L, P, L2, P2 = 512, 80, 512, 160


def _word(rng):
  # Words of 1-4 syllables: a small vocabulary leaves many words in several pieces, so word
  # starts (and spans of several pieces) matter.
  return "".join(rng.choice(["ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "va", "ze"],
                            int(rng.integers(1, 5))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("text_rows")
  rng = np.random.default_rng(0)
  vocab = [_word(rng) for _ in range(400)]
  # Long documents (one window each) and a few shorter than the window.
  docs = [" ".join(rng.choice(vocab, int(rng.integers(lo, hi))))
          for lo, hi in [(500, 900)] * 14 + [(20, 200)] * 4]
  rng.shuffle(docs)
  with open(root / "docs.txt", "w") as f:
    f.write("\n".join(docs) + "\n")
  model = tokenizers.train_sentencepiece(docs, str(root / "spm"), 300, fit_vocab=True)
  return root / "docs.txt", docs, tokenizers.load_tokenizer("sentencepiece:" + model)


def _reference_row(text, tok, rng):
  """The row's masked fields, written from the specification (not from the pipeline's code)."""
  ids = np.asarray(tok.sp.encode(text), np.int32)  # the library's list of ids
  pieces = [tok.sp.id_to_piece(int(i)) for i in range(tok.vocab_size)]
  starts_of = np.array([p.startswith("\u2581") for p in pieces])
  want = max(L - 2, L2)
  if len(ids) > want:  # one random window, starting at a word
    cands = [k for k in range(len(ids) - want + 1) if starts_of[ids[k]]]
    start = cands[int(rng.integers(len(cands)))] if cands else 0
    ids = ids[start:start + want]
  n = min(len(ids), L - 2)
  seq = np.full(L, tok.pad_id, np.int32)
  seq[0], seq[1:1 + n], seq[1 + n] = tok.cls_id, ids[:n], tok.sep_id
  ws = np.ones(L, bool)
  ws[1:1 + n] = starts_of[ids[:n]]
  mlm = ref.span_mlm(seq, ws, rng, vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                     special_ids=(tok.cls_id, tok.pad_id, tok.sep_id, tok.mask_id),
                     max_predictions=P)
  s2s = ref.infilling(ids[:L2], rng, max_length=L2, max_predictions=P2, bos_id=tok.cls_id,
                      eos_id=tok.mask_id, pad_id=tok.pad_id, sep_id=tok.sep_id, rate=0.25)
  out = {f"mlm_{k}": mlm[k] for k in ("positions", "targets", "weights")}
  out["mlm_ids"] = mlm["input_ids"]
  out.update({f"s2s_{k}": s2s[k] for k in ("positions", "targets", "weights", "segments")})
  out["s2s_ids"], out["s2s_position_ids"] = s2s["input_ids"], s2s["position_ids"]
  return out


def test_paper_shaped_text_batches_equal_the_reference(corpus):
  path, docs, tok = corpus
  cfg = pipeline.default_config()
  cfg.seed = 7
  cfg.streams.text.update(dict(batch_size=8, max_length=L, max_predictions=P, s2s_max_length=L2,
                               s2s_max_predictions=P2,
                               sources=[dict(name="docs", kind="text", path=str(path))]))
  st = Stream("text", pipeline.resolve_config(cfg), tok, process_index=0, process_count=1)
  stream_id = schema.STREAM_IDS["text"]
  windows = 0
  for step in range(4):
    batch = dict(zip(st.out_spec, st.batch(0, step)))
    slots = np.arange(step * 8, step * 8 + 8)
    srcs, recs = st.mixture.records(slots)
    assert not batch["_drops"].any() and batch["row_valid"].all()
    for j, (slot, i) in enumerate(zip(slots, recs)):
      assert srcs[j] == 0
      rng = np.random.default_rng([7, stream_id, int(slot)])
      want = _reference_row(docs[int(i)], tok, rng)
      for k, v in want.items():
        got = batch[k][j]
        assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), (step, j, k)
      windows += int(batch["_truncated"][j])
  assert 0 < windows < 32  # long documents (windows) and short ones both occurred


class _FirstTokenTokenizer:
  """Word starts that depend on the text's first token (as byte-level BPE's do)."""
  cls_id, pad_id, sep_id, mask_id, vocab_size = 0, 1, 2, 9, 10

  def word_starts(self, ids):
    out = np.asarray(ids) % 3 == 0
    if len(out):
      out[0] = True
    return out


def test_codec_sequences_equal_sequence_row_by_row():
  from data_pipelines.examples import TextCodec
  codec = TextCodec(_FirstTokenTokenizer())
  rng = np.random.default_rng(1)
  for lengths in ([5, 5, 5], [0, 3, 9, 12], [0, 0], [12], [7, 2]):
    texts = [rng.integers(4, 9, n).astype(np.int32) for n in lengths]
    ids, ws = codec.sequences(texts, 10)
    for j, t in enumerate(texts):
      want_ids, want_ws = codec.sequence(t, 10)
      np.testing.assert_array_equal(ids[j], want_ids)
      np.testing.assert_array_equal(ws[j], want_ws)
    assert ids.dtype == np.int32 and ws.dtype == bool


def test_padding_rows_among_masked_rows(corpus, tmp_path):
  """Records that fail (a line of only spaces, one attempt) become padding rows in batches
  whose other rows are masked together: those still equal the reference."""
  _, docs, tok = corpus
  lines = ["   " if k % 3 == 0 else d for k, d in enumerate(docs)]
  (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
  cfg = pipeline.default_config()
  cfg.seed, cfg.max_attempts = 5, 1
  source = dict(name="docs", kind="text", path=str(tmp_path / "docs.txt"))
  cfg.streams.text.update(dict(batch_size=6, max_length=L, max_predictions=P, s2s_max_length=L2,
                               s2s_max_predictions=P2, sources=[source]))
  st = Stream("text", pipeline.resolve_config(cfg), tok, process_index=0, process_count=1)
  empty = st.builder.empty_row()
  padded = 0
  for step in range(3):
    batch = dict(zip(st.out_spec, st.batch(0, step)))
    slots = np.arange(step * 6, step * 6 + 6)
    _, recs = st.mixture.records(slots)
    for j, (slot, i) in enumerate(zip(slots, recs)):
      if not lines[int(i)].strip():
        assert not batch["row_valid"][j] and batch["_drops"][j].sum() == 1
        for k, v in empty.items():
          if k in batch and not k.startswith("_"):
            assert batch[k][j].tobytes() == np.asarray(v, batch[k].dtype).tobytes(), k
        padded += 1
        continue
      want = _reference_row(docs[int(i)], tok,
                            np.random.default_rng([5, schema.STREAM_IDS["text"], int(slot)]))
      for k, v in want.items():
        assert batch[k][j].tobytes() == v.tobytes(), (step, j, k)
  assert 0 < padded < 18
