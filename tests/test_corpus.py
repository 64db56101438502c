"""The tokenizer's corpus: every text and caption of files or configured sources, each once."""
import json

import numpy as np
import pytest

from data_pipelines import corpus
import data_fixtures as fx


def test_files_by_extension(tmp_path):
  rng = np.random.default_rng(0)
  shard = fx.write_webdataset(tmp_path / "w.tar", 3, rng)
  coco = fx.write_coco(tmp_path / "c.json", tmp_path / "img", 2, rng)
  (tmp_path / "p.jsonl").write_text(
      json.dumps({"text": "one doc", "captions": ["cap a", "cap a", "cap b"]}) + "\n"
      + json.dumps({"body": "other field"}) + "\n")
  (tmp_path / "t.txt").write_text("line one\n\nline two\n")
  got = list(corpus.path_texts([str(tmp_path / n) for n in ("w.tar", "c.json", "p.jsonl",
                                                           "t.txt")]))
  want = []
  for _, cap, extra in shard.values():  # a .txt caption is the record's text and a caption
    want += [cap] + [e for e in extra if e != cap]
  want += [c for _, caps in coco.values() for c in caps]
  want += ["one doc", "cap a", "cap b", "line one", "line two"]
  assert got == want
  assert list(corpus.path_texts([str(tmp_path / "p.jsonl")], text_field="body")) == [
      "cap a", "cap b", "other field"]
  with pytest.raises(FileNotFoundError, match="nowhere.txt"):
    list(corpus.path_texts([str(tmp_path / "nowhere.txt")]))


def test_config_reads_text_and_pair_sources_once(tmp_path):
  import ml_collections
  rng = np.random.default_rng(1)
  shard = fx.write_webdataset(tmp_path / "w.tar", 4, rng)
  fx.write_npz_regions(tmp_path / "r", list(shard), rng, 4, 3)
  spec = dict(kind="webdataset", path=str(tmp_path / "w.tar"))
  config = ml_collections.ConfigDict(dict(data=dict(streams=dict(
      text=dict(batch_size=4, sources=[dict(spec, name="as_text")]),
      image=dict(batch_size=4, sources=[dict(kind="region_npz", path=str(tmp_path / "r"))]),
      pair=dict(batch_size=4, sources=[dict(spec, name="pairs",
                                            regions=dict(kind="region_npz",
                                                         path=str(tmp_path / "r")))])))))
  got = list(corpus.config_texts(config))
  # the shard once (text and pair streams read the same files), the region store never
  assert sorted(got) == sorted({t for _, cap, extra in shard.values() for t in [cap] + extra})


def test_tokenizer_command_explains_a_too_large_vocabulary_in_one_line(tmp_path, capsys):
  from unimo_jax import cli
  (tmp_path / "t.txt").write_text("a b c\nd e f\n")
  rc = cli.main(["unimo-jax", "tokenizer", "train", "--input", str(tmp_path / "t.txt"),
                 "--vocab-size", "500", "--out", str(tmp_path / "spm")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1
  assert "vocabulary size 500 is too large" in err[0] and "--fit-vocab" in err[0]
  assert cli.main(["unimo-jax", "tokenizer", "train", "--input", str(tmp_path / "t.txt"),
                   "--vocab-size", "500", "--fit-vocab", "--out", str(tmp_path / "spm")]) == 0
