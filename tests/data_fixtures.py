"""Small data fixtures for the data-pipeline tests, written by the tests (never downloaded).

`WhitespaceTokenizer` implements the tokenizer interface (CLS 0, PAD 1, SEP 2, UNK 3, MASK last)
so the pipeline tests do not depend on a trained SentencePiece model. The writers produce every
kind of source, each with known content, and can plant bad records.
"""
import base64
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

WORDS = ("a an the red green blue yellow big small circle square triangle left right above "
         "below of on near two three shapes scene picture").split()


class WhitespaceTokenizer:
  """Words split on whitespace; ids 4.. in sorted word order; unknown words -> UNK."""

  def __init__(self, words=WORDS):
    self.words = ["<s>", "<pad>", "</s>", "<unk>"] + sorted(set(words)) + ["<mask>"]
    self._ids = {w: i for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words)
    self.cls_id, self.pad_id, self.sep_id, self.unk_id = 0, 1, 2, 3
    self.mask_id = self.vocab_size - 1

  def encode(self, text):
    return np.asarray([self._ids.get(w, 3) for w in text.split()], np.int32)

  def word_starts(self, ids):
    return np.ones(len(ids), bool)

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids if 3 < i < self.mask_id)


def sentence(rng, lo=3, hi=10):
  return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def image_bytes(pixels, fmt="PNG", mode=None, **kw):
  img = Image.fromarray(np.asarray(pixels, np.uint8))
  if mode:
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def damaged_png(png: bytes) -> bytes:
  """The middle of a PNG zeroed: its chunk CRCs no longer match (caught by the header check)."""
  return png[:40] + bytes(len(png) - 60) + png[-20:]


def undecodable_png(w=16, h=16) -> bytes:
  """A PNG with valid chunks and CRCs whose image data is not a zlib stream: only the decoder
  can tell (it exercises the TF-side safety net)."""
  def chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data" * 8)
          + chunk(b"IEND", b""))


def random_pixels(rng, h, w):
  """Smooth-ish random images (JPEG keeps them close to the original)."""
  base = rng.integers(0, 255, (max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))


def write_corpus(path, n, rng, *, empty_lines=0, non_utf8=0, blank_lines=0):
  """n good lines, then planted bad ones; returns the good lines in file order."""
  good = [sentence(rng) for _ in range(n)]
  with open(path, "wb") as f:
    for line in good:
      f.write(line.encode() + b"\n")
    f.write(b"\n" * empty_lines)
    f.write(b"   \t \n" * blank_lines)
    f.write(b"caf\xe9 latin-1 text\n" * non_utf8)
  return good


def write_images(folder, n, rng, size=(24, 32), fmt="PNG"):
  """n images named 0000.<ext>; returns {key: pixels}."""
  os.makedirs(folder, exist_ok=True)
  out = {}
  for i in range(n):
    px = random_pixels(rng, *size)
    ext = "png" if fmt == "PNG" else "jpg"
    with open(os.path.join(folder, f"{i:04d}.{ext}"), "wb") as f:
      f.write(image_bytes(px, fmt))
    out[f"{i:04d}"] = px
  return out


def write_pairs_jsonl(path, image_dir, n, rng, *, captions_per_image=3, bad_json=0,
                      missing_image=0, empty_caption=0):
  """Pairs with images in image_dir; returns {key: captions}."""
  os.makedirs(image_dir, exist_ok=True)
  table = {}
  with open(path, "w") as f:
    for i in range(n):
      key = f"p{i:03d}"
      with open(os.path.join(image_dir, f"{key}.png"), "wb") as g:
        g.write(image_bytes(random_pixels(rng, 20, 28)))
      caps = [sentence(rng) for _ in range(captions_per_image)]
      table[key] = caps
      f.write(json.dumps(dict(key=key, image=f"{key}.png", captions=caps,
                              hard_negatives=[sentence(rng), sentence(rng)])) + "\n")
    for _ in range(bad_json):
      f.write('{"key": "broken", "captions": [\n')
    for j in range(missing_image):
      f.write(json.dumps(dict(key=f"m{j}", image=f"nowhere{j}.png", captions=["a red circle"]))
              + "\n")
    for j in range(empty_caption):
      with open(os.path.join(image_dir, f"e{j}.png"), "wb") as g:
        g.write(image_bytes(random_pixels(rng, 20, 28)))
      f.write(json.dumps(dict(key=f"e{j}", image=f"e{j}.png", captions=["", "  "])) + "\n")
  return table


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_webdataset(path, n, rng, *, start=0, truncate_last=False, bad_image=0):
  """One shard of n records (jpg + txt + json); returns {key: (jpg bytes, caption, json_caps)}.

  truncate_last cuts the file inside the last record's image member; bad_image plants records
  whose jpg member is not an image.
  """
  table = {}
  with tarfile.open(path, "w") as tar:
    for i in range(start, start + n):
      key = f"s{i:05d}"
      px = random_pixels(rng, 24, 24)
      cap = sentence(rng)
      extra = [sentence(rng)]
      jpg = image_bytes(px, "JPEG", quality=95)
      _add(tar, f"{key}.jpg", jpg)
      _add(tar, f"{key}.txt", cap.encode())
      _add(tar, f"{key}.json", json.dumps(dict(captions=extra)).encode())
      table[key] = (jpg, cap, extra)
    for j in range(bad_image):
      _add(tar, f"bad{j}.jpg", b"this is not an image at all")
      _add(tar, f"bad{j}.txt", b"a red circle")
  if truncate_last:
    # Cut the shard in the middle of the last record's image member (a broken download).
    with tarfile.open(path, "r") as tar:
      last = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    with open(path, "r+b") as f:
      f.truncate(last.offset_data + last.size // 2)
    table.pop(os.path.splitext(last.name)[0], None)
  return table


def write_coco(ann_path, image_dir, n, rng, *, uncaptioned=1):
  """COCO captions JSON + images; returns {file stem: (id, captions)}."""
  os.makedirs(image_dir, exist_ok=True)
  images, anns, table = [], [], {}
  for i in range(n + uncaptioned):
    fname = f"COCO_{i:06d}.jpg"
    with open(os.path.join(image_dir, fname), "wb") as f:
      f.write(image_bytes(random_pixels(rng, 30, 40), "JPEG"))
    images.append(dict(id=100 + i, file_name=fname, width=40, height=30))
    if i < n:
      caps = [sentence(rng) for _ in range(2)]
      anns += [dict(id=1000 + 10 * i + k, image_id=100 + i, caption=c)
               for k, c in enumerate(caps)]
      table[fname[:-4]] = (100 + i, caps)
  with open(ann_path, "w") as f:
    json.dump(dict(images=images, annotations=anns), f)
  return table


def random_regions(rng, n, F, C, W=40, H=30):
  x1 = rng.uniform(0, W / 2, n)
  y1 = rng.uniform(0, H / 2, n)
  boxes = np.stack([x1, y1, x1 + rng.uniform(2, W / 2, n), y1 + rng.uniform(2, H / 2, n)], 1)
  probs = rng.dirichlet(np.ones(C), n).astype(np.float32)
  return dict(boxes=boxes.astype(np.float32), features=rng.normal(size=(n, F)).astype(np.float32),
              class_probs=probs, width=W, height=H)


def write_npz_regions(folder, keys, rng, F, C, *, nan=(), wrong_shape=()):
  os.makedirs(folder, exist_ok=True)
  table = {}
  for k in keys:
    r = random_regions(rng, int(rng.integers(2, 6)), F, C)
    if k in nan:
      r["features"][0, 0] = np.nan
    if k in wrong_shape:
      r["boxes"] = r["boxes"][:, :3]
    np.savez(os.path.join(folder, f"{k}.npz"), boxes=r["boxes"], features=r["features"],
             class_probs=r["class_probs"], image_w=r["width"], image_h=r["height"])
    table[k] = r
  return table


def _b64(a):
  return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode()


def write_tsv_regions(path, keys, rng, F, C, *, nan=(), wrong_shape=()):
  """The official TSV: img_filename W H num_box boxes features probs (base64 float32)."""
  table = {}
  with open(path, "w") as f:
    for k in keys:
      r = random_regions(rng, int(rng.integers(2, 6)), F, C)
      feats = r["features"].copy()
      if k in nan:
        feats[1, 2] = np.nan
      n = len(r["boxes"]) + (1 if k in wrong_shape else 0)
      f.write("\t".join([f"{k}.jpg", str(r["width"]), str(r["height"]), str(n),
                         _b64(r["boxes"]), _b64(feats), _b64(r["class_probs"])]) + "\n")
      table[k] = r
  return table
