"""PA-SAM (Xie et al., "PA-SAM: Prompt Adapter SAM for High-Quality Image Segmentation", ICME
2024), following the authors' released implementation (github.com/xzz2/pa-sam), so that the
released decoder checkpoint loads strictly. That repository carries no licence: only facts
(module and parameter names, shapes, constants, the order of operations) are taken from it; the
code here is segtune's own.

PA-SAM keeps SAM's image encoder and prompt encoder and replaces SAM's mask decoder with a PA
decoder: SAM's decoder (same names and shapes) plus

- `guiding_conv`: the encoder's input image (SAM-normalised, padded), resized to four times
  the embedding grid (256x256 for the 1024 models), with a fourth channel: OpenCV's Canny
  edges (thresholds 10 and 100) of that image cast to uint8, divided by 255. Two stride-2
  2x2 convolutions with LayerNorm2d and GELU and a 1x1 convolution bring it to the embedding
  grid and width: the guiding embedding.
- `prompt_adapter`, run inside the second block of SAM's two-way transformer, beside that
  block's token-to-image attention (its output is added to that attention's): the block's
  image tokens are multiplied by the guiding embedding, the prompt tokens attend to the
  product (`cross_attn_token_to_image`), and the attended mask token (mask token 0) with a
  learned token each (`static_uncertain_token`, `static_refined_token`) goes through
  `uncertain_mlp` and `refined_mlp` to an uncertain token and a refined token. Their dot
  products with the guided image tokens give an uncertainty map, a refined mask and (from the
  mask token itself) a coarse mask; the uncertainty-gated mask takes the refined mask where
  the uncertainty is at least 0.5 and the coarse one elsewhere. The refined token takes the
  mask token's place, and four positive and four negative hard points are sampled where the
  uncertainty times the refined-minus-coarse probability is highest and lowest (top-k at
  evaluation, a straight-through Gumbel top-k in training); each becomes a new token (its
  content: the image token plus the guided token there; its position: the prompt encoder's
  positional encoding there plus its positive or negative point embedding), appended for the
  rest of the transformer. The guided image tokens are also added to the block's image
  tokens.
- The predicted mask is the mask-token-0 output of SAM's upscaling and hypernetwork head, as
  in the released evaluation (`multimask_output=False`).

The decoder reads the image, so only `forward`/`decode_with_images` decode; it does not read
the ViT's intermediate features (the released code passes them in but never uses them), so the
encoder's output is cached like SAM's. PA-SAM's own modules start from PyTorch's default
initialisation (as in the released training), so an untrained PA-SAM does not predict what its
SAM does. What still differs from the released code is listed in the README (Models).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import Attention
from torch import nn

from segtune.config import ModelConfig
from segtune.errors import CheckpointError, ConfigError
from segtune.models.base import load_state_strict
from segtune.models.sam import SamSegmenter, _build
from segtune.prompts import PromptBatch

#: Hard points sampled by the adapter, of each sign.
SAMPLE_POINTS = 4
#: The two-way transformer block (0-based) whose token-to-image attention the adapter joins.
ADAPTER_BLOCK = 1
#: cv2.Canny's thresholds in the released code.
CANNY_LOW, CANNY_HIGH = 10, 100
#: The released checkpoint's name (PA-SAM-L over sam_vit_l_0b3195.pth, README of xzz2/pa-sam).
RELEASED_FILE = "epoch_20.pth"

# Sobel's x kernel (cross-correlation: right minus left); its transpose gives y.
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
# tan(22.5 degrees) in OpenCV's 15-bit fixed point.
_TAN22_Q15 = round(0.4142135623730950 * (1 << 15))


def canny_edges(image: torch.Tensor, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> torch.Tensor:
    """OpenCV's `Canny(image, low, high)` (3x3 Sobel, L1 magnitude) on `(B,C,H,W)` integer
    values 0..255: `(B,1,H,W)` bool edges.

    As OpenCV does: Sobel with replicated borders; with several channels, each pixel takes the
    channel of largest magnitude (the first on ties); non-maximum suppression along the
    gradient's sector (horizontal, vertical or diagonal, OpenCV's fixed-point tests and its mix
    of strict and non-strict comparisons), zero magnitude outside the image; pixels above
    `high` are edges, and edges grow through 8-connected surviving pixels above `low`.
    """
    b, c, h, w = image.shape
    x = F.pad(image.detach().float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor(_SOBEL_X, device=x.device)
    dx = F.conv2d(x, kx.view(1, 1, 3, 3)).round().long().view(b, c, h, w)
    dy = F.conv2d(x, kx.t().reshape(1, 1, 3, 3)).round().long().view(b, c, h, w)
    mag = dx.abs() + dy.abs()
    best = mag.argmax(dim=1, keepdim=True)
    dx, dy, mag = (t.gather(1, best)[:, 0] for t in (dx, dy, mag))
    padded = F.pad(mag, (1, 1, 1, 1))

    def shifted(di: int, dj: int) -> torch.Tensor:
        return padded[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    ax, ay = dx.abs(), dy.abs() * (1 << 15)
    tan22 = ax * _TAN22_Q15
    tan67 = tan22 + ax * (1 << 16)
    across = ay < tan22
    along = ~across & (ay > tan67)
    same_sign = (dx < 0) == (dy < 0)
    peak_h = (mag > shifted(0, -1)) & (mag >= shifted(0, 1))
    peak_v = (mag > shifted(-1, 0)) & (mag >= shifted(1, 0))
    peak_d = torch.where(same_sign,
                         (mag > shifted(-1, -1)) & (mag > shifted(1, 1)),
                         (mag > shifted(-1, 1)) & (mag > shifted(1, -1)))
    peak = torch.where(across, peak_h, torch.where(along, peak_v, peak_d)) & (mag > low)
    edges = peak & (mag > high)
    while True:  # hysteresis: grow a few steps between checks
        grown = edges
        for _ in range(4):
            grown = peak & (F.max_pool2d(grown[:, None].float(), 3, 1, 1)[:, 0] > 0)
        if torch.equal(grown, edges):
            return edges[:, None]
        edges = grown


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float -> 0..255 as numpy's `astype(np.uint8)` does on x86 for values within +-2^31:
    truncation toward zero, then modulo 256 (the released code casts the normalised image)."""
    return torch.remainder(torch.trunc(x.float()), 256)


class AdapterMaps(NamedTuple):
    """The adapter's maps on the embedding grid, `(1,1,g,g)` each (the released training's
    auxiliary losses read them; segtune's loop trains on the final mask only)."""

    uncertainty: torch.Tensor
    coarse: torch.Tensor
    refined: torch.Tensor
    gated: torch.Tensor


class PromptAdapter(nn.Module):
    """The prompt adapter: parameter names and shapes as the released `prompt_adapter`."""

    def __init__(self, dim: int, heads: int, attention_downsample: int = 2):
        super().__init__()
        self.static_uncertain_token = nn.Embedding(1, dim)
        self.static_refined_token = nn.Embedding(1, dim)
        self.uncertain_mlp = MLP(2 * dim, dim // 4, dim, 3)
        self.refined_mlp = MLP(2 * dim, dim // 4, dim, 3)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample_rate=attention_downsample)

    def forward(self, queries: torch.Tensor, query_pe: torch.Tensor, keys: torch.Tensor,
                key_pe: torch.Tensor, guide: torch.Tensor, prompt_encoder: PromptEncoder,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AdapterMaps]:
        """Tokens `(1,N,C)` with their PE, image tokens `(1,HW,C)` with theirs, the guiding
        embedding as tokens `(1,HW,C)` -> (what to add to the block's token-to-image attention,
        `(1,N+2k,C)`; what to add to its image tokens; the new query PE; the maps)."""
        guided = guide * keys
        out = self.cross_attn_token_to_image(q=queries + query_pe, k=guided + key_pe, v=guided)
        mask_token = out[:, 1]
        n = mask_token.shape[0]
        uncertain = self.uncertain_mlp(
            torch.cat([self.static_uncertain_token.weight.expand(n, -1), mask_token], dim=-1))
        refined_token = self.refined_mlp(
            torch.cat([self.static_refined_token.weight.expand(n, -1), mask_token], dim=-1))
        features = guided.transpose(1, 2)  # (1, C, HW)
        uncertainty = torch.sigmoid(uncertain[:, None] @ features)[:, 0]  # (1, HW)
        refined = (refined_token[:, None] @ features)[:, 0]
        coarse = (mask_token[:, None] @ features)[:, 0]
        gated = torch.where((uncertainty >= 0.5).detach(), refined, coarse)
        out = torch.cat([out[:, :1], refined_token[:, None], out[:, 2:]], dim=1)

        score = uncertainty * (torch.sigmoid(refined) - torch.sigmoid(coarse))
        position = prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)  # (1, HW, C)
        content = keys + guided
        pos_pe, pos_content = self.pick(score, position, content)
        neg_pe, neg_content = self.pick(-score, position, content)
        labels = prompt_encoder.point_embeddings  # 0: negative point, 1: positive point
        query_pe = torch.cat(
            [query_pe, pos_pe + labels[1].weight, neg_pe + labels[0].weight], dim=1)
        out = torch.cat([out, pos_content, neg_content], dim=1)

        g = math.isqrt(uncertainty.shape[-1])
        maps = AdapterMaps(*(m.view(-1, 1, g, g) for m in (uncertainty, coarse, refined, gated)))
        return out, guided, query_pe, maps

    def pick(self, score: torch.Tensor, position: torch.Tensor, content: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `SAMPLE_POINTS` highest-scoring grid cells' PE and content `(1,k,C)` each, in
        raster order: plain top-k at evaluation; in training a Gumbel top-k whose
        straight-through weights (1 in value) carry the gradient back to the score."""
        k = min(SAMPLE_POINTS, score.shape[-1])
        if self.training:
            weights = gumbel_topk(score, k)
            index = weights.detach().topk(k, dim=-1).indices.sort(dim=-1).values
            w = weights.gather(1, index)[..., None]
        else:
            index = score.topk(k, dim=-1).indices.sort(dim=-1).values
            w = torch.ones(*index.shape, 1, device=score.device, dtype=content.dtype)
        rows = index[..., None].expand(-1, -1, content.shape[-1])
        return position.gather(1, rows) * w, content.gather(1, rows) * w


def gumbel_topk(score: torch.Tensor, k: int, tau: float = 1.0) -> torch.Tensor:
    """A k-hot `(B,N)` of the top k of `score` plus Gumbel noise, with the gradient of the sum of
    k successive softmaxes (each with the mass already taken masked out): straight-through."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand_like(score).clamp(tiny, 1.0 - torch.finfo(score.dtype).eps)
    logits = score - torch.log(-torch.log(u))
    soft = torch.zeros_like(score)
    taken = torch.zeros_like(score)
    for _ in range(k):
        logits = logits + torch.log((1.0 - taken).clamp(min=tiny))
        taken = F.softmax(logits / tau, dim=-1)
        soft = soft + taken
    hard = torch.zeros_like(soft).scatter_(1, soft.topk(k, dim=-1).indices, 1.0)
    return hard - soft.detach() + soft


class PaMaskDecoder(MaskDecoder):
    """SAM's mask decoder with `guiding_conv` and `prompt_adapter`: its state dict has the names
    and shapes of the released PA decoder (`MaskDecoderPA`) for the same width."""

    def __init__(self, *, transformer_dim: int, transformer: TwoWayTransformer,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256):
        super().__init__(transformer_dim=transformer_dim, transformer=transformer,
                         num_multimask_outputs=num_multimask_outputs, iou_head_depth=iou_head_depth,
                         iou_head_hidden_dim=iou_head_hidden_dim)
        d = transformer_dim
        self.guiding_conv = nn.Sequential(
            nn.Conv2d(4, d // 4, kernel_size=2, stride=2), LayerNorm2d(d // 4), nn.GELU(),
            nn.Conv2d(d // 4, d, kernel_size=2, stride=2), LayerNorm2d(d), nn.GELU(),
            nn.Conv2d(d, d, kernel_size=1),
        )
        self.prompt_adapter = PromptAdapter(d, transformer.num_heads)

    @classmethod
    def over(cls, decoder: MaskDecoder) -> PaMaskDecoder:
        """A PA decoder holding `decoder`'s weights (SAM's part), PA-SAM's own modules fresh."""
        t = decoder.transformer
        pa = cls(transformer_dim=decoder.transformer_dim,
                 transformer=TwoWayTransformer(depth=t.depth, embedding_dim=t.embedding_dim,
                                               num_heads=t.num_heads, mlp_dim=t.mlp_dim),
                 num_multimask_outputs=decoder.num_multimask_outputs,
                 iou_head_depth=decoder.iou_prediction_head.num_layers,
                 iou_head_hidden_dim=decoder.iou_prediction_head.layers[0].out_features)
        result = pa.load_state_dict(decoder.state_dict(), strict=False)
        assert not result.unexpected_keys
        assert all(k.startswith(("guiding_conv.", "prompt_adapter.")) for k in result.missing_keys)
        return pa

    def trainable_in_adapter_policy(self) -> list[nn.Parameter]:
        """What the released training trains: PA-SAM's modules, and of SAM's decoder the mask
        tokens, the upscaling and the hypernetwork MLPs."""
        parts = (self.guiding_conv, self.prompt_adapter, self.output_upscaling,
                 self.output_hypernetworks_mlps)
        return [p for m in parts for p in m.parameters()] + [self.mask_tokens.weight]

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                guide_image: torch.Tensor, prompt_encoder: PromptEncoder,
                ) -> tuple[torch.Tensor, torch.Tensor, AdapterMaps]:
        """One image `(1,C,h,w)` and one prompt -> (mask-token-0 logits `(1,1,4h,4w)`, the IoU
        head's prediction for it `(1,1)`, the adapter's maps). `guide_image`: `(1,4,4h,4w)`."""
        b, c, h, w = image_embeddings.shape
        guide = self.guiding_conv(guide_image).flatten(2).transpose(1, 2)
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)[None]
        tokens = torch.cat([out_tokens.expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        hs, keys, maps = self._two_way(src, image_pe, tokens, guide, prompt_encoder)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])
        masks = (hyper[:, None] @ upscaled.flatten(2)).view(b, 1, *upscaled.shape[-2:])
        iou = self.iou_prediction_head(hs[:, 0])[:, :1]
        return masks, iou, maps

    def _two_way(self, src: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
                 guide: torch.Tensor, prompt_encoder: PromptEncoder,
                 ) -> tuple[torch.Tensor, torch.Tensor, AdapterMaps]:
        """SAM's TwoWayTransformer forward, with the prompt adapter in block ADAPTER_BLOCK."""
        tf = self.transformer
        keys = src.flatten(2).transpose(1, 2)
        key_pe = pos.flatten(2).transpose(1, 2)
        queries, query_pe = tokens, tokens
        maps = None
        for index, block in enumerate(tf.layers):
            if block.skip_first_layer_pe:
                queries = block.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + block.self_attn(q=q, k=q, v=queries)
            queries = block.norm1(queries)
            attended = block.cross_attn_token_to_image(
                q=queries + query_pe, k=keys + key_pe, v=keys)
            if index == ADAPTER_BLOCK:
                extra, guided, query_pe, maps = self.prompt_adapter(
                    queries, query_pe, keys, key_pe, guide, prompt_encoder)
                grow = extra.shape[1] - attended.shape[1]  # the sampled points: zeros so far
                attended = F.pad(attended, (0, 0, 0, grow)) + extra
                queries = F.pad(queries, (0, 0, 0, grow))
                keys = keys + guided
            queries = block.norm2(queries + attended)
            queries = block.norm3(queries + block.mlp(queries))
            q, k = queries + query_pe, keys + key_pe
            keys = block.norm4(keys + block.cross_attn_image_to_token(q=k, k=q, v=queries))
        q, k = queries + query_pe, keys + key_pe
        queries = tf.norm_final_attn(queries + tf.final_attn_token_to_image(q=q, k=k, v=keys))
        assert maps is not None, "the two-way transformer has fewer blocks than PA-SAM needs"
        return queries, keys, maps


class PaSamSegmenter(SamSegmenter):
    """SAM's image and prompt encoders with the PA decoder (`sam.mask_decoder`)."""

    policies = ("adapter", "full")

    def __init__(self, sam: Sam):
        super().__init__(sam)
        if not isinstance(sam.mask_decoder, PaMaskDecoder):
            sam.mask_decoder = PaMaskDecoder.over(sam.mask_decoder)
        self.grid = sam.prompt_encoder.image_embedding_size[0]

    @property
    def decoder(self) -> PaMaskDecoder:
        return self.sam.mask_decoder

    def trainable_parameters(self, policy: str) -> list[nn.Parameter]:
        if policy == "adapter":
            return self.decoder.trainable_in_adapter_policy()
        if policy == "full":
            return list(self.parameters())
        raise ConfigError(f"model.train: PA-SAM has no policy {policy!r}; "
                          f"expected one of {', '.join(self.policies)}")

    def guide_images(self, images: torch.Tensor) -> torch.Tensor:
        """The guiding convolution's input `(B,4,4g,4g)`: the encoder's input (normalised,
        padded) resized to four times the embedding grid, and its Canny edges in [0, 1]."""
        side = 4 * self.grid
        x = F.interpolate(self.preprocess(images), (side, side), mode="bilinear",
                          align_corners=False)
        with torch.no_grad():
            edges = canny_edges(as_uint8(x))
        return torch.cat([x, edges.to(x.dtype)], dim=1)

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch,
               size: tuple[int, int]) -> torch.Tensor:
        raise RuntimeError("PA-SAM decodes from the image too: call the model, not decode()")

    def decode_with_images(self, embeddings: torch.Tensor, images: torch.Tensor,
                           prompts: PromptBatch) -> torch.Tensor:
        """Decode (possibly cached) embeddings, one image at a time, with the image beside them."""
        size = tuple(images.shape[-2:])
        sx, sy, resized = self.geometry(*size)
        guide = self.guide_images(images)
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        lows = []
        for i in range(embeddings.shape[0]):
            points, boxes = self.scaled_prompts(prompts, i, sx, sy)
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            low, _, _ = self.decoder(embeddings[i : i + 1], dense_pe, sparse, dense,
                                     guide[i : i + 1], self.sam.prompt_encoder)
            lows.append(low)
        return self.postprocess(torch.cat(lows), resized, size)


def _read_release(path: Path, decoder: PaMaskDecoder, variant: str) -> None:
    """Load a PA decoder state dict (what the released train.py saves: the decoder's flat state
    dict, `net.module.state_dict()`) strictly into `decoder`."""
    width = decoder.transformer_dim
    expected = (f"the flat state dict that PA-SAM's train.py saves for its decoder "
                f"({len(decoder.state_dict())} tensors: SAM's {width}-wide mask decoder, "
                f"guiding_conv.* and prompt_adapter.*), such as the released PA-SAM-L "
                f"{RELEASED_FILE} for variant vit_l (README of github.com/xzz2/pa-sam)")
    if not path.is_file():
        raise CheckpointError(f"model.adapter_checkpoint: {path} does not exist; "
                              f"expected {expected}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-tensor file: name it, no traceback
        first = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(f"model.adapter_checkpoint: {path} could not be read as a "
                              f"weights-only PyTorch state dict ({err.__class__.__name__}: "
                              f"{first}); expected {expected}.") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"model.adapter_checkpoint: {path} holds a "
                              f"{type(state).__name__}, not a state dict of tensors; "
                              f"expected {expected}.")
    hint = ""
    if any(k.startswith("image_encoder.") for k in state):
        hint = " It looks like a whole SAM checkpoint, which belongs in model.checkpoint."
    try:
        load_state_strict(decoder, state, str(path))
    except CheckpointError as err:
        detail = str(err).removeprefix(f"{path}: ")
        raise CheckpointError(f"model.adapter_checkpoint: {path} is not a PA-SAM decoder "
                              f"checkpoint for variant {variant}: {detail}{hint} "
                              f"Expected {expected}."
                              ) from None


def build_pasam(cfg: ModelConfig, *, weights: bool = True) -> PaSamSegmenter:
    """PA-SAM over a SAM variant: `model.checkpoint` is the SAM weights (the released PA-SAM-L
    sits on sam_vit_l_0b3195.pth), `model.adapter_checkpoint` the released PA decoder, loaded
    strictly over SAM's decoder; `tiny` needs neither."""
    # No encoder adapters: PA-SAM's adapter is in its decoder.
    base = cfg.model_copy(update={"train": "mask_decoder"})
    sam = _build(base, SamSegmenter, "PA-SAM", None, weights).sam
    sam.mask_decoder = PaMaskDecoder.over(sam.mask_decoder)
    if weights and cfg.adapter_checkpoint is not None:
        _read_release(Path(cfg.adapter_checkpoint), sam.mask_decoder, cfg.variant)
    return PaSamSegmenter(sam)
