"""2 processes x 4 CPU devices (gloo, localhost) evaluate exactly like 1 process x 8 devices.

The worker processes run this file as a script. Each builds the same 13-image synthetic split
and the same parameters from fixed seeds, feeds only its own slice of every global batch of 8
(the second batch leaves process 1 one real row and three padding rows; with 10 images to
caption, process 1 gets no real row at all), and runs every evaluator: retrieval, hard
negatives, the language metrics and captioning with BLEU/CIDEr. Every process writes its
results as JSON; the test compares both with the 1-process run: metrics, (sum, count) pairs
with exact counts, retrieval ranks and the generated captions.
"""
import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTION_IMAGES = 10


def _tiny_config():
  from unimo_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel
  return ModelConfig.tiny(vocab_size=64, dropout_rate=0.0, attention_dropout_rate=0.0)


def evaluate() -> dict:
  """Runs the Evaluator on all devices of the current run; returns a JSON-ready summary."""
  import jax  # pylint: disable=import-outside-toplevel
  import test_eval_runner as ter  # pylint: disable=import-outside-toplevel
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  from unimo_jax.evaluation import captioning, runner  # pylint: disable=import-outside-toplevel
  from unimo_jax.model import Unimo, init_params  # pylint: disable=import-outside-toplevel

  cfg = _tiny_config()
  mesh = parallel.make_mesh((-1, 1, 1))
  params = jax.device_put(init_params(cfg, jax.random.key(1)), parallel.replicated(mesh))
  data, meta = ter._split(cfg)  # pylint: disable=protected-access
  settings = runner.EvalSettings(
      batch_size=8, caption=captioning.CaptionSettings(max_length=4, beam_size=2),
      caption_images=CAPTION_IMAGES)
  ev = runner.Evaluator(Unimo(cfg), mesh, settings,
                        decode_fn=lambda ids: " ".join(f"w{i}" for i in ids))
  res = ev.run(params, data, meta)
  ranks = res["artefacts"]["retrieval"]
  return dict(
      process_count=jax.process_count(), device_count=jax.device_count(),
      metrics={k: float(v) for k, v in res["metrics"].items() if not k.endswith("_s")},
      pairs={k: [float(s), float(c)] for k, (s, c) in res["pairs"].items()},
      ranks={k: np.asarray(ranks[k]).tolist() for k in ("i2t_ranks", "t2i_ranks")},
      captions=[[c["index"], c["text"]] for c in res["artefacts"]["captions"]])


def worker(process_id: int, port: int, out_dir: str) -> None:
  from unimo_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize(f"127.0.0.1:{port}", 2, process_id, platform="cpu")
  import jax  # pylint: disable=import-outside-toplevel
  assert jax.process_count() == 2 and jax.device_count() == 8
  summary = evaluate()
  with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
    json.dump(summary, f)


@pytest.mark.slow
def test_evaluation_on_two_processes_equals_one(tmp_path):
  import multiprocess_util  # pylint: disable=import-outside-toplevel
  import test_eval_runner as ter  # pylint: disable=import-outside-toplevel
  one = evaluate()
  assert one["process_count"] == 1 and one["device_count"] == 8

  multiprocess_util.run_workers(__file__, str(tmp_path))

  # Every real row counted once: the counts are the split's, not a process's share or double.
  n_captions = int(ter._split(_tiny_config())[0]["caption_valid"].sum())  # pylint: disable=protected-access
  assert one["pairs"]["i2t_r@1"][1] == ter.N and one["pairs"]["t2i_r@1"][1] == n_captions
  assert sorted(i for i, _ in one["captions"]) == list(range(CAPTION_IMAGES))
  for i in range(2):
    with open(tmp_path / f"process_{i}.json") as f:
      two = json.load(f)
    assert two["process_count"] == 2 and two["device_count"] == 8
    assert sorted(two["metrics"]) == sorted(one["metrics"]), f"process {i}"
    for k, v in one["metrics"].items():
      np.testing.assert_allclose(two["metrics"][k], v, rtol=1e-5, err_msg=f"process {i} {k}")
    assert sorted(two["pairs"]) == sorted(one["pairs"]), f"process {i}"
    for k, (s, c) in one["pairs"].items():
      assert two["pairs"][k][1] == c, f"process {i} {k} count"
      np.testing.assert_allclose(two["pairs"][k][0], s, rtol=1e-5, err_msg=f"process {i} {k}")
    assert two["ranks"] == one["ranks"], f"process {i}"
    assert two["captions"] == one["captions"], f"process {i}"


if __name__ == "__main__":
  sys.path.insert(0, HERE)
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
