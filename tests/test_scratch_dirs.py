"""Runs leave nothing behind in /tmp: a full test run once left ~1 GB of Ray session logs and
MLflow downloads there, and a benchmark its whole folder, until CI's disk filled up."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ray_and_tempfile_write_into_the_sessions_scratch_folder(scratch_tmpdir: Path) -> None:
    import ray

    assert Path(tempfile.gettempdir()) == scratch_tmpdir
    info = ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        session = Path(info.address_info["session_dir"])
    finally:
        ray.shutdown()
    assert session.is_relative_to(scratch_tmpdir), session


def _bench_folders(tmp_path: Path, keep: bool) -> tuple[Path, Path]:
    code = ("from benchmarks.common import workdir; import os; root = workdir('probe'); "
            "(root / 'file').write_text('x'); print(root); print(os.environ['RAY_TMPDIR'])")
    env = {**os.environ, "TMPDIR": str(tmp_path), "SEGTUNE_BENCH_KEEP": "1" if keep else "0"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    root, ray_tmp = (Path(line) for line in res.stdout.split()[-2:])
    assert root.parent == tmp_path and Path(ray_tmp).parent == tmp_path
    return root, ray_tmp


def test_a_benchmark_removes_its_folders_when_it_exits(tmp_path: Path) -> None:
    root, ray_tmp = _bench_folders(tmp_path, keep=False)
    assert not root.exists() and not ray_tmp.exists()


def test_segtune_bench_keep_keeps_them(tmp_path: Path) -> None:
    root, ray_tmp = _bench_folders(tmp_path, keep=True)
    assert (root / "file").read_text() == "x" and ray_tmp.is_dir()
