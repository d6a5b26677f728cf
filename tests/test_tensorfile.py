"""segtune.tensorfile: the files it packs are ordinary safetensors files, read back by the
safetensors library itself, and a pack is a snapshot that later in-place changes do not reach."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from segtune.tensorfile import DTYPES, pack
from tracking.artifacts import sha256_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"t.{code}": (torch.randn(3, 5, generator=g) * 7).to(dtype) for dtype, code in DTYPES.items()}
    out["scalar"] = torch.tensor(4.0)  # Adam's step is a 0-dim tensor
    out["strided"] = torch.arange(24.0).reshape(4, 6).t()  # not contiguous
    out["empty"] = torch.zeros(0, 3)
    return out


def test_a_packed_file_reads_back_with_safetensors_exactly(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    digest = pack(tensors, {"note": "hello"}).write(path)
    got = load_file(str(path))
    assert got.keys() == tensors.keys()
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name], want), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "hello"}
    assert digest == sha256_file(path)  # the hash given for the manifest is the file's


def test_a_pack_is_a_snapshot(tmp_path: Path) -> None:
    w = torch.ones(4, 4)
    packed = pack({"w": w})
    w.add_(1.0)  # the next optimizer step, while the thread still writes
    packed.write(tmp_path / "w.safetensors")
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], torch.ones(4, 4))


def test_nothing_to_pack_is_still_a_valid_file(tmp_path: Path) -> None:
    pack({}).write(tmp_path / "e.safetensors")
    assert load_file(str(tmp_path / "e.safetensors")) == {}


def test_a_dtype_safetensors_cannot_hold_is_named() -> None:
    with pytest.raises(TypeError, match="z: .*complex"):
        pack({"z": torch.zeros(2, dtype=torch.complex64)})
