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
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

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


class SamSegmenter(Segmenter):
    """SAM with batched training-friendly calls: images + point/box prompts -> mask logits."""

    policies = ("full", "mask_decoder")

    def __init__(self, sam: Sam):
        super().__init__()
        self.sam = sam
        self.image_size = sam.image_encoder.img_size

    def parameter_groups(self, policy: str) -> list[nn.Parameter]:
        if policy == "full":
            return list(self.sam.parameters())
        if policy == "mask_decoder":
            return list(self.sam.mask_decoder.parameters())
        raise ConfigError(f"model.train: SAM has no policy {policy!r}; expected one of {', '.join(self.policies)}")

    def _resize_scale(self, h: int, w: int) -> float:
        return self.image_size / max(h, w)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8-range images `(B,C,H,W)` -> SAM input: longest side resized, normalised, padded."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self._resize_scale(h, w)
        if scale != 1.0:
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        return F.pad(x, (0, self.image_size - x.shape[-1], 0, self.image_size - x.shape[-2]))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(self.preprocess(images))

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch, size: tuple[int, int]) -> torch.Tensor:
        scale = self._resize_scale(*size)
        scaled = (round(size[0] * scale), round(size[1] * scale))
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        out = []
        # SAM's decoder pairs one image with many prompts; a training batch is many images with
        # one prompt each, so decode image by image.
        for i in range(embeddings.shape[0]):
            points = None
            if prompts.points is not None:
                points = (prompts.points[i : i + 1] * scale, prompts.labels[i : i + 1])
            boxes = None if prompts.boxes is None else prompts.boxes[i : i + 1] * scale
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, _ = self.sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1], image_pe=dense_pe,
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            out.append(low_res)
        low = torch.cat(out)
        masks = F.interpolate(low, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : scaled[0], : scaled[1]]
        return F.interpolate(masks, size, mode="bilinear", align_corners=False)


def _load_official(sam: Sam, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: {path} does not exist; expected a SAM checkpoint file "
                              "such as sam_vit_b_01ec64.pth (https://github.com/facebookresearch/segment-anything#model-checkpoints).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-tensor file: name it, no traceback
        raise CheckpointError(f"model.checkpoint: {path} could not be read as a weights-only PyTorch "
                              f"state dict ({err.__class__.__name__}: {str(err).splitlines()[0][:200]}).") from None
    load_state_strict(sam, state, str(path))


def build_sam(variant: str, checkpoint: str | None = None) -> SamSegmenter:
    """Build a SAM variant; the official variants load `checkpoint` (weights only)."""
    if variant not in SAM_VARIANTS:
        raise ConfigError(f"model.variant: SAM has no variant {variant!r}; expected one of {', '.join(SAM_VARIANTS)}")
    spec = SAM_VARIANTS[variant]
    sam = build_sam_modules(spec)
    if checkpoint is not None:
        _load_official(sam, Path(checkpoint))
    elif spec.checkpoint_file is not None:
        raise ConfigError(f"model.checkpoint: SAM {variant} needs its weights; set model.checkpoint to the "
                          f"path of {spec.checkpoint_file}.")
    return SamSegmenter(sam)
