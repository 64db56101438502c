"""``unimo-jax prepare``: build datasets, their tokenizer and side files, once.

    unimo-jax prepare synthetic_scenes --data-dir D [--size demo|tiny|small|...]
    unimo-jax prepare tfidf --captions captions.jsonl --out negatives.jsonl [--k 4]
    unimo-jax prepare neighbours --config C[:ARG] [--workdir W --step S] [--out F]
    unimo-jax prepare regions --kind region_npz|region_tsv --path SRC --out DIR [--dtype float16]
    unimo-jax prepare tokens --path CORPUS [--kind text|jsonl] --tokenizer SPEC --out DIR

``synthetic_scenes`` builds the three TFDS configs (pairs, text, images) under D, trains the
default SentencePiece tokenizer on their captions, QA and corpus (D/tokenizer/spm.model for the
demo size, D/tokenizer/spm_<name>.model otherwise), and writes the TF-IDF negatives of every
pair split (``rewriting.tfidf_side_path``: D/side/synthetic_scenes/<config>/...). Each step is
skipped when its output exists (TFDS caches its own builds), so running it again is cheap.
A manifest D/prepared-<config>.json records paths, sizes and timings.

``tfidf`` computes the same side file for any captioned data: a JSONL with one
{"id": int, "captions": [str, ...]} object per image.

``neighbours`` writes the related images X_I and related texts X_T of every training pair of a
training config (`data_pipelines.neighbours`; its ``neighbours`` section picks the scorers) to
F, by default the ``neighbours`` file the config's pair source reads. It prints the builder's
throughput and, on synthetic_scenes, precision@k against the ground truth.

``regions`` converts region features (a ``region_npz`` directory or glob, or the official
base64 ``region_tsv``) into a ``region_store`` directory (`data_pipelines.sources.region_store`:
sharded float16 .npy arrays read by memory map), which a source spec then names as
``regions=dict(kind="region_store", path=DIR)``. Bad records are skipped and counted; it prints
records/s and MB/s of the conversion.

``tokens`` tokenises a text corpus (``text``: one document per line, or ``jsonl`` with a text
field) with the run's tokenizer into a ``token_store`` directory
(`data_pipelines.sources.token_store`: sharded int32 .npy arrays read by memory map), named in
the text stream as ``dict(kind="token_store", path=DIR)``: the text rows then skip
tokenisation. The store records the tokenizer's fingerprint (a run with another tokenizer is
refused); bad records are skipped and counted; it prints records/s and tokens/s.
"""
import json
import os
import time

from data_pipelines import rewriting
from data_pipelines import tokenizers
from data_pipelines.synthetic_scenes import captions as captions_lib
from data_pipelines.synthetic_scenes import generate


def _log(msg):
  print(f"[prepare] {msg}", flush=True)


def build_tfds(options_list, data_dir: str):
  """Builds (or finds cached) TFDS configs; returns ({config name: seconds},
  {kind: builder directory}) — a directory opens with ``tfds.builder_from_directory``."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  import data_pipelines.synthetic_scenes as ss  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  times, dirs = {}, {}
  for options in options_list:
    start = time.time()
    builder = ss.builder_for(options, data_dir)
    cached = builder.is_prepared() if hasattr(builder, "is_prepared") else False
    builder.download_and_prepare()
    times[options.name] = round(time.time() - start, 2)
    dirs[options.kind] = os.path.abspath(str(builder.data_dir))
    _log(f"synthetic_scenes/{options.name}: {'cached' if cached else 'built'} in "
         f"{times[options.name]:.1f}s -> {builder.data_dir}")
  return times, dirs


def split_language(pairs: generate.SceneOptions, split: str):
  """(scenes, ids, language fields) of every example of a pair split (no rendering)."""
  scenes, ids, fields = [], [], []
  for index in range(pairs.num_examples(split)):
    scene, f = generate.language_fields(pairs, split, index)
    scenes.append(scene)
    fields.append(f)
    ids.append(generate.STREAMS[split] * generate.ID_STRIDE + index)
  return scenes, ids, fields


def tokenizer_corpus(train_fields, text: generate.SceneOptions) -> list:
  """Captions and QA of the train pairs plus the text corpus (hard negatives reuse the same
  words, so they add nothing but time)."""
  lines = []
  for f in train_fields:
    lines.extend(f["captions"])
    lines.extend(f["qa"]["question"])
  lines.extend(sorted({a for f in train_fields for a in f["qa"]["answer"]}))
  lines.extend(r["text"] for _, r in generate.generate_examples(text, "train"))
  return lines


def tfidf_for_split(scenes, ids, fields, path: str, k: int) -> int:
  """TF-IDF negatives of one pair split; a retrieved caption true of the image is rejected."""
  caps = [f["captions"] for f in fields]
  claims = [captions_lib.parse(c)[0] for cs in caps for c in cs]
  accept = lambda image, c: not captions_lib.holds(claims[c], scenes[image])
  return rewriting.write_tfidf_side_file(path, ids, caps, k, accept=accept)


def prepare_synthetic(data_dir: str, size: str = "demo", image_size: int = 64,
                      feature_dim: int = 64, seed: int = 0, class_mode: str = "shape_colour",
                      vocab_size: int = 512, model_type: str = "bpe", tfidf_k: int = 4,
                      force: bool = False) -> dict:
  """Everything the demo needs under ``data_dir``; returns the manifest dict."""
  start = time.time()
  common = dict(size=size, image_size=image_size, feature_dim=feature_dim, seed=seed,
                class_mode=class_mode)
  pairs = generate.SceneOptions(kind="pairs", **common)
  text = generate.SceneOptions(kind="text", **common)
  images = generate.SceneOptions(kind="images", **common)
  manifest = dict(dataset="synthetic_scenes", data_dir=os.path.abspath(data_dir),
                  configs={o.kind: o.name for o in (pairs, text, images)}, timings={})
  manifest["timings"]["tfds"], manifest["builder_dirs"] = build_tfds((pairs, text, images),
                                                                    data_dir)

  name = "spm" if pairs.name == "pairs" else f"spm_{pairs.name}"
  prefix = os.path.join(data_dir, "tokenizer", name)
  side = {split: rewriting.tfidf_side_path(data_dir, f"synthetic_scenes/{pairs.name}", split)
          for split in pairs.splits}
  language = {}  # split -> (scenes, ids, fields), computed once for both uses below

  def split_fields(split):
    if split not in language:
      language[split] = split_language(pairs, split)
    return language[split]

  t = time.time()
  if force or not os.path.exists(prefix + ".model"):
    lines = tokenizer_corpus(split_fields("train")[2], text)
    tokenizers.train_sentencepiece(lines, prefix, vocab_size, model_type=model_type,
                                   fit_vocab=True)
    _log(f"tokenizer trained on {len(lines)} lines in {time.time() - t:.1f}s")
  tok = tokenizers.load_tokenizer(f"sentencepiece:{prefix}.model")
  manifest["tokenizer"] = f"sentencepiece:{os.path.abspath(prefix)}.model"
  manifest["vocab_size"] = tok.vocab_size
  manifest["timings"]["tokenizer"] = round(time.time() - t, 2)
  _log(f"tokenizer {manifest['tokenizer']} vocab_size {tok.vocab_size}")

  t = time.time()
  manifest["tfidf_negatives"] = {}
  for split, path in side.items():
    if force or not os.path.exists(path):
      n = tfidf_for_split(*split_fields(split), path, tfidf_k)
      _log(f"tfidf negatives {split}: {n} images -> {path}")
    manifest["tfidf_negatives"][split] = os.path.abspath(path)
  manifest["timings"]["tfidf"] = round(time.time() - t, 2)
  manifest["timings"]["total"] = round(time.time() - start, 2)
  with open(os.path.join(data_dir, f"prepared-{pairs.name}.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  _log(f"done in {manifest['timings']['total']:.1f}s")
  return manifest


def prepare_tfidf(captions_file: str, out: str, k: int) -> int:
  ids, caps = [], []
  with open(captions_file, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        ids.append(int(rec["id"]))
        caps.append([c for c in rec["captions"] if isinstance(c, str) and c.strip()])
  n = rewriting.write_tfidf_side_file(out, ids, caps, k)
  _log(f"tfidf negatives: {n} images -> {out}")
  return n


def prepare_regions(kind: str, path: str, out: str, dtype: str, shard_images: int) -> dict:
  from data_pipelines.sources import open_source  # pylint: disable=import-outside-toplevel
  from data_pipelines.sources import region_store  # pylint: disable=import-outside-toplevel
  src = open_source(dict(kind=kind, path=path), name=f"{kind}:{path}")
  m = region_store.write_store(src, os.path.expanduser(out), dtype=dtype,
                               shard_images=shard_images, log=_log)
  sec = max(m["seconds"], 1e-9)
  _log(f"regions: {m['records']} records ({sum(m['skipped'].values())} skipped: "
       f"{m['skipped']}) -> {out} in {sec:.1f}s: {m['records'] / sec:,.0f} records/s, "
       f"{m['bytes'] / sec / 1e6:,.0f} MB/s written ({m['dtype']}, F {m['feature_dim']}, "
       f"C {m['num_classes']})")
  return m


def prepare_tokens(kind: str, path: str, tokenizer_spec: str, out: str,
                   shard_records: int) -> dict:
  from data_pipelines.sources import open_source  # pylint: disable=import-outside-toplevel
  from data_pipelines.sources import token_store  # pylint: disable=import-outside-toplevel
  tok = tokenizers.load_tokenizer(tokenizer_spec)
  src = open_source(dict(kind=kind, path=path), name=f"{kind}:{path}")
  m = token_store.write_store(src, tok, os.path.expanduser(out), tokenizer_spec=tokenizer_spec,
                              shard_records=shard_records, log=_log)
  sec = max(m["seconds"], 1e-9)
  _log(f"tokens: {m['records']} records, {m['tokens']} tokens ({sum(m['skipped'].values())} "
       f"skipped: {m['skipped']}) -> {out} in {sec:.1f}s: {m['records'] / sec:,.0f} records/s, "
       f"{m['tokens'] / sec:,.0f} tokens/s (tokenizer {m['tokenizer']['fingerprint']})")
  return m


def _parser(prog):
  from unimo_jax import commands  # pylint: disable=import-outside-toplevel
  p = commands.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="dataset", required=True)
  s = sub.add_parser("synthetic_scenes",
                     help="build synthetic_scenes, its tokenizer and side files")
  s.add_argument("--data-dir", required=True,
                 help="where the TFDS datasets, tokenizer and side files are written")
  s.add_argument("--size", default="demo", choices=sorted(generate.SIZES),
                 help="number of images and texts (tiny for tests, demo for the demo)")
  s.add_argument("--image-size", type=int, default=64, help="stored image side in pixels")
  s.add_argument("--feature-dim", type=int, default=64, help="region feature size")
  s.add_argument("--seed", type=int, default=0, help="seed of the scene generator")
  s.add_argument("--class-mode", default="shape_colour", choices=("shape_colour", "shape"),
                 help="region classes: 48 shape-colour classes or 6 shapes")
  s.add_argument("--vocab-size", type=int, default=512,
                 help="tokenizer size incl. specials (shrunk to what the corpus can fill)")
  s.add_argument("--model-type", default="bpe", choices=("unigram", "bpe", "word", "char"),
                 help="SentencePiece model type of the tokenizer")
  s.add_argument("--tfidf-k", type=int, default=4, help="TF-IDF negatives per image")
  s.add_argument("--force", action="store_true", help="redo the tokenizer and side files")
  t = sub.add_parser("tfidf", help="TF-IDF negatives side file for a captions JSONL")
  t.add_argument("--captions", required=True, help='JSONL of {"id": int, "captions": [str]}')
  t.add_argument("--out", required=True, help="the side file (JSONL) to write")
  t.add_argument("--k", type=int, default=4, help="TF-IDF negatives per image")
  n = sub.add_parser("neighbours", help="related images / texts side file of a training config")
  n.add_argument("--config", required=True,
                 help="training config file, path[:ARG] (its get_config(ARG) is used)")
  n.add_argument("--workdir", default=None,
                 help="a training run whose checkpoint the embedding scorer uses")
  n.add_argument("--step", type=int, default=None,
                 help="the checkpoint step of --workdir (default: the latest)")
  n.add_argument("--out", default=None,
                 help="the side file to write (default: the pair source's neighbours file)")
  r = sub.add_parser("regions", help="convert npz / base64 TSV region features to a region store")
  r.add_argument("--kind", required=True, choices=("region_npz", "region_tsv"),
                 help="the format of --path")
  r.add_argument("--path", required=True, help="npz directory or glob, or TSV file(s)")
  r.add_argument("--out", required=True, help="the store directory to write (must not hold one)")
  r.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                 help="features and class probabilities (float16: half the bytes, rounded)")
  r.add_argument("--shard-images", type=int, default=256, help="images per shard file")
  k = sub.add_parser("tokens", help="tokenise a text corpus once into a token store")
  k.add_argument("--path", required=True, help="text file(s) or glob (or JSONL with --kind jsonl)")
  k.add_argument("--kind", default="text", choices=("text", "jsonl"), help="the format of --path")
  k.add_argument("--tokenizer", required=True,
                 help="the run's data.tokenizer spec (sentencepiece:PATH or bpe:DIR)")
  k.add_argument("--out", required=True, help="the store directory to write (must not hold one)")
  k.add_argument("--shard-records", type=int, default=65536, help="records per shard file")
  return p


def load_config_file(spec: str):
  """``path[:ARG]`` -> the ConfigDict of the file's ``get_config(ARG)``."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path}: no such file")
  module_spec = importlib.util.spec_from_file_location("_neighbours_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def prepare_neighbours(config_spec: str, out: str | None, workdir: str | None,
                       step: int | None) -> dict:
  from data_pipelines import neighbours  # pylint: disable=import-outside-toplevel
  config = load_config_file(config_spec)
  if not out:
    specs = list(config.data.streams.pair.sources) if "pair" in config.data.streams else []
    out = (dict(specs[0]).get("neighbours") if specs else None)
    if not out:
      raise ValueError(f"--config {config_spec}: its pair source has no 'neighbours' file; "
                       "pass --out")
  return neighbours.build(config, os.path.expanduser(out), workdir=workdir, step=step,
                          log=lambda line: _log(line))


def main(argv) -> int:
  from unimo_jax import commands  # pylint: disable=import-outside-toplevel
  args = _parser(argv[0]).parse_args(argv[1:])
  try:
    return _run(args)
  except (FileNotFoundError, ValueError) as e:  # a missing or bad input file: one line
    return commands.fail(f"{argv[0]} {args.dataset}", e)


def _run(args) -> int:
  if args.dataset == "tfidf":
    prepare_tfidf(args.captions, args.out, args.k)
    return 0
  if args.dataset == "regions":
    prepare_regions(args.kind, args.path, args.out, args.dtype, args.shard_images)
    return 0
  if args.dataset == "tokens":
    prepare_tokens(args.kind, args.path, args.tokenizer, args.out, args.shard_records)
    return 0
  if args.dataset == "neighbours":
    prepare_neighbours(args.config, args.out, args.workdir, args.step)
    return 0
  manifest = prepare_synthetic(args.data_dir, size=args.size, image_size=args.image_size,
                               feature_dim=args.feature_dim, seed=args.seed,
                               class_mode=args.class_mode,
                               vocab_size=args.vocab_size, model_type=args.model_type,
                               tfidf_k=args.tfidf_k, force=args.force)
  print(json.dumps(manifest, indent=2))
  return 0
