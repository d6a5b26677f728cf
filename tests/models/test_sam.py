"""segtune.models.sam and the families built on it (SAM, MedSAM, PA-SAM): policies, prompt
geometry, encoder caching, adapters, missing-checkpoint errors and official-checkpoint loading.

The tests every MODELS entry gets (shape, NaN, gradients, learning, seeded init) are in
test_registry.py.
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
from segtune.models import MODELS, build_model
from segtune.models.sam import SAM_VARIANTS, SamSegmenter, build_sam_modules
from segtune.prompts import PromptBatch
from tests.models.test_registry import discs

SAM_FAMILIES = [f for f in ("sam", "medsam", "pasam") if f in MODELS]
REAL_SAM = sorted(v for v, spec in SAM_VARIANTS.items() if spec.checkpoint_file is not None)
# (family, variant, the weights file its missing-checkpoint error must name)
NEEDS_WEIGHTS = ([("sam", v, SAM_VARIANTS[v].checkpoint_file) for v in REAL_SAM]
                 + [("medsam", "vit_b", "medsam_vit_b.pth"), ("pasam", "vit_b", "sam_vit_b_01ec64.pth")])


def _model(family: str = "sam", policy: str = "full", checkpoint: str | None = None) -> SamSegmenter:
    model = build_model(ModelConfig(name=family, variant="tiny", train=policy, checkpoint=checkpoint))
    assert isinstance(model, SamSegmenter)
    return model


def _discs(h: int = 256, w: int = 256) -> tuple[torch.Tensor, torch.Tensor, PromptBatch]:
    """test_registry's two discs, with their centres as one positive point prompt each."""
    images, masks, points = discs(h, w)
    return images, masks, PromptBatch(points=points, labels=torch.ones(2, 1, dtype=torch.int64))


def _box_prompts(masks: torch.Tensor) -> PromptBatch:
    boxes = []
    for m in masks[:, 0]:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return PromptBatch(boxes=torch.tensor(boxes, dtype=torch.float32))


@pytest.mark.parametrize("family", SAM_FAMILIES)
def test_box_prompts_give_the_input_shape(family: str) -> None:
    model = _model(family).eval()
    images, masks, _ = _discs(200, 256)
    with torch.no_grad():
        out = model(images, _box_prompts(masks))
    assert out.shape == (2, 1, 200, 256) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", SAM_FAMILIES)
def test_prompts_are_in_input_pixels_at_any_input_size(family: str) -> None:
    # A 2x nearest upscale of an image, with the prompt at 2x the coordinates, must reach the
    # encoders as the same image and the same prompt: the model resizes to its encoder's input
    # and scales prompts with it. (Bilinear 2x downsampling of a 2x nearest upscale is exact.)
    # MedSAM squashes to a square, so it gets a square image. The property is the geometry, so
    # the image resize is plain bilinear here: the real one (antialiased, on 8-bit levels, as the
    # reference pipelines resize) is checked against them in test_reference_equivalence.py.
    model = _model(family).eval()
    model.resize = lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    size = (200, 256) if model.keep_aspect else (256, 256)
    images, _, prompts = _discs(*size)
    big = images.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    big_prompts = PromptBatch(points=prompts.points * 2, labels=prompts.labels)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [model.sam.image_encoder.register_forward_pre_hook(lambda m, a: seen.append(("image", a[0]))),
             model.sam.prompt_encoder.register_forward_pre_hook(
                 lambda m, a, kw: seen.append(("points", kw["points"][0])), with_kwargs=True)]
    with torch.no_grad():
        small_out = model(images, prompts)
        half = len(seen)
        big_out = model(big, big_prompts)
        moved = model(images, PromptBatch(points=prompts.points.flip(0), labels=prompts.labels))
    for h in hooks:
        h.remove()
    assert [k for k, _ in seen[:half]] == [k for k, _ in seen[half : 2 * half]]
    for (_, a), (_, b) in zip(seen[:half], seen[half : 2 * half], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert big_out.shape == (2, 1, 2 * size[0], 2 * size[1])
    if model.keep_aspect:
        # SAM resizes its low-resolution map through the encoder's frame, so the two outputs are
        # one map resized twice; MedSAM resizes it straight to the input size, as its recipe does.
        up = F.interpolate(small_out, size=big_out.shape[-2:], mode="bilinear", align_corners=False)
        assert torch.allclose(up, big_out, atol=1e-4 * small_out.abs().max().item())
    # ...and the prompt matters: the two images' points swapped give other predictions.
    scale = small_out.abs().max().item()
    assert (moved - small_out).abs().max() > 1e-2 * scale


def test_medsam_scales_x_and_y_apart_for_a_non_square_input() -> None:
    # MedSAM resizes (h, w) to a square, so a point at (x, y) goes to (x * S/w, y * S/h).
    model = _model("medsam")
    sx, sy, resized = model.geometry(200, 256)
    assert resized == (model.image_size, model.image_size)
    assert (sx, sy) == (model.image_size / 256, model.image_size / 200)
    sam = _model("sam")
    s, s2, resized = sam.geometry(200, 256)
    assert s == s2 == sam.image_size / 256 and resized == (200, 256)


@pytest.mark.parametrize("family", [f for f in SAM_FAMILIES if "mask_decoder" in _model(f).policies])
def test_mask_decoder_policy_trains_only_the_decoder(family: str) -> None:
    model = _model(family, "mask_decoder")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {f"sam.mask_decoder.{n}" for n, _ in model.sam.mask_decoder.named_parameters()}
    assert trainable == decoder


def test_full_policy_gradients_reach_every_part_of_sam() -> None:
    model = _model("sam", "full")
    images, masks, prompts = _discs()
    dice_loss(model(images, prompts), masks).backward()
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    encoder = {n for n, _ in model.named_parameters() if n.startswith("sam.image_encoder.")}
    assert encoder and encoder <= nonzero  # all the way down to the patch embedding
    assert any(n.startswith("sam.prompt_encoder.") for n in nonzero)
    assert any(n.startswith("sam.mask_decoder.transformer.") for n in nonzero)
    assert any(n.startswith("sam.mask_decoder.output_upscaling.") for n in nonzero)


def test_adapter_policy_trains_the_encoder_adapters_and_the_decoder() -> None:
    model = _model("sam", "adapter")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {f"sam.mask_decoder.{n}" for n, _ in model.sam.mask_decoder.named_parameters()}
    adapters = trainable - decoder
    assert decoder <= trainable
    assert adapters and all(".adapter." in n for n in adapters)
    blocks = {n.split(".adapter.")[0] for n in adapters}
    assert len(blocks) == len(model.sam.image_encoder.blocks)  # one per encoder block
    # The checkpointed weights name the adapters once each.
    assert set(model.trainable_state()) == trainable


def test_an_untrained_adapter_changes_nothing() -> None:
    # The adapters' up-projection starts at zero, so an adapted SAM computes what SAM does.
    plain, adapted = _model("sam", "full").eval(), _model("sam", "adapter").eval()
    images, _, prompts = _discs(200, 256)
    with torch.no_grad():
        assert torch.allclose(adapted(images, prompts), plain(images, prompts), atol=1e-6)


def test_adapters_exist_only_under_the_adapter_policy() -> None:
    with pytest.raises(ConfigError, match=r"model\.train.*'adapter'"):
        _model("sam", "full").set_policy("adapter")


def test_set_policy_returns_the_trainable_parameters_and_can_switch_back() -> None:
    model = _model("sam", "mask_decoder")
    params = model.set_policy("full")
    assert len(params) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    params = model.set_policy("mask_decoder")
    assert {id(p) for p in params} == {id(p) for p in model.sam.mask_decoder.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}


def test_decoder_training_on_a_cached_encoding_lowers_the_dice_loss() -> None:
    # With the encoder frozen, its output is computed once (`encode`) and only `decode` trains.
    torch.manual_seed(0)
    model = _model("sam", "mask_decoder")
    images, masks, prompts = _discs()
    size = tuple(images.shape[-2:])
    with torch.no_grad():
        emb = model.encode(images)
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
        assert torch.allclose(model.decode(emb, prompts, size), model(images, prompts), atol=1e-5)
    assert final < initial - 0.05, (initial, final)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("sam.mask_decoder."))


class _BuiltTheNetwork(Exception):
    pass


@pytest.mark.parametrize("family, variant, weights", NEEDS_WEIGHTS)
def test_real_variant_without_checkpoint_names_the_file_before_building(family: str, variant: str,
                                                                        weights: str) -> None:
    # The error must come before the network is built: vit_h is 630M parameters (2.5 GB) to
    # allocate and initialise only to say that a setting is missing. A global parameter
    # registration hook stops the build at its first parameter, so this fails fast.
    def stop(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
        raise _BuiltTheNetwork(f"{family} {variant} built {module.__class__.__name__}.{name} "
                               "before reporting the missing checkpoint")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(stop)
    try:
        with pytest.raises(ConfigError, match=r"model\.checkpoint") as exc:
            build_model(ModelConfig(name=family, variant=variant))
    finally:
        handle.remove()
    assert weights in str(exc.value)


def test_medsam_has_only_vit_b_and_tiny() -> None:
    with pytest.raises(ConfigError, match=r"model\.variant.*'vit_l'"):
        build_model(ModelConfig(name="medsam", variant="vit_l", checkpoint="whatever.pth"))


# --- official-format checkpoints (a plain torch.save of Sam's state dict) ---------------------


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """A tiny SAM state dict with other weights than build_model's seeded init."""
    torch.manual_seed(1234)
    return build_sam_modules(SAM_VARIANTS["tiny"]).state_dict()


@pytest.fixture()
def tiny_file(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state, path)
    return path


@pytest.mark.parametrize("family", SAM_FAMILIES)
def test_tiny_state_dict_file_round_trips(family: str, tiny_file: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    model = _model(family, _model(family).policies[0], checkpoint=str(tiny_file))
    loaded = model.sam.state_dict()
    assert loaded.keys() >= tiny_state.keys()
    # build_model's seeded init does not overwrite the loaded weights.
    assert all(torch.equal(loaded[k], tiny_state[k]) for k in tiny_state)


def test_adapter_policy_loads_an_official_checkpoint(tiny_file: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    # The official files know no adapters; they are added after loading, and change nothing yet.
    adapted = _model("sam", "adapter", checkpoint=str(tiny_file)).eval()
    plain = _model("sam", "full", checkpoint=str(tiny_file)).eval()
    assert all(torch.equal(adapted.sam.state_dict()[k], v) for k, v in tiny_state.items())
    images, _, prompts = _discs()
    with torch.no_grad():
        assert torch.allclose(adapted(images, prompts), plain(images, prompts), atol=1e-6)


def _save(tmp_path: Path, name: str, state: dict) -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_missing_key_is_named(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    del state["mask_decoder.iou_token.weight"]
    path = _save(tmp_path, "missing.pth", state)
    with pytest.raises(CheckpointError) as exc:
        _model(checkpoint=str(path))
    msg = str(exc.value)
    assert str(path) in msg and "missing" in msg and "mask_decoder.iou_token.weight" in msg


def test_unexpected_key_is_named(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = _save(tmp_path, "extra.pth", {**tiny_state, "adapter.scale": torch.ones(3)})
    with pytest.raises(CheckpointError) as exc:
        _model(checkpoint=str(path))
    msg = str(exc.value)
    assert str(path) in msg and "unexpected" in msg and "adapter.scale" in msg


def test_key_of_another_shape_is_named(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = _save(tmp_path, "shape.pth", {**tiny_state, "mask_decoder.iou_token.weight": torch.zeros(1, 7)})
    with pytest.raises(CheckpointError, match=r"another shape.*mask_decoder\.iou_token\.weight"):
        _model(checkpoint=str(path))


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
    else:  # a download that failed after creating the file
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        _model(checkpoint=str(path))
    assert str(path) in str(exc.value)
    assert "weights-only" in str(exc.value)


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "sam_vit_b_01ec64.pth"
    with pytest.raises(CheckpointError, match="does not exist") as exc:
        _model(checkpoint=str(path))
    assert str(path) in str(exc.value)
