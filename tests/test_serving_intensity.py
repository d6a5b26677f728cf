"""A model trained on 16-bit images takes 16-bit requests: the pyfunc maps them as training did."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from segtune.config import load_config
from segtune.models import PROMPT_KINDS, build_model
from segtune.serving import SegtuneMaskModel, request_kinds
from tests.conftest import DEMO


def _served(intensity: str) -> SegtuneMaskModel:
    """The pyfunc as load_context leaves it, around a real tiny SAM and its config."""
    cfg = load_config(DEMO, [f"dataset.intensity={intensity}"])
    served = SegtuneMaskModel()
    served.cfg, served.device = cfg, torch.device("cpu")
    served.model = build_model(cfg.model).eval()
    served.kinds = request_kinds(PROMPT_KINDS[cfg.model.name])
    return served


def test_16_bit_request_is_mapped_by_the_training_window() -> None:
    served = _served("{window: [0, 4095]}")
    raw = np.random.default_rng(0).integers(0, 4096, size=(64, 64), dtype=np.uint16)
    eight = np.rint(raw.astype(np.float32) * 255.0 / 4095.0).astype(np.uint8)
    request = {"image": raw, "points": [[32, 32]]}
    got = served.predict(None, request)[0]
    assert np.array_equal(got, served.predict(None, {"image": eight, "points": [[32, 32]]})[0])
    # Clipping the raw values instead (what an `auto` model does) feeds the model other pixels.
    assert not np.array_equal(served._eight_bit(raw), np.clip(raw, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("image", [np.full((8, 8), 300, np.int64), np.full((8, 8), 12.0)])
def test_auto_models_clip_as_before(image: np.ndarray) -> None:
    served = _served("auto")
    assert np.array_equal(served._eight_bit(image), np.clip(image, 0, 255).astype(np.uint8))


def test_the_mapping_needs_none_of_the_datasets_dependencies() -> None:
    """A registered model's environment pins what serving needs, not cityscapesscripts & co.:
    the pyfunc's intensity mapping must not import segtune.data (whose package imports them)."""
    code = ("import sys; sys.modules['cityscapesscripts'] = None; "  # as if it were not installed
            "import numpy as np; from segtune.intensity import parse_intensity, to_uint8; "
            "print(to_uint8(np.array([[0, 4095]], np.uint16), parse_intensity({'window': [0, 4095]}), None)"
            ".tolist()); print('segtune.data' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[[0,", "255]]", "False"]
