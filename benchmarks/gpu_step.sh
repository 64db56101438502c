#!/usr/bin/env bash
# UNIMO-base bf16 train steps on ONE CUDA GPU: step time, tokens/s and MFU against the GPU's bf16
# dense peak (unimo_jax.train.flops.PEAK_FLOPS; H100/H200/A100 are in the table, pass
# PEAK_TFLOPS=<dense bf16 TFLOP/s> for another GPU). Under 5 minutes on a fresh machine:
#
#   bash benchmarks/gpu_step.sh              # from the repository root
#   BATCH=32,16,32 STEPS=20 bash benchmarks/gpu_step.sh
#
# 1. installs jax[cuda12] pinned to the jax the project uses (pip, ~1-2 min), and the project;
# 2. runs benchmarks/train_step.py: the paper config (experiments/configs/base.py: 12 layers,
#    H 768, 100 regions, 512 text tokens, all seven objectives, ring CMCL) at global batch
#    BATCH text,image,pair rows, bfloat16 compute with float32 parameters, remat on, one compile
#    then the median of STEPS steps;
# 3. prints step time, tokens/s (input tokens of the three streams per step) and MFU.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${BATCH:-64,32,64}"
STEPS="${STEPS:-10}"
LAYERS="${LAYERS:-12}"
OUT="${OUT:-/tmp/unimo_gpu_step.json}"
JAX_VERSION="$(python3 -c 'import importlib.metadata as m; print(m.version("jax"))' 2>/dev/null || echo 0.10.2)"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python3 -m pip install -q "jax[cuda12]==${JAX_VERSION}"
timeout 60 python3 -m pip install -q -e . --no-deps
python3 -c 'import jax; d = jax.devices()[0]; assert d.platform == "gpu", d; print("device:", d.device_kind, "x", jax.device_count())'

CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" timeout 240 python3 benchmarks/train_step.py \
  --config experiments/configs/base.py --steps "${STEPS}" --batch "${BATCH}" \
  --layers "${LAYERS}" --dtype bfloat16 --json "${OUT}"

python3 - "${OUT}" "${PEAK_TFLOPS:-0}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b = r["batch"]
# input tokens per step: text 512; image [IMG] + 100 regions; pair [IMG] + 100 + 512
tokens = b["text"] * 512 + b["image"] * 101 + b["pair"] * (101 + 512)
step = r["step_seconds"]
peak = float(sys.argv[2]) * 1e12 or r["peak_tflops_per_device"] * 1e12
mfu = r["tflops_per_device"] * 1e12 / peak if peak else float("nan")
print(f"\n{r['device']}: UNIMO-base bf16, batch {b['text']}/{b['image']}/{b['pair']}, "
      f"{r['layers']} layers, compile {r['compile_seconds']} s")
print(f"step {step * 1e3:.1f} ms | {tokens / step:,.0f} tokens/s | "
      f"{r['tflops_per_device']:.1f} TFLOP/s | MFU {mfu:.3f} (peak {peak / 1e12:.0f} TFLOP/s bf16)")
PY
