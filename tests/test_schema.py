"""The batch schema: resolved shapes, and build-time errors that name the source and field."""
import numpy as np
import pytest

from data_pipelines import pipeline, schema
import data_fixtures as fx


def _cfg(**kw):
  c = pipeline.resolve_config(pipeline.default_config())
  c.update(kw)
  c["streams"]["text"].update(batch_size=8, max_length=16, max_predictions=3, s2s_max_length=20,
                              s2s_max_predictions=6, sources=[{}])
  c["streams"]["image"].update(batch_size=4, sources=[{}])
  c["streams"]["pair"].update(batch_size=6, max_length=12, max_predictions=2,
                              s2s_max_predictions=11, sources=[{}])
  return c


def test_patch_schema_hand_resolved():
  c = _cfg(image_size=32, patch_size=8, num_positives=2, num_negatives=3, num_related_images=1,
           num_related_texts=4)
  spec = schema.batch_spec(c, process_count=2)
  i32, f32, b = np.dtype(np.int32), np.dtype(np.float32), np.dtype(bool)
  expected = {
      "text/mlm_ids": ((4, 16), i32), "text/mlm_positions": ((4, 3), i32),
      "text/mlm_targets": ((4, 3), i32), "text/mlm_weights": ((4, 3), f32),
      "text/s2s_ids": ((4, 20), i32), "text/s2s_segments": ((4, 20), i32),
      "text/s2s_position_ids": ((4, 20), i32), "text/s2s_positions": ((4, 6), i32),
      "text/s2s_targets": ((4, 6), i32), "text/s2s_weights": ((4, 6), f32),
      "text/row_valid": ((4,), b),
      "image/pixels": ((2, 32, 32, 3), f32), "image/visual_mask": ((2, 16), b),
      "image/row_valid": ((2,), b),
      "pair/pixels": ((3, 32, 32, 3), f32), "pair/visual_mask": ((3, 16), b),
      "pair/caption_ids": ((3, 12), i32),
      "pair/mlm_ids": ((3, 12), i32), "pair/mlm_positions": ((3, 2), i32),
      "pair/mlm_targets": ((3, 2), i32), "pair/mlm_weights": ((3, 2), f32),
      "pair/s2s_ids": ((3, 12), i32), "pair/s2s_segments": ((3, 12), i32),
      "pair/s2s_position_ids": ((3, 12), i32), "pair/s2s_positions": ((3, 11), i32),
      "pair/s2s_targets": ((3, 11), i32), "pair/s2s_weights": ((3, 11), f32),
      "pair/positive_ids": ((3, 2, 12), i32), "pair/positive_valid": ((3, 2), b),
      "pair/negative_ids": ((3, 3, 12), i32), "pair/negative_valid": ((3, 3), b),
      "pair/related_pixels": ((3, 1, 32, 32, 3), f32), "pair/related_valid": ((3, 1), b),
      "pair/related_text_ids": ((3, 4, 12), i32), "pair/related_text_valid": ((3, 4), b),
      "pair/row_valid": ((3,), b),
  }
  assert spec == expected


def test_region_schema_fields():
  c = _cfg(visual_input="regions", num_regions=5, region_feature_dim=7, num_region_classes=3,
           num_related_images=2)
  spec = schema.batch_spec(c)
  assert spec["image/region_features"] == ((4, 5, 7), np.dtype(np.float32))
  assert spec["image/region_boxes"] == ((4, 5, 5), np.dtype(np.float32))
  assert spec["image/region_valid"] == ((4, 5), np.dtype(bool))
  assert spec["image/region_classes"] == ((4, 5), np.dtype(np.int32))
  assert spec["image/region_class_probs"] == ((4, 5, 3), np.dtype(np.float32))
  assert spec["image/visual_mask"] == ((4, 5), np.dtype(bool))
  assert spec["pair/related_region_features"] == ((6, 2, 5, 7), np.dtype(np.float32))
  assert "image/pixels" not in spec and "pair/related_pixels" not in spec


def test_objectives_select_fields_and_streams_can_be_off():
  c = _cfg()
  c["streams"]["text"]["objectives"] = ("mlm",)
  c["streams"]["image"]["batch_size"] = 0
  spec = schema.batch_spec(c)
  assert not any(k.startswith("text/s2s") or k.startswith("image/") for k in spec)
  assert schema.enabled_streams(c) == ("text", "pair")
  assert all(k.split("/")[1] in [f.name for f in schema.stream_fields(k.split("/")[0], c)]
             for k in spec)


def test_batch_size_must_divide_by_process_count():
  with pytest.raises(schema.SchemaError, match="streams.image.batch_size 4 .* process_count 8"):
    schema.batch_spec(_cfg(), process_count=8)


def test_check_row_names_source_and_field():
  spec = {"mlm_ids": ((4,), np.dtype(np.int32)), "row_valid": ((), np.dtype(bool))}
  good = {"mlm_ids": np.zeros(4, np.int32), "row_valid": np.bool_(True)}
  schema.check_row(good, spec, source="books", stream="text")
  with pytest.raises(schema.SchemaError, match=r"'books'.*'mlm_ids'.*int32\[4\].*int64\[4\]"):
    schema.check_row({**good, "mlm_ids": np.zeros(4, np.int64)}, spec, source="books",
                     stream="text")
  with pytest.raises(schema.SchemaError, match="'books'.*lacks field 'row_valid'"):
    schema.check_row({"mlm_ids": good["mlm_ids"]}, spec, source="books", stream="text")
  with pytest.raises(schema.SchemaError, match="'books'.*unknown field 'extra'"):
    schema.check_row({**good, "extra": 1}, spec, source="books", stream="text")


def test_describe_lists_every_field():
  c = _cfg()
  text = schema.describe(c)
  assert len(text.splitlines()) == len(schema.batch_spec(c))


def _pair_cfg(tmp_path, source):
  c = pipeline.default_config()
  c.image_size, c.patch_size = 16, 8
  c.streams.pair.batch_size = 2
  c.streams.pair.max_length = 12
  c.streams.pair.sources = [source]
  return c


def test_source_without_a_needed_field_fails_at_build_naming_both(tmp_path):
  fx.write_corpus(tmp_path / "c.txt", 4, np.random.default_rng(0))
  c = _pair_cfg(tmp_path, dict(name="just_text", kind="text", path=str(tmp_path / "c.txt")))
  with pytest.raises(schema.SchemaError, match="'just_text'.*field 'image'"):
    pipeline.make_pipeline(c, tokenizer=fx.WhitespaceTokenizer())


def test_region_features_of_the_wrong_size_fail_at_build(tmp_path):
  rng = np.random.default_rng(1)
  fx.write_npz_regions(tmp_path / "r", ["a", "b"], rng, 6, 4)
  c = pipeline.default_config()
  c.visual_input = "regions"
  c.region_feature_dim, c.num_region_classes = 8, 4  # the files hold F=6
  c.streams.image.batch_size = 2
  c.streams.image.sources = [dict(name="feats", kind="region_npz", path=str(tmp_path / "r"))]
  with pytest.raises(schema.SchemaError, match="'feats'.*bad_feature_shape"):
    pipeline.make_pipeline(c)


def test_unknown_stream_is_an_error():
  c = pipeline.default_config().to_dict()
  c["streams"]["video"] = dict(batch_size=1)
  with pytest.raises(schema.SchemaError, match="video"):
    pipeline.resolve_config(c)
