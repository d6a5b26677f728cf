"""Benchmark 3: a decoder-only training step on a cached embedding vs one that runs the encoder.

SAM vit_b (random weights, fp32, CPU, 1 image of 1024x1024; goal >=30x) and CLIPSeg with a
ViT-B/16 vision tower at 352x352 (random weights; goal >=10x). Each side takes one untimed
warm-up step first. Few steps: a vit_b encoder pass alone takes ~10+ s on 2 CPU cores.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import verdict
from segtune.cache import decode_cached
from segtune.losses import LOSSES
from segtune.prompts import PromptBatch


def step_times(model, images: torch.Tensor, prompts: PromptBatch, mask: torch.Tensor, cached_steps: int = 3) -> tuple[float, float]:
    """Seconds per training step with the encoder, and per step on the cached embedding."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = LOSSES["dice"]
    model.train()

    def step(logits: torch.Tensor) -> None:
        loss_fn(logits, mask).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Both sides warm up alike (first-call allocations, kernel selection) before one is timed.
    step(model(images, prompts))
    t = time.perf_counter()
    step(model(images, prompts))  # the uncached path: encoder (no grad needed) + decoder
    full = time.perf_counter() - t
    with torch.no_grad():
        # Batch-first and through fp16, as the cache stores it.
        emb = model.encode(images).movedim(model.embedding_batch_axis, 0).half().float()
    step(decode_cached(model, emb, images, prompts))  # warm-up
    t = time.perf_counter()
    for _ in range(cached_steps):
        step(decode_cached(model, emb, images, prompts))
    return full, (time.perf_counter() - t) / cached_steps


def sam_vit_b() -> None:
    from segtune.models.sam import SAM_VARIANTS, SamSegmenter, build_sam_modules

    torch.manual_seed(0)
    model = SamSegmenter(build_sam_modules(SAM_VARIANTS["vit_b"]))
    model.set_policy("mask_decoder")
    images = torch.randint(0, 255, (1, 3, 1024, 1024), dtype=torch.uint8)
    prompts = PromptBatch(points=torch.tensor([[[512.0, 512.0]]]), labels=torch.tensor([[1]]))
    mask = torch.zeros(1, 1, 1024, 1024)
    mask[..., 400:600, 400:600] = 1
    full, cached = step_times(model, images, prompts, mask, cached_steps=2)
    print(f"SAM vit_b, 1 image 1024^2: step with encoder {full:.2f}s, on cached embedding {cached:.3f}s")
    verdict("cache step SAM vit_b", full / cached, ">=30x", full / cached >= 30)


def clipseg_b16() -> None:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from segtune.models.clipseg import TINY_TOKENIZER, ClipSegSegmenter, _tokenizer

    torch.manual_seed(0)
    # CIDAS/clipseg-rd64-refined's shape: ViT-B/16 at 352, reduce_dim 64; random weights.
    conf = CLIPSegConfig(vision_config=dict(patch_size=16, image_size=352), reduce_dim=64)
    model = ClipSegSegmenter(CLIPSegForImageSegmentation(conf), _tokenizer(TINY_TOKENIZER), 352)
    model.set_policy("decoder")
    images = torch.randint(0, 255, (2, 3, 352, 352), dtype=torch.uint8)
    prompts = PromptBatch(texts=["mitochondria", "mitochondria"])
    mask = torch.zeros(2, 1, 352, 352)
    mask[..., 100:200, 100:200] = 1
    # Fill the text memo first: in a run it is filled once, so neither timed side should pay for
    # the text tower (counting it on the encoder side only would inflate the ratio).
    model.text_embeddings(list(prompts.texts), images.device)
    full, cached = step_times(model, images, prompts, mask)
    print(f"CLIPSeg ViT-B/16, 2 images 352^2: step with encoder {full:.3f}s, on cached activations {cached:.3f}s")
    verdict("cache step CLIPSeg B/16", full / cached, ">=10x", full / cached >= 10)


if __name__ == "__main__":
    torch.set_num_threads(2)
    clipseg_b16()
    sam_vit_b()
