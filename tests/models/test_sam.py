"""Model families behind the Segmenter interface, with SAM's tiny preset: shapes, gradients,
policies, learning, seeded init, errors and official-checkpoint loading.

Tests over `MODELS` take each family's tiny variant from `TINY`; a family added to MODELS
without a tiny preset fails `test_every_family_has_a_tiny_variant`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segtune.config import ModelConfig
from segtune.errors import CheckpointError, ConfigError
from segtune.losses import dice_loss
from segtune.models import MODELS, Segmenter, build_model
from segtune.models.sam import SAM_VARIANTS, build_sam
from segtune.prompts import PromptBatch

TINY = {"sam": "tiny"}
FAMILIES = sorted(MODELS)
REAL_SAM = sorted(v for v, spec in SAM_VARIANTS.items() if spec.checkpoint_file is not None)


def _model(family: str, policy: str = "full") -> Segmenter:
    return build_model(ModelConfig(name=family, variant=TINY[family], train=policy))


def _discs(h: int = 256, w: int = 256) -> tuple[torch.Tensor, torch.Tensor, PromptBatch]:
    """Two uint8 images (B,1,H,W): a dark disc on grey; the mask is the disc; a point at its centre."""
    yy, xx = np.mgrid[:h, :w]
    images, masks, points = [], [], []
    for cx, cy, r in ((0.4 * w, 0.45 * h, 0.16 * min(h, w)), (0.65 * w, 0.35 * h, 0.12 * min(h, w))):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img = np.full((h, w), 128, np.uint8)
        img[disc] = 30
        images.append(img[None])
        masks.append(disc[None].astype(np.float32))
        points.append([[cx, cy]])
    prompts = PromptBatch(points=torch.tensor(points, dtype=torch.float32),
                          labels=torch.ones(2, 1, dtype=torch.int64))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), prompts


def _box_prompts(masks: torch.Tensor) -> PromptBatch:
    boxes = []
    for m in masks[:, 0]:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return PromptBatch(boxes=torch.tensor(boxes, dtype=torch.float32))


def test_every_family_has_a_tiny_variant() -> None:
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(256, 256), (200, 256)], ids=["256x256", "200x256"])
def test_output_shape_and_finite(family: str, size: tuple[int, int]) -> None:
    model = _model(family).eval()
    images, _, prompts = _discs(*size)
    with torch.no_grad():
        out = model(images, prompts)
    assert out.shape == (2, 1, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0  # not a constant map


@pytest.mark.parametrize("family", FAMILIES)
def test_box_prompts_give_the_same_shape(family: str) -> None:
    model = _model(family).eval()
    images, masks, _ = _discs(200, 256)
    with torch.no_grad():
        out = model(images, _box_prompts(masks))
    assert out.shape == (2, 1, 200, 256) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_in_input_pixels_at_any_input_size(family: str) -> None:
    # A 2x nearest upscale of an image, with the prompt at 2x the coordinates, must give the
    # same prediction, upscaled: the model resizes to its own input size and scales prompts
    # with it. (Bilinear 2x downsampling of a 2x nearest upscale is exact, and both outputs
    # come from one low-resolution map resized to the input size.)
    model = _model(family).eval()
    images, _, prompts = _discs(200, 256)
    big = images.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    big_prompts = PromptBatch(points=prompts.points * 2, labels=prompts.labels)
    with torch.no_grad():
        small_out = model(images, prompts)
        big_out = model(big, big_prompts)
        moved = model(images, PromptBatch(points=prompts.points.flip(0), labels=prompts.labels))
    assert big_out.shape == (2, 1, 400, 512)
    up = F.interpolate(small_out, size=(400, 512), mode="bilinear", align_corners=False)
    scale = small_out.abs().max().item()
    assert torch.allclose(up, big_out, atol=1e-4 * scale)
    # ...and the prompt matters: the two images' points swapped give other predictions.
    assert (moved - small_out).abs().max() > 1e-2 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_part_under_full(family: str) -> None:
    model = _model(family, "full")
    assert all(p.requires_grad for p in model.parameters())
    images, masks, prompts = _discs()
    dice_loss(model(images, prompts), masks).backward()
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if family == "sam":
        encoder = {n for n, _ in model.named_parameters() if n.startswith("sam.image_encoder.")}
        assert encoder and encoder <= nonzero  # all the way down to the patch embedding
        assert "sam.image_encoder.patch_embed.proj.weight" in nonzero
        assert any(n.startswith("sam.prompt_encoder.") for n in nonzero)
        assert any(n.startswith("sam.mask_decoder.transformer.") for n in nonzero)
        assert any(n.startswith("sam.mask_decoder.output_upscaling.") for n in nonzero)


def test_sam_mask_decoder_policy_trains_only_the_decoder() -> None:
    model = _model("sam", "mask_decoder")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {f"sam.mask_decoder.{n}" for n, _ in model.sam.mask_decoder.named_parameters()}
    assert trainable == decoder
    assert set(model.trainable_state()) == decoder
    images, masks, prompts = _discs()
    dice_loss(model(images, prompts), masks).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in decoder)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in decoder)


def test_sam_set_policy_returns_the_trainable_parameters_and_can_switch_back() -> None:
    model = _model("sam", "mask_decoder")
    params = model.set_policy("full")
    assert len(params) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    params = model.set_policy("mask_decoder")
    assert {id(p) for p in params} == {id(p) for p in model.sam.mask_decoder.parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_adam_steps_lower_the_dice_loss(family: str) -> None:
    # The decoder-only policy with the frozen encoder's output cached (as `encode` allows)
    # keeps this to seconds on a CPU; the full policy's gradients are checked above.
    torch.manual_seed(0)
    model = _model(family, "mask_decoder")
    images, masks, prompts = _discs()
    with torch.no_grad():
        emb = model.encode(images)
    size = tuple(images.shape[-2:])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        initial = dice_loss(model.decode(emb, prompts, size), masks).item()
    for _ in range(20):
        loss = dice_loss(model.decode(emb, prompts, size), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = dice_loss(model.decode(emb, prompts, size), masks).item()
        # The cached path is the model's forward.
        assert torch.allclose(model.decode(emb, prompts, size), model(images, prompts), atol=1e-5)
    assert final < initial - 0.05, (initial, final)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_is_seeded_and_leaves_the_global_rng_alone(family: str) -> None:
    before = torch.random.get_rng_state()
    a, b = _model(family).state_dict(), _model(family).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Random init, not a constant: two parameters of one shape differ.
    w = [v for k, v in a.items() if k.endswith("weight") and v.dim() == 2]
    assert not torch.equal(w[0], torch.zeros_like(w[0]))


@pytest.mark.parametrize("field, value, match", [
    ("name", "unet", r"model\.name.*'unet'"),
    ("variant", "vit_x", r"model\.variant.*'vit_x'"),
    ("train", "adapter", r"model\.train.*'adapter'"),
])
def test_unknown_name_variant_or_policy_is_a_config_error(field: str, value: str, match: str) -> None:
    kwargs = {"name": "sam", "variant": "tiny", "train": "full", field: value}
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(**kwargs))


class _BuiltTheNetwork(Exception):
    pass


@pytest.mark.parametrize("variant", REAL_SAM)
def test_real_variant_without_checkpoint_names_the_file_before_building(variant: str) -> None:
    # The error must come before the network is built: vit_h is 630M parameters (2.5 GB) to
    # allocate and initialise only to say that a setting is missing. A global parameter
    # registration hook stops the build at its first parameter, so this fails fast.
    def stop(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
        raise _BuiltTheNetwork(f"build_sam({variant!r}) built {module.__class__.__name__}.{name} "
                               "before reporting the missing checkpoint")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(stop)
    try:
        with pytest.raises(ConfigError, match=r"model\.checkpoint") as exc:
            build_sam(variant)
    finally:
        handle.remove()
    assert SAM_VARIANTS[variant].checkpoint_file in str(exc.value)


def test_vit_b_checkpoint_name_is_the_official_one() -> None:
    assert SAM_VARIANTS["vit_b"].checkpoint_file == "sam_vit_b_01ec64.pth"


# --- official-format checkpoints (a plain torch.save of Sam's state dict) ---------------------


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)  # other weights than build_model's seeded init
    return build_sam("tiny").sam.state_dict()


def test_tiny_state_dict_file_round_trips(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state, path)
    loaded = build_sam("tiny", checkpoint=str(path)).sam.state_dict()
    assert loaded.keys() == tiny_state.keys()
    assert all(torch.equal(loaded[k], tiny_state[k]) for k in loaded)
    # ...through build_model too, whose seeded init does not overwrite the loaded weights.
    model = build_model(ModelConfig(name="sam", variant="tiny", checkpoint=str(path)))
    assert all(torch.equal(model.sam.state_dict()[k], tiny_state[k]) for k in tiny_state)


def test_missing_key_is_named(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        build_sam("tiny", checkpoint=str(path))
    msg = str(exc.value)
    assert "missing.pth" in msg and "missing" in msg and "mask_decoder.iou_token.weight" in msg


def test_unexpected_key_is_named(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = {**tiny_state, "adapter.scale": torch.ones(3)}
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        build_sam("tiny", checkpoint=str(path))
    msg = str(exc.value)
    assert "extra.pth" in msg and "unexpected" in msg and "adapter.scale" in msg


def test_key_of_another_shape_is_named(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = {**tiny_state, "mask_decoder.iou_token.weight": torch.zeros(1, 7)}
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"another shape.*mask_decoder\.iou_token\.weight"):
        build_sam("tiny", checkpoint=str(path))


class NotWeights:
    """A custom class: pickling an instance makes a file that weights-only loading refuses."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@pytest.mark.parametrize("kind", ["custom_object", "random_bytes", "empty"])
def test_unreadable_or_unsafe_files_are_refused_naming_the_path(
        tmp_path: Path, tiny_state: dict[str, torch.Tensor], kind: str) -> None:
    path = tmp_path / f"{kind}.pth"
    if kind == "custom_object":
        torch.save({**tiny_state, "extra": NotWeights()}, path)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        build_sam("tiny", checkpoint=str(path))
    assert str(path) in str(exc.value)
    assert "weights-only" in str(exc.value)


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "sam_vit_b_01ec64.pth"
    with pytest.raises(CheckpointError, match="does not exist") as exc:
        build_sam("tiny", checkpoint=str(path))
    assert str(path) in str(exc.value)
