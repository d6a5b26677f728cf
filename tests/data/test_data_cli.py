"""`segtune data synth|check|prepare|info`: every dataset name end to end, user errors as a
message and exit 1 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from segtune.data import SYNTH, open_store
from segtune.data_cli import data_app

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(data_app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, not a user error: show its traceback
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", sorted(SYNTH))
def test_synth_check_prepare_info_for_every_dataset(name: str, tmp_path: Path) -> None:
    root, cache = tmp_path / "raw", tmp_path / "cache"
    code, out, _ = _run("synth", name, root)
    assert code == 0 and f"segtune data prepare {name} {root}" in out
    code, out, _ = _run("check", name, root, "--patch-size", 128)
    assert code == 0 and out.splitlines()[-1].startswith(f"ok: {name} at {root}")
    code, out, _ = _run("prepare", name, root, "--out", cache, "--patch-size", 128)
    assert code == 0, out
    store = Path(out.splitlines()[-1].removeprefix("store: "))
    assert store.parent == cache and open_store(store).summary() in out
    code, out, _ = _run("info", store, "--json")
    info = json.loads(out)
    assert code == 0 and info["dataset"] == name and info["patch_size"] == 128
    assert set(info["splits"]) == {"train", "val", "test"} and info["splits"]["test"] > 0
    assert info["hash"] == open_store(store).hash
    code, out, _ = _run("info", store)
    assert code == 0 and out.strip() == open_store(store).summary()


def test_set_passes_dataset_fields_and_options(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    _run("synth", "synthetic_cityscapes", root)
    code, out, _ = _run("prepare", "cityscapes", root, "--out", tmp_path / "c", "--patch-size",
                        64, "--set", "classes=[car, road]", "--set", "fit=tile",
                        "--set", "val_fraction=0.5")
    assert code == 0
    info = open_store(Path(out.splitlines()[-1].removeprefix("store: "))).info()
    assert set(info["classes"]) == {"car", "road"} and info["fit"] == "tile"
    assert info["options"] == {"classes": ["car", "road"]}
    code, out, _ = _run("check", "cityscapes", root, "--set", "classes=[car]", "--json")
    assert code == 0 and set(json.loads(out)["classes"]) == {"car"}


@pytest.mark.parametrize("args, expected", [
    (["check", "folder", "{root}", "--set", "clases=[car]"], "clases: unknown field"),
    (["check", "folder", "{root}", "--set", "classes=[car]"], "has no option classes"),
    (["check", "folder", "{root}", "--set", "fit=stretch"], "fit: Input should be"),
    (["check", "imagenet", "{root}"], "Unknown dataset 'imagenet'"),
    (["synth", "imagenet", "{root}"], "No synthetic generator for 'imagenet'"),
    (["info", "{root}"], "is not a prepared segtune store"),
])
def test_user_errors_exit_1_with_the_message(args: list[str], expected: str,
                                             tmp_path: Path) -> None:
    code, out, err = _run(*[a.format(root=tmp_path) for a in args])
    assert code == 1 and expected in err and "Traceback" not in out + err


def test_check_reports_every_problem_and_prepare_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _run("synth", "folder", root)
    (root / "masks" / "sample_001.png").unlink()
    Image.fromarray(np.full((256, 320), 3, np.uint8)).save(root / "masks" / "sample_002.png")
    code, _, err = _run("check", "folder", root)
    assert code == 1
    assert "error: 2 problems in the folder data at" in err
    assert str(root / "images" / "sample_001.png") in err
    assert str(root / "masks" / "sample_002.png") in err and "mask values [3]" in err
    code, _, err = _run("prepare", "folder", root, "--out", tmp_path / "cache")
    assert code == 1 and "nothing was prepared" in err
    assert not any((tmp_path / "cache").iterdir())


def test_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", "from segtune.data_cli import data_app; data_app()",
         "check", "folder", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: 1 problem in the folder data at")
    assert "expected the folder of masks" in result.stderr and "Traceback" not in result.stderr
