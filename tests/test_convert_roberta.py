"""RoBERTa import: parity with Hugging Face's torch RoBERTa, the command, the saved format, the
merge into a full model, and the parameter count of the base text path."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unimo_jax.convert import cli, roberta  # noqa: E402
from unimo_jax.model import ModelConfig, Unimo, init_variables  # noqa: E402


def _small_roberta(tmp_path, dtype=None):
  cfg = transformers.RobertaConfig(
      vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=24, type_vocab_size=1, layer_norm_eps=1e-5,
      pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu")
  torch.manual_seed(0)
  model = transformers.RobertaForMaskedLM(cfg).eval()
  with torch.no_grad():  # larger weights than the 0.02 init; non-trivial biases and LayerNorms
    for name, p in model.named_parameters():
      if ("LayerNorm" in name or "layer_norm" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  out = tmp_path / "hf"
  (model.to(dtype) if dtype else model).save_pretrained(out)
  return model, out


def _zeros_like_model(config):
  """A full parameter tree of the model's shapes (values do not matter for merging)."""
  shapes = nn.unbox(jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0))))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)["params"]


def test_parity_with_hugging_face_roberta(tmp_path):
  hf, hf_dir = _small_roberta(tmp_path)
  config, params = roberta.load(str(hf_dir))
  assert config.roberta_positions and config.num_layers == 2 and config.mask_token_id == 96

  ids = np.array([[0, 5, 17, 33, 8, 2, 1, 1, 1],
                  [0, 44, 2, 1, 1, 1, 1, 1, 1],
                  [0, 9, 10, 11, 12, 13, 14, 15, 2]], np.int64)
  attention_mask = (ids != 1).astype(np.int64)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention_mask),
             output_hidden_states=True)
  want_hidden = out.hidden_states[-1].numpy()
  want_logits = out.logits.numpy()

  model = Unimo(config)
  ours = jax.jit(lambda p, i: model.apply({"params": p}, i, method=Unimo.encode_text))(
      params, ids.astype(np.int32))
  positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
  logits = jax.jit(lambda p, h, q: model.apply({"params": p}, h, q, method=Unimo.lm_logits))(
      params, ours["hidden"], positions)
  real = attention_mask.astype(bool)
  assert np.abs(want_logits[real]).max() > 2.0  # a non-trivial comparison
  np.testing.assert_allclose(np.asarray(ours["hidden"])[real], want_hidden[real], atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits)[real], want_logits[real], atol=1e-4)


def test_command_saved_format_and_merge_into_full_model(tmp_path):
  _, hf_dir = _small_roberta(tmp_path)
  out = tmp_path / "converted"
  assert cli.main(["unimo-jax convert", "roberta", "--hf-dir", str(hf_dir), "--out", str(out),
                   "--visual-input", "regions"]) == 0
  config, params = roberta.load_converted(str(out))
  want_config, want = roberta.load(str(hf_dir), visual_input="regions")
  assert config == want_config and config.visual_input == "regions"
  jax.tree.map(np.testing.assert_array_equal, params, want)
  assert json.loads((out / "source.json").read_text())["num_params"] > 0
  assert cli.main(["unimo-jax convert", "roberta", "--hf-dir", str(tmp_path / "missing"),
                   "--out", str(out)]) == 2

  fresh = _zeros_like_model(config)
  merged, kept = roberta.merge_params(fresh, params)
  np.testing.assert_array_equal(merged["text_embed"]["word"], want["text_embed"]["word"])
  assert any(k.startswith("region_embed/") for k in kept)
  assert not any(k.startswith(("encoder/", "text_embed/", "lm_head/")) for k in kept)
  with pytest.raises(ValueError, match="shape"):
    roberta.merge_params(_zeros_like_model(config.replace(mlp_dim=16)), params)


def test_bfloat16_checkpoint_and_bare_model(tmp_path):
  hf, hf_dir = _small_roberta(tmp_path, dtype=torch.bfloat16)
  _, params = roberta.load(str(hf_dir))
  want = hf.roberta.embeddings.word_embeddings.weight.detach().to(torch.float32).numpy()
  np.testing.assert_array_equal(params["text_embed"]["word"], want)  # bf16 values exactly

  bare = tmp_path / "bare"
  hf.roberta.to(torch.float32).save_pretrained(bare)  # RobertaModel: has a pooler, no LM head
  config, params = roberta.load(str(bare))
  assert "lm_head" not in params and config.hidden_size == 32


def test_base_text_path_has_roberta_base_parameter_count():
  """UNIMO-base's text path (text embeddings + encoder + LM head) has exactly RoBERTa-base's
  parameters (RobertaForMaskedLM, tied decoder counted once) minus the token-type embedding
  (1 x 768, folded into the positions on import); RobertaForMaskedLM has no pooler."""
  rob = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                   type_vocab_size=1, layer_norm_eps=1e-5)
  with torch.device("meta"):
    hf = transformers.RobertaForMaskedLM(rob)
  hf_count = sum(p.numel() for p in hf.parameters())
  token_types = hf.roberta.embeddings.token_type_embeddings.weight.numel()
  assert token_types == 768 and getattr(hf.roberta, "pooler", None) is None

  shapes = jax.eval_shape(lambda: init_variables(ModelConfig.base(), jax.random.PRNGKey(0)))
  params = shapes["params"]
  ours = sum(int(np.prod(x.shape)) for k in ("text_embed", "encoder", "lm_head")
             for x in jax.tree.leaves(params[k]))
  assert ours == hf_count - token_types, (ours, hf_count, token_types)
  assert jnp.dtype(jax.tree.leaves(params)[0].dtype) == jnp.float32


def test_layer_layout_conversion_and_older_files(tmp_path):
  """stack_layer_params stacks per-layer trees on a leading axis (what the scanned encoder
  reads); files written in the older per-layer layout load in the scanned one."""
  from flax import serialization
  from unimo_jax.model.layers import stack_layer_params, unstack_layer_params
  rng = np.random.default_rng(0)
  layers = [{"attention": {"query": {"kernel": rng.normal(size=(4, 2, 2)), "bias": rng.normal(
      size=(2, 2))}}, "mlp_norm": {"scale": rng.normal(size=(4,))}} for _ in range(3)]
  enc = stack_layer_params(layers)
  assert enc["layers"]["attention"]["query"]["kernel"].shape == (3, 4, 2, 2)
  np.testing.assert_array_equal(enc["layers"]["mlp_norm"]["scale"][2], layers[2]["mlp_norm"]["scale"])
  back = unstack_layer_params(enc)
  np.testing.assert_array_equal(back[1]["attention"]["query"]["bias"],
                                layers[1]["attention"]["query"]["bias"])
  config = ModelConfig.tiny(num_layers=3)
  old = {"encoder": {f"layer_{i}": layers[i] for i in range(3)}}
  os.makedirs(tmp_path / "old")
  with open(tmp_path / "old" / roberta.PARAMS_FILE, "wb") as f:
    f.write(serialization.msgpack_serialize(old))
  with open(tmp_path / "old" / roberta.CONFIG_FILE, "w") as f:
    f.write(config.to_json())
  _, params = roberta.load_converted(str(tmp_path / "old"))
  np.testing.assert_array_equal(params["encoder"]["layers"]["attention"]["query"]["kernel"],
                                enc["layers"]["attention"]["query"]["kernel"])
