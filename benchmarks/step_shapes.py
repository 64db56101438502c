"""The text-MLM benchmark shapes and their analytic training FLOPs, product by product
(``step_vs_peers.py``, ``step_profile.py``): the same useful work counted for every
implementation (encoder + LM head at the predicted positions, x3 for training)."""

SHAPES = {
    "S1": dict(layers=4, hidden=768, heads=12, mlp=3072, vocab=32000, batch=16, length=128),
    "S2": dict(layers=4, hidden=256, heads=4, mlp=1024, vocab=8000, batch=32, length=128),
    # --smoke: seconds, not a measurement
    "T1": dict(layers=2, hidden=64, heads=4, mlp=128, vocab=500, batch=4, length=32),
}


def predictions(shape) -> int:
  return max(1, round(0.15 * shape["length"]))


def train_flops(shape) -> float:
  """Analytic FLOPs of one training step (3 x forward matmuls; LM head at the P slots)."""
  b, l, h, m, v = (shape[k] for k in ("batch", "length", "hidden", "mlp", "vocab"))
  p = predictions(shape)
  per_layer = b * l * 2 * (4 * h * h + 2 * h * m) + b * 2 * 2 * l * l * h
  head = b * p * 2 * (h * h + h * v)
  return 3.0 * (shape["layers"] * per_layer + head)


def matmul_products(shape) -> list:
  """The products of one training step as (kind, operand shapes, count): each dense layer's
  forward ``X W`` ("nn"), ``dY W^T`` ("nt") and ``X^T dY`` ("tn"); attention's batched
  ``Q K^T`` ("scores") and ``A V`` ("mix"), x3 for training. Their FLOPs sum to
  `train_flops`."""
  b, l, h, m, v, heads = (shape[k] for k in ("batch", "length", "hidden", "mlp", "vocab",
                                             "heads"))
  t, p, d, n = b * l, b * predictions(shape), h // heads, shape["layers"]

  def dense(rows, k, out, count):
    return [("nn", ((rows, k), (k, out)), count), ("nt", ((rows, out), (k, out)), count),
            ("tn", ((rows, k), (rows, out)), count)]

  out = []
  for k, o in ((h, 3 * h), (h, h), (h, m), (m, h)):
    out += dense(t, k, o, n)
  out += [("scores", ((b * heads, l, d), (b * heads, l, d)), 3 * n),
          ("mix", ((b * heads, l, l), (b * heads, l, d)), 3 * n)]
  return out + dense(p, h, h, 1) + dense(p, h, v, 1)


def product_flops(kind, shapes) -> float:
  (r, k), (_, c) = shapes[0][-2:], shapes[1][-2:]
  batch = shapes[0][0] if len(shapes[0]) == 3 else 1
  if kind == "nn":
    return 2.0 * r * k * c
  if kind == "nt":  # (r, k') (k, k')^T: r x k outputs over k' = shapes[0][1]
    return 2.0 * r * k * shapes[1][0]
  if kind == "tn":  # (r', k)^T (r', c): k x c outputs over r'
    return 2.0 * r * k * c
  if kind == "scores":  # (b, l, d) (b, l', d)^T
    return 2.0 * batch * r * k * shapes[1][1]
  return 2.0 * batch * r * k * c  # mix: (b, l, l') (b, l', d)
