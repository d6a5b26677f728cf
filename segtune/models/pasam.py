"""PA-SAM: a frozen SAM with a trainable prompt adapter in its mask decoder.

Written from the paper (Xie et al., "PA-SAM: Prompt Adapter SAM for High-Quality Image
Segmentation", ICME 2024), as the thesis summarises it; the reference code has no licence and
runs only on GPU, so nothing is taken from it. SAM's image encoder, prompt encoder and mask
decoder stay frozen; what trains (`train: adapter`) is:

- dense prompt compensation: the image and its gradient (Sobel magnitude) go through a small
  conv stack down to the embedding grid, then cross-attend to SAM's image embedding; the result
  is added to the dense prompt embedding;
- sparse prompt optimisation: the sparse prompt tokens cross-attend to the image embedding and
  are refined by the result;
- refined and uncertain tokens: two extra tokens run through SAM's two-way transformer beside
  the prompts; the refined token predicts a second mask, the uncertain token a map of where SAM's
  own mask is unreliable, and the final mask takes the refined prediction there;
- trainable upsampling: the low-resolution mask is upsampled and corrected by a small conv net
  that sees the full-resolution image and its gradient.

Every branch's last layer starts at zero (the uncertainty map near zero), so an untrained
PA-SAM predicts what its SAM does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from segtune.config import ModelConfig
from segtune.errors import ConfigError
from segtune.models.sam import SamSegmenter, _build
from segtune.prompts import PromptBatch


def image_and_gradient(images: torch.Tensor) -> torch.Tensor:
    """Grey level in [0,1] and its Sobel gradient magnitude: `(B,2,H,W)`."""
    grey = images.float().mean(dim=1, keepdim=True) / 255.0
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=grey.device).view(1, 1, 3, 3)
    gx = F.conv2d(grey, kx, padding=1)
    gy = F.conv2d(grey, kx.transpose(2, 3), padding=1)
    return torch.cat([grey, torch.sqrt(gx**2 + gy**2 + 1e-12)], dim=1)


def _zero(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


class PromptAdapter(nn.Module):
    """The trainable part of PA-SAM (see the module docstring)."""

    def __init__(self, dim: int, grid: int, heads: int = 2):
        super().__init__()
        self.grid = grid
        self.detail = nn.Sequential(
            nn.Conv2d(2, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1),
        )
        self.dense_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dense_out = _zero(nn.Linear(dim, dim))
        self.sparse_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.sparse_out = _zero(nn.Linear(dim, dim))
        self.extra_tokens = nn.Embedding(2, dim)  # 0: refined, 1: uncertain
        self.refined_mlp = MLP(dim, dim, dim // 8, 3)
        self.uncertain_mlp = MLP(dim, dim, dim // 8, 3)
        _zero(self.uncertain_mlp.layers[-1])
        self.uncertain_bias = nn.Parameter(torch.tensor(-4.0))  # sigmoid(-4) ~ 0.02 at the start
        self.upsample = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), _zero(nn.Conv2d(16, 1, 3, padding=1)))

    def dense(self, detail: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Compensation `(1,C,h,w)` for the dense prompt from image detail and the embedding."""
        q = F.adaptive_avg_pool2d(self.detail(detail), self.grid).flatten(2).transpose(1, 2)
        kv = embedding.flatten(2).transpose(1, 2)
        out, _ = self.dense_attn(q, kv, kv)
        return self.dense_out(out).transpose(1, 2).reshape(embedding.shape)

    def sparse(self, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        kv = embedding.flatten(2).transpose(1, 2)
        out, _ = self.sparse_attn(tokens, kv, kv)
        return tokens + self.sparse_out(out)


class PaSamSegmenter(SamSegmenter):
    policies = ("adapter", "full")

    def __init__(self, sam: Sam):
        super().__init__(sam)
        grid = sam.prompt_encoder.image_embedding_size[0]
        self.adapter = PromptAdapter(sam.prompt_encoder.embed_dim, grid)
        self._detail: torch.Tensor | None = None

    def trainable_parameters(self, policy: str) -> list[nn.Parameter]:
        if policy == "adapter":
            return list(self.adapter.parameters())
        if policy == "full":
            return list(self.parameters())
        raise ConfigError(f"model.train: PA-SAM has no policy {policy!r}; expected one of {', '.join(self.policies)}")

    def decode_with_images(self, embeddings: torch.Tensor, images: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """Decode (possibly cached) embeddings; the adapter needs the image itself beside them."""
        self._detail = image_and_gradient(images)
        try:
            return self.decode(embeddings, prompts, tuple(images.shape[-2:]))
        finally:
            self._detail = None

    def _decode_one(self, emb: torch.Tensor, detail: torch.Tensor, sparse: torch.Tensor,
                    dense: torch.Tensor) -> torch.Tensor:
        """SAM's `predict_masks` for one image, with the adapter's tokens and compensation."""
        dec = self.sam.mask_decoder
        sparse = self.adapter.sparse(sparse, emb)
        dense = dense + self.adapter.dense(detail, emb)
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)[None]
        tokens = torch.cat([out_tokens, sparse, self.adapter.extra_tokens.weight[None]], dim=1)
        hs, src = dec.transformer(emb + dense, self.sam.prompt_encoder.get_dense_pe(), tokens)
        b, c, h, w = emb.shape
        upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w)).flatten(2)
        mask_in = dec.output_hypernetworks_mlps[0](hs[:, 1])  # mask token 0: single-mask output
        masks = mask_in[:, None] @ upscaled
        refined = self.adapter.refined_mlp(hs[:, -2])[:, None] @ upscaled
        uncertain = torch.sigmoid(self.adapter.uncertain_mlp(hs[:, -1])[:, None] @ upscaled + self.adapter.uncertain_bias)
        final = masks + uncertain * (refined - masks)
        return final.reshape(b, 1, 4 * h, 4 * w)

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch, size: tuple[int, int]) -> torch.Tensor:
        if self._detail is None:
            raise RuntimeError("PA-SAM decodes from the image too: call the model, not decode()")
        sx, sy, resized = self.geometry(*size)
        detail_small = F.interpolate(self._detail, (self.image_size // 4,) * 2, mode="bilinear", align_corners=False)
        lows = []
        for i in range(embeddings.shape[0]):
            points, boxes = self.scaled_prompts(prompts, i, sx, sy)
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            lows.append(self._decode_one(embeddings[i : i + 1], detail_small[i : i + 1], sparse, dense))
        up = self.postprocess(torch.cat(lows), resized, size)
        return up + self.adapter.upsample(torch.cat([up, self._detail], dim=1))


def build_pasam(cfg: ModelConfig) -> PaSamSegmenter:
    """PA-SAM over a SAM variant (`model.checkpoint`: the SAM weights), or `tiny`."""
    base = cfg.model_copy(update={"train": "mask_decoder"})  # no encoder adapters: PA-SAM has its own
    sam = _build(base, SamSegmenter, "PA-SAM", None).sam
    return PaSamSegmenter(sam)
