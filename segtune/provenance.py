"""Where a run came from: the code version, who ran it, how, and which prepared store it read.

`segtune.trial.run_tags` puts these on every run, as segtune's own tags (`segtune.git_sha`,
`segtune.store`, ...) and as MLflow's standard ones (`mlflow.source.git.commit`,
`mlflow.source.name`, `mlflow.source.type`, `mlflow.user`), which the MLflow UI shows in its
source and user columns. Ground floor: plain files and subprocesses, no segtune imports.
"""

from __future__ import annotations

import getpass
import json
import os
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


def git_commit(sha: str) -> str | None:
    """The plain commit of a `git_sha` value (MLflow's `mlflow.source.git.commit`), None if unknown."""
    commit = sha.removesuffix("-dirty")
    return commit if commit and commit != "unknown" else None


def user() -> str:
    """Who runs this: the tracking server's user name when one is set (MLFLOW_TRACKING_USERNAME,
    as MLflow's own clients send it; never the password), else the OS user."""
    name = os.environ.get("MLFLOW_TRACKING_USERNAME", "").strip()
    if name:
        return name
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry and no USER (some containers)
        return "unknown"


def source_type() -> str:
    """MLflow's `mlflow.source.type`: JOB inside a batch job (Slurm), else LOCAL. Sweep trials,
    which Ray runs as jobs of the sweep, are tagged JOB by whoever opens them."""
    return "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL"


def store_counts(store: str | Path) -> str | None:
    """The samples per split of the store in folder `store`, as JSON; None if it cannot be read."""
    try:
        return json.dumps(json.loads((Path(store) / "index.json").read_text())["counts"]["samples"],
                          sort_keys=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
