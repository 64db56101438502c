"""Seq2seq targets restart their positions at 0, so a source + target longer than the position
table trains and decodes as long as each block fits (CNN/DM: 512 + 128 on 514 positions); a
block that does not fit fails with one clear line."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_util import tiny_config
from unimo_jax.finetune import layouts, tasks
from unimo_jax.model import Unimo, masks

# RoBERTa positions (offset 2, pad row 1): 20 rows hold 18 text positions.
CFG = tiny_config(max_positions=20, roberta_positions=True, num_layers=1)
LIMIT = CFG.max_text_length
SOURCES = [[10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32, 33]]
TARGETS = [[40, 41, 42], [50], [60, 61, 62, 63 - 10, 44]]


def _rows(max_source, max_target):
  rows = [layouts.seq2seq_layout(s, t, max_source=max_source, max_target=max_target,
                                 cls_id=CFG.cls_id, sep_id=CFG.sep_id,
                                 mask_id=CFG.mask_token_id, pad_id=CFG.pad_id)
          for s, t in zip(SOURCES, TARGETS)]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["row_valid"] = np.ones(len(rows), bool)
  return batch


def _task():
  task = tasks.Task(CFG, tasks.TaskSpec(kind="seq2seq", label_smoothing=0.1))
  params = jax.jit(lambda k: nn.unbox(task.init_params(k)))(jax.random.key(0))
  return task, params


def test_positions_follow_the_restart_pattern_by_hand():
  row = layouts.seq2seq_layout([7, 8, 9], [5, 6], max_source=6, max_target=5, cls_id=0,
                               sep_id=2, mask_id=63, pad_id=1)
  #                     [CLS] 7  8  9 [SEP] PAD | [CLS] 5  6 [MASK] PAD
  np.testing.assert_array_equal(row["ids"], [0, 7, 8, 9, 2, 1, 0, 5, 6, 63, 1])
  np.testing.assert_array_equal(row["position_ids"], [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 0])
  # the model's rows: offset 2, pads on row 1 (RoBERTa)
  got = tasks.model_positions(jnp.asarray(row["position_ids"]), jnp.asarray(row["ids"]), CFG)
  np.testing.assert_array_equal(got, [2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 1])
  # CNN/DM at full length: 510 + 126 tokens fill 512 + 128 slots, yet use 512 positions
  full = layouts.seq2seq_layout(np.arange(600) % 90 + 4, np.arange(200) % 90 + 4,
                                max_source=512, max_target=128, cls_id=0, sep_id=2,
                                mask_id=50264, pad_id=1)
  np.testing.assert_array_equal(full["position_ids"][:512], np.arange(512))
  np.testing.assert_array_equal(full["position_ids"][512:], np.arange(128))
  base = CFG.replace(max_positions=514, vocab_size=50265)
  rows = tasks.model_positions(jnp.asarray(full["position_ids"]), jnp.asarray(full["ids"]), base)
  assert int(rows.max()) == 513 < base.max_positions
  assert tasks.seq2seq_position_span(640, 127, base) == 512


def test_a_row_longer_than_the_table_trains_with_the_short_rows_values():
  """The same rows in a 14 + 8 layout (22 slots > 18 positions) and an 8 + 8 one: the extra
  source padding is invisible, so logits, loss and gradients agree."""
  task, params = _task()
  long, short = _rows(14, 8), _rows(8, 8)
  assert long["ids"].shape[1] > LIMIT
  with pytest.raises(ValueError, match="exceeds the position table"):  # the old whole-length check
    Unimo(CFG).apply({"params": params["model"]}, jnp.asarray(long["ids"]),
                     method=Unimo.encode_text)

  def loss(p, b):
    s, sums = task.loss(p, b, None, deterministic=True)
    return s / sums["count"]
  grad = jax.jit(jax.value_and_grad(loss))
  (l_long, g_long), (l_short, g_short) = (grad(params, jax.tree.map(jnp.asarray, b))
                                          for b in (long, short))
  np.testing.assert_allclose(task.token_logits(params, jax.tree.map(jnp.asarray, long)),
                             task.token_logits(params, jax.tree.map(jnp.asarray, short)),
                             atol=2e-5)
  assert np.isfinite(float(l_long))
  np.testing.assert_allclose(float(l_long), float(l_short), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_long), jax.tree.leaves(g_short)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_restarted_decoding_equals_the_uncached_forward():
  """A 14-token source and 8 decoded tokens (22 > 18 positions): the cached steps equal the
  full forward of [source block | target so far] under the seq2seq mask with the target's
  positions 0, 1, ..."""
  _, params = _task()
  model, v = Unimo(CFG), {"params": params["model"]}
  steps = 8
  source = _rows(14, 8)["ids"][:, :14]
  rng = np.random.default_rng(0)
  tokens = np.concatenate([np.full((3, 1), CFG.cls_id),
                           rng.integers(4, CFG.vocab_size - 1, (3, steps - 1))], 1).astype(np.int32)
  with pytest.raises(ValueError, match="exceeds the position table"):  # without the restart
    model.apply(v, steps, ids=jnp.asarray(source), method=Unimo.prefill)

  @jax.jit
  def cached(p, source, tokens):
    _, cache = model.apply(p, steps, ids=source, method=Unimo.prefill, restart_positions=True)
    first = cache["position"]

    def step(c, tok):
      out, c = model.apply(p, tok, c, method=Unimo.decode_step)
      return c, out["logits"]
    cache, logits = jax.lax.scan(step, cache, tokens.T)
    return logits.swapaxes(0, 1), first, cache["position"]
  logits, first, last = cached(v, jnp.asarray(source), jnp.asarray(tokens))
  np.testing.assert_array_equal(first, [CFG.position_offset] * 3)  # bos takes position 0
  np.testing.assert_array_equal(last, [CFG.position_offset + steps] * 3)

  ids = np.concatenate([source, tokens], 1)
  segments = np.concatenate([np.where(source != CFG.pad_id, 1, 0), np.full((3, steps), 2)], 1)
  src_pos = np.where(source != CFG.pad_id, np.cumsum(source != CFG.pad_id, 1) - 1, 0)
  position_ids = np.concatenate([src_pos, np.tile(np.arange(steps), (3, 1))], 1)
  positions = tasks.model_positions(jnp.asarray(position_ids), jnp.asarray(ids), CFG)
  full = model.apply(v, jnp.asarray(ids), masks.to_bias(masks.seq2seq(jnp.asarray(segments))),
                     positions=positions, position_span=14, method=Unimo.encode_text)
  want = model.apply(v, full["hidden"], jnp.tile(jnp.arange(14, 14 + steps), (3, 1)),
                     method=Unimo.lm_logits)
  np.testing.assert_allclose(logits, want, atol=1e-4)


def test_a_block_past_the_table_fails_with_one_clear_line():
  task, params = _task()
  too_long = _rows(8, LIMIT + 2)  # target block of 20 > 18 positions
  with pytest.raises(ValueError, match=r"seq2seq target block of 20 tokens exceeds the position "
                                       r"table \(18 text positions"):
    task.loss(params, jax.tree.map(jnp.asarray, too_long), None, deterministic=True)
  with pytest.raises(ValueError, match="seq2seq source block of 20 tokens"):
    task.loss(params, jax.tree.map(jnp.asarray, _rows(LIMIT + 2, 8)), None, deterministic=True)
  with pytest.raises(ValueError, match="decoding 19 tokens uses 19 text positions, more than "
                                       "the position table's 18"):
    Unimo(CFG).apply({"params": params["model"]}, 19, ids=jnp.asarray(_rows(8, 8)["ids"][:, :8]),
                     method=Unimo.prefill, restart_positions=True)
  with pytest.raises(ValueError, match="uses 19 text positions"):
    Unimo(CFG).apply({"params": params["model"]}, jnp.zeros((1, 4), jnp.int32),
                     positions=jnp.zeros((1, 4), jnp.int32), position_span=19,
                     method=Unimo.encode_text)


def test_cnndm_at_base_size_traces_training_and_decoding():
  """The official shapes on the base model (514 positions): a training step's loss over
  512 + 128 slots and a beam-search step after a 512-token source, traced (no compile)."""
  from unimo_jax.model import ModelConfig
  base = ModelConfig.preset("base")
  assert base.max_positions == 514 and base.max_text_length == 512
  task = tasks.Task(base, tasks.TaskSpec(kind="seq2seq", label_smoothing=0.1))
  params = jax.eval_shape(lambda: nn.unbox(task.init_params(jax.random.key(0))))
  b, i32 = 2, jnp.int32
  spec = lambda n, dtype=i32: jax.ShapeDtypeStruct((b, n) if n else (b,), dtype)
  batch = dict(ids=spec(640), segments=spec(640), position_ids=spec(640), positions=spec(127),
               targets=spec(127), weights=spec(127, jnp.float32), row_valid=spec(0, bool))
  loss, sums = jax.eval_shape(lambda p, x: task.loss(p, x, None, deterministic=True), params,
                              batch)
  assert loss.shape == () and sums["count"].shape == ()
  model = Unimo(base)

  def decode(p, source):
    v = {"params": p["model"]}
    _, cache = model.apply(v, 128, ids=source, method=Unimo.prefill, restart_positions=True)
    out, cache = model.apply(v, jnp.full((b,), base.cls_id, i32), cache,
                             method=Unimo.decode_step)
    return out["logits"], cache["k"]
  logits, k = jax.eval_shape(decode, params, jax.ShapeDtypeStruct((b, 512), i32))
  assert logits.shape == (b, base.vocab_size) and k.shape[2] == 512 + 128


def test_config_checks_each_block_not_the_sum():
  from unimo_jax.finetune import config as config_lib
  import importlib
  c = importlib.import_module("experiments.configs.finetune.cnndm").get_config("base")
  assert (c.data.max_source, c.data.max_target) == (512, 128)  # the official lengths, uncut
  config_lib.validate(c, num_devices=1, check_files=False)
  for field, value, fragment in (("data.max_target", 513, "data.max_target=513 exceeds"),
                                 ("data.max_source", 600, "data.max_source=600 exceeds"),
                                 ("evaluation.max_length", 513,
                                  "evaluation.max_length (decoded tokens)=513 exceeds")):
    bad = c.copy_and_resolve_references()
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=fragment.replace("(", r"\(").replace(
        ")", r"\)")) as e:
      config_lib.validate(bad, num_devices=1, check_files=False)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_finetune_and_beam_search_past_the_table_end_to_end(tmp_path):
  """`finetune` + `evaluate` of a 16 + 8 seq2seq task on a model of 20 text positions."""
  from data_fixtures import WORDS
  from test_finetune_run import finetune_and_evaluate, tiny_config as run_config
  from unimo_jax.finetune import config as config_lib
  r = np.random.default_rng(0)
  lines = ["source\ttarget"]
  for _ in range(16):
    src = " ".join(r.choice(WORDS, 12))
    lines.append(f"{src}\t{' '.join(src.split()[:3])}")
  (tmp_path / "s.tsv").write_text("\n".join(lines) + "\n")
  cfg = run_config(tmp_path, steps=2)
  cfg.task.update(dict(kind="seq2seq", label_smoothing=0.1))
  cfg.data.train = cfg.data.validation = str(tmp_path / "s.tsv")
  cfg.data.max_source, cfg.data.max_target = 16, 8
  cfg.evaluation.update(dict(beam_size=2, max_length=6, min_length=1))
  assert 16 + 8 > cfg.model.max_positions
  config_lib.validate(cfg, num_devices=8, check_files=False)
  wd = str(tmp_path / "wd")
  res, entry = finetune_and_evaluate(cfg, wd)
  assert res.last_step == 2 and np.isfinite(res.last_metrics["loss"])
  m = entry["metrics"]
  assert m["count"] == 16 and 0.0 <= m["rouge1"] <= 1.0
