#!/usr/bin/env bash
# The issue-7 benchmark on a GPU, as one prepared run (for a machine with CUDA; ~5 minutes on one GPU).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (needs `make setup` with a CUDA torch: TORCH_INDEX_URL=...)
# 1. fp32 target + bf16 draft, as on the CPU: the same table, --device cuda (CUDA-synchronized timings).
# 2. bf16 target + NF4 draft (bitsandbytes CUDA kernels): a cheaper, weaker draft.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
$PY benchmarks/bench_vs_hf.py --device cuda --prompts 10 --max-new-tokens 64 --ks 4 8 12 --assist 20:0.4 \
  --specexec 16x8 32x16 64x16 --repeat 2 --json "$OUT/gpu_fp32_bf16.json" | tee "$OUT/gpu_fp32_bf16.txt"
$PY benchmarks/bench_vs_hf.py --device cuda --target-dtype bfloat16 --draft nf4 --prompts 10 --max-new-tokens 64 \
  --ks 4 8 --specexec 16x8 32x16 --repeat 2 --json "$OUT/gpu_bf16_nf4.json" | tee "$OUT/gpu_bf16_nf4.txt"
