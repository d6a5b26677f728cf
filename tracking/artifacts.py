"""Checkpoint integrity: a sha256 manifest written beside the files and verified before use."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tracking.errors import TrackingError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """Hash every file under `folder` into `folder/manifest.json`; return {relative path: sha256}.

    `known` holds hashes the caller already computed (relative path -> sha256), e.g. while it
    wrote those files on another thread; they are not read again.
    """
    folder = Path(folder)
    known = known or {}
    files = {}
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        files[rel] = known[rel] if rel in known else sha256_file(p)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    # Written beside and renamed over: the old manifest may be a hard link shared with another
    # copy of the checkpoint (segtune.checkpoint.link_copy), which must not change with this one.
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files, "sha256": digest}, indent=2))
    os.replace(tmp, folder / MANIFEST)
    return files


def recorded_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} as `folder`'s manifest records them, without reading the files."""
    return json.loads((Path(folder) / MANIFEST).read_text())["files"]


def verify_manifest(folder: Path) -> str:
    """Check every file against the manifest; return the checkpoint's overall sha256.

    Raises TrackingError naming the first file that is missing, extra or altered.
    """
    folder = Path(folder)
    mf = folder / MANIFEST
    if not mf.is_file():
        raise TrackingError(f"{folder}: checkpoint has no {MANIFEST}; it cannot be verified.")
    manifest = json.loads(mf.read_text())
    expected: dict[str, str] = manifest["files"]
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    for name in sorted(set(expected) | present):
        if name not in present:
            raise TrackingError(f"{folder}: {name} is listed in {MANIFEST} but missing.")
        if name not in expected:
            raise TrackingError(f"{folder}: {name} is not listed in {MANIFEST}; the checkpoint was altered.")
        actual = sha256_file(folder / name)
        if actual != expected[name]:
            raise TrackingError(f"{folder}: {name} has sha256 {actual[:12]}…, but {MANIFEST} records "
                                f"{expected[name][:12]}…; the checkpoint was altered or corrupted.")
    return manifest["sha256"]
