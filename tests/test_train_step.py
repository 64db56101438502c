"""The multi-objective train step on 8 devices against unsharded references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_util as tu
from unimo_jax import parallel
from unimo_jax.train import objectives as obj_lib
from unimo_jax.train import setup as setup_lib
from unimo_jax.train import train_step as step_lib


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def full_run():
  """Two steps (both alternation phases) of every objective on 8 devices, no dropout."""
  c = tu.run_config()
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  state, step = tu.setup(c, mesh)
  params0 = _host(state.params)
  it = tu.batches(c)
  host = [next(it), next(it)]
  out, seen = [], []
  for b in host:
    seen.append(_host(state.params))
    state, m = step(state, parallel.global_batch(b, mesh))
    out.append(_host(m))
  return c, params0, host, out, _host(state.params), seen


def test_phases_run_their_objectives(full_run):
  _, _, _, (m0, m1), _, _ = full_run
  common = ("image_mrp/loss", "pair_cmcl/loss_i2t", "pair_cmcl/loss_t2i", "pair_mrp/loss")
  for m in (m0, m1):
    for k in common + ("loss", "grad_norm"):
      assert np.isfinite(m[k]) and m[k] > 0, k
    assert m["nonfinite"] == 0
  # UNIMO's alternation: MLM on even steps, seq2seq / captioning on odd steps.
  for k in ("text_mlm/loss", "pair_mlm/loss"):
    assert np.isfinite(m0[k]) and np.isnan(m1[k]), k
  for k in ("text_s2s/loss", "pair_caption/loss"):
    assert np.isnan(m0[k]) and np.isfinite(m1[k]), k
  # The CMCL temperature starts at the configured value; patches report no class metrics.
  np.testing.assert_allclose(m0["pair_cmcl/temperature"], 0.07, rtol=1e-6)
  assert "image_mrp/class_accuracy" not in m0


@pytest.mark.parametrize("phase", [0, 1])
def test_losses_equal_the_unsharded_computation(full_run, phase):
  """Each step's losses (8 devices, CMCL gathered across them, global counts, the phase a
  traced ``lax.cond``) equal the same objectives evaluated on one device with the dense CMCL
  reference and a static phase (step 1: MLM; step 2: seq2seq and captioning, taken from the
  parameters after step 1)."""
  c, _, host, metrics, _, seen = full_run
  mcfg = tu.model_config(c)
  c.cmcl.implementation = "reference"
  objectives = step_lib.UnimoObjectives(mcfg, c, mesh=None)
  names = obj_lib.active(c.objectives, ("text", "image", "pair"), phase=phase)
  scales = {n: jnp.float32(1) for n in names}
  dev = jax.devices()[0]
  batch = jax.device_put(host[phase], dev)
  params = jax.device_put(seen[phase], dev)  # the parameters that step saw
  total, ref = jax.jit(lambda p, b: objectives(p, b, None, names, scales, phase=phase,
                                               deterministic=True))(params, batch)
  ref = _host(ref)
  m = metrics[phase]
  for k, v in ref.items():
    np.testing.assert_allclose(m[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
  weights = obj_lib.weights(c.objectives)
  expected = sum(weights[n] * ref[f"{n}/loss"] for n in names if n != "pair_cmcl") + (
      0.5 * (ref["pair_cmcl/loss_i2t"] + ref["pair_cmcl/loss_t2i"]))
  np.testing.assert_allclose(m["loss"], expected, rtol=2e-5)
  np.testing.assert_allclose(m["loss"], float(total), rtol=2e-5)


def test_every_parameter_trains(full_run):
  """After the two steps every parameter moved (each objective reaches its heads), including
  the CMCL temperature."""
  _, params0, _, _, params2, _ = full_run
  flat0 = jax.tree_util.tree_leaves_with_path(params0)
  flat2 = jax.tree_util.tree_leaves(params2)
  frozen = [jax.tree_util.keystr(p) for (p, a), b in zip(flat0, flat2) if np.array_equal(a, b)]
  assert frozen == []


def _text_config(k):
  """Text-only MLM, no dropout (the grad-accumulation and bf16 tests share its program)."""
  c = tu.run_config()
  c.data.streams.image.batch_size = 0
  c.data.streams.pair.batch_size = 0
  c.objectives.text_mode = "mlm"
  c.optimizer.grad_accum_steps = k
  return c


def test_gradient_accumulation_equals_one_big_batch():
  """2 micro-batches give the update of the whole batch: the loss is normalised by the whole
  batch's count of masked tokens, not averaged per micro-batch (whose counts differ)."""
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  results = []
  for k in (1, 2):
    c = _text_config(k)
    state, step = tu.setup(c, mesh)
    host = next(tu.batches(c))
    # Micro-batch 0 (rows 0, 2, 4, ...) gets fewer targets than micro-batch 1, so a mean of
    # per-micro-batch means would differ from the whole batch's mean.
    host["text/mlm_weights"][0::2, 1:] = 0.0
    state, m = step(state, parallel.global_batch(host, mesh))
    results.append((_host(state.params), _host(m), _host(state.opt_state)))
  (p1, m1, opt1), (p2, m2, _) = results
  for k in ("loss", "text_mlm/loss", "text_mlm/accuracy", "grad_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  assert m2["text_mlm/count"] == m1["text_mlm/count"]
  # The two sums of the same gradient terms differ in order only; AdamW's first update
  # lr * g / (|g| + eps) turns a rounding difference dg of a component whose gradient nearly
  # cancels (|g| << eps) into lr * dg / eps: the tolerance of test_multiprocess.adam_tolerances
  # (1 step), from each tensor's rms gradient (its nu), and 99.9% must still match tightly.
  lr, eps = c.optimizer.learning_rate, c.optimizer.eps
  nus = jax.tree.leaves(tu.find_key(opt1, "nu"))
  assert len(nus) == len(jax.tree.leaves(p1))
  rms_all = float(np.sqrt(sum(float(np.sum(v)) for v in nus) / sum(v.size for v in nus)
                          / (1 - c.optimizer.b2)))
  tight = total = 0
  for a, b, nu in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), nus):
    g = max(float(np.sqrt(np.mean(nu) / (1 - c.optimizer.b2))), rms_all)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-7 + lr * min(2.0, 1e-5 * g / eps))
    tight += int(np.sum(np.isclose(b, a, rtol=1e-5, atol=1e-7)))
    total += a.size
  assert tight >= 0.999 * total, (tight, total)


def test_objective_counts_follow_row_validity():
  c = tu.run_config()
  batch = next(tu.batches(c))
  batch["text/row_valid"][:3] = False
  batch["pair/row_valid"][0] = False
  counts = _host(step_lib.objective_counts(jax.tree.map(jnp.asarray, batch), tu.model_config(c),
                                           obj_lib.OBJECTIVES))
  np.testing.assert_allclose(counts["text_mlm"], batch["text/mlm_weights"][3:].sum())
  np.testing.assert_allclose(counts["pair_cmcl"], 7)
  mask = batch["pair/visual_mask"][1:]
  np.testing.assert_allclose(counts["pair_mrp"], mask.sum())


def test_bfloat16_compute_keeps_float32_parameters():
  """model.dtype=bfloat16: activations in bf16 (f32-accumulating matmuls), parameters and
  optimizer state in f32, and the loss close to the f32 step's."""
  mesh = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  losses = {}
  for dtype in ("float32", "bfloat16"):
    c = _text_config(1)
    c.model.dtype = dtype
    state, step = tu.setup(c, mesh)
    state, m = step(state, parallel.global_batch(next(tu.batches(c)), mesh))
    losses[dtype] = float(m["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert all(x.dtype in (jnp.float32, jnp.int32)
               for x in jax.tree_util.tree_leaves(state.opt_state))
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_nonfinite_step_keeps_the_state_and_a_good_step_applies_the_optimizer():
  """A NaN loss leaves parameters and optimizer state bit-identical (only the counters move);
  a finite step equals ``tx.update`` + ``apply_updates`` on the same gradients, and
  ``param_norm`` is the norm of the parameters the step returns."""
  c = tu.run_config(batch=4)
  c.objectives.weights = {n: (1.0 if n == "text_mlm" else 0.0) for n in obj_lib.OBJECTIVES}
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  run = setup_lib.build_run(c, tu.batch_spec(c), mesh=mesh, process_count=1)
  b = next(tu.batches(c))
  bad = dict(b, **{"text/mlm_weights": np.full_like(b["text/mlm_weights"], np.nan)})
  state = run.new_state()
  before = _host((state.params, state.opt_state))
  state, m = run.step(state, parallel.global_batch(bad, mesh))
  assert float(m["nonfinite"]) == 1.0 and int(state.nonfinite_total) == 1
  after = _host((state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert int(state.step) == 1

  # The skipped step left the optimizer's count at 0, so the next good step is the first update:
  # it equals a good step from a fresh state (no dropout: the step number changes nothing else).
  good = parallel.global_batch(b, mesh)
  state, m = run.step(state, good)
  fresh, m_fresh = run.step(run.new_state(), good)
  got, want = _host((state.params, state.opt_state)), _host((fresh.params, fresh.opt_state))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not np.array_equal(got[0]["model"]["lm_head"]["bias"], before[0]["model"]["lm_head"]["bias"])
  norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(got[0])))
  np.testing.assert_allclose(float(m["param_norm"]), norm, rtol=1e-5)
  assert float(m["nonfinite"]) == 0.0 and int(state.nonfinite_streak) == 0
