"""benchmarks/gpu.sh's three scripts, run on the CPU with tiny models: what a GPU task runs in its
few device minutes must not fail on something a CPU could have caught (an API that moved). And
gpu.sh's own bookkeeping (a FAIL for every path a script did not report, the summary, the exit
status), with stand-in scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"RESULT cpu tiny (?P<name>[a-z -]+): (?P<ips>[\d.]+) images/s, .* \((?P<gflop>[\d.e+-]+) GFLOP/image\)")

# A minute and a half of CPU: `make test-real` runs it (CI too), beside the other heavy checks.
pytestmark = pytest.mark.real


def test_the_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "BENCH_DEVICE": "cpu", "SAM_VARIANT": "tiny", "BENCH_SECONDS": "0.1",
           "FULL_BATCH": "1", "DECODER_BATCH": "2", "EVAL_BATCH": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = {m["name"]: (float(m["ips"]), float(m["gflop"])) for m in map(LINE.match, out.stdout.splitlines()) if m}
    assert set(found) == {"full fine-tune", "decoder-only on cached embeddings", "zero-shot evaluation"}, out.stdout
    assert re.search(r"^PASS sam-full-bf16: [\d.]+ images/s, [\d.]+% of peak bf16", out.stdout,
                     re.M), out.stdout
    assert all(ips > 0 and gflop > 0 for ips, gflop in found.values()), found
    # What the counted FLOPs must show if the three steps are what they claim to be: the cached
    # step skips the encoder, and evaluation skips the backward pass.
    full = found["full fine-tune"][1]
    assert found["decoder-only on cached embeddings"][1] < full / 2
    assert found["zero-shot evaluation"][1] < full


def test_the_gpu_loop_check_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "BENCH_DEVICE": "cpu", "COMPILE_BACKEND": "eager", "EPOCHS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_loop"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [line for line in out.stdout.splitlines() if line.startswith("RUN cpu compile=")]
    assert [r.split()[2] for r in runs] == ["compile=no:", "compile=eager:"], out.stdout
    assert "CHECK cpu bf16 loop, compile=eager, checkpoints read back: ok" in out.stdout
    assert re.search(r"^PASS train-compile: run_trial on cpu in bf16, .*train.compile=eager",
                     out.stdout, re.M), out.stdout


PATHS = ["sam-mask_decoder-cache", "clipseg-decoder-352", "medsam-box-eval", "amg-zero-shot",
         "sweep-2-trials-shared-gpu"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR short enough for Ray: its socket paths (RAY_TMPDIR/ray/session_<date>_<pid>/
    sockets/plasma_store, RAY_TMPDIR a folder benchmarks.common.workdir makes in TMPDIR) must
    stay under 108 bytes, which pytest's tmp_path, named after the test, is too long for."""
    folder = Path(tempfile.mkdtemp(prefix="gp-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_every_gpu_path_passes_on_the_cpu_with_tiny_models(short_tmp: Path) -> None:
    env = {**os.environ, "TMPDIR": str(short_tmp), "BENCH_DEVICE": "cpu", "SAM_VARIANT": "tiny",
           "MEDSAM_VARIANT": "tiny", "CLIPSEG": "tiny", "PATH_SECONDS": "0.2", "CACHE_BATCH": "8",
           "TRAIN_BATCH": "4", "CLIPSEG_BATCH": "2", "MEDSAM_BATCH": "2", "AMG_POINTS": "8",
           "SWEEP_EPOCHS": "2"}
    env.pop("PATHS", None)
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_paths"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()
             if line.startswith(("PASS ", "FAIL "))}
    assert sorted(lines) == sorted(f"PASS {p}" for p in PATHS), out.stdout + out.stderr[-3000:]
    assert out.returncode == 0
    # The checks each path makes, in its figure: on the CPU, "on cuda" reads "on cpu".
    assert re.search(r"cache of \d+ rows .* built [\d.]+ images/s on cpu .* rows finite; cached "
                     r"training steps [\d.]+ images/s", lines["PASS sam-mask_decoder-cache"])
    assert "token grid 22x22" in lines["PASS clipseg-decoder-352"]  # tiny config, still at 352 px
    assert "logits finite at the input size 320x480" in lines["PASS medsam-box-eval"]
    assert re.search(r"s/image .* masks per image \[\d", lines["PASS amg-zero-shot"])
    assert re.search(r"2 trials FINISHED, .* overlapped [\d.]+s; resources.gpu=0 on cpu",
                     lines["PASS sweep-2-trials-shared-gpu"])
    assert not list(short_tmp.glob("segtune-*"))  # its folders, Ray's included, are removed


# A stand-in for the interpreter gpu.sh runs (`$PY -u -m benchmarks.NAME`): gpu_bench reports its
# path and then exits 1, gpu_loop dies before its path's line, gpu_paths reports three of its
# five paths (one FAIL) and then hangs past its timeout.
STUB = """#!/usr/bin/env bash
case "$3" in
  benchmarks.gpu_bench) echo "PASS sam-full-bf16: 1 images/s"; [ -n "${ALL_PASS:-}" ] || exit 1 ;;
  benchmarks.gpu_loop) [ -n "${ALL_PASS:-}" ] || exit 3; echo "PASS train-compile: ok" ;;
  benchmarks.gpu_paths)
    echo "PASS sam-mask_decoder-cache: a"; echo "PASS medsam-box-eval: c"
    if [ -n "${ALL_PASS:-}" ]; then
      echo "PASS clipseg-decoder-352: b"; echo "PASS amg-zero-shot: d"
      echo "PASS sweep-2-trials-shared-gpu: e"
    else
      echo "FAIL clipseg-decoder-352: b"; sleep 60
    fi ;;
esac
"""


def test_gpu_sh_reports_every_path_and_counts_them(tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PY": str(stub), "GPU_PATHS_TIMEOUT": "2"}
    out = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    summary = out.stdout.split("== path lines\n")[1].splitlines()
    before = "before printing this path's line"
    assert summary == [
        "PASS sam-full-bf16: 1 images/s",
        "FAIL gpu_bench: exited with status 1 after its path lines (its output above says why)",
        f"FAIL train-compile: benchmarks.gpu_loop exited with status 3 {before}",
        "PASS sam-mask_decoder-cache: a",
        "PASS medsam-box-eval: c",
        "FAIL clipseg-decoder-352: b",
        f"FAIL amg-zero-shot: benchmarks.gpu_paths timed out after 2s {before}",
        f"FAIL sweep-2-trials-shared-gpu: benchmarks.gpu_paths timed out after 2s {before}",
        "SUMMARY: 3 PASS, 5 FAIL",
    ], out.stdout
    assert out.returncode == 1

    out = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env={**env, "ALL_PASS": "1"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1] == "SUMMARY: 7 PASS, 0 FAIL", out.stdout
    assert out.returncode == 0
    assert not list(tmp_path.glob("segtune-gpu-sh.*"))  # its logs are removed
