"""Smoke tests of every script in benchmarks/: each runs end to end at tiny sizes.

They check that a benchmark still runs and prints or writes what its docstring says, not its
numbers (those depend on the machine). The input-pipeline runs build the tiny synthetic_scenes
data and a SentencePiece model in a temporary directory (a few seconds, no download).
"""
import json
import os
import re
import sys

import pytest
from benchmark_util import ROOT, load_benchmark


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("scenes"))


def _streams_printed(out):
  """Stream names of the printed table rows ("  text   1,234   5,678"), in order."""
  return re.findall(r"^  (text|image|pair|mixed) +[\d,]+", out, flags=re.M)


def test_input_pipeline_demo_tables(scenes_dir, capsys):
  bench = load_benchmark("input_pipeline")
  assert bench.main(["--size", "tiny", "--data_dir", scenes_dir, "--batch", "4", "--batches",
                     "1", "--runs", "1", "--visual", "patches,regions"]) == 0
  out = capsys.readouterr().out
  assert "[patches]" in out and "[regions]" in out
  assert _streams_printed(out) == ["text", "image", "pair", "mixed"] * 2


def test_input_pipeline_demo_sizes_match_the_demo_model(scenes_dir):
  """The benchmark's pipeline hands out the demo model's input (48 px, not the stored 64 px)."""
  from experiments.configs import demo
  bench = load_benchmark("input_pipeline")
  data = bench.demo_data("tiny", scenes_dir, 4)
  model = demo.get_config().model
  assert (data.image_size, data.patch_size) == (model.image_size, model.patch_size) == (48, 16)


@pytest.mark.slow
def test_input_pipeline_with_train_steps(scenes_dir, capsys):
  """--train_steps builds and trains the demo model on the pipeline's shapes (both inputs)."""
  bench = load_benchmark("input_pipeline")
  assert bench.main(["--size", "tiny", "--data_dir", scenes_dir, "--batch", "8", "--batches",
                     "1", "--runs", "1", "--train_steps", "2"]) == 0
  out = capsys.readouterr().out
  assert out.count("demo train step:") == 2 and "input/train ratio" in out


def test_cmcl_memory(capsys):
  bench = load_benchmark("cmcl_memory")
  assert bench.main(["--batch", "16", "--dim", "8", "--negatives", "0,2", "--runs", "1"]) == 0
  out = capsys.readouterr().out
  assert out.count("ratio ring/all_gather") == 2


def test_train_step(tmp_path, monkeypatch):
  bench = load_benchmark("train_step")
  out = tmp_path / "step.json"
  monkeypatch.setattr(sys, "argv", [
      "train_step.py", "--config", os.path.join(ROOT, "experiments/configs/demo.py:smoke"),
      "--steps", "1", "--batch", "8,8,8", "--layers", "1", "--json", str(out)])
  bench.main()
  res = json.loads(out.read_text())
  assert res["layers"] == 1 and res["batch"] == dict(text=8, image=8, pair=8)
  assert res["step_seconds"] > 0 and res["analytic_tflop_per_step"] > 0


def test_paper_shapes_data_and_profile(tmp_path):
  """The generated paper-shape files feed every stream; the profile splits a row's time."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import paper_shapes
  from data_pipelines import pipeline, tokenizers
  from data_pipelines.streams import Stream
  root = paper_shapes.write_paper_data(str(tmp_path / "paper"), docs=4, images=4)
  tok = tokenizers.load_tokenizer("sentencepiece:" + tokenizers.train_sentencepiece(
      paper_shapes.tokenizer_sentences(root), str(tmp_path / "spm"), 200, fit_vocab=True))
  converted = paper_shapes.convert_regions(root)
  assert {n: v[0] for n, v in converted.items()} == dict(store_npz=4, store_tsv=4)
  assert paper_shapes.convert_tokens(root, "sentencepiece:" + str(tmp_path / "spm.model"))[0] == 4
  cases = list(paper_shapes.CASES) + [(c + "_store", v, s) for c, v, s in paper_shapes.CASES
                                      if v == "regions"]
  for case, visual, stream in cases:
    regions = "store" if case.endswith("_store") else "raw"
    cfg = pipeline.resolve_config(paper_shapes.paper_config(root, visual, batch=2,
                                                            regions=regions, text=regions))
    st = Stream(stream, cfg, tok, process_index=0, process_count=1)
    total, phases = paper_shapes.profile_rows(st, 1)
    assert total > 0 and set(phases) == set(paper_shapes.PHASES), case
    assert sum(phases.values()) <= total * 1.01 + 1e-6, case
    assert phases["read"] > 0, case
    if stream == "text":
      assert st.builder.d["L"] == 512 and phases["mask"] > 0 and phases["tokenise"] > 0
      assert st.sources[0].fields == ({"token_ids"} if case == "text_store" else {"text"})
    if visual == "regions":
      assert st.builder.d["R"] == 100 and phases["regions"] > 0


@pytest.mark.slow
def test_input_pipeline_paper_mode(tmp_path, capsys):
  bench = load_benchmark("input_pipeline")
  assert bench.main(["--paper", "--paper_dir", str(tmp_path / "paper"), "--paper_docs", "4",
                     "--paper_images", "4", "--batch", "2", "--batches", "1", "--runs", "1",
                     "--workers", "0,1", "--old_rev", "HEAD"]) == 0
  out = capsys.readouterr().out
  cases = ["text", "text_store", "pair_jpeg", "image_jpeg", "image_npz", "pair_tsv"]
  assert re.findall(r"^  (text_store|text|pair_jpeg|image_jpeg|image_npz|pair_tsv) +[\d,]+", out,
                    flags=re.M)[:6] == cases
  assert "workers=1" in out and "x (2/1)" not in out
  assert out.count("one-off conversion") == 3
  # the per-core table also prices the JPEG rows with the workers' own decode ("auto")
  assert re.findall(r"^  (\w+) decoded in the workers .* ([\d.]+)x old$", out, flags=re.M) and \
      len(re.findall(r"decoded in the workers", out)) == 2
  # the workers table also times the JPEG streams with "accurate" (TF) and "pillow" decoding
  assert re.findall(r"^  (\w+_jpeg_(?:pil|tf)) +[\d,]+", out, flags=re.M) == [
      "pair_jpeg_tf", "image_jpeg_tf", "pair_jpeg_pil", "image_jpeg_pil"]


def test_input_pipeline_paper_mode_text_cases(tmp_path, capsys):
  """--cases restricts both tables; with workers 1 and 2 the 2/1 ratio and CPU split print."""
  bench = load_benchmark("input_pipeline")
  assert bench.main(["--paper", "--paper_dir", str(tmp_path / "paper"), "--paper_docs", "4",
                     "--paper_images", "2", "--batch", "2", "--batches", "1", "--runs", "1",
                     "--workers", "1,2", "--old_rev", "HEAD", "--cases", "text,text_store",
                     "--worker_batches", "2"]) == 0
  out = capsys.readouterr().out
  rows = re.findall(r"^  (text_store|text|pair_jpeg|image_jpeg|image_npz|pair_tsv) +[\d,]+", out,
                    flags=re.M)
  assert rows == ["text", "text_store"] * 2
  assert "x (2/1)" in out and "CPU us per row" in out and "cores busy" in out
  # the machine's own 1 -> 2 scaling (bare builder processes) beside the pool's, per round
  assert "pool/mach" in out
  for case in ("text", "text_store"):
    m = re.search(rf"^  {case} +.*; ([\d.]+); machine ([\d.]+)$", out, flags=re.M)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out


def test_bare_rate_counts_every_row(tmp_path):
  """`bare_rate`: k builder processes share the batches; rows/s and CPU per row are positive
  and every builder reports."""
  bench = load_benchmark("input_pipeline")
  paper_shapes = load_benchmark("paper_shapes")
  root = str(tmp_path / "paper")
  paper_shapes.write_paper_data(root, docs=4, images=2)
  tok = bench.tokenizers.load_tokenizer(bench._paper_tokenizer(root))
  cfg = bench.only(paper_shapes.paper_config(root, "patches", 2), "text")
  got = bench.bare_rate(cfg, tok, "text", 2, 4, 2)
  assert got["rate"] > 0 and got["busy"] > 0 and len(got["worker_us"]) == 2


def test_pillow_seconds_per_image_times_the_workers_decode(tmp_path):
  """paper_shapes.pillow_seconds_per_image: a positive CPU time per decoded image, on the image
  slots of a pair stream at the paper's 224 px."""
  bench = load_benchmark("input_pipeline")
  paper_shapes = load_benchmark("paper_shapes")
  root = str(tmp_path / "paper")
  paper_shapes.write_paper_data(root, docs=4, images=2)
  tok = bench.tokenizers.load_tokenizer(bench._paper_tokenizer(root))
  cfg = bench.pipeline.resolve_config(paper_shapes.paper_config(root, "patches", 2))
  st = bench.pipeline.Stream("pair", cfg, tok, process_index=0, process_count=1)
  assert 0 < paper_shapes.pillow_seconds_per_image(st, 2) < 1.0
