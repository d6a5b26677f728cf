#!/usr/bin/env bash
# Every GPU path in one prepared run: one H100/H200-class GPU, bf16, random weights (nothing is
# downloaded), under 9 minutes. Three scripts, each under `timeout` (then 5 s to die):
#   benchmarks/gpu_bench.py  140 s   1. sam-full-bf16: SAM vit_b full fine-tune, images/s and
#                                       share of peak bf16 FLOP/s (BENCH_SECONDS=25 per figure;
#                                       also decoder-only and zero-shot figures, RESULT lines).
#                                       Goals (issue 6): full >=100 images/s, decoder-only >=2000,
#                                       zero-shot >=150.
#   benchmarks/gpu_loop.py   180 s   7. train-compile: segtune's run_trial in bf16 through
#                                       Accelerate, eager and train.compile=inductor, checkpoints
#                                       packed from GPU tensors read back.
#   benchmarks/gpu_paths.py  180 s   2. sam-mask_decoder-cache: embedding cache built on the GPU
#                                       (images/s, rows finite, encoder on cuda), cached steps.
#                                    3. clipseg-decoder-352: CLIPSeg rd64 at 352 px, decoder
#                                       policy, bf16 steps; token grid 22x22.
#                                    4. medsam-box-eval: MedSAM vit_b box evaluation, images/s,
#                                       finite logits at the input size.
#                                    5. amg-zero-shot: SAM's mask generator, s/image, masks.
#                                    6. sweep-2-trials-shared-gpu: 2 Ray Tune trials at
#                                       resources.gpu=0.5, both finished, overlapping, on the GPU.
#   Total: 500 s of timeouts + 15 s of kill grace = 8 min 35 s at most (PATH_SECONDS=8 per figure).
# Each path prints one line, `PASS <path>: <figure>` or `FAIL <path>: <reason>`; a failing path
# does not stop the others. When a script dies or times out before a path's line, this script
# prints the FAIL for it; a script exiting non-zero after all its path lines (a supplementary
# gpu_bench figure failed) gets a FAIL line of its own. The last line counts PASS and FAIL; the
# exit status is 1 when any FAIL.
# Usage: bash benchmarks/gpu.sh   (COMPILE=1 also compiles gpu_bench's full fine-tune: give it
# GPU_BENCH_TIMEOUT=300). Timeouts: GPU_BENCH_TIMEOUT, GPU_LOOP_TIMEOUT, GPU_PATHS_TIMEOUT.
# `make test-real` dry-runs all three scripts on the CPU with tiny models, and this script's
# bookkeeping with stand-in scripts (tests/test_gpu_bench_dry_run.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export BENCH_SECONDS=${BENCH_SECONDS:-25} PATH_SECONDS=${PATH_SECONDS:-8}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/segtune-gpu-sh.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT
LINES="$LOGS/lines"
: >"$LINES"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"

# run SECONDS MODULE PATH...: run benchmarks.MODULE under timeout, streaming its output, then
# make sure each PATH has its line.
run() {
  local limit=$1 module=$2
  shift 2
  local log="$LOGS/$module.log" pid rc path why
  echo "== benchmarks.$module (timeout ${limit}s)"
  # Output goes to a file that tail follows until the script's process ends: a straggler it
  # leaves behind (a Ray worker) cannot hold a pipe open and stall this script.
  timeout -k 5 "$limit" "$PY" -u -m "benchmarks.$module" >"$log" 2>&1 &
  pid=$!
  tail -n +1 -f --pid="$pid" "$log"
  wait "$pid"
  rc=$?
  case $rc in
    124 | 137) why="timed out after ${limit}s" ;;
    *) why="exited with status $rc" ;;
  esac
  grep -E '^(PASS|FAIL) ' "$log" >>"$LINES"
  local missing=0
  for path in "$@"; do
    if ! grep -Eq "^(PASS|FAIL) $path:" "$log"; then
      echo "FAIL $path: benchmarks.$module $why before printing this path's line" | tee -a "$LINES"
      missing=1
    fi
  done
  if [ "$rc" -ne 0 ] && [ "$missing" -eq 0 ] && ! grep -q '^FAIL ' "$log"; then
    echo "FAIL $module: $why after its path lines (its output above says why)" | tee -a "$LINES"
  fi
}

run "${GPU_BENCH_TIMEOUT:-140}" gpu_bench sam-full-bf16
run "${GPU_LOOP_TIMEOUT:-180}" gpu_loop train-compile
run "${GPU_PATHS_TIMEOUT:-180}" gpu_paths sam-mask_decoder-cache clipseg-decoder-352 \
  medsam-box-eval amg-zero-shot sweep-2-trials-shared-gpu

passed=$(grep -c '^PASS ' "$LINES")
failed=$(grep -c '^FAIL ' "$LINES")
echo "== path lines"
cat "$LINES"
echo "SUMMARY: $passed PASS, $failed FAIL"
[ "$failed" -eq 0 ]
