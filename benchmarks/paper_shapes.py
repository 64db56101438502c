"""Generated data at UNIMO's shapes for the input benchmark (no download), and a per-row profile.

`write_paper_data(root)` writes, under `root`:
  text/docs.txt            documents of 700-1100 words (longer than 512 tokens: one window each)
  pairs/captions.jsonl     5 captions per image, numeric ids, 224 px JPEG files in pairs/images,
                           whose words come from `lexicon` classes (so lexicon rewrites apply)
  pairs/tfidf.jsonl        TF-IDF-nearest captions of other images (`rewriting` side file)
  pairs/neighbours.jsonl   one related image and one related text per image (Ki = Kt = 1)
  regions/*.npz            100 regions, F 2048, C 1601 class probabilities (image stream)
  regions.tsv              the same regions as the official base64 TSV (pair stream, regions)
and `convert_regions(root)` converts both once (`unimo-jax prepare regions`'s `write_store`) to
  store_npz/, store_tsv/   float16 region stores (source kind region_store)
and `convert_tokens(root, tokenizer)` tokenises text/docs.txt once (`unimo-jax prepare tokens`) to
  store_tokens/            a token store (source kind token_store: the text_store case)
`paper_config(root, visual)` is a ``data`` section at the paper's sizes over them (text
L 512, P 80, L2 512, P2 160; pairs L 64, P 10, P2 64, Kp 2, Kn 4, Ki 1, Kt 1; 224 px; R 100);
with ``regions="store"`` its region sources read the converted stores instead of npz / TSV.

`RowProfile(stream)` wraps the row builder's parts (read, tokenise, mask, rewrite, regions) with
timers, so `profile_rows` can say where a row's time goes; `decode_seconds_per_image` times the
stream's safe TF decode (decode, resize, normalise, error tolerance) of its images on one thread.
"""
import base64
import collections
import io
import json
import os
import sys
import time

import numpy as np

if __name__ == "__main__":
  # A child of input_pipeline.py: the code tree it times (--tree) goes first on the path, before
  # anything imports data_pipelines, then this checkout.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if "--tree" in sys.argv[:-1] and sys.argv[sys.argv.index("--tree") + 1]:
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])

from data_pipelines import lexicon, rewriting  # noqa: E402  pylint: disable=wrong-import-position

WORDS = tuple(f"w{a}{b}" for a in "bcdfghklmnprstvz" for b in "aeiouy") + tuple(
    "the of and to in is was for on that with as by at from".split())
COLOURS = [g[0] for g in lexicon.COLOURS]
OBJECTS = [s for g in lexicon.OBJECTS for s, _ in g[:1]]
RELATIONS = [g[0] for g in lexicon.RELATIONS]
NUMBERS = [g[0] for g in lexicon.NUMBERS]
SIZES = [g[0] for g in lexicon.SIZES]


def _doc(rng, lo=700, hi=1100):
  words = rng.choice(WORDS, int(rng.integers(lo, hi)))
  return " ".join(words)


def _caption(rng):
  """A COCO-like caption with colour, size, number, object and relation words."""
  c, o, r = rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(RELATIONS)
  n, s, o2 = rng.choice(NUMBERS), rng.choice(SIZES), rng.choice(OBJECTS)
  filler = " ".join(rng.choice(WORDS, int(rng.integers(2, 6))))
  return f"a {s} {c} {o} {r} {n} {o2}s {filler}"


def _jpeg(rng, size=224, quality=90) -> bytes:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  # Smooth colour fields plus noise: compresses like a photo (~15-30 KB at q 90).
  y, x = np.mgrid[0:size, 0:size] / size
  base = np.stack([np.sin(6 * x * rng.random() + rng.random() * 6),
                   np.cos(5 * y * rng.random() + rng.random() * 6),
                   np.sin(4 * (x + y) * rng.random())], -1)
  pix = (127 + 90 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pix).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def _regions(rng, R=100, F=2048, C=1601, W=640, H=480):
  x1 = rng.uniform(0, W * 0.8, R)
  y1 = rng.uniform(0, H * 0.8, R)
  boxes = np.stack([x1, y1, x1 + rng.uniform(10, W * 0.2, R), y1 + rng.uniform(10, H * 0.2, R)],
                   1).astype(np.float32)
  feats = rng.gamma(1.0, 1.0, (R, F)).astype(np.float32)
  logits = rng.normal(0, 2, (R, C))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
  return boxes, feats, probs


def _b64(a):
  return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes())


def write_paper_data(root: str, *, docs=96, images=48, regions=100, seed=0) -> str:
  """Writes the files listed in the module docstring under `root` (once); returns `root`."""
  done = os.path.join(root, "DONE")
  if os.path.exists(done):
    return root
  rng = np.random.default_rng(seed)
  for d in ("text", "pairs/images", "regions"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  with open(os.path.join(root, "text", "docs.txt"), "w") as f:
    for _ in range(docs):
      f.write(_doc(rng) + "\n")
  captions = []
  with open(os.path.join(root, "pairs", "captions.jsonl"), "w") as f:
    for i in range(images):
      caps = [_caption(rng) for _ in range(5)]
      captions.append(caps)
      with open(os.path.join(root, "pairs", "images", f"{i}.jpg"), "wb") as im:
        im.write(_jpeg(rng))
      f.write(json.dumps(dict(id=i, image=f"{i}.jpg", captions=caps)) + "\n")
  rewriting.write_tfidf_side_file(os.path.join(root, "pairs", "tfidf.jsonl"), range(images),
                                  captions, k=4)
  with open(os.path.join(root, "pairs", "neighbours.jsonl"), "w") as f:
    for i in range(images):
      j = (i + 1) % images
      f.write(json.dumps(dict(key=str(i), images=[str(j)], texts=[captions[j][0]])) + "\n")
  with open(os.path.join(root, "regions.tsv"), "wb") as tsv:
    for i in range(images):
      boxes, feats, probs = _regions(rng, R=regions)
      np.savez(os.path.join(root, "regions", f"{i}.npz"), boxes=boxes, features=feats,
               class_probs=probs, image_w=640, image_h=480)
      tsv.write(b"\t".join([f"{i}.jpg".encode(), b"640", b"480", str(regions).encode(),
                            _b64(boxes), _b64(feats), _b64(probs)]) + b"\n")
  open(done, "w").close()
  return root


def convert_regions(root: str) -> dict:
  """Converts regions/ and regions.tsv to float16 stores under `root` (once; a store is written
  under a temporary name and renamed, so an interrupted conversion is redone). Returns
  {store: (records, seconds, MB read per second)} of the conversions (from their manifests)."""
  from data_pipelines.sources import open_source  # pylint: disable=import-outside-toplevel
  from data_pipelines.sources import region_store  # pylint: disable=import-outside-toplevel
  out = {}
  for name, kind, src in (("store_npz", "region_npz", "regions"),
                          ("store_tsv", "region_tsv", "regions.tsv")):
    final, path = os.path.join(root, name), os.path.join(root, src)
    if not os.path.exists(final):
      tmp = final + ".partial"
      if os.path.exists(tmp):
        import shutil  # pylint: disable=import-outside-toplevel
        shutil.rmtree(tmp)
      region_store.write_store(open_source(dict(kind=kind, path=path), name=kind), tmp)
      os.rename(tmp, final)
    with open(os.path.join(final, region_store.MANIFEST)) as f:
      m = json.load(f)
    size = (sum(os.path.getsize(os.path.join(path, p)) for p in os.listdir(path))
            if os.path.isdir(path) else os.path.getsize(path))
    out[name] = (m["records"], m["seconds"], size / max(m["seconds"], 1e-9) / 1e6, kind)
  return out


def convert_tokens(root: str, tokenizer_spec: str) -> tuple:
  """Tokenises text/docs.txt into `root`/store_tokens (once, written under a temporary name and
  renamed). Returns (records, seconds, tokens) of the conversion (from its manifest)."""
  from data_pipelines import tokenizers  # pylint: disable=import-outside-toplevel
  from data_pipelines.sources import open_source  # pylint: disable=import-outside-toplevel
  from data_pipelines.sources import token_store  # pylint: disable=import-outside-toplevel
  final = os.path.join(root, "store_tokens")
  if not os.path.exists(final):
    tmp = final + ".partial"
    if os.path.exists(tmp):
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(tmp)
    src = open_source(dict(kind="text", path=os.path.join(root, "text", "docs.txt")), name="docs")
    token_store.write_store(src, tokenizers.load_tokenizer(tokenizer_spec), tmp,
                            tokenizer_spec=tokenizer_spec)
    os.rename(tmp, final)
  with open(os.path.join(final, token_store.MANIFEST)) as f:
    m = json.load(f)
  return m["records"], m["seconds"], m["tokens"]


def tokenizer_sentences(root: str):
  with open(os.path.join(root, "text", "docs.txt")) as f:
    out = [line.strip() for line in f]
  with open(os.path.join(root, "pairs", "captions.jsonl")) as f:
    for line in f:
      out += json.loads(line)["captions"]
  return out


def paper_config(root: str, visual: str, batch: int = 32, tokenizer: str = "",
                 regions: str = "raw", text: str = "raw"):
  """The ``data`` section at the paper's sizes over `write_paper_data(root)`'s files; region
  features from the npz / TSV files (``regions="raw"``) or from `convert_regions`'s stores
  (``"store"``); documents from docs.txt (``text="raw"``) or `convert_tokens`'s store
  (``"store"``)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  d = ml_collections.ConfigDict()
  d.seed = 0
  d.tokenizer = tokenizer
  d.visual_input = visual
  d.image_size, d.patch_size = 224, 16
  d.num_regions, d.region_feature_dim, d.num_region_classes = 100, 2048, 1601
  d.num_positives, d.num_negatives = 2, 4
  d.num_related_images = d.num_related_texts = 1
  pairs = dict(name="pairs", kind="jsonl", path=f"{root}/pairs/captions.jsonl",
               image_dir=f"{root}/pairs/images", neighbours=f"{root}/pairs/neighbours.jsonl",
               tfidf_negatives=f"{root}/pairs/tfidf.jsonl", lexicon_negatives=True)
  images = dict(name="images", kind="image_folder", path=f"{root}/pairs/images")
  if visual == "regions" and regions == "store":
    pairs["regions"] = dict(kind="region_store", path=f"{root}/store_tsv")
    images["regions"] = dict(kind="region_store", path=f"{root}/store_npz")
  elif visual == "regions":
    pairs["regions"] = dict(kind="region_tsv", path=f"{root}/regions.tsv")
    images["regions"] = dict(kind="region_npz", path=f"{root}/regions")
  d.streams = ml_collections.ConfigDict()
  docs = (dict(name="docs", kind="token_store", path=f"{root}/store_tokens") if text == "store"
          else dict(name="docs", kind="text", path=f"{root}/text/docs.txt"))
  d.streams.text = dict(batch_size=batch, max_length=512, max_predictions=80, s2s_max_length=512,
                        s2s_max_predictions=160, sources=[docs])
  d.streams.image = dict(batch_size=batch, sources=[images])
  d.streams.pair = dict(batch_size=batch, max_length=64, max_predictions=10,
                        s2s_max_predictions=64, sources=[pairs])
  return d


# ---------------------------------------------------------------------------------------------
# Where a row's time goes
# ---------------------------------------------------------------------------------------------

PHASES = ("read", "tokenise", "mask", "rewrite", "regions", "other")


class RowProfile:
  """Timers around the parts of `stream`'s row building (undone by `close`)."""

  def __init__(self, stream):
    from data_pipelines import examples  # pylint: disable=import-outside-toplevel
    self.seconds = collections.Counter()
    self._undo = []
    b = stream.builder
    for src in stream.sources:
      self._wrap(src, "read", "read")
    # Names a tree lacks are skipped (the old tree masks row by row, this one a batch of text
    # rows at once: span_mlm_batch / infilling_batch, codec.sequences).
    for name in ("encode", "sequence", "sequences", "texts"):
      self._wrap(b.codec, name, "tokenise") if b.codec is not None else None
    if b.codec is not None:
      self._wrap(b.codec.tok, "word_starts", "tokenise")
    for name in ("span_mlm", "infilling", "span_mlm_batch", "infilling_batch",
                 "captioning_layout", "region_mask", "patch_mask"):
      self._wrap(examples.masking, name, "mask")
    for name in ("paraphrase_positives", "lexicon_rewrites"):
      self._wrap(examples.rewriting, name, "rewrite")
    self._wrap(b, "_regions", "regions")

  def _wrap(self, obj, name, phase):
    fn = getattr(obj, name, None)
    if fn is None:
      return
    seconds = self.seconds

    def timed(*a, **k):
      t = time.thread_time()
      try:
        return fn(*a, **k)
      finally:
        seconds[phase] += time.thread_time() - t

    had = name in getattr(obj, "__dict__", {})
    setattr(obj, name, timed)
    self._undo.append((obj, name, fn, had))

  def close(self):
    for obj, name, fn, had in reversed(self._undo):
      if had:
        setattr(obj, name, fn)
      else:  # an instance attribute shadowing the class's method
        delattr(obj, name)


def profile_rows(stream, batches: int):
  """(CPU seconds per row of the whole Python builder, {phase: CPU seconds per row}) over
  `batches`: thread CPU time, so other processes competing for the cores do not count."""
  stream.batch(0, 0)  # warm caches (mixture periods, file handles)
  prof = RowProfile(stream)
  try:
    t = time.thread_time()
    for step in range(1, batches + 1):
      stream.batch(0, step)
    total = time.thread_time() - t
  finally:
    prof.close()
  rows = batches * stream.local_batch
  phases = {p: prof.seconds[p] / rows for p in PHASES[:-1]}
  phases["other"] = max(0.0, total / rows - sum(phases.values()))
  return total / rows, phases


def decode_seconds_per_image(stream, images: int = 64, jpeg_decode: str = "") -> float:
  """CPU seconds per decoded image of what the stream's TF stage runs on its images: the safe
  decode (decode + resize + normalise and the error tolerance around it) of `images` rows'
  image slots, absent related images included (not decoded, not counted). In a tree with
  `images.safe_decode_batch` the rows go in the stream's batches (`Stream._decode_batch`'s
  layout); in an older one image by image through `safe_decode_image`, as its stream did. A
  one-thread tf.data map in a process whose TF thread pools have one thread each
  (`_profile_main`), so the process CPU time is the decode's and not idle pool threads
  spinning. `jpeg_decode` "" is the tree's default."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from data_pipelines import images as images_lib  # pylint: disable=import-outside-toplevel
  rows = [stream.row(g, *[int(v[0]) for v in stream.mixture.records([g])]) for g in range(images)]
  size, cfg = stream.builder.d["S"], stream.cfg
  kw = dict(image_size=size, mean=cfg["pixel_mean"], std=cfg["pixel_std"])
  if jpeg_decode:
    kw["jpeg_decode"] = jpeg_decode
  b = max(1, min(int(stream.local_batch), len(rows)))
  groups = [rows[a:a + b] for a in range(0, len(rows) - b + 1, b)]

  def flat(key, group):  # the rows' own images, then their related images, row by row
    return [r[key][0] for r in group] + [v for r in group for v in list(r[key])[1:]]

  slots = [[flat(key, g) for g in groups] for key in ("_image", "_image_ratio", "_image_present")]
  decoded = int(np.sum(slots[2]))
  batched = hasattr(images_lib, "safe_decode_batch")
  if batched:
    ds = tf.data.Dataset.from_tensor_slices(
        (slots[0], np.asarray(slots[1], np.int32), np.asarray(slots[2], bool))).map(
            lambda d, r, p: images_lib.safe_decode_batch(d, r, p, **kw))
  else:
    ds = tf.data.Dataset.from_tensor_slices(
        (sum(slots[0], []), np.asarray(sum(slots[1], []), np.int32),
         np.asarray(sum(slots[2], []), bool))).map(
             lambda d, r, p: images_lib.safe_decode_image(d, r, p, **kw))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  repeats = 4
  ds = ds.with_options(options).repeat(repeats)
  for _ in ds.take(2):
    pass
  t = time.process_time()
  for _ in ds:
    pass
  return (time.process_time() - t) / max(1, repeats * decoded)


def pillow_seconds_per_image(stream, images: int = 64) -> float:
  """CPU seconds per decoded image of the builder's own decode with ``data.jpeg_decode`` "auto"
  in the workers (`pil_decode.decode_into` with `tf_exact`: Pillow for JPEG, TF's ops for what
  Pillow does not decode as TF does) on the same image slots as `decode_seconds_per_image`."""
  from data_pipelines import pil_decode  # pylint: disable=import-outside-toplevel
  rows = [stream.row(g, *[int(v[0]) for v in stream.mixture.records([g])]) for g in range(images)]
  size, cfg = stream.builder.d["S"], stream.cfg
  norm = pil_decode.Normaliser(cfg["pixel_mean"], cfg["pixel_std"])
  out = np.empty((size, size, 3), np.float32)
  slots = [(d, r) for row in rows for d, r, p in zip(row["_image"], row["_image_ratio"],
                                                    row["_image_present"]) if p]
  repeats = 4
  pil_decode.decode_into(slots[0][0], slots[0][1], out, norm, True)
  t = time.process_time()
  for _ in range(repeats):
    for d, r in slots:
      pil_decode.decode_into(d, r, out, norm, True)
  return (time.process_time() - t) / max(1, repeats * len(slots))


# ---------------------------------------------------------------------------------------------
# Command line: the per-row profile of one code tree, as JSON (the benchmark runs it twice, on
# the current tree and on an older commit's, in subprocesses of one run)
# ---------------------------------------------------------------------------------------------

# text_store: the text stream reading the token store on the new path (the raw text on the old).
CASES = (("text", "patches", "text"), ("text_store", "patches", "text"),
         ("pair_jpeg", "patches", "pair"),
         ("image_jpeg", "patches", "image"), ("image_npz", "regions", "image"),
         ("pair_tsv", "regions", "pair"))


def _profile_main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser()
  p.add_argument("--tree", default="", help="code tree to import data_pipelines from")
  p.add_argument("--root", required=True)
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--batches", type=int, default=4)
  p.add_argument("--cases", default=",".join(c for c, _, _ in CASES))
  p.add_argument("--regions", default="raw", choices=("raw", "store"),
                 help="region features from npz / TSV, or from the converted stores (and the "
                 "text_store case from the token store)")
  p.add_argument("--fast_decode", action="store_true",
                 help="also time JPEG decoding with data.jpeg_decode='fast' (decode_fast) and "
                 "the workers' own decode of 'auto' (decode_pillow)")
  a = p.parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if a.tree:
    sys.path.insert(0, a.tree)  # ahead of this checkout
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  from data_pipelines import pipeline, tokenizers  # pylint: disable=import-outside-toplevel
  from data_pipelines.streams import Stream  # pylint: disable=import-outside-toplevel
  tok = tokenizers.load_tokenizer(a.tokenizer)
  out = {}
  for case, visual, stream in CASES:
    if case not in a.cases.split(","):
      continue
    text = "store" if case == "text_store" and a.regions == "store" else "raw"
    cfg = pipeline.resolve_config(paper_config(a.root, visual, a.batch, regions=a.regions,
                                               text=text))
    st = Stream(stream, cfg, tok, process_index=0, process_count=1)
    total, phases = profile_rows(st, a.batches)
    out[case] = dict(total=total, **phases)
    if visual == "patches" and stream != "text":
      out[case]["images"] = float(st.num_images)  # images decoded per row
      out[case]["decode"] = decode_seconds_per_image(st, 16)
      if a.fast_decode:
        out[case]["decode_fast"] = decode_seconds_per_image(st, 16, "fast")
        out[case]["decode_pillow"] = pillow_seconds_per_image(st, 16)
  print("PROFILE " + json.dumps(out), flush=True)


if __name__ == "__main__":
  _profile_main()
