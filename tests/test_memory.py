"""Memory of a compiled train step is a tested property of the scanned, rematerialised encoder.

A text-MLM step (forward, LM head at the masked slots, backward) is compiled at 2 and 6 layers
and its ``memory_analysis().temp_size_in_bytes`` compared with what storing activations costs:

- without remat every layer keeps its activations for the backward pass, so temp memory grows by
  at least the size of one layer's attention probabilities per layer;
- with remat (``nothing_saveable``) a layer keeps only its input ``[B, L, H]``: temp memory grows
  by about B*L*H*4 bytes per layer, and at 6 layers it is a small fraction of the unrematerialised
  step's;
- the policy that keeps the projection/FFN matmul outputs sits in between;
- the compiled program does not grow with depth (one scanned layer body).
"""
import jax
import jax.numpy as jnp
import pytest

from unimo_jax.model import ModelConfig, Unimo, init_params

B, L, H, HEADS, MLP, P = 4, 128, 64, 4, 256, 16


def _compiled(layers: int, remat: bool, policy: str = "nothing_saveable"):
  cfg = ModelConfig.tiny(num_layers=layers, hidden_size=H, num_heads=HEADS, mlp_dim=MLP,
                         max_positions=L + 2, remat=remat, remat_policy=policy)
  model = Unimo(cfg)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))

  def loss(p, ids, slots, targets, rng):
    hidden = model.apply({"params": p}, ids, deterministic=False, rngs={"dropout": rng},
                         method=Unimo.encode_text)["hidden"]
    logits = model.apply({"params": p}, hidden, slots, method=Unimo.lm_logits)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  def step(p, ids, slots, targets, rng):
    value, grads = jax.value_and_grad(loss)(p, ids, slots, targets, rng)
    return value, jax.tree.map(lambda a, g: a - 0.1 * g, p, grads)

  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  lowered = jax.jit(step).lower(params, ints(B, L), ints(B, P), ints(B, P), jax.random.key(0))
  compiled = lowered.compile()
  return compiled.memory_analysis().temp_size_in_bytes, len(compiled.as_text())


@pytest.fixture(scope="module")
def measured():
  return {(n, remat, policy): _compiled(n, remat, policy)
          for n in (2, 6)
          for remat, policy in ((False, "nothing_saveable"), (True, "nothing_saveable"),
                                (True, "dots_with_no_batch_dims_saveable"))}


def test_remat_lowers_temp_memory_by_the_expected_factor(measured):
  temp = {k: v[0] for k, v in measured.items()}
  hidden = B * L * H * 4            # one layer input, float32
  probs = B * HEADS * L * L * 4     # one layer's attention probabilities, float32
  per_layer = lambda remat, policy: (temp[(6, remat, policy)] - temp[(2, remat, policy)]) / 4
  # no remat: every layer's activations stay alive (probabilities, FFN intermediates, ...)
  assert per_layer(False, "nothing_saveable") >= 1.5 * probs, temp
  # remat: a layer keeps its input (and little else: measured 1.5x its size)
  assert per_layer(True, "nothing_saveable") <= 2 * hidden, temp
  assert temp[(6, True, "nothing_saveable")] <= 0.3 * temp[(6, False, "nothing_saveable")], temp
  # keeping the matmul outputs costs more than nothing, less than no remat
  kept = per_layer(True, "dots_with_no_batch_dims_saveable")
  assert per_layer(True, "nothing_saveable") < kept < per_layer(False, "nothing_saveable"), temp


def test_compiled_program_does_not_grow_with_depth(measured):
  for remat, policy in ((False, "nothing_saveable"), (True, "nothing_saveable")):
    small, deep = measured[(2, remat, policy)][1], measured[(6, remat, policy)][1]
    assert deep <= 1.02 * small, (remat, small, deep)
