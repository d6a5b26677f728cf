"""Bad input through the real CLI: one paragraph naming the file or field, exit 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segtune.models.sam import SAM_VARIANTS, build_sam_modules
from tests.conftest import DEMO


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segtune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr[-2000:])


@pytest.mark.parametrize("override,needles", [
    ("model.name=nosuch", ["model.name", "sam", "clipseg"]),
    ("prompt.train=nosuch", ["prompt.train", "random_point"]),
    ("train.loss=nosuch", ["train.loss", "dice"]),
    ("dataset.name=nosuch", ["nosuch", "lucchi_em"]),
    ("train.lr=0", ["train.lr"]),
    ("train.batch_size=0", ["train.batch_size"]),
    ("model.variant=vit_q", ["model.variant", "vit_b"]),
])
def test_unknown_names_and_bad_ranges(override: str, needles: list[str], tmp_path: Path, em_data: Path) -> None:
    res = run("train", str(DEMO), "--no-track", "--set", override, "--set", f"dataset.root={em_data}",
              "--set", f"dataset.cache_dir={em_data / 'cache'}", cwd=tmp_path)
    assert_user_error(res, *needles)


def test_checkpoint_for_another_architecture_names_the_keys(tmp_path: Path, em_data: Path) -> None:
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(build_sam_modules(SAM_VARIANTS["tiny"]).state_dict(), path)  # a tiny SAM, not a vit_b
    res = run("train", str(DEMO), "--no-track", "--set", "model.variant=vit_b", "--set", f"model.checkpoint={path}",
              "--set", f"dataset.root={em_data}", "--set", f"dataset.cache_dir={em_data / 'cache'}", cwd=tmp_path)
    assert_user_error(res, str(path), "keys")


class Payload:
    """Unpickling this would run code; weights_only=True must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_a_checkpoint_with_code_in_it_is_refused_not_run(tmp_path: Path, em_data: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weights": Payload()}, path)
    res = run("train", str(DEMO), "--no-track", "--set", f"model.checkpoint={path}",
              "--set", f"dataset.root={em_data}", "--set", f"dataset.cache_dir={em_data / 'cache'}", cwd=tmp_path)
    assert_user_error(res, str(path), "weights-only")
    assert "pwned" not in res.stdout + res.stderr


def test_unwritable_storage_path_is_refused_before_anything_starts(tmp_path: Path, mlflow_server) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    res = run("sweep", str(DEMO), "--tracking-uri", mlflow_server.uri,
              "--set", f"search.storage_path={blocker / 'ray'}", cwd=tmp_path)
    assert_user_error(res, "search.storage_path", str(blocker))


def test_gpu_request_without_gpus_is_refused(tmp_path: Path, mlflow_server) -> None:
    res = run("sweep", str(DEMO), "--tracking-uri", mlflow_server.uri, "--set", "resources.gpu=1", cwd=tmp_path)
    assert_user_error(res, "GPU")
