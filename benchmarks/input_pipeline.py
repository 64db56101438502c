"""Input pipeline throughput: examples/s of each stream and of the mixed demo pipeline.

  python benchmarks/input_pipeline.py [--size demo] [--visual patches,regions] [--batches 40]
      [--runs 3] [--tokenizer sentencepiece:/x.model] [--train_steps 12]

On synthetic_scenes (built under --data_dir on first use) with the demo's per-step sizes, for
each visual input it prints, as the median of --runs timed runs of --batches batches (after a
warm-up):
  - each stream alone through tf.data (rows/s), and the Python row builder alone (rows/s: the
    share of the work that tokenisation, masking and reading take);
  - the mixed three-stream pipeline (rows/s over all streams, and steps/s).
With --paper it instead measures the paper's shapes on generated data (`paper_shapes.py`):
per-core rows/s of the Python row builder by phase for the code at --old_rev and this checkout
(alternated runs of each, in child processes), then rows/s through tf.data for each --workers
value: --runs rounds, each timing every value once through a fresh pipeline, in alternating
order (medians over the rounds; the 2/1 ratio is the median of each round's). The new path
reads region features from float16 stores converted once from the npz files and the TSV
(`unimo-jax prepare regions`; the conversion's throughput is printed); the old path reads the
npz / TSV files. The text stream is timed from the raw corpus (``text``) and, on the new path,
from a token store tokenised once (``text_store``, `unimo-jax prepare tokens`). The second
table also gives the cores busy (CPU seconds of all processes over wall seconds: a stream that
already keeps every core busy cannot gain from another worker) and the CPU per row of the
training process and of each worker, and times the JPEG streams three times: with the default
``data.jpeg_decode`` "auto" (``pair_jpeg``, ``image_jpeg``: decoded in the workers when there are
any, by TF ops in the training process with 0), always by TF ops in the training process
(``"accurate"``: ``*_jpeg_tf``) and always by Pillow in the batch builder (``"pillow"``:
``*_jpeg_pil``).
E.g. (under 3 minutes on 2 cores; ``--cases text,text_store`` and ``--tables
per_core|workers`` shorten it):
  python benchmarks/input_pipeline.py --paper --batch 16 --batches 6 --runs 3 --workers 0,1,2
With --train_steps > 0 it also trains the demo model on random schema batches for that many
steps and prints the ratio of the pipeline's steps/s to the train step's (> 1: the input keeps
up). Without --tokenizer it trains a SentencePiece model on the synthetic corpus first.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import pipeline, schema  # noqa: E402
from data_pipelines import tokenizers  # noqa: E402
from data_pipelines.sources import open_source  # noqa: E402

DEMO_BATCH = 32  # rows per stream per step (experiments/configs/demo.py)


def build_tokenizer(cfg, workdir: str, vocab_size: int):
  """SentencePiece trained on the synthetic text corpus and captions (as the demo does)."""
  sentences = []
  for s in ("text", "pair"):
    src = open_source(cfg.streams[s].sources[0], name=s)
    for i in range(min(len(src), 4000)):
      rec = src.read(i)
      sentences += [rec["text"]] if "text" in rec else list(rec.get("captions", []))
  prefix = os.path.join(workdir, "synthetic_spm")
  return tokenizers.load_tokenizer("sentencepiece:" + tokenizers.train_sentencepiece(
      sentences, prefix, vocab_size, fit_vocab=True))


def time_iterator(it, batches: int, runs: int):
  """Median seconds per batch over `runs` runs of `batches` batches (after 3 warm-up ones)."""
  return time_pipeline(it, batches, runs)[0]


def _process_cpu(pid: int) -> float:
  """User + system CPU seconds of process `pid` so far (Linux /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_pipeline(it, batches: int, runs: int):
  """(median seconds per batch over `runs` runs of `batches` batches after 3 warm-up ones, this
  process's CPU seconds and each worker's over all timed batches)."""
  for _ in range(3):
    next(it)
  pids = getattr(it, "worker_pids", [])  # a plain iterator has no workers
  start = [_process_cpu(p) for p in pids]
  cpu = time.process_time()
  per_batch = []
  for _ in range(runs):
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    per_batch.append((time.perf_counter() - t) / batches)
  return (statistics.median(per_batch), time.process_time() - cpu,
          [_process_cpu(p) - s for p, s in zip(pids, start)])


def _bare_builder():
  """Child process of `bare_rate` (``--_bare_builder``): builds its share of batches with
  `Stream.batch` as a worker does, but alone, after a "go" line on stdin."""
  import pickle  # pylint: disable=import-outside-toplevel
  from data_pipelines import streams  # pylint: disable=import-outside-toplevel
  cfg, tok, stream, first, batches = pickle.loads(sys.stdin.buffer.read(
      int(sys.stdin.buffer.readline())))
  st = streams.Stream(stream, cfg, tok, process_index=0, process_count=1, probe=False,
                      half_regions=False)
  st.batch(0, first)  # warm-up
  print("ready", flush=True)
  sys.stdin.buffer.readline()
  t, cpu = time.perf_counter(), time.process_time()
  for k in range(batches):
    st.batch(0, first + 1 + k)
  print(json.dumps(dict(wall=time.perf_counter() - t, cpu=time.process_time() - cpu)), flush=True)
  return 0


def bare_rate(cfg, tok, stream: str, builders: int, batches: int, rows_per_batch: int) -> dict:
  """The machine's own scaling, without the pool: `builders` processes build `batches` batches
  of `stream` between them (disjoint steps, started together), each alone as a worker builds
  them. {rate: rows per wall second, busy: cores busy, worker_us: CPU us per row of each}."""
  import pickle  # pylint: disable=import-outside-toplevel
  resolved = pipeline.resolve_config(cfg)
  each = max(1, batches // builders)
  procs = []
  try:
    for k in range(builders):
      pr = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_bare_builder"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
      payload = pickle.dumps((resolved, tok, stream, 1 + k * (each + 1), each))
      pr.stdin.write(b"%d\n" % len(payload) + payload)
      pr.stdin.flush()
      procs.append(pr)
    for pr in procs:
      if pr.stdout.readline().strip() != b"ready":
        raise RuntimeError("a bare builder did not start (its stderr says why)")
    for pr in procs:
      pr.stdin.write(b"go\n")
      pr.stdin.flush()
    got = [json.loads(pr.stdout.readline()) for pr in procs]
  finally:
    for pr in procs:
      pr.stdin.close()
      pr.wait()
  wall = max(g["wall"] for g in got)
  rows = each * builders * rows_per_batch
  return dict(rate=rows / wall, busy=sum(g["cpu"] for g in got) / wall, main_us=0.0,
              worker_us=[1e6 * g["cpu"] / rows for g in got])


def worker_rounds(cfg, tok, counts, batches: int, rounds: int, rows_per_batch: int,
                  bare_stream: str = "") -> dict:
  """{workers: [one dict per round]}: each round times `batches` batches through a fresh
  pipeline for every value in `counts`, in alternating order (a drift in the machine's speed
  then hits every value alike). Per run: rows per wall second, cores busy (the CPU seconds of
  this process and its workers over the wall seconds), CPU microseconds per row of this process
  and of each worker (a worker's CPU over all the run's rows). With `bare_stream`, each round
  also times one and two bare builder processes (`bare_rate`; keys "bare1", "bare2")."""
  runs = list(counts) + (["bare1", "bare2"] if bare_stream else [])
  out = {w: [] for w in runs}
  for r in range(rounds):
    for w in (runs if r % 2 == 0 else runs[::-1]):
      if isinstance(w, str):
        out[w].append(bare_rate(cfg, tok, bare_stream, int(w[-1]), batches, rows_per_batch))
        continue
      c = cfg.copy_and_resolve_references()
      c.workers = w
      it = pipeline.make_pipeline(c, tokenizer=tok)
      try:
        sec, cpu, worker_cpu = time_pipeline(it, batches, 1)
      finally:
        it.close()
      wall = sec * batches
      rows = rows_per_batch * batches
      out[w].append(dict(rate=rows / wall, busy=(cpu + sum(worker_cpu)) / wall,
                         main_us=1e6 * cpu / rows, worker_us=[1e6 * c / rows for c in worker_cpu]))
  return out


def time_python_rows(stream, batches: int, runs: int):
  """Median seconds per batch of the Python row builder alone (no tf.data)."""
  stream.batch(0, 0)
  per_batch = []
  for r in range(runs):
    t = time.perf_counter()
    for step in range(batches):
      stream.batch(0, 1 + r * batches + step)
    per_batch.append((time.perf_counter() - t) / batches)
  return statistics.median(per_batch)


def only(cfg, stream):
  c = cfg.copy_and_resolve_references()
  for s in schema.STREAMS:
    if s != stream:
      c.streams[s].batch_size = 0
  return c


def demo_data(size: str, data_dir: str, batch: int):
  """The demo config's data section (64 px scenes resized to the model's 48 px input, 16 px
  patches, 64-token texts, 32-token captions) on synthetic_scenes/`size`, `batch` rows per
  stream, with no related items (no neighbours file)."""
  from experiments.configs import common  # pylint: disable=import-outside-toplevel
  from experiments.configs import demo  # pylint: disable=import-outside-toplevel
  d = demo.get_config(f"data_dir={data_dir}").data
  c = common.synthetic_data(visual_input="patches", size=size, image_size=64,
                            input_size=d.image_size, patch_size=d.patch_size,
                            batch_sizes=(batch,) * 3,
                            text_length=d.streams.text.max_length,
                            caption_length=d.streams.pair.max_length, data_dir=data_dir)
  c.num_related_images = c.num_related_texts = 0
  return c


def train_steps_per_second(data_cfg, tokenizer, steps: int) -> float:
  """Steps/s of the demo train step on random schema batches (the input pipeline left out)."""
  from experiments.configs import demo  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import random_data, trainer  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  config.data = data_cfg
  config.model.vocab_size = tokenizer.vocab_size
  config.model.visual_input = data_cfg.visual_input
  # The model's input is what the pipeline hands out (the resized side, not the stored one).
  config.model.image_size = data_cfg.image_size
  config.model.patch_size = data_cfg.patch_size
  config.model.region_feature_dim = data_cfg.region_feature_dim
  config.model.num_region_classes = data_cfg.num_region_classes
  config.train.total_steps = steps
  config.train.log_every = max(2, steps // 2)
  config.train.checkpoint_every = 10 ** 9
  spec = schema.batch_spec(pipeline.resolve_config(data_cfg))
  data = random_data.RandomBatches(spec, tokenizer.vocab_size)
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train(config, workdir, data=data)
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [r["steps_per_second"] for r in rows if "steps_per_second" in r][-1]


# ---------------------------------------------------------------------------------------------
# --paper: the paper's shapes, old code vs new, and worker scaling
# ---------------------------------------------------------------------------------------------

PAPER_WORKER_CASES = ("text", "text_store", "pair_jpeg", "pair_jpeg_tf", "pair_jpeg_pil",
                      "image_jpeg", "image_jpeg_tf", "image_jpeg_pil", "image_npz", "pair_tsv")
# Cases of the second table only: the JPEG streams with a data.jpeg_decode other than the
# default "auto" (pair_jpeg, image_jpeg: decoded by the workers when data.workers > 0, by TF ops
# in this process with 0): "accurate" (always TF ops in this process) and "pillow" (always
# Pillow in the batch builder, i.e. in the workers when data.workers > 0).
DECODE_CASES = (("pair_jpeg_tf", "patches", "pair"), ("image_jpeg_tf", "patches", "image"),
                ("pair_jpeg_pil", "patches", "pair"), ("image_jpeg_pil", "patches", "image"))
CASE_DECODE = {"_tf": "accurate", "_pil": "pillow"}


def _paper_tokenizer(root: str):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import paper_shapes  # pylint: disable=import-outside-toplevel
  model = os.path.join(root, "spm.model")
  if not os.path.exists(model):
    tokenizers.train_sentencepiece(paper_shapes.tokenizer_sentences(root),
                                   os.path.join(root, "spm"), 8000, fit_vocab=True)
  return "sentencepiece:" + model


def _profiles(tree: str, root: str, tok: str, batch: int, batches: int,
              regions: str = "raw", fast_decode: bool = False, cases: str = "") -> dict:
  """Per-row profile of every case on the code tree `tree` ("" = this checkout), in a child;
  `regions` "store" reads the converted region stores (the new path), "raw" npz / TSV."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_shapes.py")
  out = subprocess.run([sys.executable, script, "--tree", tree, "--root", root, "--tokenizer",
                        tok, "--batch", str(batch), "--batches", str(batches),
                        "--regions", regions] + (["--fast_decode"] if fast_decode else []) +
                       (["--cases", cases] if cases else []),
                       capture_output=True, text=True, check=False)
  line = [l for l in out.stdout.splitlines() if l.startswith("PROFILE ")]
  if out.returncode or not line:
    raise RuntimeError(f"profile of {tree or 'this checkout'} failed:\n{out.stderr[-3000:]}")
  return json.loads(line[-1][len("PROFILE "):])


def _old_tree(rev: str, workdir: str) -> str:
  """`rev`'s data_pipelines and unimo_jax, extracted under `workdir`."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tree = os.path.join(workdir, "old_tree")
  os.makedirs(tree)
  archive = subprocess.run(["git", "-C", repo, "archive", rev, "data_pipelines", "unimo_jax"],
                           capture_output=True, check=True).stdout
  subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
  return tree


def paper_benchmark(args) -> int:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import paper_shapes  # pylint: disable=import-outside-toplevel
  root = paper_shapes.write_paper_data(os.path.expanduser(args.paper_dir),
                                      docs=args.paper_docs, images=args.paper_images)
  tok_spec = _paper_tokenizer(root)
  # The new path reads region features from stores converted once (`unimo-jax prepare regions`);
  # the old path reads the npz files and the base64 TSV as before.
  for name, (records, sec, mbs, kind) in paper_shapes.convert_regions(root).items():
    print(f"one-off conversion {kind} -> {name}: {records} records in {sec:.1f} s "
          f"({records / max(sec, 1e-9):,.0f} records/s, {mbs:,.0f} MB/s of input)")
  records, sec, tokens = paper_shapes.convert_tokens(root, tok_spec)
  print(f"one-off conversion text -> store_tokens: {records} records in {sec:.1f} s "
        f"({records / max(sec, 1e-9):,.0f} records/s, {tokens / max(sec, 1e-9):,.0f} tokens/s)")
  known = [c for c, _, _ in paper_shapes.CASES + DECODE_CASES]
  cases = args.cases.split(",") if args.cases else known
  if any(c not in known for c in cases):
    raise SystemExit(f"--cases {args.cases}: cases are {','.join(known)}")
  print(f"load average at the start {os.getloadavg()[0]:.1f}")
  print(f"paper shapes under {root}: text L 512 (MLM P 80 + infilling P2 160); pairs 5 captions, "
        f"224 px JPEG, Kp 2, Kn 4 (TF-IDF + lexicon), Ki 1, Kt 1; regions R 100, F 2048, "
        f"C 1601 (npz / TSV); batch {args.batch}; os.cpu_count() {os.cpu_count()}")
  if args.tables in ("both", "per_core"):
    runs = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
      old = _old_tree(args.old_rev, tmp)
      for _ in range(args.runs):  # alternated, so a change in the machine's load hits both
        runs["old"].append(_profiles(old, root, tok_spec, args.batch, args.batches,
                                     cases=",".join(cases)))
        runs["new"].append(_profiles("", root, tok_spec, args.batch, args.batches, "store",
                                     fast_decode=True, cases=",".join(cases)))
    med = {k: {case: {p: statistics.median(r[case][p] for r in v) for p in v[0][case]}
               for case in v[0]} for k, v in runs.items()}
    print(f"\nPython row building per core: rows per CPU second (median of {args.runs} "
          f"alternated runs; old = {args.old_rev}, new = this checkout, region features from the "
          f"converted stores); CPU microseconds per row by phase, old>new; TF decode: CPU "
          f"microseconds per image (one TF thread), and rows per CPU second with it")
    phases = paper_shapes.PHASES
    print(f"  {'case':<11} {'old rows/s':>10} {'new rows/s':>10} {'x':>5}  " +
          " ".join(f"{p:>13}" for p in phases) + f" {'TF decode':>13} {'with decode':>17}")
    for case in med["new"]:
      o, n = med["old"][case], med["new"][case]
      cells = " ".join(f"{1e6 * o[p]:>6.0f}>{1e6 * n[p]:<6.0f}" for p in phases)
      dec = with_dec = f"{'-':>13}"
      if "decode" in n:
        dec = f"{1e6 * o['decode']:>6.0f}>{1e6 * n['decode']:<6.0f}"
        ot, nt = (o["total"] + o["images"] * o["decode"], n["total"] + n["images"] * n["decode"])
        with_dec = f"{1 / ot:>5,.0f}>{1 / nt:<5,.0f} {ot / nt:.2f}x"
      print(f"  {case:<11} {1 / o['total']:>10,.0f} {1 / n['total']:>10,.0f} "
            f"{o['total'] / n['total']:>5.2f}  {cells} {dec} {with_dec:>17}")
    for case in med["new"]:
      o, n = med["old"][case], med["new"][case]
      if "decode_fast" in n:
        ot = o["total"] + o["images"] * o["decode"]
        nt = n["total"] + n["images"] * n["decode_fast"]
        print(f"  {case} with data.jpeg_decode='fast': TF decode {1e6 * n['decode_fast']:.0f} us "
              f"per image, {1 / nt:,.0f} rows per CPU second with decode, {ot / nt:.2f}x old")
      if "decode_pillow" in n:
        ot = o["total"] + o["images"] * o["decode"]
        nt = n["total"] + n["images"] * n["decode_pillow"]
        print(f"  {case} decoded in the workers (the default 'auto' with data.workers > 0: "
              f"Pillow): {1e6 * n['decode_pillow']:.0f} us per image, {1 / nt:,.0f} rows per "
              f"CPU second with decode, {ot / nt:.2f}x old")
  if args.tables == "per_core":
    return 0
  counts = [int(w) for w in args.workers.split(",")]
  scaling = 1 in counts and 2 in counts
  batches = args.worker_batches or args.batches
  print(f"\nthrough the pipeline (new code, this process + data.workers processes), rows per "
        f"wall second: {args.runs} rounds, each timing every workers value once ({batches} "
        f"batches, a fresh pipeline), in alternating order; medians over the rounds; load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores:")
  if scaling:
    print("  machine 2/1: each round also times the same batches built by one and by two bare "
          "builder processes (Stream.batch alone, no pool, no tf.data, started together): what "
          "this machine gives two processes at that moment; pool/machine = (2/1) / (machine 2/1)")
  print(f"  {'case':<11} " + " ".join(f"{f'workers={w}':>11}" for w in counts) +
        f" {'x (max/0)':>10}" + (f" {'x (2/1)':>8} {'machine':>8} {'pool/mach':>9}"
                                 if scaling else "") +
        "   cores busy (CPU s / wall s of all processes), and CPU us per row: this process / "
        "each worker, per workers value" + ("; 2/1 of each round" if scaling else ""))
  tok = tokenizers.load_tokenizer(tok_spec)
  for case, visual, stream in paper_shapes.CASES + DECODE_CASES:
    if case not in PAPER_WORKER_CASES or case not in cases:
      continue
    cfg = only(paper_shapes.paper_config(root, visual, args.batch, regions="store",
                                         text="store" if case == "text_store" else "raw"),
               stream)
    for suffix, value in CASE_DECODE.items():
      if case.endswith(suffix):
        cfg.jpeg_decode = value
    per_w = worker_rounds(cfg, tok, counts, batches, args.runs, args.batch,
                          bare_stream=stream if scaling else "")
    rates = [statistics.median(r["rate"] for r in per_w[w]) for w in counts]
    cells = []
    for w in counts:
      busy = statistics.median(r["busy"] for r in per_w[w])
      main_us = statistics.median(r["main_us"] for r in per_w[w])
      each = [statistics.median(r["worker_us"][k] for r in per_w[w]) for k in range(w)]
      cells.append(f"{busy:.2f} {main_us:.0f}/" + ",".join(f"{c:.0f}" for c in each))
    ratio, rounds = "", ""
    if scaling:
      per_round = [b["rate"] / a["rate"] for a, b in zip(per_w[1], per_w[2])]
      machine = [b["rate"] / a["rate"] for a, b in zip(per_w["bare1"], per_w["bare2"])]
      pool, mach = statistics.median(per_round), statistics.median(machine)
      ratio = f" {pool:>8.2f} {mach:>8.2f} {pool / mach:>9.2f}"
      rounds = ("; " + " ".join(f"{x:.2f}" for x in per_round) + "; machine " +
                " ".join(f"{x:.2f}" for x in machine))
    print(f"  {case:<11} " + " ".join(f"{r:>11,.0f}" for r in rates) +
          f" {max(rates[1:] or rates) / rates[0]:>10.2f}{ratio}   " + "  ".join(cells) + rounds)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="demo", help="synthetic_scenes size preset")
  p.add_argument("--data_dir", default="~/.cache/unimo_jax/tfds")
  p.add_argument("--visual", default="patches,regions")
  p.add_argument("--batch", type=int, default=DEMO_BATCH, help="rows per stream per step")
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--tokenizer", default="", help="spec; default: train one on the corpus")
  p.add_argument("--vocab_size", type=int, default=2000)
  p.add_argument("--train_steps", type=int, default=0,
                 help="also time this many demo train steps (compiles the model)")
  p.add_argument("--paper", action="store_true",
                 help="the paper's shapes on generated data: old vs new code, worker scaling")
  p.add_argument("--paper_dir", default="~/.cache/unimo_jax/paper_shapes")
  p.add_argument("--paper_docs", type=int, default=96, help="--paper: documents written")
  p.add_argument("--paper_images", type=int, default=48, help="--paper: images written")
  p.add_argument("--old_rev", default="fc1e2af", help="--paper: the commit timed as 'old'")
  p.add_argument("--workers", default="0,1,2", help="--paper: data.workers values to time")
  p.add_argument("--cases", default="", help="--paper: only these cases (comma-separated, "
                 "e.g. text,text_store; default all)")
  p.add_argument("--tables", default="both", choices=("both", "per_core", "workers"),
                 help="--paper: which of the two tables to measure")
  p.add_argument("--worker_batches", type=int, default=0,
                 help="--paper: batches per timed run through the pipeline (default --batches)")
  args = p.parse_args(argv)
  if args.paper:
    return paper_benchmark(args)

  base = demo_data(args.size, args.data_dir, args.batch)
  with tempfile.TemporaryDirectory() as tmp:
    tok = (tokenizers.load_tokenizer(args.tokenizer) if args.tokenizer
           else build_tokenizer(base, tmp, args.vocab_size))
  print(f"synthetic_scenes/{args.size}, {args.batch} rows per stream per step, tokenizer "
        f"vocab {tok.vocab_size}; median of {args.runs} runs x {args.batches} batches")
  for vis in args.visual.split(","):
    cfg = base.copy_and_resolve_references()
    cfg.visual_input = vis
    print(f"\n[{vis}]")
    print(f"  {'stream':<8} {'tf.data rows/s':>15} {'python rows/s':>15}")
    for s in schema.STREAMS:
      it = pipeline.make_pipeline(only(cfg, s), tokenizer=tok)
      sec = time_iterator(it, args.batches, args.runs)
      py = time_python_rows(it.streams[s], max(5, args.batches // 4), args.runs)
      it.close()
      print(f"  {s:<8} {args.batch / sec:>15,.0f} {args.batch / py:>15,.0f}")
    it = pipeline.make_pipeline(cfg, tokenizer=tok)
    sec = time_iterator(it, args.batches, args.runs)
    it.close()
    rows = args.batch * len(schema.STREAMS)
    print(f"  {'mixed':<8} {rows / sec:>15,.0f}   ({1 / sec:.1f} steps/s of {rows} rows)")
    if args.train_steps > 0:
      train_sps = train_steps_per_second(cfg, tok, args.train_steps)
      print(f"  demo train step: {train_sps:.2f} steps/s; input/train ratio "
            f"{(1 / sec) / train_sps:.1f}x")
  return 0


if __name__ == "__main__" and sys.argv[1:] == ["--_bare_builder"]:
  sys.exit(_bare_builder())
if __name__ == "__main__":
  sys.exit(main())
