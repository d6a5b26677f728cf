"""The interface every model family implements, and strict state-dict loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from segtune.errors import CheckpointError
from segtune.prompts import PromptBatch


class Segmenter(nn.Module):
    """Images + prompts in, mask logits `(B,1,H,W)` at the input size out.

    Subclasses implement `encode` (the image encoder, cacheable when frozen), `decode` (prompt
    encoder + mask decoder on encoder output) and `trainable_parameters(policy)`. A family
    whose `encode` output the embedding cache (segtune.cache) may keep sets
    `cacheable_encoder` and answers the cache's questions: `encoder_state`, `encoder_trains`,
    `embedding_batch_axis`, and the preprocessing in `image_size` and `keep_aspect`.
    """

    policies: tuple[str, ...] = ()
    #: The side of the square image the encoder takes.
    image_size: int
    #: True when the input's aspect is kept (resize the long side, pad); False: resized square.
    keep_aspect: bool = False
    #: True when `encode(images)` may be computed once and reused while the encoder is frozen.
    cacheable_encoder: bool = False
    #: The batch axis of what `encode` returns (CLIPSeg stacks its layers first).
    embedding_batch_axis: int = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch, size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self, policy: str) -> list[nn.Parameter]:
        """The parameters a freeze policy (`model.train` in the YAML) leaves trainable."""
        raise NotImplementedError

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """Everything `encode` reads besides the image: the encoder's weights and pixel
        statistics (the embedding cache's key hashes them)."""
        raise NotImplementedError(f"{type(self).__name__} has no cacheable encoder")

    def encoder_trains(self) -> bool:
        """True when some parameter the encoder pass uses trains under the current policy."""
        raise NotImplementedError(f"{type(self).__name__} has no cacheable encoder")

    def forward(self, images: torch.Tensor, prompts: PromptBatch,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits `(B,1,H,W)`. Given `embeddings` (what `encode(images)` returns, e.g. from
        the embedding cache) the encoder is skipped. Training calls this, never `decode`
        directly, so a DDP wrapper sees the step and averages gradients across workers."""
        if embeddings is None:
            embeddings = self.encode(images)
        return self.decode_with_images(embeddings, images, prompts)

    def decode_with_images(self, embeddings: torch.Tensor, images: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """Decode; a model whose decoder also reads the image (PA-SAM) overrides this."""
        return self.decode(embeddings, prompts, tuple(images.shape[-2:]))

    def set_policy(self, policy: str) -> list[nn.Parameter]:
        """Freeze everything but the freeze policy's trainable parameters; return those."""
        trainable = self.trainable_parameters(policy)
        ids = {id(p) for p in trainable}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)
        return trainable

    def save_assets(self, folder: Path) -> None:
        """Write the files besides the weights that rebuild this model's architecture (CLIPSeg:
        its HF config and tokenizer); the families whose architecture the config alone names
        (SAM, MedSAM, PA-SAM) write none."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores: the parameters that train under the current policy."""
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      only: set[str] | None = None) -> None:
    """Load `state` into `module`, failing with the missing/unexpected keys named.

    With `only`, the state must hold exactly those keys (a partial checkpoint of trainable
    weights); otherwise it must match the module's whole state dict.
    """
    own = module.state_dict()
    expected = set(own) if only is None else only
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shape_bad = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape_bad:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({show(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({show(unexpected)})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} keys of another shape ({show(shape_bad)})")
        raise CheckpointError(f"{source}: the checkpoint does not fit {module.__class__.__name__}: "
                              + "; ".join(parts) + ". Is it a checkpoint for another model or variant?")
    module.load_state_dict(dict(state), strict=only is None)
