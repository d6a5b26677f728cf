"""Where a run came from: the code version, recorded as `segtune.git_sha` on every run."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_sha(cwd: Path | None = None) -> str:
    """The commit of the working tree (suffixed `-dirty` with uncommitted changes), or `unknown`."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
