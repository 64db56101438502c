"""benchmarks/paper_shapes.py `decode_seconds_per_image` times the stream's own safe decode of its
images (batch by batch, absent related images not counted), on the generated paper-shape data."""
import os
import sys

import numpy as np

from data_pipelines import images, pipeline
from data_pipelines.streams import Stream
import data_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_seconds_per_image_times_the_safe_batch_decode(tmp_path, monkeypatch):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import paper_shapes
  root = paper_shapes.write_paper_data(str(tmp_path / "paper"), docs=2, images=4)
  calls = []
  real = images.safe_decode_batch

  def counted(data, ratio, present, **kw):
    calls.append(tuple(data.shape))
    return real(data, ratio, present, **kw)

  monkeypatch.setattr(images, "safe_decode_batch", counted)
  for stream, per_row in (("image", 1), ("pair", 2)):
    cfg = pipeline.resolve_config(paper_shapes.paper_config(root, "patches", batch=2))
    st = Stream(stream, cfg, fx.WhitespaceTokenizer(), process_index=0, process_count=1)
    calls.clear()
    for mode in ("", "fast"):
      seconds = paper_shapes.decode_seconds_per_image(st, 4, mode)
      assert 0 < seconds < 1, (stream, mode)
    # traced once per mode, on the stream's batches of 2 rows x (1 + Ki) images
    assert calls == [(2 * per_row,)] * 2, (stream, calls)
    assert np.isfinite(seconds)
