"""Installed, not only checked out: a wheel of segtune in a fresh virtual environment, used from
another folder, with nothing but its declared dependencies (`make test-real`; a few minutes,
most of it pip resolving PyTorch, Ray and MLflow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.real


def _run(args: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{args[:3]} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_a_wheel_in_a_fresh_venv_runs_the_demo_from_elsewhere(tmp_path: Path) -> None:
    wheels, env_dir, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(REPO)], tmp_path, 600)
    wheel = next(wheels.glob("segtune-*.whl"))
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], tmp_path, 1500)
    # Only what the wheel declares: no repository on the path, no experiments/ beside the CWD.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}:{env.get('PATH', '')}"
    segtune = str(env_dir / "bin" / "segtune")
    help_text = _run([segtune, "--help"], work, 120, env).stdout
    assert "demo" in help_text and "sweep" in help_text
    version = _run([str(py), "-c", "import segtune.cli, pathlib; print(pathlib.Path(segtune.cli.__file__).parent)"],
                   work, 60, env).stdout.strip()
    assert str(REPO) not in version and "site-packages" in version  # the installed copy, not the checkout
    out = _run([segtune, "demo", "--quick", "--home", str(work / "mlflow")], work, 1200, env)
    assert "champion" in out.stdout.lower() or "registered" in out.stdout, out.stdout[-2000:]
    _run([segtune, "server", "stop", "--home", str(work / "mlflow")], work, 60, env)
    shutil.rmtree(env_dir, ignore_errors=True)  # 5+ GB: do not wait for pytest's cleanup
