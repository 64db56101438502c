"""Row-building worker processes: same batches for any worker count, resume, errors, shutdown."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from data_pipelines import pipeline, schema, workers
from data_pipelines.mixture import Mixture
import data_fixtures as fx
import worker_fixtures as wfx

TOK = fx.WhitespaceTokenizer()
S = 16
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("worker_data")
  rng = np.random.default_rng(1)
  # Two bad lines (not UTF-8) at the end of the corpus: dropped when read, at build time.
  fx.write_corpus(root / "corpus.txt", 20, rng, non_utf8=2)
  fx.write_pairs_jsonl(root / "pairs.jsonl", root / "pimg", 10, rng, missing_image=1)
  fx.write_images(root / "imgs", 6, rng, size=(S, S))
  return root


def _config(root, visual="patches", **kw):
  c = pipeline.default_config()
  c.seed = 3
  c.visual_input = visual
  c.image_size, c.patch_size = S, 4
  c.num_positives, c.num_negatives, c.num_related_images, c.num_related_texts = 2, 2, 0, 0
  c.streams.text.update(dict(batch_size=4, max_length=12, max_predictions=3, s2s_max_length=16,
                             s2s_max_predictions=6, sources=[
                                 dict(name="corpus", kind="text", path=str(root / "corpus.txt"))]))
  c.streams.image.update(dict(batch_size=2, sources=[
      dict(name="imgs", kind="image_folder", path=str(root / "imgs"))]))
  c.streams.pair.update(dict(batch_size=4, max_length=14, max_predictions=2,
                             s2s_max_predictions=14, sources=[
                                 dict(name="pairs", kind="jsonl", path=str(root / "pairs.jsonl"),
                                      image_dir=str(root / "pimg"))]))
  for k, v in kw.items():
    c[k] = v
  return c


def _text_only(c):
  c.streams.image.batch_size = c.streams.pair.batch_size = 0
  return c


def _batches(cfg, n, **kw):
  it = pipeline.make_pipeline(cfg, tokenizer=kw.pop("tokenizer", TOK), **kw)
  try:
    out = [next(it) for _ in range(n)]
    return out, it.dropped_counts(), it.get_state()
  finally:
    it.close()


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def _alive(pid):
  """Running (not a zombie waiting to be reaped)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      state = next(l for l in f if l.startswith("State:"))
  except (FileNotFoundError, ProcessLookupError, StopIteration):
    return False
  return "Z" not in state.split()[1]


def test_resolve_workers():
  assert workers.resolve_workers(0) == 0 and workers.resolve_workers(3) == 3
  cores = len(os.sched_getaffinity(0))
  assert workers.resolve_workers(-1) == (cores - 2 if cores >= 4 else 0)
  with pytest.raises(ValueError, match="data.workers"):
    workers.resolve_workers(-2)


def test_batches_identical_for_0_1_2_workers(data):
  """All three streams (TF image decoding after the workers), bad records included."""
  ref, ref_drops, ref_state = _batches(_config(data, workers=0), 6)
  for n in (1, 2):
    got, drops, state = _batches(_config(data, workers=n), 6)
    for a, b in zip(ref, got):
      _same(a, b)
    assert drops == ref_drops
    assert state == ref_state
  assert ref_drops["corpus"].get("non_utf8_text", 0) + ref_drops["pairs"].get(
      "missing_field", 0) > 0  # the planted bad records were met


def test_regions_identical_across_workers(tmp_path):
  rng = np.random.default_rng(2)
  keys = [f"r{i}" for i in range(8)]
  fx.write_npz_regions(tmp_path / "npz", keys, rng, 6, 5)
  c = pipeline.default_config()
  c.visual_input, c.num_regions, c.region_feature_dim, c.num_region_classes = "regions", 4, 6, 5
  c.streams.image.update(dict(batch_size=4, sources=[
      dict(name="npz", kind="region_npz", path=str(tmp_path / "npz"))]))
  ref, _, _ = _batches(c, 4)
  c.workers = 2
  got, _, _ = _batches(c, 4)
  for a, b in zip(ref, got):
    _same(a, b)


def test_resume_in_the_middle(data):
  cfg0 = _text_only(_config(data, workers=0))
  ref, _, _ = _batches(cfg0, 8)
  cfg2 = _text_only(_config(data, workers=2))
  it = pipeline.make_pipeline(cfg2, tokenizer=TOK)
  try:
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    more = [next(it) for _ in range(2)]  # run ahead, then go back: the same iterator resumes
    it.set_state(state)
    again = [next(it) for _ in range(5)]
  finally:
    it.close()
  for a, b in zip(ref[:3] + ref[3:5], first + more):
    _same(a, b)
  for a, b in zip(ref[3:8], again):
    _same(a, b)
  # A fresh iterator with 1 worker restored from the state gives the same continuation.
  it = pipeline.make_pipeline(_text_only(_config(data, workers=1)), tokenizer=TOK)
  try:
    it.set_state(state)
    for b in ref[3:6]:
      _same(b, next(it))
    assert it.get_state()["slots"] == _batches(cfg0, 6)[2]["slots"]
  finally:
    it.close()


def test_two_processes_with_workers_equal_one(data):
  cfg1 = _config(data, workers=0)
  ref, _, _ = _batches(cfg1, 3)
  parts = [_batches(_config(data, workers=2), 3, process_index=p, process_count=2)[0]
           for p in (0, 1)]
  for step in range(3):
    for k, v in ref[step].items():
      joined = np.concatenate([parts[0][step][k], parts[1][step][k]])
      assert joined.tobytes() == v.tobytes(), (step, k)


def _expected_drops(cfg, source_len, bad, steps):
  """Independent count: slots of the first `steps` batches whose record (or replacement
  draw) is one of the `bad` indices, from the mixture alone."""
  c = pipeline.resolve_config(cfg)
  m = Mixture([1.0], [source_len], seed=c["seed"], stream_id=schema.STREAM_IDS["text"],
              period=c["mixture_period"])
  b = c["streams"]["text"]["batch_size"]
  _, recs = m.records(np.arange(steps * b))
  count = 0
  for g, r in enumerate(recs):
    attempt = 0
    while int(r) in bad and attempt < c["max_attempts"]:
      count += 1
      attempt += 1
      r = m.replacement(g, 0, attempt)
  return count


def test_bad_record_counted_once_whichever_worker(data):
  steps = 12  # 48 slots over a 22-record corpus: each bad record is met about twice
  expected = _expected_drops(_config(data), 22, {20, 21}, steps)
  assert expected > 0
  for n in (0, 1, 2):
    cfg = _text_only(_config(data, workers=n))
    _, drops, state = _batches(cfg, steps)
    assert drops["corpus"] == {"non_utf8_text": expected}, n
    assert state["dropped"]["corpus"] == {"non_utf8_text": expected}


def _crashy_config(path):
  """Two workers reading the text source 'crashy' at ``path``, two rows a batch."""
  cfg = pipeline.default_config()
  cfg.workers = 2
  cfg.streams.text.update(dict(batch_size=2, max_length=8, max_predictions=2, s2s_max_length=8,
                               s2s_max_predictions=4, sources=[
                                   dict(name="crashy", kind="text", path=str(path))]))
  return cfg


@pytest.mark.parametrize("how, message", [
    ("raise", "ValueError: cannot tokenise 'zap'"),
    ("exit", "exited with code 7"),
])
def test_worker_failure_is_an_error_naming_the_source(tmp_path, how, message):
  with open(tmp_path / "bad.txt", "w") as f:
    for i in range(10):
      f.write(f"a red circle zap {i}\n")
  it = pipeline.make_pipeline(_crashy_config(tmp_path / "bad.txt"),
                              tokenizer=wfx.FailInWorkerTokenizer("zap", how))
  pids = it.worker_pids
  t = time.time()
  try:
    with pytest.raises(Exception) as e:
      for _ in range(4):
        next(it)
  finally:
    it.close()
  assert time.time() - t < 60
  assert "'crashy'" in str(e.value) and message in str(e.value)
  assert not any(_alive(p) for p in pids)


def test_close_stops_the_workers(data):
  it = pipeline.make_pipeline(_text_only(_config(data, workers=2)), tokenizer=TOK)
  next(it)
  pids = it.worker_pids
  assert len(pids) == 2 and all(_alive(p) for p in pids)
  it.close()
  assert not any(_alive(p) for p in pids)


_SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
import data_fixtures as fx
from data_pipelines import pipeline
from test_workers import _config, _text_only
import pathlib
it = pipeline.make_pipeline(_text_only(_config(pathlib.Path({root!r}), workers=2)),
                            tokenizer=fx.WhitespaceTokenizer())
next(it)
print(json.dumps(it.worker_pids), flush=True)
while True:
  next(it)
"""


def test_sigterm_leaves_no_worker_process(data, tmp_path):
  script = tmp_path / "run.py"
  script.write_text(textwrap.dedent(_SCRIPT.format(paths=[TESTS, ROOT], root=str(data))))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  try:
    pids = json.loads(proc.stdout.readline())
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  deadline = time.time() + 20
  while time.time() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.2)
  assert not any(_alive(p) for p in pids), pids
