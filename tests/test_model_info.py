"""``unimo-jax model-info``: parameter counts per component and forward passes."""
from unimo_jax import cli
from unimo_jax.model_info import main as model_info


def test_model_info_tiny_runs_and_base_traces(capsys):
  assert cli.main(["unimo-jax", "model-info", "--batch-size", "2", "--text-length", "8"]) == 0
  out = capsys.readouterr().out
  assert "NON-FINITE" not in out and "lm_logits@P (2, 1, 1000)" in out
  assert "hidden (2, 17, 64)" in out  # [IMG] + 16 patches of a 32px image

  assert model_info.main(["model-info", "--preset", "base", "--visual", "regions",
                          "--num-regions", "10"]) == 0
  out = capsys.readouterr().out
  # RoBERTa-base MaskedLM has 124,697,433 parameters, 768 of them the token-type row
  assert "124,696,665" in out and "eval_shape only" in out
  assert "hidden (4, 11, 768)" in out  # image: [IMG] + 10 regions
