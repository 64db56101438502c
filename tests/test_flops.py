"""Analytic FLOPs against hand counts and against the dot products in the model's own jaxpr."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unimo_jax.model import ModelConfig, Unimo, dummy_visual, init_params, masks
from unimo_jax.train import flops as flops_lib
from unimo_jax.train import objectives as obj_lib


def jaxpr_matmul_flops(fn, *args) -> float:
  """2 * (output elements) * (contracted size) summed over every dot_general of fn's jaxpr,
  including those inside sub-jaxprs (pjit, remat, cond, scan bodies times their length)."""
  def count(jaxpr, mult=1.0):
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        total += mult * 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)
      inner_mult = mult * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
      for v in eqn.params.values():
        subs = v if isinstance(v, (list, tuple)) else [v]
        for s in subs:
          if isinstance(s, jax.extend.core.ClosedJaxpr):
            total += count(s.jaxpr, inner_mult)
          elif isinstance(s, jax.extend.core.Jaxpr):
            total += count(s, inner_mult)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_encoder_hand_count():
  # one layer, B=1, L=2, H=4, M=8: projections 2*2*4*16=256, mlp 2*2*2*32=256, attn 4*4*4=64
  assert flops_lib.encoder_flops(1, 2, 4, 8, 1) == 256 + 256 + 64
  assert flops_lib.encoder_flops(3, 2, 4, 8, 5) == 15 * (256 + 256 + 64)
  assert flops_lib.lm_head_flops(2, 3, 4, 10) == 2 * 2 * 3 * (16 + 40)


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.tiny(dropout_rate=0.0, attention_dropout_rate=0.0)
  # Shapes suffice: make_jaxpr traces abstract parameters.
  return cfg, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def test_text_mlm_forward_matches_jaxpr(tiny):
  cfg, params = tiny
  model = Unimo(cfg)
  ids = jnp.full((4, 16), 5, jnp.int32)
  pos = jnp.zeros((4, 3), jnp.int32)

  def fwd(p):
    h = model.apply({"params": p}, ids, method=Unimo.encode_text)["hidden"]
    return model.apply({"params": p}, h, pos, method=Unimo.lm_logits)

  expected = (flops_lib.encoder_flops(4, 16, cfg.hidden_size, cfg.mlp_dim, cfg.num_layers)
              + flops_lib.lm_head_flops(4, 3, cfg.hidden_size, cfg.vocab_size))
  assert jaxpr_matmul_flops(fwd, params) == expected


@pytest.mark.parametrize("visual_input", ["patches", "regions"])
def test_image_mrp_forward_matches_jaxpr(visual_input):
  cfg = ModelConfig.tiny(visual_input=visual_input)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  model = Unimo(cfg)
  visual = dummy_visual(cfg, 2, num_regions=5)

  def fwd(p):
    out = model.apply({"params": p}, visual, method=Unimo.encode_image)
    return model.apply({"params": p}, out["hidden"][:, 1:], method=Unimo.region_heads)

  n = cfg.num_patches if visual_input == "patches" else 5
  expected = (flops_lib.visual_embed_flops(2, cfg, 5)
              + flops_lib.encoder_flops(2, 1 + n, cfg.hidden_size, cfg.mlp_dim, cfg.num_layers)
              + flops_lib.region_heads_flops(2, n, cfg))
  assert jaxpr_matmul_flops(fwd, params) == expected


def test_projection_matches_jaxpr(tiny):
  cfg, params = tiny
  model = Unimo(cfg)
  x = jnp.ones((3, cfg.hidden_size))
  got = jaxpr_matmul_flops(lambda p: model.apply({"params": p}, x, method=Unimo.cmcl_text), params)
  assert got == flops_lib.projection_flops(3, cfg)


def _objectives(text_mode="alternate", pair_text_mode="alternate", **weights):
  w = {name: 1.0 for name in obj_lib.OBJECTIVES}
  w.update(weights)
  return ml_collections.ConfigDict(dict(text_mode=text_mode, pair_text_mode=pair_text_mode,
                                        weights=w))


def test_step_flops_alternation_averages_phases():
  cfg = ModelConfig.tiny()
  shapes = {"text/mlm_ids": (8, 32), "text/mlm_positions": (8, 5), "text/s2s_ids": (8, 40),
            "text/s2s_positions": (8, 10), "text/row_valid": (8,)}
  enc = lambda b, l: flops_lib.encoder_flops(b, l, cfg.hidden_size, cfg.mlp_dim, cfg.num_layers)
  mlm = enc(8, 32) + flops_lib.lm_head_flops(8, 5, cfg.hidden_size, cfg.vocab_size)
  s2s = enc(8, 40) + flops_lib.lm_head_flops(8, 10, cfg.hidden_size, cfg.vocab_size)
  # Alternating: each phase runs one objective's rows at their own shape.
  alt = flops_lib.step_flops(cfg, _objectives(), shapes)
  assert alt["train"] == pytest.approx(3 * (mlm + s2s) / 2)
  assert alt["text_mlm"] == pytest.approx(3 * mlm / 2)  # half the steps each
  assert alt["text_s2s"] == pytest.approx(3 * s2s / 2)
  # 'both': the two sets of rows share one pass, padded to the longer text (40) and slots (10).
  padded = s2s
  both = flops_lib.step_flops(cfg, _objectives(text_mode="both"), shapes)
  assert both["train"] == pytest.approx(3 * 2 * padded)
  off = flops_lib.step_flops(cfg, _objectives(text_mode="both", text_s2s=0.0), shapes)
  assert off["train"] == pytest.approx(3 * mlm) and "text_s2s" not in off


def test_peak_table_and_mfu():
  assert flops_lib.peak_flops_per_device("TPU v4") == 275e12
  assert flops_lib.peak_flops_per_device("TPU v5 lite", "bfloat16") == 197e12
  assert flops_lib.peak_flops_per_device("TPU v5") == 459e12
  assert flops_lib.peak_flops_per_device("TPU v6 lite", "bfloat16") == 918e12
  assert flops_lib.peak_flops_per_device("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops_lib.peak_flops_per_device("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert flops_lib.peak_flops_per_device("NVIDIA H200", "float32") == 494e12
  assert flops_lib.peak_flops_per_device("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
  assert flops_lib.peak_flops_per_device("cpu", "float32", "cpu", 8) == 440e9 / 8
  assert flops_lib.peak_flops_per_device("some new chip") == 0.0
  assert flops_lib.peak_flops_per_device("TPU v4", override=1e15) == 1e15
  np.testing.assert_allclose(flops_lib.mfu(1e12, 2.0, 1e12, 4), 0.5)
  assert flops_lib.mfu(1e12, 2.0, 0.0, 4) == 0.0
  # on a CPU: the host's measured matmul rate, shared by the fake devices
  peak = flops_lib.measured_cpu_peak()
  assert peak > 1e9 and flops_lib.current_peak_flops() == peak / jax.local_device_count()


@pytest.mark.parametrize("visual_input, text_mode", [("patches", "alternate"),
                                                     ("regions", "both")])
def test_step_forward_matches_the_objectives_jaxpr(visual_input, text_mode):
  """The analytic forward count of each step phase equals the matmul FLOPs of the objectives
  the train step differentiates (every merged pass, head and CMCL similarity matrix)."""
  import train_util as tu  # pylint: disable=import-outside-toplevel
  from unimo_jax.train import unimo_objectives  # pylint: disable=import-outside-toplevel
  c = tu.run_config(visual_input)
  c.objectives.text_mode = text_mode
  c.cmcl.implementation = "reference"
  mcfg = tu.model_config(c)
  params = jax.eval_shape(lambda: {"model": init_params(mcfg, jax.random.key(0)),
                                   "cmcl": {"log_temperature": jnp.zeros(())}})
  shapes = tu.global_shapes(c)
  streams = ("text", "image", "pair")
  every = obj_lib.all_active(c.objectives, streams)
  objectives = unimo_objectives.UnimoObjectives(mcfg, c, mesh=None)
  scales = {n: jnp.float32(1) for n in every}
  for phase in range(obj_lib.num_phases(c.objectives)):
    got = jaxpr_matmul_flops(
        lambda p, b: objectives(p, b, None, every, scales, phase, deterministic=True)[0],
        params, shapes)
    expected = sum(flops_lib.forward_flops(mcfg, c.objectives,
                                           {k: v.shape for k, v in shapes.items()}, phase,
                                           c.cmcl).values())
    assert got == expected, (phase, got, expected)


def test_alternation_with_one_objective_off_runs_the_other_every_step():
  c = _objectives(text_s2s=0.0, pair_mlm=0.0)
  streams = ("text", "image", "pair")
  assert obj_lib.num_phases(c) == 1
  assert obj_lib.active(c, streams, 0) == ("text_mlm", "image_mrp", "pair_cmcl", "pair_caption",
                                           "pair_mrp")
  c = _objectives(text_s2s=0.0)
  assert obj_lib.num_phases(c) == 2  # the pair stream still alternates
  assert "text_mlm" in obj_lib.active(c, streams, 1)
