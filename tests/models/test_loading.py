"""Real loading paths: official SAM key layout, a MedSAM-style state dict, CLIPSeg from a directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything import sam_model_registry

from segtune.config import ModelConfig
from segtune.errors import CheckpointError
from segtune.models import build_model
from segtune.models.sam import SAM_VARIANTS, build_sam_modules
from segtune.prompts import PromptBatch


def test_real_size_vit_b_has_segment_anythings_keys_and_shapes() -> None:
    ours = build_sam_modules(SAM_VARIANTS["vit_b"]).state_dict()
    official = sam_model_registry["vit_b"](checkpoint=None).state_dict()
    assert ours.keys() == official.keys()
    assert all(ours[k].shape == official[k].shape for k in ours)


def test_medsam_style_state_dict_loads_with_medsam_preprocessing(tmp_path: Path) -> None:
    # MedSAM ships a plain SAM state dict; write one (tiny) the way it is saved, then load it.
    torch.manual_seed(1)
    state = build_sam_modules(SAM_VARIANTS["tiny"]).state_dict()
    path = tmp_path / "medsam_vit_b.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(name="medsam", variant="tiny", checkpoint=str(path), train="mask_decoder"))
    loaded = model.sam.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    image = torch.rand(1, 3, 100, 300) * 255
    box = PromptBatch(boxes=torch.tensor([[20.0, 10.0, 120.0, 60.0]]))
    assert model(image, box).shape == (1, 1, 100, 300)
    # MedSAM's input is min-max scaled to [0, 1] over the whole image, not mean/std normalised.
    x = model.preprocess(image)
    assert x.min().item() == pytest.approx(0.0) and x.max().item() == pytest.approx(1.0)


def test_clipseg_loads_from_a_save_pretrained_directory(tmp_path: Path) -> None:
    tiny = build_model(ModelConfig(name="clipseg", variant="tiny", train="decoder"))
    tiny.model.save_pretrained(tmp_path / "clipseg")
    tiny.tokenizer.save_pretrained(tmp_path / "clipseg")
    loaded = build_model(ModelConfig(name="clipseg", variant="rd64-refined", checkpoint=str(tmp_path / "clipseg"),
                                     train="decoder"))
    image = torch.rand(2, 1, 64, 64) * 255
    prompts = PromptBatch(texts=["a", "b"])
    with torch.no_grad():
        assert torch.allclose(tiny(image, prompts), loaded(image, prompts), atol=1e-5)


def test_clipseg_from_a_missing_directory_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    with pytest.raises(CheckpointError, match="no-such-model"):
        build_model(ModelConfig(name="clipseg", variant="rd64-refined", checkpoint=str(missing), train="decoder"))


def test_clipseg_runs_at_the_processors_size_not_the_vision_configs(tmp_path: Path) -> None:
    """The released checkpoints' vision config says 224; their processor resizes to 352."""
    import json

    from segtune.models.clipseg import processor_size

    assert processor_size("CIDAS/clipseg-rd64-refined", 224) == 352  # a hub id: the released size
    assert processor_size(tmp_path, 224) == 352  # a saved released model without its processor
    assert processor_size(tmp_path, 128) == 128  # another architecture keeps its own size
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 288, "width": 288}}))
    assert processor_size(tmp_path, 224) == 288
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 320}))
    assert processor_size(tmp_path, 224) == 320
