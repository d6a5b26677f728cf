"""PA-SAM as released (github.com/xzz2/pa-sam): the released decoder checkpoint's layout loads
strictly through `model.adapter_checkpoint`, wrong files are refused naming the field, the hard
points are a plain top-k at evaluation and a Gumbel top-k in training, and the guiding image's
edge channel is OpenCV's Canny.

The released file (PA-SAM-L, `epoch_20.pth`, on Baidu Pan) is not downloaded: OFFICIAL_LAYOUT
below writes out, name by name, the state dict that the authors' `MaskDecoderPA` has (SAM's mask
decoder as segment-anything defines it, plus `guiding_conv` and `prompt_adapter` as the released
`model/mask_decoder_pa.py` defines them), from those definitions and not from segtune's module.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from segtune.config import ModelConfig
from segtune.errors import CheckpointError
from segtune.losses import dice_loss
from segtune.models import build_model
from segtune.models.pasam import (
    SAMPLE_POINTS,
    PaSamSegmenter,
    PromptAdapter,
    as_uint8,
    canny_edges,
    gumbel_topk,
)
from segtune.models.sam import SAM_VARIANTS, SamSpec, build_sam_modules
from segtune.prompts import PromptBatch
from tests.models.test_registry import discs

Shape = tuple[int, ...]


def _linear(prefix: str, out: int, inp: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)}


def _norm(prefix: str, n: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _attention(prefix: str, dim: int, internal: int) -> dict[str, Shape]:
    """segment-anything's `Attention`: q/k/v project to `internal`, out_proj back to `dim`."""
    shapes = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        shapes |= _linear(f"{prefix}.{proj}", internal, dim)
    return shapes | _linear(f"{prefix}.out_proj", dim, internal)


def _mlp(prefix: str, dims: list[int]) -> dict[str, Shape]:
    """segment-anything's `MLP`: `layers.i` maps dims[i] -> dims[i+1]."""
    shapes = {}
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        shapes |= _linear(f"{prefix}.layers.{i}", b, a)
    return shapes


def official_layout(dim: int = 256, mlp_dim: int = 2048, iou_hidden: int = 256) -> dict[str, Shape]:
    """The released `MaskDecoderPA`'s state dict, name -> shape. The released decoder is always
    256 wide (vit_b, vit_l and vit_h alike): a two-block two-way transformer (MLP 2048,
    attention downsample 2), 3 + 1 mask tokens, an IoU head of depth 3 and width 256."""
    half, quarter, eighth = dim // 2, dim // 4, dim // 8
    shapes: dict[str, Shape] = {}
    for i in range(2):
        block = f"transformer.layers.{i}"
        shapes |= _attention(f"{block}.self_attn", dim, dim)
        shapes |= _attention(f"{block}.cross_attn_token_to_image", dim, half)
        shapes |= _attention(f"{block}.cross_attn_image_to_token", dim, half)
        shapes |= _linear(f"{block}.mlp.lin1", mlp_dim, dim)
        shapes |= _linear(f"{block}.mlp.lin2", dim, mlp_dim)
        for n in range(1, 5):
            shapes |= _norm(f"{block}.norm{n}", dim)
    shapes |= _attention("transformer.final_attn_token_to_image", dim, half)
    shapes |= _norm("transformer.norm_final_attn", dim)
    shapes["iou_token.weight"] = (1, dim)
    shapes["mask_tokens.weight"] = (4, dim)
    # ConvTranspose2d weights are (in, out, kh, kw); LayerNorm2d at index 1.
    shapes |= {"output_upscaling.0.weight": (dim, quarter, 2, 2),
               "output_upscaling.0.bias": (quarter,)}
    shapes |= _norm("output_upscaling.1", quarter)
    shapes |= {"output_upscaling.3.weight": (quarter, eighth, 2, 2),
               "output_upscaling.3.bias": (eighth,)}
    for i in range(4):
        shapes |= _mlp(f"output_hypernetworks_mlps.{i}", [dim, dim, dim, eighth])
    shapes |= _mlp("iou_prediction_head", [dim, iou_hidden, iou_hidden, 4])
    # PA-SAM: the guiding convolution over the image and its edge channel (4 channels in) ...
    shapes |= {"guiding_conv.0.weight": (quarter, 4, 2, 2), "guiding_conv.0.bias": (quarter,)}
    shapes |= _norm("guiding_conv.1", quarter)
    shapes |= {"guiding_conv.3.weight": (dim, quarter, 2, 2), "guiding_conv.3.bias": (dim,)}
    shapes |= _norm("guiding_conv.4", dim)
    shapes |= {"guiding_conv.6.weight": (dim, dim, 1, 1), "guiding_conv.6.bias": (dim,)}
    # ... and the prompt adapter: two learned tokens, two MLPs 2*dim -> dim/4 -> dim/4 -> dim,
    # and a token-to-image attention like the transformer's.
    shapes["prompt_adapter.static_uncertain_token.weight"] = (1, dim)
    shapes["prompt_adapter.static_refined_token.weight"] = (1, dim)
    shapes |= _mlp("prompt_adapter.uncertain_mlp", [2 * dim, quarter, quarter, dim])
    shapes |= _mlp("prompt_adapter.refined_mlp", [2 * dim, quarter, quarter, dim])
    shapes |= _attention("prompt_adapter.cross_attn_token_to_image", dim, half)
    return shapes


OFFICIAL_LAYOUT = official_layout()

# A SAM with the real decoder (256 wide, MLP 2048, 8 heads) and the real 1024 input and 64x64
# embedding grid, but a one-block, 32-wide image encoder with windowed attention only: a vit_l
# encoder (300M parameters) costs minutes on two CPU cores and is not what these tests are about.
TEST_VARIANT = "test_l_decoder"
TEST_SPEC = SamSpec(embed_dim=32, depth=1, heads=1, global_attn=(), image_size=1024, prompt_dim=256,
                    window=14, decoder_mlp=2048, decoder_heads=8)


@pytest.fixture()
def l_decoder(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(SAM_VARIANTS, TEST_VARIANT, TEST_SPEC)
    return TEST_VARIANT


def _official_state(seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(shape, generator=gen) for k, shape in OFFICIAL_LAYOUT.items()}


def _save(tmp_path: Path, state: dict, name: str = "epoch_20.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def _point(x: float, y: float) -> PromptBatch:
    return PromptBatch(points=torch.tensor([[[x, y]]]), labels=torch.ones(1, 1, dtype=torch.int64))


def test_the_official_layout_has_the_released_decoders_152_tensors() -> None:
    # 120 of SAM's mask decoder, 10 of the guiding convolution, 22 of the prompt adapter.
    assert len(OFFICIAL_LAYOUT) == 152
    assert sum(k.startswith("guiding_conv.") for k in OFFICIAL_LAYOUT) == 10
    assert sum(k.startswith("prompt_adapter.") for k in OFFICIAL_LAYOUT) == 22


def test_released_layout_loads_strictly_and_predicts(tmp_path: Path, l_decoder: str) -> None:
    state = _official_state()
    path = _save(tmp_path, state)
    model = build_model(ModelConfig(name="pasam", variant=l_decoder, adapter_checkpoint=str(path),
                                    train="adapter"))
    assert isinstance(model, PaSamSegmenter)
    loaded = model.sam.mask_decoder.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    image = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        out = model(image, _point(60.0, 40.0))
        again = model(image, _point(60.0, 40.0))
    assert out.shape == (1, 1, 96, 128) and torch.isfinite(out).all()
    assert torch.equal(out, again)  # evaluation: plain top-k, nothing random

    # Training: the Gumbel top-k's straight-through weights carry gradient back to the
    # uncertainty branch, which reaches the final mask only through the sampled points.
    model.train()
    dice_loss(model(image, _point(60.0, 40.0)), torch.zeros(1, 1, 96, 128)).backward()
    grads = {n for n, p in model.named_parameters()
             if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("guiding_conv.0.", "prompt_adapter.uncertain_mlp.", "prompt_adapter.refined_mlp.",
                 "prompt_adapter.static_uncertain_token", "output_upscaling.", "mask_tokens"):
        assert any(n.startswith(f"sam.mask_decoder.{part}") for n in grads), part
    assert not any(n.startswith(("sam.image_encoder.", "sam.prompt_encoder.")) for n in grads)


def test_the_loaded_decoder_is_the_one_that_predicts(tmp_path: Path) -> None:
    # A tiny PA decoder's state dict, saved and loaded into a model with other weights, makes
    # that model predict what the source does.
    source = build_model(ModelConfig(name="pasam", variant="tiny", train="adapter")).eval()
    with torch.no_grad():
        for p in source.sam.mask_decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = _save(tmp_path, source.sam.mask_decoder.state_dict(), "tiny_pa.pth")
    loaded = build_model(ModelConfig(name="pasam", variant="tiny", train="adapter",
                                     adapter_checkpoint=str(path))).eval()
    fresh = build_model(ModelConfig(name="pasam", variant="tiny", train="adapter")).eval()
    images, _, points = discs()
    prompts = PromptBatch(points=points, labels=torch.ones(2, 1, dtype=torch.int64))
    with torch.no_grad():
        want = source(images, prompts)
        assert torch.allclose(loaded(images, prompts), want, atol=1e-5)
        assert not torch.allclose(fresh(images, prompts), want, atol=1e-3)


@pytest.mark.parametrize("break_it, named", [
    # the guiding convolution over RGB only, without the edge channel
    (lambda s: s.update({"guiding_conv.0.weight": torch.zeros(64, 3, 2, 2)}),
     "guiding_conv.0.weight"),
    # another name for the adapter
    (lambda s: s.update({k.replace("prompt_adapter.", "adapter."): s.pop(k)
                         for k in [k for k in s if k.startswith("prompt_adapter.")]}),
     "prompt_adapter.cross_attn_token_to_image"),
    # a DistributedDataParallel prefix
    (lambda s: s.update({f"module.{k}": s.pop(k) for k in list(s)}), "module."),
    # a decoder without PA-SAM's modules (SAM's own)
    (lambda s: [s.pop(k) for k in list(s) if k.startswith(("guiding_conv.", "prompt_adapter."))],
     "missing"),
], ids=["wrong_shape", "wrong_names", "ddp_prefix", "plain_sam_decoder"])
def test_a_checkpoint_of_another_layout_is_refused_naming_the_field(
        tmp_path: Path, l_decoder: str, break_it, named: str) -> None:
    state = _official_state()
    break_it(state)
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError) as exc:
        build_model(ModelConfig(name="pasam", variant=l_decoder, adapter_checkpoint=str(path)))
    msg = str(exc.value)
    assert msg.startswith("model.adapter_checkpoint: ") and str(path) in msg and named in msg
    assert "PA-SAM" in msg and "epoch_20.pth" in msg  # what was expected
    assert "\n" not in msg


def test_the_vit_l_release_does_not_fit_the_tiny_variant(tmp_path: Path) -> None:
    path = _save(tmp_path, _official_state())
    with pytest.raises(CheckpointError,
                       match=r"model\.adapter_checkpoint: .*variant tiny.*another shape"):
        build_model(ModelConfig(name="pasam", variant="tiny", adapter_checkpoint=str(path)))


def test_a_whole_sam_checkpoint_is_pointed_to_model_checkpoint(tmp_path: Path) -> None:
    path = _save(tmp_path, build_sam_modules(SAM_VARIANTS["tiny"]).state_dict(), "sam_tiny.pth")
    with pytest.raises(CheckpointError,
                       match=r"model\.adapter_checkpoint: .*belongs in model\.checkpoint"):
        build_model(ModelConfig(name="pasam", variant="tiny", adapter_checkpoint=str(path)))


@pytest.mark.parametrize("kind", ["missing", "not_weights", "not_a_dict"])
def test_a_missing_or_unreadable_file_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "epoch_20.pth"
    if kind == "not_weights":
        path.write_bytes(b"not a checkpoint")
    elif kind == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError) as exc:
        build_model(ModelConfig(name="pasam", variant="tiny", adapter_checkpoint=str(path)))
    msg = str(exc.value)
    assert msg.startswith("model.adapter_checkpoint: ") and str(path) in msg and "PA-SAM" in msg


def test_an_untrained_pasam_does_not_predict_what_its_sam_does() -> None:
    # PA-SAM's own modules start from PyTorch's default init, as in the released training: the
    # documents must not claim an untrained PA-SAM equals SAM. The SAM weights are the same.
    sam = build_model(ModelConfig(name="sam", variant="tiny", train="mask_decoder")).eval()
    pasam = build_model(ModelConfig(name="pasam", variant="tiny", train="adapter")).eval()
    assert all(torch.equal(pasam.sam.state_dict()[k], v) for k, v in sam.sam.state_dict().items())
    images, _, points = discs()
    prompts = PromptBatch(points=points, labels=torch.ones(2, 1, dtype=torch.int64))
    with torch.no_grad():
        assert not torch.allclose(pasam(images, prompts), sam(images, prompts), atol=1e-2)


# --- hard points: top-k at evaluation, Gumbel top-k in training ---------------------------------


def _adapter_inputs(n_cells: int = 64, dim: int = 16):
    gen = torch.Generator().manual_seed(3)
    score = torch.randn(1, n_cells, generator=gen)
    position = torch.randn(1, n_cells, dim, generator=gen)
    content = torch.randn(1, n_cells, dim, generator=gen)
    return score, position, content


def test_evaluation_picks_the_plain_top_k_in_raster_order() -> None:
    adapter = PromptAdapter(16, 2).eval()
    score, position, content = _adapter_inputs()
    pe, picked = adapter.pick(score, position, content)
    top = score[0].topk(SAMPLE_POINTS).indices.sort().values
    assert torch.equal(pe[0], position[0, top]) and torch.equal(picked[0], content[0, top])
    pe_neg, _ = adapter.pick(-score, position, content)
    bottom = (-score[0]).topk(SAMPLE_POINTS).indices.sort().values
    assert torch.equal(pe_neg[0], position[0, bottom])


def test_training_picks_by_gumbel_top_k_with_straight_through_weights() -> None:
    adapter = PromptAdapter(16, 2).train()
    score, position, content = _adapter_inputs()
    # Noisy: different draws pick different cells where the scores are close...
    torch.manual_seed(0)
    draws = {tuple(adapter.pick(score, position, content)[0][0, :, 0].tolist()) for _ in range(20)}
    assert len(draws) > 1
    # ...but a clear margin wins every time, and the weights are exactly k-hot in value.
    clear = torch.zeros(1, 64)
    clear[0, [3, 17, 40, 63]] = 30.0
    for _ in range(10):
        w = gumbel_topk(clear, SAMPLE_POINTS)
        assert torch.allclose(w, (clear > 0).float(), atol=1e-6)
    # The gradient reaches the score (the Gumbel softmaxes), unlike a hard top-k.
    s = score.clone().requires_grad_(True)
    pe, picked = adapter.pick(s, position, content)
    (pe.sum() + picked.sum()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_model_is_deterministic_in_eval_and_samples_in_training() -> None:
    model = build_model(ModelConfig(name="pasam", variant="tiny", train="adapter"))
    images, _, points = discs()
    prompts = PromptBatch(points=points, labels=torch.ones(2, 1, dtype=torch.int64))
    with torch.no_grad():
        model.eval()
        torch.manual_seed(0)
        a = model(images, prompts)
        torch.manual_seed(1)
        assert torch.equal(a, model(images, prompts))
        model.train()
        outs = []
        for seed in range(4):
            torch.manual_seed(seed)
            outs.append(model(images, prompts))
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_the_gated_mask_takes_refined_where_uncertain() -> None:
    model = build_model(ModelConfig(name="pasam", variant="tiny", train="adapter")).eval()
    images, _, points = discs()
    emb = model.encode(images)[:1]
    sx, sy, _ = model.geometry(256, 256)
    prompts = PromptBatch(points=points, labels=torch.ones(2, 1, dtype=torch.int64))
    pts, boxes = model.scaled_prompts(prompts, 0, sx, sy)
    enc = model.sam.prompt_encoder
    sparse, dense = enc(points=pts, boxes=boxes, masks=None)
    with torch.no_grad():
        masks, iou, maps = model.sam.mask_decoder(emb, enc.get_dense_pe(), sparse, dense,
                                                  model.guide_images(images[:1]), enc)
    g = model.grid
    assert masks.shape == (1, 1, 4 * g, 4 * g) and iou.shape == (1, 1)
    assert all(m.shape == (1, 1, g, g) for m in maps)
    sure = maps.uncertainty < 0.5
    assert torch.equal(maps.gated[sure], maps.coarse[sure])
    assert torch.equal(maps.gated[~sure], maps.refined[~sure])


# --- the guiding image's edge channel ---------------------------------------------------------


def test_the_normalised_image_is_cast_to_bytes_as_numpy_does() -> None:
    x = torch.tensor([-1.5, -0.2, 0.0, 2.7, -2.1, 1.99])
    assert as_uint8(x).tolist() == [255.0, 0.0, 0.0, 2.0, 254.0, 1.0]


def test_canny_marks_one_column_at_a_vertical_step_and_nothing_on_flat() -> None:
    img = torch.zeros(1, 3, 12, 10, dtype=torch.long)
    img[..., 4:] = 200
    edges = canny_edges(img)[0, 0]
    # Sobel's magnitude is 800 at columns 3 and 4; non-maximum suppression keeps the first.
    assert edges[:, 3].all() and edges.sum() == 12
    assert not canny_edges(torch.full((1, 3, 8, 8), 77))[0, 0].any()


def test_canny_matches_opencv_when_installed() -> None:
    # OpenCV is no dependency of segtune, only of its tests (the dev extra); canny_edges was
    # checked against opencv-python-headless 4.6.0 (the released code's) and 5.0.0.
    import cv2
    rng = np.random.default_rng(0)
    for _ in range(20):
        img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        want = cv2.Canny(img, 10, 100) > 0
        got = canny_edges(torch.from_numpy(img).permute(2, 0, 1)[None].long())[0, 0].numpy()
        assert (want == got).all()
