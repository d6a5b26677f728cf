"""The layout holds: floors import only downward, no cycles, private APIs in one module, ruff clean.

`lint-imports` checks the contracts in pyproject.toml (docs/architecture.md draws them); these
tests run it and ruff as `make test` does, and check what a contract cannot express.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Private APIs of the libraries segtune builds on: allowed in segtune/ray_compat.py only.
PRIVATE_MODULES = ("ray._private", "ray._raylet", "ray.core.generated")
PRIVATE_ATTRIBUTES = {"_reset_state", "_version", "_connect_and_get_accessor"}


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept() -> None:
    out = _run("lint-imports")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_ruff_is_clean() -> None:
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _layers() -> list[list[str]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layered = next(c for c in config["contracts"] if c["type"] == "layers")
    return [[m.strip() for m in floor.replace("|", ":").split(":")] for floor in layered["layers"]]


def test_every_segtune_module_sits_on_a_floor() -> None:
    """A new module must be placed on a floor, or the layers contract would not see it."""
    placed = {m for floor in _layers() for m in floor}
    modules = {f"segtune.{p.stem}" for p in (REPO / "segtune").glob("*.py") if p.stem != "__init__"}
    packages = {f"segtune.{p.parent.name}" for p in (REPO / "segtune").glob("*/__init__.py")}
    assert modules | packages == placed


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith(PRIVATE_MODULES)]
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    return found


def test_private_library_apis_only_in_ray_compat() -> None:
    files = [p for d in ("segtune", "tracking") for p in (REPO / d).rglob("*.py")]
    offenders = [hit for p in files if p.name != "ray_compat.py" for hit in _private_uses(p)]
    assert offenders == []
    # The check itself sees what it looks for.
    assert len(_private_uses(REPO / "segtune" / "ray_compat.py")) >= 5
