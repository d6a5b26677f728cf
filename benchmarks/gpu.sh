#!/usr/bin/env bash
# GPU check for one H100 (bf16), under 8 minutes, random weights (no download):
# 1. benchmarks/gpu_bench.py: SAM vit_b images/s for full fine-tune, decoder-only on cached
#    embeddings and zero-shot evaluation, with the share of peak bf16 FLOP/s (three 40 s runs).
#    Goals (issue 6): decoder-only >=2000 images/s, full fine-tune >=100, zero-shot >=150.
# 2. benchmarks/gpu_loop.py: segtune's own loop on the GPU: bf16 through Accelerate, eager and
#    train.compile=inductor, checkpoints packed from GPU tensors read back.
# Usage: bash benchmarks/gpu.sh   (COMPILE=1 also compiles gpu_bench's full fine-tune)
# `make test` dry-runs both on the CPU with the tiny SAM (tests/test_gpu_bench_dry_run.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 "$PY" -m benchmarks.gpu_bench
timeout 180 "$PY" -m benchmarks.gpu_loop
