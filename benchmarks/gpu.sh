#!/usr/bin/env bash
# GPU benchmark for one H100 (bf16): SAM vit_b images/s for full fine-tune, decoder-only on
# cached embeddings, zero-shot evaluation, and the share of peak bf16 FLOP/s. Random weights
# (no download). About 3-4 minutes: three 40 s measurements plus model build and warm-up.
# Goals (issue 6): decoder-only >=2000 images/s, full fine-tune >=100, zero-shot >=150.
# Usage: bash benchmarks/gpu.sh   (COMPILE=1 to try torch.compile on the full fine-tune)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 480 "$PY" -m benchmarks.gpu_bench
