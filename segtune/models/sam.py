"""SAM (segment-anything) behind segtune's model interface.

Built from `segment_anything.modeling` classes, as its `build_sam.py` does: the official
variants (`vit_b`, `vit_l`, `vit_h`) with the official checkpoint files, and `tiny`, a
randomly initialised SAM at 256x256 for tests and the demo. Training calls the image encoder,
prompt encoder and mask decoder directly, because `Sam.forward` runs under `torch.no_grad()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from segtune.config import ModelConfig
from segtune.errors import CheckpointError, ConfigError
from segtune.models.base import Segmenter, load_state_strict
from segtune.prompts import PromptBatch


@dataclass(frozen=True)
class SamSpec:
    """The shape of one SAM variant (segment-anything's `_build_sam` arguments, plus size)."""

    embed_dim: int
    depth: int
    heads: int
    global_attn: tuple[int, ...]
    image_size: int = 1024
    prompt_dim: int = 256
    window: int = 14
    decoder_mlp: int = 2048
    decoder_heads: int = 8
    checkpoint_file: str | None = None


SAM_VARIANTS: dict[str, SamSpec] = {
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11), checkpoint_file="sam_vit_b_01ec64.pth"),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23), checkpoint_file="sam_vit_l_0b3195.pth"),
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31), checkpoint_file="sam_vit_h_4b8939.pth"),
    # A few hundred thousand parameters: trains on two CPU cores in seconds per epoch.
    "tiny": SamSpec(64, 2, 2, (1,), image_size=256, prompt_dim=64, window=8, decoder_mlp=256, decoder_heads=2),
}


def build_sam_modules(spec: SamSpec) -> Sam:
    """A `Sam` assembled from its three parts, like segment-anything's `_build_sam`."""
    patch = 16
    grid = spec.image_size // patch
    encoder = ImageEncoderViT(
        depth=spec.depth, embed_dim=spec.embed_dim, img_size=spec.image_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec.heads, patch_size=patch,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=spec.global_attn,
        window_size=spec.window, out_chans=spec.prompt_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_dim, image_embedding_size=(grid, grid),
        input_image_size=(spec.image_size, spec.image_size), mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=spec.prompt_dim,
                                      mlp_dim=spec.decoder_mlp, num_heads=spec.decoder_heads),
        transformer_dim=spec.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=spec.prompt_dim,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


class ParallelAdapter(nn.Module):
    """A bottleneck beside an encoder block's MLP (AdaptFormer-style): `mlp(x) + up(gelu(down(x)))`.

    `up` starts at zero, so an adapted SAM computes exactly what the plain one does until trained.
    """

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = max(4, int(dim * ratio))
        self.down, self.up = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


def add_adapters(sam: Sam) -> nn.ModuleList:
    """Attach a ParallelAdapter to every encoder block (as `blocks.N.adapter`), via a forward hook
    on the block's MLP, so SAM's own state-dict keys stay as the official checkpoints name them."""
    adapters = nn.ModuleList()
    for block in sam.image_encoder.blocks:
        block.adapter = ParallelAdapter(block.mlp.lin1.in_features)
        block.mlp.register_forward_hook(lambda mod, args, out, a=block.adapter: out + a(args[0]))
        adapters.append(block.adapter)
    return adapters


class SamSegmenter(Segmenter):
    """SAM with batched training-friendly calls: images + point/box prompts -> mask logits.

    `keep_aspect` is SAM's ResizeLongestSide + padding; MedSAM instead resizes to a square.
    """

    policies = ("full", "mask_decoder", "adapter")
    cacheable_encoder = True

    def __init__(self, sam: Sam, *, keep_aspect: bool = True):
        super().__init__()
        self.sam = sam
        self.image_size = sam.image_encoder.img_size
        self.keep_aspect = keep_aspect
        self.adapters: nn.ModuleList | None = None

    def trainable_parameters(self, policy: str) -> list[nn.Parameter]:
        if policy == "full":
            return list(self.parameters())
        if policy == "mask_decoder":
            return list(self.sam.mask_decoder.parameters())
        if policy == "adapter" and self.adapters is not None:
            return list(self.adapters.parameters()) + list(self.sam.mask_decoder.parameters())
        raise ConfigError(f"model.train: {type(self).__name__} has no policy {policy!r} here; "
                          f"expected one of {', '.join(self.policies)}")

    def encoder_state(self) -> dict[str, torch.Tensor]:
        state = {f"image_encoder.{k}": v for k, v in self.sam.image_encoder.state_dict().items()}
        state.update(pixel_mean=self.sam.pixel_mean, pixel_std=self.sam.pixel_std)
        return state

    def encoder_trains(self) -> bool:
        # The encoder adapters live inside the image encoder: `adapter` trains it too.
        return any(p.requires_grad for p in self.sam.image_encoder.parameters())

    def geometry(self, h: int, w: int) -> tuple[float, float, tuple[int, int]]:
        """(x scale, y scale, resized size) from an input of size (h, w) to the encoder's input."""
        if not self.keep_aspect:
            return self.image_size / w, self.image_size / h, (self.image_size, self.image_size)
        # SamPredictor's ResizeLongestSide: sides rounded half up, prompts scaled per axis by the
        # rounded sizes (for 601x799 the two scales differ in the fourth digit).
        s = self.image_size / max(h, w)
        rh, rw = int(h * s + 0.5), int(w * s + 0.5)
        return rw / w, rh / h, (rh, rw)

    def resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """0..255 images to the encoder's frame as SamPredictor's ResizeLongestSide does it: an
        antialiased bilinear resize (PIL), rounded back to 8-bit levels."""
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x.round().clamp(0, 255)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's pixel mean/std on 0..255 input."""
        return (x - self.sam.pixel_mean) / self.sam.pixel_std

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8-range images `(B,C,H,W)` -> encoder input: resized, normalised, padded."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        _, _, size = self.geometry(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = self.resize(x, size)
        x = self.normalise(x)
        return F.pad(x, (0, self.image_size - x.shape[-1], 0, self.image_size - x.shape[-2]))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(self.preprocess(images))

    def scaled_prompts(self, prompts: PromptBatch, i: int, sx: float, sy: float):
        """Image i's points and box in encoder coordinates, as SAM's prompt encoder takes them."""
        scale = torch.tensor([sx, sy], device=self.sam.pixel_mean.device)
        points = None
        if prompts.points is not None:
            points = (prompts.points[i : i + 1] * scale, prompts.labels[i : i + 1])
        boxes = None if prompts.boxes is None else prompts.boxes[i : i + 1] * scale.repeat(2)
        return points, boxes

    def low_res_logits(self, embeddings: torch.Tensor, prompts: PromptBatch, sx: float, sy: float,
                       images: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's low-resolution mask logits `(B,1,4h,4w)`, one image at a time.

        SAM's decoder pairs one image with many prompts; a training batch is many images with
        one prompt each, so decode image by image.
        """
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        out = []
        for i in range(embeddings.shape[0]):
            points, boxes = self.scaled_prompts(prompts, i, sx, sy)
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, _ = self.sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1], image_pe=dense_pe,
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            out.append(low_res)
        return torch.cat(out)

    def postprocess(self, low: torch.Tensor, resized: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits -> the encoder frame -> crop the padding -> the input size."""
        masks = F.interpolate(low, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : resized[0], : resized[1]]
        return F.interpolate(masks, size, mode="bilinear", align_corners=False)

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch, size: tuple[int, int]) -> torch.Tensor:
        sx, sy, resized = self.geometry(*size)
        return self.postprocess(self.low_res_logits(embeddings, prompts, sx, sy), resized, size)


class MedSamSegmenter(SamSegmenter):
    """MedSAM: SAM vit_b fine-tuned on medical images, with its own preprocessing.

    The image is resized to a 1024x1024 square (aspect not kept) and min-max scaled to [0, 1]
    per image, with no mean/std; prompts are boxes, one mask per box.
    """

    def __init__(self, sam: Sam):
        super().__init__(sam, keep_aspect=False)

    def resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """As MedSAM's inference recipe resizes (skimage, cubic spline, anti-aliased, kept within
        the image's own range, then cast to uint8, which truncates): torch's antialiased bicubic
        comes closest on the GPU (tests/models/test_reference_equivalence.py says how close)."""
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        y = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return torch.minimum(torch.maximum(y, lo), hi).floor()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp(min=1e-8)

    def postprocess(self, low: torch.Tensor, resized: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits straight to the input size, as MedSAM's recipe does (no padding to crop)."""
        return F.interpolate(low, size, mode="bilinear", align_corners=False)


def _load_official(sam: Sam, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: {path} does not exist; expected a SAM checkpoint file "
                              "such as sam_vit_b_01ec64.pth (https://github.com/facebookresearch/segment-anything#model-checkpoints).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-tensor file: name it, no traceback
        raise CheckpointError(f"model.checkpoint: {path} could not be read as a weights-only PyTorch "
                              f"state dict ({err.__class__.__name__}: {(str(err).splitlines() or [''])[0][:200]}).") from None
    load_state_strict(sam, state, str(path))


def _build(cfg: ModelConfig, wrapper: type[SamSegmenter], family: str, weights_file: str | None,
           weights: bool = True) -> SamSegmenter:
    if cfg.variant not in SAM_VARIANTS:
        raise ConfigError(f"model.variant: {family} has no variant {cfg.variant!r}; expected one of {', '.join(SAM_VARIANTS)}")
    spec = SAM_VARIANTS[cfg.variant]
    if weights and cfg.checkpoint is None and spec.checkpoint_file is not None:
        # Before building: a vit_h costs seconds and gigabytes just to be refused.
        raise ConfigError(f"model.checkpoint: {family} {cfg.variant} needs its weights; set model.checkpoint "
                          f"to the path of {weights_file or spec.checkpoint_file}.")
    sam = build_sam_modules(spec)
    if weights and cfg.checkpoint is not None:
        _load_official(sam, Path(cfg.checkpoint))
    model = wrapper(sam)
    if cfg.freeze_policy == "adapter":
        model.adapters = add_adapters(sam)  # after loading: the official keys know no adapters
    return model


def build_sam(cfg: ModelConfig, *, weights: bool = True) -> SamSegmenter:
    """SAM: `vit_b`/`vit_l`/`vit_h` from the official checkpoint files (weights only), or `tiny`.
    `weights=False`: the architecture alone, no file read (a full state dict loads over it)."""
    return _build(cfg, SamSegmenter, "SAM", None, weights)


def build_medsam(cfg: ModelConfig, *, weights: bool = True) -> SamSegmenter:
    """MedSAM: a SAM vit_b with `medsam_vit_b.pth` (a plain SAM state dict), or `tiny`."""
    if cfg.variant not in ("vit_b", "tiny"):
        raise ConfigError(f"model.variant: MedSAM has variants vit_b and tiny, not {cfg.variant!r}")
    return _build(cfg, MedSamSegmenter, "MedSAM", "medsam_vit_b.pth", weights)
