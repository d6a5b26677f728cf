"""Every MODELS entry, as its tiny preset: shape, no-NaN, gradient, policy, learning and seeded-init
tests (timm-style, randomly initialised, no downloads).

The only per-family knowledge here is which prompt a family takes (`TEXT_FAMILIES`); policies
come from each model's own `policies`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.config import ModelConfig
from segtune.errors import ConfigError
from segtune.losses import dice_loss
from segtune.models import MODELS, Segmenter, build_model
from segtune.prompts import PromptBatch

TEXT_FAMILIES = {"clipseg"}  # prompted by text; every other family by points
# PA-SAM's adapter reads the image as well as its embedding, so only `forward` can decode.
DECODE_NEEDS_IMAGE = {"pasam"}
FAMILIES = sorted(MODELS)


def _model(family: str, policy: str = "full") -> Segmenter:
    return build_model(ModelConfig(name=family, variant="tiny", train=policy))


# (family, policy) for every policy each family declares; building the tiny presets is cheap.
PAIRS = [(f, p) for f in FAMILIES for p in _model(f).policies]


def discs(h: int = 256, w: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two uint8 images (B,1,H,W) of a dark disc on grey, the discs as masks, and their centres (B,1,2)."""
    yy, xx = np.mgrid[:h, :w]
    images, masks, points = [], [], []
    for cx, cy, r in ((0.4 * w, 0.45 * h, 0.16 * min(h, w)), (0.65 * w, 0.35 * h, 0.12 * min(h, w))):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img = np.full((h, w), 128, np.uint8)
        img[disc] = 30
        images.append(img[None])
        masks.append(disc[None].astype(np.float32))
        points.append([[cx, cy]])
    return (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)),
            torch.tensor(points, dtype=torch.float32))


def prompts_for(family: str, points: torch.Tensor) -> PromptBatch:
    if family in TEXT_FAMILIES:
        return PromptBatch(texts=["a dark disc"] * len(points))
    return PromptBatch(points=points, labels=torch.ones(points.shape[:2], dtype=torch.int64))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_is_small_and_declares_policies(family: str) -> None:
    model = _model(family)
    assert isinstance(model, Segmenter)
    assert model.policies and "full" in model.policies
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # CPU-test sized


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(256, 256), (200, 256)], ids=["256x256", "200x256"])
def test_output_shape_and_finite(family: str, size: tuple[int, int]) -> None:
    model = _model(family).eval()
    images, _, points = discs(*size)
    with torch.no_grad():
        out = model(images, prompts_for(family, points))
    assert out.shape == (2, 1, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0  # not a constant map


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_then_decode_is_forward(family: str) -> None:
    model = _model(family).eval()
    images, _, points = discs(200, 256)
    prompts = prompts_for(family, points)
    with torch.no_grad():
        full = model(images, prompts)
        emb = model.encode(images)
        if family in DECODE_NEEDS_IMAGE:
            with pytest.raises(RuntimeError, match="call the model"):
                model.decode(emb, prompts, (200, 256))
            return
        split = model.decode(emb, prompts, (200, 256))
    assert torch.allclose(split, full, atol=1e-5)


@pytest.mark.parametrize("family, policy", PAIRS)
def test_policy_freezes_the_rest_and_gradients_reach_what_trains(family: str, policy: str) -> None:
    model = _model(family, policy)
    trainable = {id(p) for p in model.trainable_parameters(policy)}
    assert trainable
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    assert set(model.trainable_state()) == {n for n, p in model.named_parameters() if p.requires_grad}
    images, masks, points = discs()
    dice_loss(model(images, prompts_for(family, points)), masks).backward()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    if policy == "full":
        assert trainable == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_adam_steps_lower_the_dice_loss(family: str) -> None:
    torch.manual_seed(0)
    model = _model(family, "full")
    images, masks, points = discs()
    prompts = prompts_for(family, points)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        initial = dice_loss(model(images, prompts), masks).item()
    for _ in range(20):
        loss = dice_loss(model(images, prompts), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = dice_loss(model(images, prompts), masks).item()
    assert final < initial - 0.05, (initial, final)


@pytest.mark.parametrize("family, policy", PAIRS)
def test_build_model_is_seeded_and_leaves_the_global_rng_alone(family: str, policy: str) -> None:
    before = torch.random.get_rng_state()
    a, b = _model(family, policy).state_dict(), _model(family, policy).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = next(v for k, v in a.items() if k.endswith("weight") and v.dim() == 2 and v.shape[0] > 1)
    assert w.std() > 0  # random init, not a constant


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_variant_is_a_config_error_naming_it(family: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.variant.*'vit_x'"):
        build_model(ModelConfig(name=family, variant="vit_x"))


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_policy_is_a_config_error_naming_it(family: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.train.*'bogus'"):
        _model(family, "bogus")


def test_unknown_family_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"model\.name.*'unet'") as exc:
        build_model(ModelConfig(name="unet", variant="tiny"))
    assert all(name in str(exc.value) for name in MODELS)
