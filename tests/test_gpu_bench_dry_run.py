"""benchmarks/gpu.sh's two scripts, run on the CPU with the tiny SAM: what a GPU task runs in its
few device minutes must not fail on something a CPU could have caught (an API that moved)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"RESULT cpu tiny (?P<name>[a-z -]+): (?P<ips>[\d.]+) images/s, .* \((?P<gflop>[\d.e+-]+) GFLOP/image\)")


def test_the_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "BENCH_DEVICE": "cpu", "SAM_VARIANT": "tiny", "BENCH_SECONDS": "0.1",
           "FULL_BATCH": "1", "DECODER_BATCH": "2", "EVAL_BATCH": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = {m["name"]: (float(m["ips"]), float(m["gflop"])) for m in map(LINE.match, out.stdout.splitlines()) if m}
    assert set(found) == {"full fine-tune", "decoder-only on cached embeddings", "zero-shot evaluation"}, out.stdout
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
